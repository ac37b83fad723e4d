-- Settle a request's token reservation to its real usage, in every window
-- that recorded it (layout as in limiter_acquire.lua).
--
-- A refund comes off the entry that holds the reservation, if that entry is
-- still in its window (once it has left, the tokens no longer count anyway).
-- An extra charge is recorded now: that is when the usage became known.
--
-- KEYS, two per window i: KEYS[2i-1] ZSET log, KEYS[2i] HASH costs
-- ARGV:
--   [1] now, microseconds since the epoch; "" = the server's clock (TIME)
--   [2] token difference: real usage minus reservation (< 0 refunds)
--   then 3 per window i, from 3 + 3(i-1): the reservation's entry (slice start,
--   us), window (us), resolution (us)
-- Returns the number of tokens refunded (< 0) or charged (> 0) over all windows.

-- (limiter_common.lua, prepended, defines now, num() and record())
local delta = tonumber(ARGV[2])
local moved = 0

for i = 1, #KEYS / 2 do
  local log, costs, base = KEYS[2 * i - 1], KEYS[2 * i], 3 + 3 * (i - 1)
  local member, window = ARGV[base], tonumber(ARGV[base + 1])
  if delta < 0 then
    local score = redis.call('ZSCORE', log, member)
    if score and tonumber(score) > now - window then
      local held = tonumber(redis.call('HGET', costs, 't' .. member)) or 0
      local give = math.min(-delta, held)
      if give > 0 then
        redis.call('HINCRBY', costs, 't' .. member, -give)
        redis.call('HINCRBY', costs, 'T', -give)
        moved = moved - give
      end
    end
  elseif delta > 0 then
    record(log, costs, window, tonumber(ARGV[base + 2]), 0, delta)
    moved = moved + delta
  end
end
return moved
