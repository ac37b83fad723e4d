-- Release the lock if the caller still owns it.
-- KEYS[1]  lock key
-- KEYS[2]  followers key
-- ARGV[1]  token               (the owner's flight id)
-- Returns 1 when released, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
