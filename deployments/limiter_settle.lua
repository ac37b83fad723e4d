-- Settle a request's token reservation to its real usage, in every window
-- that recorded it (key layout in limiter_acquire.lua).
--
-- A refund comes off the entry that holds the reservation, if that entry is
-- still in its window (once it has left, the tokens no longer count anyway).
-- An extra charge is recorded now: that is when the usage became known.
--
-- settle(delta, windows): `delta` = real usage minus reservation in tokens
-- (< 0 refunds); each window = {log, costs, member (the reservation's entry,
-- slice start in us), window (us), resolution (us)}.

-- (limiter_common.lua, prepended, defines now, num() and record())

local function settle(delta, windows)
  for _, w in ipairs(windows) do
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
      record(w.log, w.costs, w.window, w.resolution, 0, delta)
    end
  end
end
