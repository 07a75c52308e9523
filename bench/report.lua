-- Shared by the bench/*.lua wrk scripts: one machine-readable result line.
-- Loaded with dofile() from each script (wrk runs them from the repo root,
-- or wherever BENCH_DIR points).
--
-- Prints:
--   BENCH requests=N duration_us=N bytes=N rps=R p50_us=N p99_us=N mean_us=N max_us=N
--         status_errors=N socket_errors=N [non2xx=N statuses=CODE:N,...]
-- status_errors is wrk's own count of responses with status > 399;
-- socket_errors adds up connect/read/write errors and timeouts. Scripts that
-- see every response (write.lua) also report the exact count of non-2xx
-- answers and every status seen.

bench_threads = {}

function bench_track(thread)
   table.insert(bench_threads, thread)
end

function bench_report(summary, latency, extra)
   local e = summary.errors
   local rps = summary.requests / (summary.duration / 1e6)
   io.write(string.format(
      "BENCH requests=%d duration_us=%d bytes=%d rps=%.1f p50_us=%d p99_us=%d mean_us=%d max_us=%d status_errors=%d socket_errors=%d%s\n",
      summary.requests, summary.duration, summary.bytes, rps,
      latency:percentile(50), latency:percentile(99), latency.mean, latency.max,
      e.status, e.connect + e.read + e.write + e.timeout, extra or ""))
end
