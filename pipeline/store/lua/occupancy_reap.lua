-- KEYS: subscribers, channels, members, users, leaving, node, nodes, events
-- ARGV: node_name, field, entries...
-- Takes a dead web process's subscriptions off the counts: `entries` are
-- quadruples (a member of its `node` hash, that member's channel, the leave
-- event, the vacated event; '' for one not wanted). Each member still in the
-- hash is removed with all it counted; a user left with none appends its
-- leave, a channel left with none its vacate, at once (no grace: a client
-- that reconnected elsewhere counts again already). Once the hash is empty
-- the process leaves `nodes`. Returns how many events it appended.
local appended = 0
for i = 1, #entries, 4 do
  local member, channel, leave, vacated = entries[i], entries[i + 1], entries[i + 2], entries[i + 3]
  local own = tonumber(redis.call('HGET', node, member) or '0')
  if own > 0 then
    redis.call('HDEL', node, member)
    if redis.call('HINCRBY', members, member, -own) <= 0 then
      redis.call('HDEL', members, member)
      if redis.call('HINCRBY', users, channel, -1) <= 0 then redis.call('HDEL', users, channel) end
      if leave ~= '' then
        redis.call('XADD', events, '*', field, leave)
        appended = appended + 1
      end
    end
    if redis.call('HINCRBY', subscribers, channel, -own) <= 0 then
      redis.call('HDEL', subscribers, channel)
      redis.call('ZREM', channels, channel)
      if vacated ~= '' then
        redis.call('XADD', events, '*', field, vacated)
        appended = appended + 1
      end
    end
  elseif own < 0 then
    redis.call('HDEL', node, member)
  end
end
if redis.call('HLEN', node) == 0 then redis.call('SREM', nodes, node_name) end
return appended
