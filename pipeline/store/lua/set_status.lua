-- KEYS: message, status_channel
-- ARGV: status, expires_at, frame, origin_channel, origin_client, force, fields...
-- Moves a message's status forward (by RANK), never back, unless forced (a
-- replay restarting a finished message); a message taken again while it is
-- `processing` counts one more attempt. The frame goes out only where the
-- status channel is in reach (a single Redis): on a cluster it lives in
-- another slot, and the caller publishes it. Returns {status now, '1' when
-- it changed}.
local current = redis.call('HGET', message, 'status')
if current and force ~= '1' and (RANK[current] or 0) >= RANK[status] then
  if status == 'processing' and current == 'processing' then
    redis.call('HINCRBY', message, 'attempts', 1)
  end
  return {current, '0'}
end
if #fields > 0 then redis.call('HSET', message, unpack(fields)) end
redis.call('HSET', message, 'status', status)
if status == 'processing' then redis.call('HINCRBY', message, 'attempts', 1) end
redis.call('EXPIREAT', message, expires_at)
if frame ~= '' and status_channel then
  redis.call('PUBLISH', status_channel, frame)
  if origin_channel ~= '' then redis.call('PUBLISH', origin_channel, origin_client .. SEPARATOR .. frame) end
end
return {status, '1'}
