-- wrk script: POST one fixed chat request; at the end print the run's figures as one JSON line.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-3f9c2a7e41d05b86c1e9a4f27d3b6058"
-- The request body is bench/chat.json, or the file named by BENCH_BODY.
local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local f = assert(io.open(os.getenv("BENCH_BODY") or (dir .. "chat.json"), "r"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean))
end
