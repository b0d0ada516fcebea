-- After clock.lua. The worst fresh view of each endpoint (KEYS as in
-- health_report.lua); ARGV[1]: how long a view counts (ms). Answers one
-- number per key: 0 when no view is fresh, else the highest state
-- (1 healthy, 2 probing, 3 ejected).

local ttl = tonumber(ARGV[1])
local now_ms = math.floor(now_us / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local worst = 0
  local all = redis.call('HGETALL', key)
  for j = 2, #all, 2 do
    local state, at = string.match(all[j], '^(%d+):(%d+)$')
    state, at = tonumber(state), tonumber(at)
    if state and at and now_ms - at <= ttl and state > worst then
      worst = state
    end
  end
  out[i] = worst
end
return out
