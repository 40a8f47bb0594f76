"""The Lua scripts of the Redis quota backend: each runs atomically inside Redis, on Redis's own
clock (`TIME`), so replicas never race and their clocks never matter for windows.

Keys of one tenant share a hash tag (`prefix:{tenant}:...`), so a cluster keeps them on one node:

    live        ZSET  request key -> reservation deadline (µs): in flight, freed when not refreshed
    res         HASH  request key -> tokens reserved
    reserved    STR   sum of `res` (tokens reserved and not yet settled)
    rpm         ZSET  request key -> admission time (µs): the requests of the last 60 s
    tpm         ZSET  entry -> time (µs); tpm:amt HASH entry -> tokens; tpm:sum STR their sum
    ledgers     HASH  ledger -> "read time|watermark" of the ledger read it was rebuilt from;
                      a ledger missing here: its spend was lost (or never held), rebuild it
    pending:<l> HASH  request key -> spend settled while ledger <l>'s spend was missing
    d:<day>     HASH  t:<ledger> tokens, j:<ledger> joules of that day (tenant's time zone)
    m:<month>   HASH  u:<ledger> USD of that month
    done:<key>  STR   the request was settled (settlement is idempotent)

Redis has no time zones: the caller names the day before, of and after its own clock (and the
same for months) with their boundaries in Unix seconds; the script picks the one that holds
Redis's now. Integers travel as decimal strings (`n`), so microsecond times keep every digit.

A settlement from around a rebuild (older than its ledger read, give or take clock skew) may
already be in the rebuilt sum: the settle script answers `check` and the caller asks the ledger
whether its row was within the read's watermark, then settles it again with the answer.
"""

from __future__ import annotations

_PRELUDE = """
local W = 60000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_s = now / 1000000
local function n(x) return string.format('%.0f', x) end
local function f(x) return string.format('%.17g', x) end
-- which of three consecutive periods holds now: bounds are ARGV[base+1 .. base+4]
local function pick(base)
  if now_s >= tonumber(ARGV[base + 3]) then return 3 end
  if now_s >= tonumber(ARGV[base + 2]) then return 2 end
  return 1
end
-- a day's (tokens, joules) or a month's (usd) over every ledger
local function spent(hkey)
  local flat = redis.call('HGETALL', hkey)
  local a, b = 0, 0
  for i = 1, #flat, 2 do
    local kind = string.sub(flat[i], 1, 2)
    if kind == 'j:' then b = b + tonumber(flat[i + 1]) else a = a + tonumber(flat[i + 1]) end
  end
  return a, b
end
local KEEP_S = 3456000  -- period hashes outlive their period by weeks (40 days in all)
local SKEW_S = 5  -- clock skew allowed between the processes that write one ledger
"""

# KEYS: 1 live, 2 res, 3 reserved, 4 rpm, 5 tpm, 6 tpm:amt, 7 tpm:sum, 8 ledgers,
#       9-11 day hashes (before, of, after the caller's day), 12-14 month hashes
# ARGV: 1 ledger, 2 request key, 3 estimate, 4 capped (0/1), 5 requests/min, 6 tokens/min,
#       7 tokens/day, 8 usd/month, 9 joules/day, 10 max concurrent (0: no limit), 11 TTL (µs),
#       12-15 day bounds (s), 16-19 month bounds (s)
# -> {'rebuild'} | {'ok', day index, now}
#    | {'limited', limit, wait µs, used, requests, requests reset µs, tokens, tokens reset µs, now}
#    | {'exhausted', limit, used, need, period index, now}
ADMIT = (
    _PRELUDE
    + """
if redis.call('HEXISTS', KEYS[8], ARGV[1]) == 0 then return {'rebuild'} end
local key, estimate, capped = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local rpm, tpm, maxc = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[10])
local tpd, upm, jpd = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
-- reservations nobody refreshed (their replica died) are freed
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', n(now), 'LIMIT', 0, 1000)
for _, k in ipairs(dead) do
  local r = redis.call('HGET', KEYS[2], k)
  if r then
    redis.call('HDEL', KEYS[2], k)
    redis.call('DECRBY', KEYS[3], r)
  end
  redis.call('ZREM', KEYS[1], k)
end
-- entries older than 60 s leave the windows
local horizon = now - W
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', n(horizon))
local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', n(horizon))
if #old > 0 then
  local gone = 0
  for _, m in ipairs(old) do
    gone = gone + tonumber(redis.call('HGET', KEYS[6], m) or '0')
    redis.call('HDEL', KEYS[6], m)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', n(horizon))
  redis.call('DECRBY', KEYS[7], n(gone))
end
local requests = redis.call('ZCARD', KEYS[4])
local tokens = tonumber(redis.call('GET', KEYS[7]) or '0')
-- how long until `need` more fits under `limit`: the oldest entries must age out first
local function wait(zkey, amounts, total, need, limit)
  local excess = total + need - limit
  if not amounts then  -- one per entry: the excess-th oldest entry is the one to wait for
    local at = redis.call('ZRANGE', zkey, excess - 1, excess - 1, 'WITHSCORES')
    if at[2] then return tonumber(at[2]) + W - now end
    return W
  end
  local flat = redis.call('ZRANGE', zkey, 0, -1, 'WITHSCORES')
  for i = 1, #flat, 2 do
    excess = excess - tonumber(redis.call('HGET', amounts, flat[i]) or '0')
    if excess <= 0 then return tonumber(flat[i + 1]) + W - now end
  end
  return W
end
local function limited(limit, wait_us, used)
  local rr, tr = 0, 0
  if rpm > 0 and requests > 0 then rr = wait(KEYS[4], nil, requests, rpm, rpm) end
  if tpm > 0 and tokens > 0 then tr = wait(KEYS[5], KEYS[6], tokens, tpm, tpm) end
  return {'limited', limit, n(wait_us), n(used), n(requests), n(rr), n(tokens), n(tr), n(now)}
end
if maxc > 0 then
  local live = redis.call('ZCARD', KEYS[1])
  if live >= maxc then return limited('max_concurrent', 1000000, live) end
end
if rpm > 0 and requests + 1 > rpm then
  return limited('requests_per_minute', wait(KEYS[4], nil, requests, 1, rpm), requests)
end
local fits = 0
if capped then fits = estimate end
if tpm > 0 and tokens + math.max(fits, 1) > tpm then
  local w = wait(KEYS[5], KEYS[6], tokens, math.max(fits, 1), tpm)
  return limited('tokens_per_minute', w, tokens)
end
local d, m = pick(11), pick(15)
local function over(limit, used, need)
  return limit > 0 and not (used + need <= limit and used < limit)
end
local day_tokens, day_joules = spent(KEYS[8 + d])
day_tokens = day_tokens + tonumber(redis.call('GET', KEYS[3]) or '0')
if over(tpd, day_tokens, fits) then
  return {'exhausted', 'tokens_per_day', f(day_tokens), n(fits), n(d), n(now)}
end
local month_usd = spent(KEYS[11 + m])
if over(upm, month_usd, 0) then
  return {'exhausted', 'usd_per_month', f(month_usd), '0', n(m), n(now)}
end
if over(jpd, day_joules, 0) then
  return {'exhausted', 'joules_per_day', f(day_joules), '0', n(d), n(now)}
end
redis.call('ZADD', KEYS[1], n(now + tonumber(ARGV[11])), key)
redis.call('HSET', KEYS[2], key, n(estimate))
redis.call('INCRBY', KEYS[3], n(estimate))
if rpm > 0 then
  redis.call('ZADD', KEYS[4], n(now), key)
  redis.call('PEXPIRE', KEYS[4], 2 * W / 1000)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[5], n(now), key)
  redis.call('HSET', KEYS[6], key, n(estimate))
  redis.call('INCRBY', KEYS[7], n(estimate))
end
return {'ok', n(d), n(now)}
"""
)

# KEYS: 1 done marker, 2 live, 3 res, 4 reserved, 5 rpm, 6 tpm, 7 tpm:amt, 8 tpm:sum,
#       9 ledgers, 10 pending, 11 the admission day's hash, 12-14 day hashes, 15-17 month hashes
# ARGV: 1 ledger, 2 request key, 3 tokens reserved, 4 tokens used, 5 usd, 6 joules,
#       7 count tokens per minute (0/1), 8 marker TTL (s), 9-12 day bounds, 13-16 month bounds,
#       17 admission day, 18-20 day names, 21-23 month names, 24 settled at (Unix s, the
#       ledger row's ts), 25 '' or 'charge' or 'counted' (the ledger's answer to a check),
#       26 the watermark that answer is about
# -> {'dup'} | {'check', watermark}
#    | {'ok', requests, tokens/min, in flight, tokens today, usd this month, joules today}
SETTLE = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'dup'} end
local L = ARGV[1]
local marker = redis.call('HGET', KEYS[9], L)
local counted = false
if marker then
  local sep = string.find(marker, '|', 1, true)
  local watermark = string.sub(marker, sep + 1)
  if ARGV[25] ~= '' and ARGV[26] == watermark then
    counted = ARGV[25] == 'counted'
  elseif tonumber(ARGV[24]) < tonumber(string.sub(marker, 1, sep - 1)) + SKEW_S then
    return {'check', watermark}  -- settled around the rebuild: is it in the rebuilt sum?
  end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[8])
local key, reserved, tokens = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local r = redis.call('HGET', KEYS[3], key)
if r then
  redis.call('HDEL', KEYS[3], key)
  redis.call('DECRBY', KEYS[4], r)
end
redis.call('ZREM', KEYS[2], key)
-- the reservation's entry in the token window becomes the real usage; if it has left the
-- window already (or there was none), usage beyond the reservation counts from now
local horizon = now - W
local amount = redis.call('HGET', KEYS[7], key)
local at = redis.call('ZSCORE', KEYS[6], key)
if amount and at and tonumber(at) > horizon then
  redis.call('HSET', KEYS[7], key, n(tokens))
  redis.call('INCRBY', KEYS[8], n(tokens - tonumber(amount)))
elseif ARGV[7] == '1' and tokens > reserved then
  local extra = key .. '+'
  redis.call('ZADD', KEYS[6], n(now), extra)
  redis.call('HSET', KEYS[7], extra, n(tokens - reserved))
  redis.call('INCRBY', KEYS[8], n(tokens - reserved))
end
local d, m = pick(8), pick(12)
if not marker then  -- this ledger's spend was lost: kept aside until rebuilt from the ledger
  redis.call('HSET', KEYS[10], key, table.concat(
    {ARGV[4], ARGV[5], ARGV[6], ARGV[17], ARGV[17 + d], ARGV[20 + m]}, '|'))
elseif not counted then
  for _, c in ipairs({{KEYS[11], 't:', ARGV[4]}, {KEYS[11 + d], 'j:', ARGV[6]},
                      {KEYS[14 + m], 'u:', ARGV[5]}}) do
    if tonumber(c[3]) ~= 0 then
      redis.call('HINCRBYFLOAT', c[1], c[2] .. L, c[3])
      redis.call('EXPIRE', c[1], KEEP_S)
    end
  end
end
local day_tokens, day_joules = spent(KEYS[11 + d])
local month_usd = spent(KEYS[14 + m])
return {'ok', n(redis.call('ZCOUNT', KEYS[5], '(' .. n(horizon), '+inf')),
        n(redis.call('GET', KEYS[8]) or '0'), n(redis.call('ZCARD', KEYS[2])),
        f(day_tokens), f(month_usd), f(day_joules)}
"""
)

# KEYS: 1 ledgers, 2 pending, 3 the day's hash, 4 the month's hash
# ARGV: 1 ledger, 2 pending entries the ledger sums leave out, 3 tokens, 4 usd, 5 joules (the
#       ledger's sums for the day and month), 6 the tenant's key base (`prefix:{tenant}:`),
#       7 "read time|watermark" of the ledger read
# -> 'ok' | 'already' (someone rebuilt it) | 'retry' (more settled meanwhile: read again)
REBUILD = (
    _PRELUDE
    + """
local L = ARGV[1]
if redis.call('HEXISTS', KEYS[1], L) == 1 then return 'already' end
if redis.call('HLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return 'retry' end
redis.call('HSET', KEYS[3], 't:' .. L, ARGV[3], 'j:' .. L, ARGV[5])
redis.call('HSET', KEYS[4], 'u:' .. L, ARGV[4])
redis.call('EXPIRE', KEYS[3], KEEP_S)
redis.call('EXPIRE', KEYS[4], KEEP_S)
local flat = redis.call('HGETALL', KEYS[2])
for i = 2, #flat, 2 do
  local p = {}
  for part in string.gmatch(flat[i], '[^|]+') do p[#p + 1] = part end
  -- tokens | usd | joules | admission day | day | month
  for _, c in ipairs({{'d:' .. p[4], 't:', p[1]}, {'d:' .. p[5], 'j:', p[3]},
                      {'m:' .. p[6], 'u:', p[2]}}) do
    if tonumber(c[3]) ~= 0 then
      redis.call('HINCRBYFLOAT', ARGV[6] .. c[1], c[2] .. L, c[3])
      redis.call('EXPIRE', ARGV[6] .. c[1], KEEP_S)
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], L, ARGV[7])
return 'ok'
"""
)

# KEYS: 1 live, 2 res, 3 reserved, 4 ledgers, 5.. the done markers of the keys in ARGV
# ARGV: 1 ledger, 2 TTL (µs), then request key and tokens reserved, pair by pair
# -> {this ledger's spend is held (1) or lost (0), reservations restored}
KEEPALIVE = (
    _PRELUDE
    + """
local deadline = n(now + tonumber(ARGV[2]))
local restored = 0
for i = 3, #ARGV, 2 do
  local k, r = ARGV[i], ARGV[i + 1]
  if redis.call('EXISTS', KEYS[5 + (i - 3) / 2]) == 0 then
    if redis.call('ZSCORE', KEYS[1], k) then
      redis.call('ZADD', KEYS[1], 'XX', deadline, k)
    else  -- expired while its replica was cut off, or the store lost it: in flight still
      redis.call('ZADD', KEYS[1], deadline, k)
      redis.call('HSET', KEYS[2], k, r)
      redis.call('INCRBY', KEYS[3], r)
      restored = restored + 1
    end
  end
end
return {redis.call('HEXISTS', KEYS[4], ARGV[1]), restored}
"""
)
