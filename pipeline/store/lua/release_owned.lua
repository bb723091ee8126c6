-- KEYS: key
-- ARGV: token
-- Compare and delete: only the owner (who set `token`) lets go of a claim or
-- a lock; one that lapsed and was taken by another is not ours to delete.
if redis.call('GET', key) == token then return redis.call('DEL', key) end
return 0
