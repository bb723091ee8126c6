-- KEYS: connections
-- ARGV: member, now, lapse, cap
-- Counts an open WebSocket in a sorted set of "node/client" scored by when
-- the entry lapses (entries past `now` are dropped first). Returns 1, and
-- counts nothing, when the set already holds `cap`.
redis.call('ZREMRANGEBYSCORE', connections, '-inf', tonumber(now))
if redis.call('ZCARD', connections) >= tonumber(cap) then return 1 end
redis.call('ZADD', connections, lapse, member)
redis.call('PEXPIREAT', connections, math.floor(tonumber(lapse) * 1000))
return 0
