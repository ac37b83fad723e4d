-- Publish a flight's result (value or error) and release its lock.
-- KEYS[1]  lock key
-- KEYS[2]  result key          (per flight token; read by waiters that subscribed late)
-- ARGV[1]  token               (the leader's flight id)
-- ARGV[2]  payload             (bytes: tag + value or encoded error)
-- ARGV[3]  result ttl          (milliseconds)
-- ARGV[4]  channel             (pub/sub channel the waiters listen on)
-- Returns the number of replicas notified.
-- The result is written even if the lock was taken over: waiters that still
-- follow this token can use it; the newer owner's waiters read their own key.
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return redis.call('PUBLISH', ARGV[4], ARGV[1])
