-- Append a batch of ledger records, all of them new, and add the batch's summed increments to
-- its daily aggregates, in one atomic step.
--
-- KEYS: [1] time index zset (record id scored by timestamp, ms), [2] days zset (day id scored
--       by yyyymmdd), then n record keys, then g aggregate hashes, then g index sets (the set of
--       members of each aggregate's day and dimension). All share the {ledger} tag.
-- ARGV: [1] record ttl (ms), [2] aggregate ttl (ms), [3] index cutoff (ms: drop older entries
--       from the time index), [4] n records, [5] g aggregates, [6] d days, [7] c fields,
--       [8] records per ZADD, [9] the record keys' prefix (a record key is that prefix and
--       the record id), then c field names, then d pairs (day score, day id), then
--       n pairs (json, timestamp in ms), then g groups (index member, c integer increments, one
--       per field, summed over the batch's records in that aggregate).
-- Returns the number of records written (n). If any record key already exists (a replay or a
-- retried batch) it writes nothing and returns those record ids instead: the sums would count
-- them twice, so the caller sends the batch again without them.
-- Numbers from ARGV go to Redis as the strings they came in: Lua never formats an increment.

local n, g, d, c = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local chunk, prefix_len = tonumber(ARGV[8]), #ARGV[9]
local days_at = 10 + c
local recs_at = days_at + 2 * d
local aggs_at = recs_at + 2 * n

local function record_id(i)
  return string.sub(KEYS[2 + i], prefix_len + 1)
end

local stored = 0
for i = 1, n, chunk do
  stored = stored + redis.call('EXISTS', unpack(KEYS, 2 + i, 2 + math.min(n, i + chunk - 1)))
end
if stored > 0 then
  local known = {}
  for i = 1, n do
    if redis.call('EXISTS', KEYS[2 + i]) == 1 then
      known[#known + 1] = record_id(i)
    end
  end
  return known
end

local record_ttl, agg_ttl = ARGV[1], ARGV[2]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
for i = 1, n, chunk do
  local scored = {}
  for j = i, math.min(n, i + chunk - 1) do
    local a = recs_at + 2 * (j - 1)
    redis.call('SET', KEYS[2 + j], ARGV[a], 'PX', record_ttl)
    scored[#scored + 1] = ARGV[a + 1]
    scored[#scored + 1] = record_id(j)
  end
  redis.call('ZADD', KEYS[1], unpack(scored))
end
redis.call('ZADD', KEYS[2], unpack(ARGV, days_at, recs_at - 1))

for j = 1, g do
  local agg, index = KEYS[2 + n + j], KEYS[2 + n + g + j]
  local a = aggs_at + (1 + c) * (j - 1)
  for f = 1, c do
    redis.call('HINCRBY', agg, ARGV[9 + f], ARGV[a + f])
  end
  redis.call('PEXPIRE', agg, agg_ttl)
  redis.call('SADD', index, ARGV[a])
  redis.call('PEXPIRE', index, agg_ttl)
end
return n
