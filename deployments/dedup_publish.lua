-- Publish a flight's result (value or error) and release its lock.
-- KEYS[1]  lock key
-- KEYS[2]  result key          (per flight token; read by waiters that subscribed late)
-- KEYS[3]  followers key       (how many callers found this flight's lock taken)
-- ARGV[1]  token               (the leader's flight id)
-- ARGV[2]  payload             (bytes: tag + value or encoded error)
-- ARGV[3]  result ttl          (milliseconds)
-- ARGV[4]  channel             (pub/sub channel the waiters listen on)
-- Returns the number of replicas notified (0 when nobody followed: nothing is written).
-- The result is written even if the lock was taken over: waiters that still
-- follow this token can use it; the newer owner's waiters read their own key.
local mine = redis.call('GET', KEYS[1]) == ARGV[1]
-- Nobody followed this flight: no waiter needs the result (a later caller takes the lock,
-- or finds the answer in the cache). After a takeover the count is the new owner's: write.
local followed = (not mine) or tonumber(redis.call('GET', KEYS[3]) or '0') > 0
if followed then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
if mine then
  redis.call('DEL', KEYS[1], KEYS[3])
end
if followed then
  return redis.call('PUBLISH', ARGV[4], ARGV[1])
end
return 0
