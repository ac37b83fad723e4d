-- A follower stops following a stream before its end (its clients left, or it waited past
-- its deadline): it is uncounted, so that the leader can stop a stream nobody reads.
-- KEYS[1]  lock key
-- KEYS[2]  followers key
-- ARGV[1]  token               (the leader it followed)
-- Returns how many followers are left, or -1 when that leader no longer holds the lock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local left = redis.call('DECR', KEYS[2])
  if left <= 0 then
    redis.call('DEL', KEYS[2])
    return 0
  end
  return left
end
return -1
