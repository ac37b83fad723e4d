-- Read an exact-cache entry and count the hit or miss, in one round trip.
-- KEYS[1]  entry key           (hash: b = body, t = stored-at)   {namespace} hash tag
-- KEYS[2]  stats key           (hash of counters)                {namespace} hash tag
-- ARGV[1]  max age             (milliseconds; -1 = any age)
-- Returns {body, age_ms, ttl_ms} on a hit (ttl_ms: the entry's remaining lifetime),
-- nil on a miss. Ages use the server's clock, so every replica computes the same `age`.
local entry = redis.call('HMGET', KEYS[1], 'b', 't')
local body, stored = entry[1], tonumber(entry[2])
if not body or not stored then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return nil
end
local now = redis.call('TIME')
local age = math.max(0, tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - stored)
local max_age = tonumber(ARGV[1])
if max_age >= 0 and age > max_age then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return nil
end
redis.call('HINCRBY', KEYS[2], 'hits', 1)
return {body, age, redis.call('PTTL', KEYS[1])}
