-- wrk: the vendor page's example task update, PUT with a JSON body, to the
-- fixed path given on the command line. `done` prints one machine-readable
-- line that run.sh parses (latencies in microseconds).
wrk.method = "PUT"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, "maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", "remark": "API-test", "end_action": 1}'

-- BENCH_USERS (default 1024) user ids are taken in turn, so updates of
-- different users can share a group commit; with 1 every request hits the one
-- path, and taskgate's per-line serialisation makes them queue.
local users = tonumber(os.getenv("BENCH_USERS") or "1024")
local counter = 0
local task = "f232d184-dd54-42a0-8ace-0bf8d660f4cc"
request = function()
  counter = counter + 1
  local u = counter % users
  local path = string.format("/agent-api/user/%08x-0000-4000-8000-%012x/task/%s", u, u, task)
  return wrk.format(nil, path)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f max_us=%d " ..
    "non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
