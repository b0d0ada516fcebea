-- Settles one admitted request (KEYS as in admit.lua): replaces its token
-- and money reservations by what it used, adds that to the settled totals
-- of the day and month budgets, and gives back its lease. A budget with a
-- soft threshold is watched: the first settlement of the period that takes
-- its settled total to the threshold, and the first that takes it to the
-- limit, each claim an alert key (SET NX, living as long as the period's
-- counters), so every replica together raises each alert once.
--
-- clock.lua comes first: now_s, now_us, n().
-- ARGV: 1 lease id, 2 admitted second, 3 day, 4 month, 5 token delta
--       (used - reserved), 6 micro-USD delta, 7 renew-only TTL ms (0: settle),
--       8 tokens charged, 9 micro-USD charged, then per scope (key, org) 11:
--       5 flags (1: the limit applied at admission) in the order tokens/min,
--       concurrent, tokens/day, tokens/month, money; then limit and soft
--       threshold (-1: not watched) of tokens/day, tokens/month, money;
--       32, 33 the first and last request unit given back unused (0 0:
--       none), then the concurrency slots to free (or renew): lease
--       members `<id>:<i>` as admit.lua made them.
-- Answer: {scope, budget, kind, settled total, ...} per alert raised:
--         scope 1 key, 2 org; budget 1 tokens/day, 2 tokens/month, 3 money;
--         kind 1 soft threshold, 2 limit.
local lease = ARGV[1]
local sec, day, month = ARGV[2], ARGV[3], ARGV[4]
local delta, delta_usd = tonumber(ARGV[5]), tonumber(ARGV[6])
local renew = tonumber(ARGV[7])
local charged, charged_usd = tonumber(ARGV[8]), tonumber(ARGV[9])
local DAY_TTL, MONTH_TTL = 90000, 2764800
local alerts = {}
local back_from, back_to = tonumber(ARGV[32]), tonumber(ARGV[33])
local function slot_members()
  local m = {}
  for j = 34, #ARGV do m[#m + 1] = lease .. ':' .. ARGV[j] end
  return m
end

-- Adds `by` to a settled total; raises what it crossed.
local function settled(p, scope, budget, tag, period, ttl, by, max, soft)
  local key = p .. ':' .. tag .. 's:' .. period
  local total = redis.call('INCRBY', key, n(by))
  redis.call('EXPIRE', key, ttl)
  if soft < 0 then return end
  local marks = {{1, soft, 's'}, {2, max, 'r'}}
  for _, mk in ipairs(marks) do
    if total >= mk[2] then
      local al = p .. ':al:' .. tag .. ':' .. period .. ':' .. mk[3] .. n(mk[2])
      if redis.call('SET', al, '1', 'NX', 'EX', ttl) then
        for _, v in ipairs({scope, budget, mk[1], total}) do alerts[#alerts + 1] = v end
      end
    end
  end
end

for i = 1, 2 do
  local p = KEYS[i]
  local b = 9 + (i - 1) * 11
  local tpm, cc, tpd, tpmo, usd = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local w = {}
  for j = 1, 6 do w[j] = tonumber(ARGV[b + 5 + j]) end
  if renew > 0 then
    if cc == '1' and #ARGV >= 34 then
      local until_us = n(now_us + renew * 1000)
      for _, m in ipairs(slot_members()) do redis.call('ZADD', p .. ':cc', 'XX', until_us, m) end
      redis.call('PEXPIRE', p .. ':cc', n(renew * 2))
    end
  else
    if cc == '1' and #ARGV >= 34 then redis.call('ZREM', p .. ':cc', unpack(slot_members())) end
    if back_from > 0 then
      local m = {}
      for j = back_from, back_to do m[#m + 1] = lease .. ':' .. j end
      redis.call('ZREM', p .. ':rq', unpack(m))
    end
    if delta ~= 0 then
      -- A bucket that has left the window no longer counts: nothing to fix.
      if tpm == '1' and tonumber(sec) > now_s - 60 then
        local n = redis.call('HINCRBY', p .. ':tm', sec, n(delta))
        if n < 0 then redis.call('HSET', p .. ':tm', sec, 0) end
      end
      if tpd == '1' then
        local n = redis.call('INCRBY', p .. ':td:' .. day, n(delta))
        if n < 0 then redis.call('SET', p .. ':td:' .. day, 0, 'KEEPTTL') end
      end
      if tpmo == '1' then
        local n = redis.call('INCRBY', p .. ':tmo:' .. month, n(delta))
        if n < 0 then redis.call('SET', p .. ':tmo:' .. month, 0, 'KEEPTTL') end
      end
    end
    if usd == '1' and delta_usd ~= 0 then
      local n = redis.call('INCRBY', p .. ':usd:' .. month, n(delta_usd))
      if n < 0 then redis.call('SET', p .. ':usd:' .. month, 0, 'KEEPTTL') end
    end
    if tpd == '1' then settled(p, i, 1, 'td', day, DAY_TTL, charged, w[1], w[2]) end
    if tpmo == '1' then settled(p, i, 2, 'tmo', month, MONTH_TTL, charged, w[3], w[4]) end
    if usd == '1' then settled(p, i, 3, 'usd', month, MONTH_TTL, charged_usd, w[5], w[6]) end
  end
end
return alerts
