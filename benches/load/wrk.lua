-- wrk script for benches/load.sh.
-- Sends GET / with an X-API-Key chosen at random from the file named by the
-- KEYS_FILE environment variable (one secret per line). Requests are formatted
-- once in init() so the per-request cost in wrk is a table lookup. With KEY_ORDER=seq the keys
-- go in file order instead, round and round (a warm-up that reaches every key).
-- done() prints one machine-readable line:
--   RESULT requests=N duration_us=N rps=N p50_us=N p90_us=N p99_us=N max_us=N non2xx=N connect_err=N read_err=N write_err=N timeout_err=N

local reqs = {}
local n = 0
local sequential = os.getenv("KEY_ORDER") == "seq"
local next_key = 0

function init(args)
  local path = os.getenv("KEYS_FILE")
  if path == nil or path == "" then
    error("KEYS_FILE is not set")
  end
  local f = assert(io.open(path, "r"))
  for line in f:lines() do
    if line ~= "" then
      n = n + 1
      reqs[n] = wrk.format("GET", "/", { ["X-API-Key"] = line })
    end
  end
  f:close()
  if n == 0 then
    error("no keys in " .. path)
  end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
end

function request()
  if sequential then
    next_key = next_key % n + 1
    return reqs[next_key]
  end
  return reqs[math.random(n)]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d non2xx=%d connect_err=%d read_err=%d write_err=%d timeout_err=%d\n",
    summary.requests, summary.duration,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
