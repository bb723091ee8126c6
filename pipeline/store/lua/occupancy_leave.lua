-- KEYS: subscribers, channels, members, users, leaving, node, nodes, events
-- ARGV: channel, member, vacancy, subscription, field, leave_due, vacate_due, leave, vacated
-- One subscription less to `channel` by the user of `member`: the one the
-- `node` hash keeps as `subscription` ([channel, user, client]); nothing when
-- that hash does not have it (never counted, taken off already by an earlier
-- try of this leave, or by the reaper), so a leave never takes off another
-- socket's count and a retried one is harmless. A user's last subscription
-- appends `leave`, a channel's last `vacated` (each only when given), or,
-- when its due time is given (not ''), waits in `leaving` until then (the
-- grace; occupancy_flush.lua appends it). Returns how many events it appended.
local taken, user_left, emptied = take_off(subscription, member, channel)
if not taken then return 0 end
local appended = 0
if user_left then
  if leave_due ~= '' then redis.call('ZADD', leaving, leave_due, member) else appended = append(leave) end
end
if emptied then
  if vacate_due ~= '' then redis.call('ZADD', leaving, vacate_due, vacancy) else appended = appended + append(vacated) end
end
return appended
