-- KEYS: claim
-- ARGV: token, answer, expires_at
-- The first answer of a claimed id replaces the claim, only while the claim
-- is still this request's: one that lapsed (a Redis pool wait past its TTL)
-- may be another request's by now, and its answer is not ours to overwrite.
-- Returns 1 when written.
if redis.call('GET', claim) ~= token then return 0 end
redis.call('SET', claim, answer, 'EXAT', expires_at)
return 1
