-- Many limiter calls of one replica in one script run: first the token
-- settlements waiting for a ride, then the acquires, each decided on its own
-- exactly as if it ran alone (the whole run is atomic, with one clock reading).
--
-- KEYS, the distinct windows' keys, two per window k (one {hash tag}):
--   KEYS[2k-1] ZSET log, KEYS[2k] HASH costs (layout in limiter_acquire.lua)
-- ARGV (numbers as decimal text; times and windows in microseconds):
--   [1] now, microseconds since the epoch; "" = the server's clock (TIME)
--   [2] C, the number of checks; [3] S, the number of settlements
--   [3 + c], c = 1..C, one check: "k window resolution request_limit
--       token_limit shadow" (limits -1 = none; shadow 1 = report only)
--   [3 + C + s], s = 1..S, one settlement: "delta requests" then, per window
--       that recorded the request, " k member window resolution" (member = the
--       reservation's entry)
--   then one per acquire: "tokens" then " c" per check that applies; a lease
--       starts "L requests for_us tokens" instead of "tokens"
-- Returns one reply per settlement (1) then one per acquire (acquire()'s), in
-- ARGV order; a call that fails is an error reply in its place, the others
-- still run (its own writes before the failure stay, as with any script).

-- (limiter_common.lua, limiter_settle.lua and limiter_acquire.lua, prepended,
-- define now, keep_alive(), settle(), defer(), acquire() and flush_all())

local function words(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do out[#out + 1] = word end
  return out
end

-- Runs fn(...); an error becomes this call's error reply, not the whole run's.
local function isolated(fn, ...)
  local ok, result = pcall(fn, ...)
  if ok then return result or 1 end
  return redis.error_reply(type(result) == 'table' and result.err or tostring(result))
end

local replies = {}
local count_checks, count_settle = tonumber(ARGV[2]), tonumber(ARGV[3])
local checks = {}
for c = 1, count_checks do
  local w = words(ARGV[3 + c])
  local k = tonumber(w[1])
  checks[c] = {
    log = KEYS[2 * k - 1], costs = KEYS[2 * k], window = tonumber(w[2]),
    resolution = tonumber(w[3]), requests = tonumber(w[4]), tokens = tonumber(w[5]),
    shadow = w[6] == '1',
  }
end

-- Settlements of one window entry add up and go as one (a refund is capped by
-- what the entry holds, so the sum gives what one after another would).
local groups, group_list, settle_groups = {}, {}, {}
for s = 1, count_settle do
  local w = words(ARGV[3 + count_checks + s])
  local delta, requests = tonumber(w[1]), tonumber(w[2])
  local refund = delta < 0 or requests < 0
  local mine = {}
  for j = 3, #w, 4 do
    local id = w[j] .. ' ' .. (refund and w[j + 1] or '+')
    local g = groups[id]
    if not g then
      local k = tonumber(w[j])
      g = {
        delta = 0, requests = 0, window = {
          log = KEYS[2 * k - 1], costs = KEYS[2 * k], member = w[j + 1],
          window = tonumber(w[j + 2]), resolution = tonumber(w[j + 3]),
        },
      }
      groups[id] = g
      group_list[#group_list + 1] = g
    end
    g.delta, g.requests = g.delta + delta, g.requests + requests
    mine[#mine + 1] = g
  end
  settle_groups[s] = mine
end
-- The windows the acquires will read (log key -> resolution).
local loads = {}
for _, c in ipairs(checks) do loads[c.log] = c.resolution end
for _, g in ipairs(group_list) do
  local w = g.window
  local refund = g.delta < 0 or g.requests < 0
  if loads[w.log] == w.resolution
      and (not refund or w.member == num(now - now % w.resolution)) then
    defer(w.log, g)
  else
    g.reply = isolated(settle, g.delta, g.requests, w)
  end
end

for a = 4 + count_checks + count_settle, #ARGV do
  local w = words(ARGV[a])
  local first, lease = 2, nil
  if w[1] == 'L' then
    first, lease = 5, {requests = tonumber(w[2]), for_us = tonumber(w[3])}
  end
  local mine = {}
  for j = first, #w do mine[j - first + 1] = checks[tonumber(w[j])] end
  replies[a - 3 - count_checks] = isolated(acquire, tonumber(w[first - 1]), mine, lease)
end
flush_all()

-- A deferred settlement whose window no acquire managed to load goes on its own.
for _, g in ipairs(group_list) do
  if g.reply == nil then g.reply = isolated(settle, g.delta, g.requests, g.window) end
end
for s = 1, count_settle do
  local reply = 1
  for _, g in ipairs(settle_groups[s]) do
    if type(g.reply) == 'table' and g.reply.err then reply = g.reply end
  end
  replies[s] = reply
end
return replies
