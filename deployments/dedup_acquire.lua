-- Take the single-flight lock for a key, or say who holds it.
-- KEYS[1]  lock key            ({hash tag} shared with the flight's result and stream keys)
-- ARGV[1]  token               (this caller's flight id)
-- ARGV[2]  ttl                 (milliseconds)
-- Returns {1, token, ttl_ms} when taken, else {0, owner_token, remaining_ttl_ms}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, ARGV[1], tonumber(ARGV[2])}
end
local owner = redis.call('GET', KEYS[1])
local pttl = redis.call('PTTL', KEYS[1])
if not owner then
  -- Expired between SET and GET (cannot happen inside one script, kept for safety).
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
return {0, owner, pttl}
