-- KEYS: subscribers, channels, members, users, leaving, node, nodes, events
-- ARGV: channel, member, vacancy, node_name, subscription, field, occupied, join
-- One subscription more to `channel` by the user of `member` ([channel, user]
-- in JSON), on the web process `node_name`, whose `node` hash keeps it as
-- `subscription` ([channel, user, client]): one entry a subscription, so its
-- leave takes off exactly what it added, and a join counted already counts
-- nothing. A channel's first subscriber appends `occupied`, a user's first
-- subscription `join` (each only when given, not ''), unless it cancels the
-- pending vacate (`vacancy`, [channel]) or leave (`member`) a last one left
-- waiting out the grace: a reconnect within it sends nothing. Returns how
-- many events it appended.
if redis.call('HSETNX', node, subscription, 1) == 0 then return 0 end
local appended = 0
redis.call('SADD', nodes, node_name)
if redis.call('HINCRBY', subscribers, channel, 1) == 1 then
  redis.call('ZADD', channels, 0, channel)
  if redis.call('ZREM', leaving, vacancy) == 0 and occupied ~= '' then
    redis.call('XADD', events, '*', field, occupied)
    appended = appended + 1
  end
end
if redis.call('HINCRBY', members, member, 1) == 1 then
  redis.call('HINCRBY', users, channel, 1)
  if redis.call('ZREM', leaving, member) == 0 and join ~= '' then
    redis.call('XADD', events, '*', field, join)
    appended = appended + 1
  end
end
return appended
