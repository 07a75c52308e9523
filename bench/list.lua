-- wrk script: GET one seeded user's linked identities, a random user from
-- seed-user-0 .. seed-user-(BENCH_USERS-1) per request (the users
-- `linkid seed --links N` creates). The bearer token comes from wrk's -H.
dofile((os.getenv("BENCH_DIR") or "bench") .. "/report.lua")

local users = tonumber(os.getenv("BENCH_USERS") or "10000")
local prefix = "/api/admin/users/v4/users/seed-user-"
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
   return wrk.format(nil, prefix .. math.random(0, users - 1) .. "/linked-identities")
end

function done(summary, latency, requests)
   bench_report(summary, latency)
end
