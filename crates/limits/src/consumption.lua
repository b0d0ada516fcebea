-- Reads what the key scope (KEYS[1]) and the org scope (KEYS[2]) have used
-- of each limit now, with the rules of admit.lua, and changes nothing.
--
-- clock.lua comes first: now_s, now_us, day, month.
-- Answer: {now_s, then per scope: requests in the sliding minute, tokens in
--          the last 60 s, open leases, tokens today, tokens this month,
--          micro-USD this month}.
local out = {now_s}
for i = 1, 2 do
  local p = KEYS[i]
  out[#out + 1] = redis.call('ZCOUNT', p .. ':rq', '(' .. n(now_us - 60000000), '+inf')
  local h = redis.call('HGETALL', p .. ':tm')
  local tokens = 0
  for j = 1, #h, 2 do
    if tonumber(h[j]) > now_s - 60 then tokens = tokens + tonumber(h[j + 1]) end
  end
  out[#out + 1] = tokens
  out[#out + 1] = redis.call('ZCOUNT', p .. ':cc', '(' .. n(now_us), '+inf')
  out[#out + 1] = tonumber(redis.call('GET', p .. ':td:' .. day) or '0')
  out[#out + 1] = tonumber(redis.call('GET', p .. ':tmo:' .. month) or '0')
  out[#out + 1] = tonumber(redis.call('GET', p .. ':usd:' .. month) or '0')
end
return out
