-- After clock.lua. One replica's view of some endpoints of one org.
-- KEYS: each endpoint's hash, llmgw:{<org>}:health:<endpoint>, one field
-- per replica holding "<state>:<ms>" (Redis time).
-- ARGV[1]: the replica id; ARGV[2]: how long a view counts (ms);
-- ARGV[2 + i]: the state of KEYS[i] (1 healthy, 2 probing, 3 ejected).
-- Views older than the TTL (replicas gone) are removed, and the hash
-- expires with the last view written to it.

local ttl = tonumber(ARGV[2])
local now_ms = math.floor(now_us / 1000)
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[2 + i] .. ':' .. n(now_ms))
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local at = tonumber(string.match(all[j + 1], ':(%d+)$'))
    if not at or now_ms - at > ttl then
      redis.call('HDEL', key, all[j])
    end
  end
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
