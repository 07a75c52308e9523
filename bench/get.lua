-- wrk script: a fixed GET (the URL and -H headers given to wrk), reported
-- in bench/report.lua's format. Used for the baseline and identity providers.
dofile((os.getenv("BENCH_DIR") or "bench") .. "/report.lua")

function setup(thread)
   bench_track(thread)
end

function done(summary, latency, requests)
   bench_report(summary, latency)
end
