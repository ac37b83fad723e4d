-- Settle a request's token reservation to its real usage in one window that
-- recorded it (key layout in limiter_acquire.lua), or give back what a lease
-- did not use (requests and tokens; deployments/limiter_lease.py).
--
-- A refund comes off the entry that holds the reservation, if that entry is
-- still in its window (once it has left, the usage no longer counts anyway).
-- An extra charge is recorded now: that is when the usage became known.
--
-- settle(delta, requests, w): `delta` = real usage minus reservation in tokens
-- (< 0 refunds); `requests` <= 0, requests given back (only with delta <= 0);
-- w = {log, costs, member (the reservation's entry, slice start in us),
-- window (us), resolution (us)}.

-- (limiter_common.lua, prepended, defines now, num() and keep_alive())

-- Add tokens to the entry of the current slice, stamped now.
local function charge(w, tokens)
  local member = num(now - now % w.resolution)
  local added = redis.call('ZADD', w.log, 'GT', num(now), member)
  redis.call('HINCRBY', w.costs, 't' .. member, tokens)
  redis.call('HINCRBY', w.costs, 'T', tokens)
  if added == 1 then keep_alive(w.log, w.costs, w.window, w.resolution) end
end

local function give_back(w, field, amount)
  local held = tonumber(redis.call('HGET', w.costs, field .. w.member)) or 0
  local give = math.min(amount, held)
  if give > 0 then
    redis.call('HINCRBY', w.costs, field .. w.member, -give)
    redis.call('HINCRBY', w.costs, string.upper(field), -give)
  end
end

local function settle(delta, requests, w)
  if delta < 0 or requests < 0 then
    local score = redis.call('ZSCORE', w.log, w.member)
    if score and tonumber(score) > now - w.window then
      if delta < 0 then give_back(w, 't', -delta) end
      if requests < 0 then give_back(w, 'r', -requests) end
    end
  elseif delta > 0 then
    charge(w, delta)
  end
end
