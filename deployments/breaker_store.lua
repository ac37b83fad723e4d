-- One circuit breaker's state machine, run atomically (BreakerMachine in breaker.py
-- is the same algorithm; both pass tests/deployments/test_breaker_store.py).
--
-- KEYS[1] breaker:{name}         hash: st, gen, opens, until, hosince, hoc, hof, hos, pid, np
-- KEYS[2] breaker:{name}:leases  zset: half-open permit id -> lease expiry (ms)
-- KEYS[3] breaker:{name}:window  hash: cfg, n, f, s, head, r<i> (COUNT_BASED outcome codes)
--                                      or b<i> = "sec:calls:failed:slow" (TIME_BASED buckets)
-- ARGV[1]  op: acquire | record | open_for | set_state | snapshot
-- ARGV[2]  now in ms, or "" to use the server's clock (TIME): tests inject a clock
-- ARGV[3]  window type (0 COUNT_BASED, 1 TIME_BASED)   ARGV[4] window size (calls | s)
-- ARGV[5]  minimum calls (already capped by a count window's size)
-- ARGV[6]  failure rate threshold (%)                  ARGV[7] slow call rate threshold (%)
-- ARGV[8]  wait in open (ms)  ARGV[9] wait multiplier  ARGV[10] max wait in open (ms)
-- ARGV[11] permitted calls in half-open                ARGV[12] max wait in half-open (ms, 0 off)
-- ARGV[13] max open-for (ms)
-- ARGV[14..] per op: acquire: lease ms | record: generation, permit id, outcome code,
--            open-for ms, count (that many equal outcomes; 1 if absent) | open_for: ms |
--            set_state: state code
-- States: 0 CLOSED 1 OPEN 2 HALF_OPEN 3 FORCED_OPEN 4 DISABLED 5 METRICS_ONLY.
-- Outcomes: 0 success 1 failure 2 slow success 3 slow failure 4 ignored.
-- Returns {allowed, state, generation, permit id, retry-after ms, from, to} (from/to -1: none),
-- or for snapshot {state, generation, calls, failed, slow, not permitted, in flight,
-- half-open calls, open remaining ms}.

local H, L, W = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local wtype, wsize, minc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local fthr, sthr = tonumber(ARGV[6]), tonumber(ARGV[7])
local wait_ms, wmult, max_wait = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local permits, max_ho, max_open_for = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local CLOSED, OPEN, HALF, FORCED, DISABLED, METRICS = 0, 1, 2, 3, 4, 5
local wcfg = wtype .. ':' .. wsize

local function num(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end

local state, gen = num(H, 'st'), num(H, 'gen')

local function trips(f, s, n)
  return f * 100 >= fthr * n or s * 100 >= sthr * n
end

local function reply(allowed, pid, retry, moved)
  local from, to = -1, -1
  if moved then from, to = moved[1], moved[2] end
  return {allowed, state, gen, pid, retry, from, to}
end

local function to(new, open_ms)
  local old = state
  state, gen = new, gen + 1
  redis.call('HSET', H, 'st', new, 'gen', gen, 'hoc', 0, 'hof', 0, 'hos', 0)
  redis.call('DEL', L)
  if new == CLOSED or new == METRICS then redis.call('DEL', W) end
  if new == CLOSED then
    redis.call('HSET', H, 'opens', 0)
  elseif new == OPEN then
    if not open_ms or open_ms <= 0 then
      local opens = num(H, 'opens') + 1
      redis.call('HSET', H, 'opens', opens)
      open_ms = math.floor(math.min(wait_ms * wmult ^ (opens - 1), math.max(max_wait, wait_ms)))
    end
    redis.call('HSET', H, 'until', now + open_ms)
  elseif new == HALF then
    redis.call('HSET', H, 'hosince', now)
  end
  return {old, new}
end

local function flags(code)
  local failed, slow = 0, 0
  if code == 1 or code == 3 then failed = 1 end
  if code == 2 or code == 3 then slow = 1 end
  return failed, slow
end

local function window_counts()
  if redis.call('HGET', W, 'cfg') ~= wcfg then return 0, 0, 0 end
  if wtype == 0 then return num(W, 'n'), num(W, 'f'), num(W, 's') end
  local oldest = math.floor(now / 1000) - wsize
  local n, f, s = 0, 0, 0
  local all = redis.call('HGETALL', W)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) == 'b' then
      local bs, c, bf, bsl = string.match(all[i + 1], '(-?%d+):(%d+):(%d+):(%d+)')
      if tonumber(bs) > oldest then
        n, f, s = n + tonumber(c), f + tonumber(bf), s + tonumber(bsl)
      end
    end
  end
  return n, f, s
end

local function window_add(code, count)
  if redis.call('HGET', W, 'cfg') ~= wcfg then
    redis.call('DEL', W)
    redis.call('HSET', W, 'cfg', wcfg)
  end
  local failed, slow = flags(code)
  if wtype == 0 then
    local head = num(W, 'head')
    local n, f, s = num(W, 'n'), num(W, 'f'), num(W, 's')
    if n == wsize and f == 0 and s == 0 and failed == 0 and slow == 0 then
      -- A full window of fast successes (a healthy upstream) stays one: only the head moves.
      redis.call('HSET', W, 'head', (head + count) % wsize)
      return n, f, s
    end
    for _ = 1, math.min(count, wsize) do  -- more than the window holds would be overwritten
      local old = redis.call('HGET', W, 'r' .. head)
      if old then
        local of, os = flags(tonumber(old))
        n, f, s = n - 1, f - of, s - os
      end
      n, f, s = n + 1, f + failed, s + slow
      redis.call('HSET', W, 'r' .. head, code)
      head = (head + 1) % wsize
    end
    redis.call('HSET', W, 'head', head, 'n', n, 'f', f, 's', s)
    return n, f, s
  end
  local sec = math.floor(now / 1000)
  local field = 'b' .. (sec % wsize)
  local c, bf, bsl = 0, 0, 0
  local bucket = redis.call('HGET', W, field)
  if bucket then
    local bs, bc, bbf, bbs = string.match(bucket, '(-?%d+):(%d+):(%d+):(%d+)')
    if tonumber(bs) == sec then c, bf, bsl = tonumber(bc), tonumber(bbf), tonumber(bbs) end
  end
  c, bf, bsl = c + count, bf + failed * count, bsl + slow * count
  redis.call('HSET', W, field, sec .. ':' .. c .. ':' .. bf .. ':' .. bsl)
  return window_counts()
end

local function open_for(ms)
  ms = math.min(ms, max_open_for)
  if state == FORCED or state == DISABLED or state == METRICS then return reply(0, 0, 0, nil) end
  if state == OPEN then
    local u = math.max(num(H, 'until'), now + ms)
    redis.call('HSET', H, 'until', u)
    return reply(0, 0, u - now, nil)
  end
  local moved = to(OPEN, ms)
  return reply(0, 0, ms, moved)
end

local function acquire(lease)
  local moved = nil
  if state == OPEN and now >= num(H, 'until') then moved = to(HALF) end
  if state == HALF and max_ho > 0 and now >= num(H, 'hosince') + max_ho then moved = to(OPEN) end
  if state == OPEN or state == FORCED then
    redis.call('HINCRBY', H, 'np', 1)
    local remaining = wait_ms
    if state == OPEN then remaining = num(H, 'until') - now end
    return reply(0, 0, remaining, moved)
  end
  if state ~= HALF then return reply(1, 0, 0, moved) end
  redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
  if num(H, 'hoc') + redis.call('ZCARD', L) >= permits then
    redis.call('HINCRBY', H, 'np', 1)
    return reply(0, 0, 1000, moved)
  end
  local pid = redis.call('HINCRBY', H, 'pid', 1)
  redis.call('ZADD', L, now + lease, pid)
  return reply(1, pid, 0, moved)
end

local function record_half_open(pid, code)
  if redis.call('ZREM', L, pid) == 0 or code == 4 then return reply(0, 0, 0, nil) end
  local failed, slow = flags(code)
  local n = redis.call('HINCRBY', H, 'hoc', 1)
  local f = redis.call('HINCRBY', H, 'hof', failed)
  local s = redis.call('HINCRBY', H, 'hos', slow)
  if n < permits then return reply(0, 0, 0, nil) end
  if trips(f, s, n) then return reply(0, 0, 0, to(OPEN)) end
  return reply(0, 0, 0, to(CLOSED))
end

local function record(pgen, pid, code, open_ms, count)
  local current = pgen == gen
  if open_ms > 0 then
    -- The upstream's own retry-after is news whatever state we are in.
    if current then redis.call('ZREM', L, pid) end
    return open_for(open_ms)
  end
  if not current then return reply(0, 0, 0, nil) end
  if state == HALF then return record_half_open(pid, code) end
  if code == 4 or (state ~= CLOSED and state ~= METRICS) then return reply(0, 0, 0, nil) end
  local n, f, s = window_add(code, count)
  if state == CLOSED and n >= minc and trips(f, s, n) then return reply(0, 0, 0, to(OPEN)) end
  return reply(0, 0, 0, nil)
end

if op == 'acquire' then
  return acquire(tonumber(ARGV[14]))
elseif op == 'record' then
  local count = tonumber(ARGV[18] or '1')
  return record(tonumber(ARGV[14]), ARGV[15], tonumber(ARGV[16]), tonumber(ARGV[17]), count)
elseif op == 'open_for' then
  return open_for(tonumber(ARGV[14]))
elseif op == 'set_state' then
  local moved = to(tonumber(ARGV[14]))
  return reply(0, 0, 0, moved)
elseif op == 'snapshot' then
  local n, f, s = window_counts()
  if state == HALF then n, f, s = num(H, 'hoc'), num(H, 'hof'), num(H, 'hos') end
  local remaining = 0
  if state == OPEN then remaining = math.max(0, num(H, 'until') - now) end
  local inflight = redis.call('ZCOUNT', L, '(' .. now, '+inf')
  return {state, gen, n, f, s, num(H, 'np'), inflight, num(H, 'hoc'), remaining}
end
return redis.error_reply('unknown op ' .. tostring(op))
