-- KEYS: messages...
-- ARGV: values...
-- The `accepted` status of many messages at once (a batch POST): what
-- set_status.lua does for each, with no frame to publish, in one call. For
-- each message `values` holds when its hash expires, then its ACCEPTED
-- fields in that order. A message a worker already moved further is left
-- as it is.
for i, key in ipairs(messages) do
  local base = (i - 1) * (#ACCEPTED + 1)
  local current = redis.call('HGET', key, 'status')
  if not current or (RANK[current] or 0) < RANK.accepted then
    for j, name in ipairs(ACCEPTED) do redis.call('HSET', key, name, values[base + 1 + j]) end
    redis.call('HSET', key, 'status', 'accepted')
    redis.call('EXPIREAT', key, values[base + 1])
  end
end
return #messages
