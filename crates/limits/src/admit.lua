-- One admission, atomically: check every limit of the key scope (KEYS[1])
-- and the org scope (KEYS[2]), and only if all pass, count the request,
-- reserve its tokens and money and take a concurrency lease.
-- Both prefixes carry the org's hash tag, so every key built here lives in
-- the same Cluster slot as the declared ones.
--
-- ARGV: 1 lease id, 2 reserve tokens, 3 reserve micro-USD, 4 lease TTL ms,
--       5..10 key limits, 11..16 org limits (-1: none), each in the order
--       requests/min, tokens/min, concurrent, tokens/day, tokens/month, micro-USD/month,
--       17 request units, 18 concurrency slots, 19 hold µs.
-- A grant of several units (a replica admitting a busy key's requests
-- itself for a short hold) is all or nothing, and must fit whole: every
-- unit is counted in the sliding minute as of the end of the hold (the
-- latest a replica may use it), each slot is a lease member `<id>:<i>`, and
-- the reservations must fit under each token and money limit. One unit
-- keeps the rule of a single request: admitted while used < limit.
-- Answer: {admitted 0|1, kind, retry_after_s,
--          req_limit, req_remaining, req_reset_ms,
--          tok_limit, tok_remaining, tok_reset_ms, second, day, month, held_us}
-- kind: 0 none, 1 requests, 2 tokens, 3 concurrency, 4 quota; -1: no such limit.

-- clock.lua comes first: now_s, now_us, day, month, day_left, month_left, n().

local lease = ARGV[1]
local reserve = tonumber(ARGV[2])
local reserve_usd = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local count = tonumber(ARGV[17])
local slots = tonumber(ARGV[18])
local hold_us = tonumber(ARGV[19])
local WINDOW = 60000000
-- Tokens of a grant count in the second its hold ends (settlements fix that bucket).
local tm_sec = math.floor((now_us + hold_us) / 1000000)
-- Whether `used` leaves room under `lim` for this admission's `amount`.
local function fits(used, lim, amount)
  return used < lim and (count == 1 or used + amount <= lim)
end

local scopes = {}
for i = 1, 2 do
  local b = 4 + (i - 1) * 6
  scopes[i] = {
    p = KEYS[i],
    rpm = tonumber(ARGV[b + 1]), tpm = tonumber(ARGV[b + 2]), cc = tonumber(ARGV[b + 3]),
    tpd = tonumber(ARGV[b + 4]), tpmo = tonumber(ARGV[b + 5]), usd = tonumber(ARGV[b + 6]),
  }
end

-- Phase 1: read (dropping what has left its window) and decide.
local kind, retry = 0, 0
local function refuse(k, r)
  if r < 1 then r = 1 end
  if kind == 0 or k < kind then kind, retry = k, r
  elseif k == kind and r > retry then retry = r end
end

for _, s in ipairs(scopes) do
  if s.cc >= 0 then
    redis.call('ZREMRANGEBYSCORE', s.p .. ':cc', '-inf', n(now_us))
    s.cc_used = redis.call('ZCARD', s.p .. ':cc')
    if s.cc_used + slots > s.cc then refuse(3, 1) end
  end
  if s.rpm >= 0 then
    redis.call('ZREMRANGEBYSCORE', s.p .. ':rq', '-inf', n(now_us - WINDOW))
    s.rq_used = redis.call('ZCARD', s.p .. ':rq')
    local oldest = redis.call('ZRANGE', s.p .. ':rq', 0, 0, 'WITHSCORES')
    if oldest[2] then
      s.rq_reset_us = tonumber(oldest[2]) + WINDOW - now_us
    else
      s.rq_reset_us = WINDOW
    end
    if s.rq_used + count > s.rpm then refuse(1, math.ceil(s.rq_reset_us / 1000000)) end
  end
  if s.tpm >= 0 then
    local h = redis.call('HGETALL', s.p .. ':tm')
    local used, oldest = 0, nil
    for i = 1, #h, 2 do
      local sec = tonumber(h[i])
      if sec <= now_s - 60 then
        redis.call('HDEL', s.p .. ':tm', h[i])
      else
        local n = tonumber(h[i + 1])
        used = used + n
        if n > 0 and (oldest == nil or sec < oldest) then oldest = sec end
      end
    end
    s.tm_used = used
    s.tm_reset_s = oldest and (oldest + 60 - now_s) or 60
    if not fits(used, s.tpm, reserve) then refuse(2, s.tm_reset_s) end
  end
  if s.tpd >= 0 then
    s.td_used = tonumber(redis.call('GET', s.p .. ':td:' .. day) or '0')
    if not fits(s.td_used, s.tpd, reserve) then refuse(4, day_left) end
  end
  if s.tpmo >= 0 then
    s.tmo_used = tonumber(redis.call('GET', s.p .. ':tmo:' .. month) or '0')
    if not fits(s.tmo_used, s.tpmo, reserve) then refuse(4, month_left) end
  end
  if s.usd >= 0 then
    s.usd_used = tonumber(redis.call('GET', s.p .. ':usd:' .. month) or '0')
    if not fits(s.usd_used, s.usd, reserve_usd) then refuse(4, month_left) end
  end
end

-- Phase 2: apply, only when every limit passed.
local admitted = kind == 0
if admitted then
  for _, s in ipairs(scopes) do
    if s.cc >= 0 then
      local until_us = n(now_us + ttl_ms * 1000)
      for i = 1, slots do redis.call('ZADD', s.p .. ':cc', until_us, lease .. ':' .. i) end
      redis.call('PEXPIRE', s.p .. ':cc', n(ttl_ms * 2))
      s.cc_used = s.cc_used + slots
    end
    if s.rpm >= 0 then
      local at = n(now_us + hold_us)
      for i = 1, count do redis.call('ZADD', s.p .. ':rq', at, lease .. ':' .. i) end
      redis.call('PEXPIRE', s.p .. ':rq', n(61000 + math.ceil(hold_us / 1000)))
      if s.rq_used == 0 then s.rq_reset_us = WINDOW + hold_us end
      s.rq_used = s.rq_used + count
    end
    if s.tpm >= 0 then
      redis.call('HINCRBY', s.p .. ':tm', n(tm_sec), n(reserve))
      redis.call('PEXPIRE', s.p .. ':tm', 61000)
      s.tm_used = s.tm_used + reserve
    end
    if s.tpd >= 0 then
      redis.call('INCRBY', s.p .. ':td:' .. day, n(reserve))
      redis.call('EXPIRE', s.p .. ':td:' .. day, 90000)
    end
    if s.tpmo >= 0 then
      redis.call('INCRBY', s.p .. ':tmo:' .. month, n(reserve))
      redis.call('EXPIRE', s.p .. ':tmo:' .. month, 2764800)
    end
    if s.usd >= 0 then
      redis.call('INCRBY', s.p .. ':usd:' .. month, n(reserve_usd))
      redis.call('EXPIRE', s.p .. ':usd:' .. month, 2764800)
    end
  end
end

-- Headers: the tighter scope (least remaining) of each kind.
local rl, rr, rs, tl, tr, ts = -1, -1, -1, -1, -1, -1
for _, s in ipairs(scopes) do
  if s.rpm >= 0 then
    local rem = s.rpm - s.rq_used
    if rem < 0 then rem = 0 end
    if rl < 0 or rem < rr then rl, rr, rs = s.rpm, rem, math.ceil(s.rq_reset_us / 1000) end
  end
  if s.tpm >= 0 then
    local rem = s.tpm - s.tm_used
    if rem < 0 then rem = 0 end
    if tl < 0 or rem < tr then tl, tr, ts = s.tpm, rem, s.tm_reset_s * 1000 end
  end
end

-- The latest hold still running in a sliding minute (units a grant may give back).
local held = 0
for _, s in ipairs(scopes) do
  if s.rpm >= 0 then
    local last = redis.call('ZRANGE', s.p .. ':rq', -1, -1, 'WITHSCORES')
    if last[2] and tonumber(last[2]) - now_us > held then held = tonumber(last[2]) - now_us end
  end
end

return {admitted and 1 or 0, kind, retry, rl, rr, rs, tl, tr, ts, tm_sec, day, month, held}
