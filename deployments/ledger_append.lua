-- Append a batch of ledger records and fold each into its daily aggregates, once per request id.
--
-- KEYS: [1] time index zset (request id scored by timestamp, ms), [2] days zset (day id scored
--       by yyyymmdd), then per record: its record key, then d aggregate hashes, then d index
--       sets (one per dimension: key, user, tenant, model, all). All share the {ledger} tag.
-- ARGV: [1] record ttl (ms), [2] aggregate ttl (ms), [3] index cutoff (ms: drop older entries
--       from the time index), [4] number of records, then per record:
--       request id, json, timestamp (ms), day id, day score, d, d index members,
--       c, c pairs (aggregate field, integer increment).
-- Returns the number of records written (replays of a known request id are skipped whole,
-- so an aggregate never counts a record twice).

local record_ttl, agg_ttl = ARGV[1], ARGV[2]
local written = 0
local k, a = 3, 5
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])

for _ = 1, tonumber(ARGV[4]) do
  local rid, json, ts, day, day_score = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local d = tonumber(ARGV[a + 5])
  local members = a + 6
  local c = tonumber(ARGV[members + d])
  local pairs_at = members + d + 1
  local fresh = redis.call('SET', KEYS[k], json, 'NX', 'PX', record_ttl)
  if fresh then
    written = written + 1
    redis.call('ZADD', KEYS[1], ts, rid)
    redis.call('ZADD', KEYS[2], day_score, day)
    for j = 1, d do
      local agg, index = KEYS[k + j], KEYS[k + d + j]
      for p = 0, c - 1 do
        redis.call('HINCRBY', agg, ARGV[pairs_at + 2 * p], ARGV[pairs_at + 2 * p + 1])
      end
      redis.call('PEXPIRE', agg, agg_ttl)
      redis.call('SADD', index, ARGV[members + j - 1])
      redis.call('PEXPIRE', index, agg_ttl)
    end
  end
  k = k + 1 + 2 * d
  a = pairs_at + 2 * c
end
return written
