-- wrk script: the login-time reverse lookup, GET /linked-identities with
-- provider_id and linked_user_id of a random seeded link (`linkid seed`
-- links seed-user-N to seed-remote-N at the Nth linkable provider, round
-- robin; BENCH_PROVIDERS lists them in config order). The bearer token
-- comes from wrk's -H. With BENCH_SEQUENTIAL=1 the links are asked for in
-- seed order instead, over and over (run.sh fills a row cache this way).
dofile((os.getenv("BENCH_DIR") or "bench") .. "/report.lua")

local users = tonumber(os.getenv("BENCH_USERS") or "10000")
local providers = {}
for p in string.gmatch(os.getenv("BENCH_PROVIDERS") or "azure-ad,okta,corporate-saml", "[^,]+") do
   table.insert(providers, p)
end
local prefix = "/api/admin/users/v4/linked-identities?provider_id="
local next_thread = 0
local sequential = os.getenv("BENCH_SEQUENTIAL") == "1"
local counter = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
   bench_track(thread)
end

function init(args)
   math.randomseed(os.time() * 1000 + thread_id * 7919)
end

function request()
   local n
   if sequential then
      n = counter % users
      counter = counter + 1
   else
      n = math.random(0, users - 1)
   end
   return wrk.format(nil, prefix .. providers[(n % #providers) + 1] .. "&linked_user_id=seed-remote-" .. n)
end

function done(summary, latency, requests)
   bench_report(summary, latency)
end
