-- Prepended to limiter_acquire.lua and limiter_settle.lua when they are loaded
-- (key layout in limiter_acquire.lua).
-- ARGV[1]: now, microseconds since the epoch; "" = the server's clock (TIME).

-- Stamps near 2^51 us: format them in full (Lua's default %.14g would round).
local function num(value)
  return string.format('%d', value)
end

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end


-- Add usage to the entry of the current slice. Only a new entry sets the keys'
-- lifetime: it holds the newest usage, stamped at most one slice from now.
local function record(log, costs, window, resolution, requests, tokens)
  local member = num(now - now % resolution)
  local added = redis.call('ZADD', log, 'GT', num(now), member)
  if requests > 0 then
    redis.call('HINCRBY', costs, 'r' .. member, requests)
    redis.call('HINCRBY', costs, 'R', requests)
  end
  if tokens > 0 then
    redis.call('HINCRBY', costs, 't' .. member, tokens)
    redis.call('HINCRBY', costs, 'T', tokens)
  end
  if added == 1 then
    local ttl = num(math.ceil((window + resolution) / 1000) + 1000)
    redis.call('PEXPIRE', log, ttl)
    redis.call('PEXPIRE', costs, ttl)
  end
end
