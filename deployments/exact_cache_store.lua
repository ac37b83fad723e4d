-- Store an exact-cache entry with its TTL and the server's time of storing.
-- KEYS[1]  entry key           (hash: b = body, t = stored-at)   {namespace} hash tag
-- KEYS[2]  stats key           (hash of counters)                {namespace} hash tag
-- ARGV[1]  body                (bytes: a complete chat.completion JSON)
-- ARGV[2]  ttl                 (milliseconds, > 0)
-- Returns 1.
local now = redis.call('TIME')
local stored = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 't', stored)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'stores', 1)
return 1
