-- Settles one admitted request (KEYS as in admit.lua): replaces its token
-- and money reservations by what it used, and gives back its lease.
-- ARGV: 1 lease id, 2 admitted second, 3 day, 4 month, 5 token delta
--       (used - reserved), 6 micro-USD delta, 7 renew-only TTL ms (0: settle),
--       8..12 key flags, 13..17 org flags (1: the limit applied at admission),
--       each in the order tokens/min, concurrent, tokens/day, tokens/month, money.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_us = now_s * 1000000 + tonumber(t[2])
local function n(x) return string.format('%d', x) end
local lease = ARGV[1]
local sec, day, month = ARGV[2], ARGV[3], ARGV[4]
local delta, delta_usd = tonumber(ARGV[5]), tonumber(ARGV[6])
local renew = tonumber(ARGV[7])

for i = 1, 2 do
  local p = KEYS[i]
  local b = 7 + (i - 1) * 5
  local tpm, cc, tpd, tpmo, usd = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  if renew > 0 then
    if cc == '1' then
      redis.call('ZADD', p .. ':cc', 'XX', n(now_us + renew * 1000), lease)
      redis.call('PEXPIRE', p .. ':cc', n(renew * 2))
    end
  else
    if cc == '1' then redis.call('ZREM', p .. ':cc', lease) end
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
  end
end
return 1
