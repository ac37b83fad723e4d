-- Take the single-flight lock for a key, or say who holds it.
-- KEYS[1]  lock key            ({hash tag} shared with the flight's result and stream keys)
-- KEYS[2]  followers key       (how many callers found the lock taken: the leader writes its
--                              result for them only when there are any)
-- ARGV[1]  token               (this caller's flight id)
-- ARGV[2]  ttl                 (milliseconds)
-- Returns {1, token, ttl_ms} when taken, else {0, owner_token, remaining_ttl_ms}.
-- Sent again with the same token (the store client retries a call whose reply was lost), it
-- finds its own lock: taken, and no follower is counted (the leader would write its answer
-- for nobody).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])  -- a count left by an earlier holder is not this flight's
  return {1, ARGV[1], tonumber(ARGV[2])}
end
local owner = redis.call('GET', KEYS[1])
local pttl = redis.call('PTTL', KEYS[1])
if not owner then
  -- Expired between SET and GET (cannot happen inside one script, kept for safety).
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
if owner == ARGV[1] then
  return {1, owner, pttl}
end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], pttl > 0 and pttl or ARGV[2])
return {0, owner, pttl}
