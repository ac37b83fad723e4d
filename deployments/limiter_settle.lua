-- Settle a request's token reservation to its real usage in one window that
-- recorded it (key layout in limiter_acquire.lua).
--
-- A refund comes off the entry that holds the reservation, if that entry is
-- still in its window (once it has left, the tokens no longer count anyway).
-- An extra charge is recorded now: that is when the usage became known.
--
-- settle(delta, w): `delta` = real usage minus reservation in tokens (< 0
-- refunds); w = {log, costs, member (the reservation's entry, slice start in
-- us), window (us), resolution (us)}.

-- (limiter_common.lua, prepended, defines now, num() and keep_alive())

-- Add tokens to the entry of the current slice, stamped now.
local function charge(w, tokens)
  local member = num(now - now % w.resolution)
  local added = redis.call('ZADD', w.log, 'GT', num(now), member)
  redis.call('HINCRBY', w.costs, 't' .. member, tokens)
  redis.call('HINCRBY', w.costs, 'T', tokens)
  if added == 1 then keep_alive(w.log, w.costs, w.window, w.resolution) end
end

local function settle(delta, w)
  if delta < 0 then
    local score = redis.call('ZSCORE', w.log, w.member)
    if score and tonumber(score) > now - w.window then
      local held = tonumber(redis.call('HGET', w.costs, 't' .. w.member)) or 0
      local give = math.min(-delta, held)
      if give > 0 then
        redis.call('HINCRBY', w.costs, 't' .. w.member, -give)
        redis.call('HINCRBY', w.costs, 'T', -give)
      end
    end
  elseif delta > 0 then
    charge(w, delta)
  end
end
