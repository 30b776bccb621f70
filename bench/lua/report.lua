-- Shared by the bench's wrk scripts: done() prints one JSON line that bench/load.py parses.
local report = {}

function report.done(summary, latency, requests)
   local e = summary.errors
   local p = {}
   for _, q in ipairs({50, 90, 99, 99.9}) do
      p[#p + 1] = string.format('"p%s": %d', tostring(q), latency:percentile(q))
   end
   io.write(string.format(
      'BENCH_JSON {"tool": "wrk", "requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"latency_us": {%s, "min": %d, "max": %d, "mean": %.1f}, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}%s}\n',
      summary.requests, summary.duration, summary.bytes, table.concat(p, ", "),
      latency.min, latency.max, latency.mean,
      e.connect, e.read, e.write, e.status, e.timeout, report.extra or ""))
end

return report
