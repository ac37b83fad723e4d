-- The first part of the limiter's one script (limiter_common, _settle,
-- _acquire and _batch.lua, in that order; key layout in limiter_acquire.lua).
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


-- A window's keys live as long as their newest entry can count: set when an
-- entry is added (it holds the newest usage, stamped at most one slice from now).
local function keep_alive(log, costs, window, resolution)
  local ttl = num(math.ceil((window + resolution) / 1000) + 1000)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', costs, ttl)
end
