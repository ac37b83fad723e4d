-- Extend the lock while its owner still works (the leader's heartbeat).
-- KEYS[1]  lock key
-- KEYS[2]  followers key       (lives as long as the lock)
-- ARGV[1]  token               (the owner's flight id)
-- ARGV[2]  ttl                 (milliseconds)
-- Returns 1 when extended, 0 when the lock is no longer the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])  -- 0 (no such key) when nobody follows
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
