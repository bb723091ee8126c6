-- KEYS: subscribers, channels, members, users, leaving, node, nodes, events
-- ARGV: node_name, field, horizon, pending_read, entries...
-- Takes a dead web process's subscriptions off the counts: `entries` are
-- sextuples (a subscription of its `node` hash, its member [channel, user],
-- its channel's vacancy [channel], the channel, the leave event, the vacated
-- event; '' for one not wanted). Each still in the hash is removed and
-- counts one less; a user left with none appends its leave at once (no
-- grace: a client that reconnected elsewhere counts again already). A
-- channel left with none appends its vacate at once, unless a living user's
-- leave of it waits out its grace: then the vacate waits too, due with the
-- last such leave (at the same due time a leave, [c, u], sorts before the
-- vacate, [c], so the flusher ends it first), and the channel's events stay
-- in order. `horizon` is the latest a pending leave can be due ('' when
-- leaves never wait); `leaving` is read once, at most `pending_read`
-- entries: when there are more, every emptied channel's vacate waits until
-- the horizon. Once the hash is empty the process leaves `nodes`. Returns
-- how many events it appended.
local appended = 0
local last_leave  -- channel -> due of its last pending leave, read when a channel first empties
local function vacate_due(channel)
  if horizon == '' then return nil end
  if last_leave == nil then
    local limit = tonumber(pending_read)
    local found = redis.call('ZRANGE', leaving, 0, limit - 1, 'WITHSCORES')
    if #found >= 2 * limit then
      last_leave = false  -- too many to read here: every vacate waits until the horizon
    else
      last_leave = {}
      for i = 1, #found, 2 do
        local parts = cjson.decode(found[i])
        local due = tonumber(found[i + 1])
        if #parts > 1 and (last_leave[parts[1]] or -math.huge) < due then last_leave[parts[1]] = due end
      end
    end
  end
  if last_leave == false then return horizon end
  return last_leave[channel]
end
for i = 1, #entries, 6 do
  local subscription, member, vacancy, channel = entries[i], entries[i + 1], entries[i + 2], entries[i + 3]
  local leave, vacated = entries[i + 4], entries[i + 5]
  local _, user_left, emptied = take_off(subscription, member, channel)
  if user_left then appended = appended + append(leave) end
  if emptied then
    local due = vacate_due(channel)
    if due ~= nil then redis.call('ZADD', leaving, due, vacancy) else appended = appended + append(vacated) end
  end
end
if redis.call('HLEN', node) == 0 then redis.call('SREM', nodes, node_name) end
return appended
