-- Check every window of every quota that applies to one request, then record
-- the request in all of them or in none (see deployments/limiter.py).
--
-- One window = a sliding log of entries. An entry holds the hits of one
-- `resolution`-long slice of time: its score is the time of the slice's latest
-- hit, so it leaves the window when that hit does (never early). Two keys per
-- window (every key shares one {hash tag}):
--   log    ZSET  member = slice start (us), score = latest hit in the slice (us)
--   costs  HASH  "r<member>" / "t<member>": requests / tokens of that entry;
--                "R" / "T": totals over the live entries
--
-- acquire(cost, checks): `cost` = tokens the request reserves (it is always 1
-- request); each check = {log, costs, window (us), resolution (us), request
-- limit, token limit (-1 = no limit), shadow (true = report only)}.
-- Returns {now, enforced_ok, all_ok, then 5 per check: requests used, tokens
--   used (both before this request), oldest entry's score (-1 = empty),
--   request wait, token wait (us; 0 = fits, -1 = can never fit)}.
-- Enforced windows record the request when all of them admit; shadow windows
-- when every window admits (as if they were enforced too).

-- (limiter_common.lua, prepended, defines now, num() and record())

local function prune(log, costs, window)
  local edge = num(now - window)
  local freed_r, freed_t = 0, 0
  while true do
    local gone = redis.call('ZRANGEBYSCORE', log, '-inf', edge, 'LIMIT', 0, 500)
    if #gone == 0 then break end
    local fields = {}
    for _, member in ipairs(gone) do
      local c = redis.call('HMGET', costs, 'r' .. member, 't' .. member)
      freed_r = freed_r + (tonumber(c[1]) or 0)
      freed_t = freed_t + (tonumber(c[2]) or 0)
      fields[#fields + 1] = 'r' .. member
      fields[#fields + 1] = 't' .. member
    end
    redis.call('HDEL', costs, unpack(fields))
    redis.call('ZREM', log, unpack(gone))
  end
  if freed_r > 0 then redis.call('HINCRBY', costs, 'R', -freed_r) end
  if freed_t > 0 then redis.call('HINCRBY', costs, 'T', -freed_t) end
end

-- How long until the oldest entries holding `excess` units have left the window.
local function wait_for(log, costs, window, field, excess)
  local freed, start = 0, 0
  while true do
    local batch = redis.call('ZRANGE', log, start, start + 99, 'WITHSCORES')
    if #batch == 0 then return window end -- totals out of step: a full window is safe
    for j = 1, #batch, 2 do
      freed = freed + (tonumber(redis.call('HGET', costs, field .. batch[j])) or 0)
      if freed >= excess then return tonumber(batch[j + 1]) + window - now end
    end
    start = start + 100
  end
end

local function wait(log, costs, window, field, used, need, limit)
  if limit < 0 or used + need <= limit then return 0 end
  if need > limit then return -1 end
  return wait_for(log, costs, window, field, used + need - limit)
end

local function acquire(cost, checks)
  local out = {now, 1, 1}
  local enforced_ok, all_ok = true, true
  for i, c in ipairs(checks) do
    prune(c.log, c.costs, c.window)
    local totals = redis.call('HMGET', c.costs, 'R', 'T')
    local used_r, used_t = tonumber(totals[1]) or 0, tonumber(totals[2]) or 0
    local wait_r = wait(c.log, c.costs, c.window, 'r', used_r, 1, c.requests)
    local wait_t = wait(c.log, c.costs, c.window, 't', used_t, cost, c.tokens)
    if wait_r ~= 0 or wait_t ~= 0 then
      all_ok = false
      if not c.shadow then enforced_ok = false end
    end
    local at = 4 + 5 * (i - 1)
    out[at], out[at + 1], out[at + 3], out[at + 4] = used_r, used_t, wait_r, wait_t
  end
  for i, c in ipairs(checks) do
    if enforced_ok and (all_ok or not c.shadow) then
      record(c.log, c.costs, c.window, c.resolution, 1, cost)
    end
    local oldest = redis.call('ZRANGE', c.log, 0, 0, 'WITHSCORES')
    out[4 + 5 * (i - 1) + 2] = oldest[2] and tonumber(oldest[2]) or -1
  end
  out[2] = enforced_ok and 1 or 0
  out[3] = all_ok and 1 or 0
  return out
end
