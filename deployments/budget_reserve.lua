-- Reserve a request's worst-case cost against every budget that applies to it, or none.
--
-- KEYS: per budget i (1..n): KEYS[2i-1] = its period hash (fields: spent, held, r:<request id>,
--       w:<permille>), KEYS[2i] = its in-flight zset (request id scored by hold expiry, ms).
--       All keys share the tenant's {hash tag}.
-- ARGV: [1] request id, [2] amount (picodollars, integer string), [3] hold ttl (ms),
--       [4] day id the caller expects (dYYYYMMDD), [5] month id (mYYYYMM),
--       then per budget i: ARGV[5+3i-2] limit (picodollars), ARGV[5+3i-1] period ('d' | 'm'),
--       ARGV[5+3i] key ttl (ms).
-- Returns {1, now_ms} admitted (also when this request id already holds a reservation),
--         {0, i, spent, held} refused by budget i (nothing reserved anywhere),
--         {-1, day id, month id} the caller's period ids disagree with the server clock.
-- The server's clock decides the period so every replica agrees on it.

local function civil(days)
  -- days since 1970-01-01 -> year, month, day (proleptic Gregorian)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local y, m, d = civil(math.floor(tonumber(t[1]) / 86400))
local day_id = string.format('d%04d%02d%02d', y, m, d)
local month_id = string.format('m%04d%02d', y, m)
if day_id ~= ARGV[4] or month_id ~= ARGV[5] then
  return {-1, day_id, month_id}
end

local rid = ARGV[1]
local amount = tonumber(ARGV[2])
local n = #KEYS / 2

local function prune(hash, zset)
  -- Holds whose owner vanished (crashed replica) expire and give their amount back.
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now_ms)
  for _, old in ipairs(expired) do
    local held = redis.call('HGET', hash, 'r:' .. old)
    if held then
      if held ~= '0' then  -- '-0' is no integer to Redis: the script would fail
        redis.call('HINCRBY', hash, 'held', '-' .. held)
      end
      redis.call('HDEL', hash, 'r:' .. old)
    end
    redis.call('ZREM', zset, old)
  end
end

for i = 1, n do
  local hash, zset = KEYS[2 * i - 1], KEYS[2 * i]
  prune(hash, zset)
  if redis.call('HEXISTS', hash, 'r:' .. rid) == 1 then
    return {1, now_ms}
  end
end

for i = 1, n do
  local hash = KEYS[2 * i - 1]
  local limit = tonumber(ARGV[5 + 3 * i - 2])
  local spent = tonumber(redis.call('HGET', hash, 'spent') or '0')
  local held = tonumber(redis.call('HGET', hash, 'held') or '0')
  if spent + held + amount > limit then
    return {0, i, tostring(redis.call('HGET', hash, 'spent') or '0'),
            tostring(redis.call('HGET', hash, 'held') or '0')}
  end
end

local expires = now_ms + tonumber(ARGV[3])
for i = 1, n do
  local hash, zset = KEYS[2 * i - 1], KEYS[2 * i]
  local ttl = ARGV[5 + 3 * i]
  redis.call('HINCRBY', hash, 'held', ARGV[2])
  redis.call('HSET', hash, 'r:' .. rid, ARGV[2])
  redis.call('ZADD', zset, expires, rid)
  redis.call('PEXPIRE', hash, ttl)
  redis.call('PEXPIRE', zset, ttl)
end
return {1, now_ms}
