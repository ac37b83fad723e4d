-- Store one semantic-cache entry, announce it, and keep the store within its size.
--
-- KEYS: [1] the entry's hash, [2] the change stream, [3] the order zset (entry id -> expiry,
--       unix ms by the server's clock; +inf for an entry that never expires). All share {sc}.
-- ARGV: [1] entry id, [2] ttl in ms ('' = never expires), [3] namespace, [4] max entries
--       ('0' = no cap), [5] stream maxlen, [6] entry key prefix, [7..] hash field/value pairs.
-- Returns how many entries were evicted to make room: those expiring soonest (the oldest,
-- when every entry has the same ttl), each announced as a 'del' so replicas drop it.

local id, ttl, ns = ARGV[1], ARGV[2], ARGV[3]
local cap, maxlen, prefix = tonumber(ARGV[4]), ARGV[5], ARGV[6]

redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = '+inf'
if ttl ~= '' then
  redis.call('PEXPIRE', KEYS[1], ttl)
  expiry = now_ms + tonumber(ttl)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'op', 'add', 'id', id, 'ns', ns)
redis.call('ZADD', KEYS[3], expiry, id)
-- Ids of entries Redis has expired on its own would count against the cap.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)

local evicted = 0
if cap > 0 then
  local over = redis.call('ZCARD', KEYS[3]) - cap
  if over > 0 then
    local doomed = redis.call('ZPOPMIN', KEYS[3], over)
    for i = 1, #doomed, 2 do
      redis.call('DEL', prefix .. doomed[i])
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'op', 'del', 'id', doomed[i], 'ns', '')
      evicted = evicted + 1
    end
  end
end
return evicted
