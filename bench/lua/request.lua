-- One fixed request per connection, configured from the environment:
--   BENCH_METHOD (GET), BENCH_PATH (/), BENCH_AUTH (Authorization value), BENCH_BODY_BYTES (0)
package.path = (os.getenv("BENCH_LUA_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.path = os.getenv("BENCH_PATH") or "/"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then
   wrk.headers["Authorization"] = auth
end
local size = tonumber(os.getenv("BENCH_BODY_BYTES") or "0")
if size > 0 then
   wrk.body = string.rep("x", size)
   wrk.headers["Content-Type"] = "application/octet-stream"
end

done = report.done
