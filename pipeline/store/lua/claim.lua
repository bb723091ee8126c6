-- KEYS: claim
-- ARGV: value, ttl
-- The first publish of a message id claims it. Returns nothing when
-- claimed, else the value there.
if redis.call('SET', claim, value, 'NX', 'EX', ttl) then return false end
return redis.call('GET', claim)
