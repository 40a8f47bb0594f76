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

Each script declares one key of the tenant (`...:live`) and derives the others from it: they
share its hash tag, so a cluster routes the call to the node that holds them all. Redis has no
time zones: the caller names the day before, of and after its own clock (and the same for
months), with their boundaries in Unix seconds, in one `calendar` argument; the script picks
the period that holds Redis's now. Integers travel as decimal strings (`n`), so microsecond
times keep every digit.

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
local function split(text)
  local out = {}
  for part in string.gmatch(text, '[^,|]+') do out[#out + 1] = part end
  return out
end
local base = string.sub(KEYS[1], 1, -5)  -- KEYS[1] is base .. 'live'
local K = {live = KEYS[1], res = base .. 'res', reserved = base .. 'reserved',
           rpm = base .. 'rpm', tpm = base .. 'tpm', tpm_amt = base .. 'tpm:amt',
           tpm_sum = base .. 'tpm:sum', ledgers = base .. 'ledgers'}
-- the calendar: 4 day bounds, 4 month bounds (s), 3 day names, 3 month names
local function periods(text)
  local c = split(text)
  local function pick(first)
    if now_s >= tonumber(c[first + 2]) then return 3 end
    if now_s >= tonumber(c[first + 1]) then return 2 end
    return 1
  end
  local d, m = pick(1), pick(5)
  return d, m, base .. 'd:' .. c[8 + d], base .. 'm:' .. c[11 + m], c[8 + d], c[11 + m]
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

# KEYS: 1 the tenant's live (the others derive from it)
# ARGV: 1 ledger, 2 request key, 3 estimate, 4 capped (0/1), 5 limits (requests/min,
#       tokens/min, tokens/day, usd/month, joules/day, max concurrent; 0: none), 6 TTL (µs),
#       7 calendar
# -> {'rebuild'} | {'ok', day index, now, reserved (0/1: to be kept alive)}
#    | {'limited', limit, wait µs, used, requests, requests reset µs, tokens, tokens reset µs, now}
#    | {'exhausted', limit, used, need, period index, now}
ADMIT = (
    _PRELUDE
    + """
if redis.call('HEXISTS', K.ledgers, ARGV[1]) == 0 then return {'rebuild'} end
local key, estimate, capped = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local L = split(ARGV[5])
local rpm, tpm, tpd = tonumber(L[1]), tonumber(L[2]), tonumber(L[3])
local upm, jpd, maxc = tonumber(L[4]), tonumber(L[5]), tonumber(L[6])
-- a reservation (a slot in flight, tokens held today) only where a limit needs one
local reserves = maxc > 0 or tpd > 0
if reserves then  -- reservations nobody refreshed (their replica died) are freed
  local dead = redis.call('ZRANGEBYSCORE', K.live, '-inf', n(now), 'LIMIT', 0, 1000)
  for _, k in ipairs(dead) do
    local r = redis.call('HGET', K.res, k)
    if r then
      redis.call('HDEL', K.res, k)
      redis.call('DECRBY', K.reserved, r)
    end
    redis.call('ZREM', K.live, k)
  end
end
-- entries older than 60 s leave the windows
local horizon = now - W
local requests, tokens = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', K.rpm, '-inf', n(horizon))
  requests = redis.call('ZCARD', K.rpm)
end
if tpm > 0 then
  local old = redis.call('ZRANGEBYSCORE', K.tpm, '-inf', n(horizon))
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do
      gone = gone + tonumber(redis.call('HGET', K.tpm_amt, m) or '0')
      redis.call('HDEL', K.tpm_amt, m)
    end
    redis.call('ZREMRANGEBYSCORE', K.tpm, '-inf', n(horizon))
    redis.call('DECRBY', K.tpm_sum, n(gone))
  end
  tokens = tonumber(redis.call('GET', K.tpm_sum) or '0')
end
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
  if rpm > 0 and requests > 0 then rr = wait(K.rpm, nil, requests, rpm, rpm) end
  if tpm > 0 and tokens > 0 then tr = wait(K.tpm, K.tpm_amt, tokens, tpm, tpm) end
  return {'limited', limit, n(wait_us), n(used), n(requests), n(rr), n(tokens), n(tr), n(now)}
end
if maxc > 0 then
  local live = redis.call('ZCARD', K.live)
  if live >= maxc then return limited('max_concurrent', 1000000, live) end
end
if rpm > 0 and requests + 1 > rpm then
  return limited('requests_per_minute', wait(K.rpm, nil, requests, 1, rpm), requests)
end
local fits = 0
if capped then fits = estimate end
if tpm > 0 and tokens + math.max(fits, 1) > tpm then
  local w = wait(K.tpm, K.tpm_amt, tokens, math.max(fits, 1), tpm)
  return limited('tokens_per_minute', w, tokens)
end
local function over(limit, used, need)
  return limit > 0 and not (used + need <= limit and used < limit)
end
local d = 2  -- (the caller's own day, where no budget asks Redis's)
if tpd > 0 or jpd > 0 or upm > 0 then
  local m, day_key, month_key
  d, m, day_key, month_key = periods(ARGV[7])
  local day_tokens, day_joules = spent(day_key)
  day_tokens = day_tokens + tonumber(redis.call('GET', K.reserved) or '0')
  if over(tpd, day_tokens, fits) then
    return {'exhausted', 'tokens_per_day', f(day_tokens), n(fits), n(d), n(now)}
  end
  local month_usd = spent(month_key)
  if over(upm, month_usd, 0) then
    return {'exhausted', 'usd_per_month', f(month_usd), '0', n(m), n(now)}
  end
  if over(jpd, day_joules, 0) then
    return {'exhausted', 'joules_per_day', f(day_joules), '0', n(d), n(now)}
  end
end
if reserves then
  redis.call('ZADD', K.live, n(now + tonumber(ARGV[6])), key)
  redis.call('HSET', K.res, key, n(estimate))
  redis.call('INCRBY', K.reserved, n(estimate))
end
if rpm > 0 then
  redis.call('ZADD', K.rpm, n(now), key)
  redis.call('PEXPIRE', K.rpm, 2 * W / 1000)
end
if tpm > 0 then
  redis.call('ZADD', K.tpm, n(now), key)
  redis.call('HSET', K.tpm_amt, key, n(estimate))
  redis.call('INCRBY', K.tpm_sum, n(estimate))
end
local held = '0'
if reserves then held = '1' end
return {'ok', n(d), n(now), held}
"""
)

# KEYS: 1 the tenant's live
# ARGV: 1 ledger, 2 request key, 3 tokens reserved, 4 tokens used, 5 usd, 6 joules,
#       7 count tokens per minute (0/1), 8 marker TTL (s), 9 calendar, 10 admission day,
#       11 settled at (Unix s, the ledger row's ts), 12 '' or 'charge' or 'counted' (the
#       ledger's answer to a check), 13 the watermark that answer is about
# -> {'dup'} | {'check', watermark}
#    | {'ok', requests, tokens/min, in flight, tokens today, usd this month, joules today}
SETTLE = (
    _PRELUDE
    + """
local key, L = ARGV[2], ARGV[1]
local done = base .. 'done:' .. key
if redis.call('EXISTS', done) == 1 then return {'dup'} end
local marker = redis.call('HGET', K.ledgers, L)
local counted = false
if marker then
  local sep = string.find(marker, '|', 1, true)
  local watermark = string.sub(marker, sep + 1)
  if ARGV[12] ~= '' and ARGV[13] == watermark then
    counted = ARGV[12] == 'counted'
  elseif tonumber(ARGV[11]) < tonumber(string.sub(marker, 1, sep - 1)) + SKEW_S then
    return {'check', watermark}  -- settled around the rebuild: is it in the rebuilt sum?
  end
end
redis.call('SET', done, '1', 'EX', ARGV[8])
local reserved, tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local r = redis.call('HGET', K.res, key)
if r then
  redis.call('HDEL', K.res, key)
  redis.call('DECRBY', K.reserved, r)
end
redis.call('ZREM', K.live, key)
-- the reservation's entry in the token window becomes the real usage; if it has left the
-- window already (or there was none), usage beyond the reservation counts from now
local horizon = now - W
local amount = redis.call('HGET', K.tpm_amt, key)
local at = redis.call('ZSCORE', K.tpm, key)
if amount and at and tonumber(at) > horizon then
  redis.call('HSET', K.tpm_amt, key, n(tokens))
  redis.call('INCRBY', K.tpm_sum, n(tokens - tonumber(amount)))
elseif ARGV[7] == '1' and tokens > reserved then
  local extra = key .. '+'
  redis.call('ZADD', K.tpm, n(now), extra)
  redis.call('HSET', K.tpm_amt, extra, n(tokens - reserved))
  redis.call('INCRBY', K.tpm_sum, n(tokens - reserved))
end
local d, m, day_key, month_key, day, month = periods(ARGV[9])
if not marker then  -- this ledger's spend was lost: kept aside until rebuilt from the ledger
  redis.call('HSET', base .. 'pending:' .. L, key,
             table.concat({ARGV[4], ARGV[5], ARGV[6], ARGV[10], day, month}, '|'))
elseif not counted then
  for _, c in ipairs({{base .. 'd:' .. ARGV[10], 't:', ARGV[4]}, {day_key, 'j:', ARGV[6]},
                      {month_key, 'u:', ARGV[5]}}) do
    if tonumber(c[3]) ~= 0 then
      redis.call('HINCRBYFLOAT', c[1], c[2] .. L, c[3])
      redis.call('EXPIRE', c[1], KEEP_S)
    end
  end
end
local day_tokens, day_joules = spent(day_key)
local month_usd = spent(month_key)
return {'ok', n(redis.call('ZCOUNT', K.rpm, '(' .. n(horizon), '+inf')),
        n(redis.call('GET', K.tpm_sum) or '0'), n(redis.call('ZCARD', K.live)),
        f(day_tokens), f(month_usd), f(day_joules)}
"""
)

# KEYS: 1 the tenant's live
# ARGV: 1 ledger, 2 pending entries the ledger sums leave out, 3 tokens, 4 usd, 5 joules (the
#       ledger's sums for the day and month), 6 day, 7 month, 8 "read time|watermark" of the
#       ledger read
# -> 'ok' | 'already' (someone rebuilt it) | 'retry' (more settled meanwhile: read again)
REBUILD = (
    _PRELUDE
    + """
local L = ARGV[1]
local pending = base .. 'pending:' .. L
if redis.call('HEXISTS', K.ledgers, L) == 1 then return 'already' end
if redis.call('HLEN', pending) ~= tonumber(ARGV[2]) then return 'retry' end
local day_key, month_key = base .. 'd:' .. ARGV[6], base .. 'm:' .. ARGV[7]
redis.call('HSET', day_key, 't:' .. L, ARGV[3], 'j:' .. L, ARGV[5])
redis.call('HSET', month_key, 'u:' .. L, ARGV[4])
redis.call('EXPIRE', day_key, KEEP_S)
redis.call('EXPIRE', month_key, KEEP_S)
local flat = redis.call('HGETALL', pending)
for i = 2, #flat, 2 do
  local p = split(flat[i])  -- tokens | usd | joules | admission day | day | month
  for _, c in ipairs({{'d:' .. p[4], 't:', p[1]}, {'d:' .. p[5], 'j:', p[3]},
                      {'m:' .. p[6], 'u:', p[2]}}) do
    if tonumber(c[3]) ~= 0 then
      redis.call('HINCRBYFLOAT', base .. c[1], c[2] .. L, c[3])
      redis.call('EXPIRE', base .. c[1], KEEP_S)
    end
  end
end
redis.call('DEL', pending)
redis.call('HSET', K.ledgers, L, ARGV[8])
return 'ok'
"""
)

# KEYS: 1 the tenant's live
# ARGV: 1 ledger, 2 TTL (µs), then request key and tokens reserved, pair by pair
# -> {this ledger's spend is held (1) or lost (0), reservations restored}
KEEPALIVE = (
    _PRELUDE
    + """
local deadline = n(now + tonumber(ARGV[2]))
local restored = 0
for i = 3, #ARGV, 2 do
  local k, r = ARGV[i], ARGV[i + 1]
  if redis.call('EXISTS', base .. 'done:' .. k) == 0 then
    if redis.call('ZSCORE', K.live, k) then
      redis.call('ZADD', K.live, 'XX', deadline, k)
    else  -- expired while its replica was cut off, or the store lost it: in flight still
      redis.call('ZADD', K.live, deadline, k)
      redis.call('HSET', K.res, k, r)
      redis.call('INCRBY', K.reserved, r)
      restored = restored + 1
    end
  end
end
return {redis.call('HEXISTS', K.ledgers, ARGV[1]), restored}
"""
)
