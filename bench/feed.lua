-- wrk script: read the change feed, GET /linked-identities/events with a
-- random `after` in 0 .. BENCH_EVENTS - BENCH_LIMIT and limit BENCH_LIMIT
-- (every answer is a full page). The bearer token comes from wrk's -H.
dofile((os.getenv("BENCH_DIR") or "bench") .. "/report.lua")

local events = tonumber(os.getenv("BENCH_EVENTS") or "1000000")
local limit = tonumber(os.getenv("BENCH_LIMIT") or "100")
local prefix = "/api/admin/users/v4/linked-identities/events?limit=" .. limit .. "&after="
local next_thread = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
   bench_track(thread)
end

function init(args)
   math.randomseed(os.time() * 1000 + thread_id * 7919)
end

function request()
   return wrk.format(nil, prefix .. math.random(0, events - limit))
end

function done(summary, latency, requests)
   bench_report(summary, latency)
end
