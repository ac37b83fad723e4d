-- Prepended to limiter_acquire.lua and limiter_settle.lua when they are loaded.
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

