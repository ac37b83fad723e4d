-- Extend the lock while its owner still works (the leader's heartbeat).
-- KEYS[1]  lock key
-- ARGV[1]  token               (the owner's flight id)
-- ARGV[2]  ttl                 (milliseconds)
-- Returns 1 when extended, 0 when the lock is no longer the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
