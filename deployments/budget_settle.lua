-- Settle a reservation to the actual cost (a release is a settle at zero).
--
-- KEYS: as budget_reserve.lua: per budget i, KEYS[2i-1] period hash, KEYS[2i] in-flight zset,
--       all sharing the tenant's {hash tag}.
-- ARGV: [1] request id, [2] actual cost (picodollars, integer string), [3] '1' on a retry,
--       [4] k = number of soft thresholds, [5..4+k] thresholds in permille, then per budget i:
--       ARGV[4+k+i] limit (picodollars).
-- Returns a flat list of soft thresholds crossed for the first time in the period (once across
--   all replicas): {i, permille, spent, ...}.
-- The actual cost is charged even if the hold already expired: the money was spent. A retry
-- (the first attempt's reply was lost: it may have run) charges only a budget whose hold is
-- still there, so that no request is charged twice.

local rid = ARGV[1]
local retry = ARGV[3] == '1'
local k = tonumber(ARGV[4])
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
  if held or not retry then
    local spent = redis.call('HINCRBY', hash, 'spent', ARGV[2])
    local spent_text = redis.call('HGET', hash, 'spent')  -- exact, unlike a Lua number
    local limit = tonumber(ARGV[4 + k + i])
    for j = 1, k do
      local permille = tonumber(ARGV[4 + j])
      if limit > 0 and spent * 1000 >= limit * permille
          and redis.call('HSETNX', hash, 'w:' .. ARGV[4 + j], '1') == 1 then
        table.insert(crossed, i)
        table.insert(crossed, permille)
        table.insert(crossed, spent_text)
      end
    end
  end
end
return crossed
