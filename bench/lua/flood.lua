-- Wrong-password flood: a unique password on every request (no cache can absorb it).
--   BENCH_PATH, BENCH_USER, BENCH_RATE (requests/s for all connections, 0 = unpaced),
--   BENCH_CONNECTIONS (needed to split BENCH_RATE)
package.path = (os.getenv("BENCH_LUA_DIR") or ".") .. "/?.lua;" .. package.path
local report = require("report")

local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(s)
   local out = {}
   for i = 1, #s, 3 do
      local a, b, c = s:byte(i, i + 2)
      local n = a * 65536 + (b or 0) * 256 + (c or 0)
      local c1 = math.floor(n / 262144) % 64
      local c2 = math.floor(n / 4096) % 64
      local c3 = math.floor(n / 64) % 64
      local c4 = n % 64
      out[#out + 1] = chars:sub(c1 + 1, c1 + 1) .. chars:sub(c2 + 1, c2 + 1)
         .. (b and chars:sub(c3 + 1, c3 + 1) or "=") .. (c and chars:sub(c4 + 1, c4 + 1) or "=")
   end
   return table.concat(out)
end

local path = os.getenv("BENCH_PATH") or "/"
local user = os.getenv("BENCH_USER") or "bench"
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local conns = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")
local pause = 0
if rate > 0 then pause = conns * 1000 / rate end

-- Globals, not locals: setup() and done() reach them through thread:set()/thread:get().
threads = {}
setup_count = 0
thread_no = 0
counter = 0
statuses = {}

function setup(thread)
   setup_count = setup_count + 1
   thread:set("thread_no", setup_count)
   threads[#threads + 1] = thread
end

function request()
   counter = counter + 1
   local auth = "Basic " .. b64(user .. ":wrong-" .. thread_no .. "-" .. counter)
   return wrk.format("GET", path, {Authorization = auth})
end

if pause > 0 then
   function delay() return pause end
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

done = function(summary, latency, requests)
   local total = {}
   for _, t in ipairs(threads) do
      for status, n in pairs(t:get("statuses")) do
         total[status] = (total[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(total) do parts[#parts + 1] = string.format('"%d": %d', status, n) end
   report.extra = ', "statuses": {' .. table.concat(parts, ", ") .. '}'
   report.done(summary, latency, requests)
end
