-- wrk script: the write mix. Each connection links a new user to okta
-- (POST, JSON body) and, once that link is answered 201, some connection of
-- the same thread deletes it (DELETE .../linked-identities/okta). Users and
-- remote ids are unique per request (run id, thread, counter), so every
-- POST must be a 201 and every DELETE a 200; anything else is counted.
-- The bearer token comes from wrk's -H; BENCH_RUN_ID keeps runs apart.
dofile((os.getenv("BENCH_DIR") or "bench") .. "/report.lua")

local run_id = os.getenv("BENCH_RUN_ID") or tostring(os.time())
local prefix = "/api/admin/users/v4/users/"
local next_thread = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
   bench_track(thread)
end

function init(args)
   counter = 0
   created = {}        -- users whose link was answered 201, to delete
   head, tail = 1, 0
   statuses = {}
   posts, deletes = 0, 0
   post_headers = { ["Content-Type"] = "application/json" }
   delete_headers = {}
   for name, value in pairs(wrk.headers) do
      post_headers[name] = value
      delete_headers[name] = value
   end
end

function request()
   if head <= tail then
      local user = created[head]
      created[head] = nil
      head = head + 1
      deletes = deletes + 1
      return wrk.format("DELETE", prefix .. user .. "/linked-identities/okta", delete_headers)
   end
   counter = counter + 1
   posts = posts + 1
   local n = run_id .. "-" .. thread_id .. "-" .. counter
   local body = '{"provider_id":"okta","linked_user_id":"bench-remote-' .. n ..
      '","linked_username":"bench-user-' .. n .. '@example.com"}'
   return wrk.format("POST", prefix .. "bench-user-" .. n .. "/linked-identities",
      post_headers, body)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 201 then
      local location = headers["location"] or headers["Location"] or ""
      local user = location:match("/users/([^/]+)/linked%-identities/okta$")
      if user then
         tail = tail + 1
         created[tail] = user
      else
         statuses["no-location"] = (statuses["no-location"] or 0) + 1
      end
   end
end

function done(summary, latency, requests)
   local total, non2xx, sent_posts, sent_deletes = {}, 0, 0, 0
   for _, thread in ipairs(bench_threads) do
      for code, n in pairs(thread:get("statuses")) do
         total[code] = (total[code] or 0) + n
         if type(code) ~= "number" or code < 200 or code > 299 then
            non2xx = non2xx + n
         end
      end
      sent_posts = sent_posts + thread:get("posts")
      sent_deletes = sent_deletes + thread:get("deletes")
   end
   local list = {}
   for code, n in pairs(total) do
      table.insert(list, tostring(code) .. ":" .. n)
   end
   table.sort(list)
   bench_report(summary, latency, string.format(" non2xx=%d statuses=%s posts=%d deletes=%d",
      non2xx, table.concat(list, ","), sent_posts, sent_deletes))
end
