-- Settle a reservation to the actual cost (a release is a settle at zero).
--
-- KEYS: as budget_reserve.lua: per budget i, KEYS[2i-1] period hash, KEYS[2i] in-flight zset,
--       all sharing the tenant's {hash tag}.
-- ARGV: [1] request id, [2] actual cost (picodollars, integer string), [3] k = number of soft
--       thresholds, [4..3+k] thresholds in permille, then per budget i: ARGV[3+k+i] limit
--       (picodollars).
-- Returns a flat list of soft thresholds crossed for the first time in the period (once across
--   all replicas): {i, permille, spent, ...}.
-- The actual cost is charged even if the hold already expired: the money was spent.

local rid = ARGV[1]
local k = tonumber(ARGV[3])
local n = #KEYS / 2
local crossed = {}

for i = 1, n do
  local hash, zset = KEYS[2 * i - 1], KEYS[2 * i]
  local held = redis.call('HGET', hash, 'r:' .. rid)
  if held then
    if held ~= '0' then  -- '-0' is no integer to Redis: the script would fail
      redis.call('HINCRBY', hash, 'held', '-' .. held)
    end
    redis.call('HDEL', hash, 'r:' .. rid)
  end
  redis.call('ZREM', zset, rid)
  local spent = redis.call('HINCRBY', hash, 'spent', ARGV[2])
  local spent_text = redis.call('HGET', hash, 'spent')  -- exact, unlike a Lua number
  local limit = tonumber(ARGV[3 + k + i])
  for j = 1, k do
    local permille = tonumber(ARGV[3 + j])
    if limit > 0 and spent * 1000 >= limit * permille
        and redis.call('HSETNX', hash, 'w:' .. ARGV[3 + j], '1') == 1 then
      table.insert(crossed, i)
      table.insert(crossed, permille)
      table.insert(crossed, spent_text)
    end
  end
end
return crossed
