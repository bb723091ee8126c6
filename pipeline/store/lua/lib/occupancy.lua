-- Shared by occupancy_leave.lua and occupancy_reap.lua (Script(uses=...)),
-- after their KEYS and ARGV are named: node, members, users, subscribers,
-- channels, events and field.

-- Takes the `node` hash's `subscription` of `member` ([channel, user]) to
-- `channel` off the counts. Returns whether the hash held it (a subscription
-- never counted, or taken off already, changes nothing), whether it was the
-- user's last one on the channel, and whether the channel is left empty.
local function take_off(subscription, member, channel)
  if redis.call('HDEL', node, subscription) == 0 then return false, false, false end
  local user_left, emptied = false, false
  if redis.call('HINCRBY', members, member, -1) <= 0 then
    redis.call('HDEL', members, member)
    if redis.call('HINCRBY', users, channel, -1) <= 0 then redis.call('HDEL', users, channel) end
    user_left = true
  end
  if redis.call('HINCRBY', subscribers, channel, -1) <= 0 then
    redis.call('HDEL', subscribers, channel)
    redis.call('ZREM', channels, channel)
    emptied = true
  end
  return true, user_left, emptied
end

-- Appends `event` to the events stream unless it is '' (not wanted); returns how many it appended.
local function append(event)
  if event == '' then return 0 end
  redis.call('XADD', events, '*', field, event)
  return 1
end
