-- KEYS: history, epoch, message_channel, markers...
-- ARGV: marker_ttl, maxlen, idle_ttl, publish, oldest, frame_tail, frames...
-- What rules add to a batch's deliveries (alert frames, copies routed to
-- other channels), for one target channel: messages appended to its history
-- and published, exactly once, guarded by a marker per source message and
-- target set in the same script (a task run again after a worker died
-- between the delivery and this finds the markers, and adds nothing, not
-- even an alert a second evaluation under a newer version would have made).
-- Every key is the target channel's, so it runs in that channel's slot on a
-- cluster. `frames` holds, for each marker, how many frames it guards, then
-- their message frame heads. Returns how many it delivered.
local added, first, at = 0, nil, 1
for _, marker in ipairs(markers) do
  local count = tonumber(frames[at])
  if redis.call('SET', marker, '1', 'NX', 'EX', marker_ttl) then
    for j = at + 1, at + count do
      local sid = redis.call('XADD', history, 'MAXLEN', maxlen, '*', 'f', frames[j])
      redis.call(publish, message_channel, sid .. SEPARATOR .. frames[j] .. sid .. frame_tail)
      first = first or sid
      added = added + 1
    end
  end
  at = at + count + 1
end
if added == 0 then return 0 end
if oldest ~= '' then redis.call('XTRIM', history, 'MINID', oldest) end
redis.call('EXPIRE', history, idle_ttl)
redis.call('SET', epoch, first, 'NX')
redis.call('EXPIRE', epoch, idle_ttl)
return added
