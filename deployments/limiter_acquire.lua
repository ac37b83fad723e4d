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
-- acquire(cost, checks[, lease]): `cost` = tokens the request reserves (it is
-- always 1 request); each check = {log, costs, window (us), resolution (us),
-- request limit, token limit (-1 = no limit), shadow (true = report only)}.
-- Returns {now, enforced_ok, all_ok, then 5 per check: requests used, tokens
--   used (both before this request), oldest entry's score (-1 = empty),
--   request wait, token wait (us; 0 = fits, -1 = can never fit)}.
-- Enforced windows record the request when all of them admit; shadow windows
-- when every window admits (as if they were enforced too).
--
-- A lease (deployments/limiter_lease.py) = {requests, for_us}: `requests` and
-- `cost` tokens in one go, recorded only if every window, shadow ones too,
-- stays at most half full with them. It ends (`until`, appended to the reply) after for_us or at the
-- end of the current slice of any of its windows, whichever comes first; its
-- usage is stamped `until` (it is spent before then), so it leaves each window
-- no earlier than the hits it stands for, and stays in the current slice's
-- entry. A lease that does not fit reports waits of 1 (none are computed).

-- (limiter_common.lua, prepended, defines now, num() and keep_alive(); the
-- batch script calls flush_all() after the run's acquires)

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

-- One script run reads each window once and writes it once: its state is
-- loaded on first use (pruned, totals, oldest entry), the run's admissions add
-- up in memory and reach Redis in one write per window (flush), before the log
-- is read again (a wait) and at the end of the run. Decisions are the same
-- as one call per request (tests/deployments/test_limiter_batch_equivalence.py).
local states, loaded = {}, {}
local deferred = {} -- log key -> settlement groups to apply when the window loads

-- A settlement of a window this run loads anyway is applied to it in memory:
-- a refund of the current slice's entry, or a charge (it always lands on the
-- current slice). It then costs no call of its own.
local function defer(log, group)
  local list = deferred[log]
  if not list then
    list = {}
    deferred[log] = list
  end
  list[#list + 1] = group
end

-- The current slice's entry gained usage: its score rises to `at` (ZADD GT).
local function stamp_at(w, at)
  w.stamp, w.dirty = math.max(w.stamp or at, at), true
  -- The current slice's entry is the newest; it is also the oldest when it
  -- is the only one.
  if w.oldest < 0 then
    w.oldest, w.oldest_member = at, w.member
  elseif w.oldest_member == w.member then
    w.oldest = math.max(w.oldest, at)
  end
end

local function apply_deferred(w)
  for _, g in ipairs(deferred[w.log] or {}) do
    if g.delta < 0 or g.requests < 0 then -- settle(): at most what the entry holds
      local give = math.min(-math.min(g.delta, 0), w.entry_t)
      local give_r = math.min(-g.requests, w.entry_r)
      w.entry_t, w.used_t = w.entry_t - give, w.used_t - give
      w.entry_r, w.used_r = w.entry_r - give_r, w.used_r - give_r
      if give > 0 or give_r > 0 then w.dirty = true end
    else -- charge()
      w.entry_t, w.used_t = w.entry_t + g.delta, w.used_t + g.delta
      stamp_at(w, now)
    end
    g.reply = 1
  end
end

local function load(c)
  local w = states[c.log]
  if w then return w end
  local oldest = redis.call('ZRANGE', c.log, 0, 0, 'WITHSCORES')
  if oldest[2] and tonumber(oldest[2]) <= now - c.window then -- something left the window
    prune(c.log, c.costs, c.window)
    oldest = redis.call('ZRANGE', c.log, 0, 0, 'WITHSCORES')
  end
  local member = num(now - now % c.resolution)
  local held = redis.call('HMGET', c.costs, 'R', 'T', 'r' .. member, 't' .. member)
  w = {
    log = c.log, costs = c.costs, window = c.window, resolution = c.resolution,
    member = member, stamp = nil, dirty = false,
    -- the totals and the current slice's entry, this run's admissions included
    used_r = tonumber(held[1]) or 0, used_t = tonumber(held[2]) or 0,
    entry_r = tonumber(held[3]) or 0, entry_t = tonumber(held[4]) or 0,
    oldest_member = oldest[1], oldest = oldest[2] and tonumber(oldest[2]) or -1,
  }
  apply_deferred(w)
  states[c.log] = w
  loaded[#loaded + 1] = w
  return w
end

-- What charge() and settle() do, with the sums of the whole run: the entry is
-- stamped (ZADD) if it gained usage, and its counts and the totals are one
-- HSET of the new values (nothing else writes these fields during the run).
local function flush(w)
  if w.dirty then
    w.dirty = false
    redis.call('HSET', w.costs, 'R', w.used_r, 'T', w.used_t,
      'r' .. w.member, w.entry_r, 't' .. w.member, w.entry_t)
  end
  if w.stamp then -- after the HSET: a new entry's PEXPIRE needs both keys to exist
    local at = w.stamp
    w.stamp = nil
    if redis.call('ZADD', w.log, 'GT', num(at), w.member) == 1 then
      keep_alive(w.log, w.costs, w.window, w.resolution)
    end
  end
end

local function flush_all()
  for _, w in ipairs(loaded) do flush(w) end
end

local function wait(w, field, used, need, limit)
  if limit < 0 or used + need <= limit then return 0 end
  if need > limit then return -1 end
  flush(w) -- the log must hold this run's admissions before it is read
  return wait_for(w.log, w.costs, w.window, field, used + need - limit)
end

local function acquire(cost, checks, lease)
  local out = {now, 1, 1}
  local enforced_ok, all_ok = true, true
  local count, stamp = 1, now
  if lease then
    count, stamp = lease.requests, now + lease.for_us
    for _, c in ipairs(checks) do
      stamp = math.min(stamp, now - now % c.resolution + c.resolution - 1)
    end
  end
  local mine = {}
  for i, c in ipairs(checks) do
    local w = load(c)
    mine[i] = w
    local wait_r, wait_t
    if lease then
      -- a lease keeps every window at most half full: the rest is decided exactly
      local fits_r = c.requests < 0 or w.used_r + count <= math.floor(c.requests / 2)
      local fits_t = c.tokens < 0 or w.used_t + cost <= math.floor(c.tokens / 2)
      wait_r, wait_t = fits_r and 0 or 1, fits_t and 0 or 1
    else
      wait_r = wait(w, 'r', w.used_r, 1, c.requests)
      wait_t = wait(w, 't', w.used_t, cost, c.tokens)
    end
    if wait_r ~= 0 or wait_t ~= 0 then
      all_ok = false
      if not c.shadow or lease then enforced_ok = false end
    end
    local at = 4 + 5 * (i - 1)
    out[at], out[at + 1], out[at + 3], out[at + 4] = w.used_r, w.used_t, wait_r, wait_t
  end
  for i, c in ipairs(checks) do
    local w = mine[i]
    if enforced_ok and (all_ok or not c.shadow) then
      w.used_r, w.used_t = w.used_r + count, w.used_t + cost
      w.entry_r, w.entry_t = w.entry_r + count, w.entry_t + cost
      stamp_at(w, stamp)
    end
    out[4 + 5 * (i - 1) + 2] = w.oldest
  end
  out[2] = enforced_ok and 1 or 0
  out[3] = all_ok and 1 or 0
  if lease then out[#out + 1] = stamp end
  return out
end
