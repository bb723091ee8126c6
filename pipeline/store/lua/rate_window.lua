-- KEYS: window
-- ARGV: now, per, member, record, cap
-- A `rate` condition's window: the ids of the messages it counted, scored by
-- when. A message counted before (its task ran again) is not counted twice.
-- A full window (`cap` ids) counts no more ids: a flood would otherwise hold
-- up to a day's ids; past it every message counts as one more than the
-- window holds, which is over any `max` below the cap. `record` is '0' for a
-- dry run (only reads). Returns how many the window holds up to `member`.
local clock = tonumber(now)
redis.call('ZREMRANGEBYSCORE', window, '-inf', clock - tonumber(per))
local score = redis.call('ZSCORE', window, member)
if not score then
  local held = redis.call('ZCARD', window)
  if record ~= '1' or held >= tonumber(cap) then return held + 1 end
  redis.call('ZADD', window, clock, member)
  redis.call('PEXPIRE', window, math.ceil(tonumber(per) * 1000))
  score = clock
end
return redis.call('ZCOUNT', window, '-inf', score)
