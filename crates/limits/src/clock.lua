-- Prepended to every script: the time from Redis `TIME` (never a
-- replica's clock) as the UTC second, microsecond, day number and `YYYYMM`
-- month, the seconds left in the day and month, and n() for numbers sent
-- back to Redis.

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_us = now_s * 1000000 + tonumber(t[2])
local day = math.floor(now_s / 86400)

-- Howard Hinnant's civil-from-days and days-from-civil (UTC calendar).
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local y, m = civil(day)
local month = y * 100 + m
local ny, nm = y, m + 1
if nm == 13 then ny, nm = y + 1, 1 end
local month_left = days(ny, nm) * 86400 - now_s
local day_left = (day + 1) * 86400 - now_s

-- Lua prints numbers with 14 significant digits: every number sent to
-- Redis goes through this instead, whole.
local function n(x) return string.format('%d', x) end

