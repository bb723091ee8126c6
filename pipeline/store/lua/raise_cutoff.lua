-- KEYS: users
-- ARGV: user, cutoff
-- A user's revocation cut-off only moves forward: a later request with an
-- earlier time must not bring that user's revoked tokens back. Returns the
-- cut-off in force.
local stored = redis.call('HGET', users, user)
if not stored or tonumber(cutoff) > tonumber(stored) then
  redis.call('HSET', users, user, cutoff)
  return cutoff
end
return stored
