-- KEYS: leaving, members, subscribers, events
-- ARGV: now, field, entries...
-- Ends the pending leaves and vacates of `entries` (quadruples: the pending
-- member of `leaving`, `members` or `subscribers` (the hash its count is in),
-- the field of that count, the event to append or '') that are due by `now`
-- and still pending: each is removed and, if its count is still 0, its event
-- appended. Whoever removes an entry appends its event: several processes
-- flushing append it once. Returns how many events it appended.
local appended = 0
for i = 1, #entries, 4 do
  local pending, hash, counted, body = entries[i], entries[i + 1], entries[i + 2], entries[i + 3]
  local due = redis.call('ZSCORE', leaving, pending)
  if due and tonumber(due) <= tonumber(now) then
    redis.call('ZREM', leaving, pending)
    local counts = hash == 'members' and members or subscribers
    if redis.call('HEXISTS', counts, counted) == 0 and body ~= '' then
      redis.call('XADD', events, '*', field, body)
      appended = appended + 1
    end
  end
end
return appended
