-- KEYS: lease
-- ARGV: token, ms
-- Extends a receiver's delivery lease by `ms`, only for its holder (`token`).
-- Returns 1 when extended, 0 when the lease lapsed or another holds it.
if redis.call('GET', lease) == token then return redis.call('PEXPIRE', lease, ms) end
return 0
