-- KEYS: gate, history, epoch, waiting, parked, done, message_channel, status_channel, message, in_flight_index, in_flight_envelopes
-- ARGV: offset, prev, expires_at, maxlen, frame_head, frame_tail, status_frame, origin_channel, origin_client, msg_id, oldest, idle_ttl, skip, now, order_wait, publish, record
-- Every record of a channel passes this gate in Kafka order, whatever its
-- outcome: delivered, a duplicate of a message already handled (a retried
-- POST writes a second record under the same id), or skipped (dead-lettered,
-- rejected). A record whose predecessor has not passed is parked with the
-- channel under that predecessor's offset; whoever passes the gate next to
-- it takes it on (docs/design.md: "Order"). A parked record passes without
-- its predecessor only once it has been parked `order_wait` seconds and its
-- predecessor is not parked itself: a line is let go head first, in order.
-- `message` and the in-flight keys are given on a single Redis only: on a
-- cluster they live in other slots, and the caller updates them once the
-- record passed. Returns {outcome, stream id, '1' when forced past its
-- predecessor, the parked records now due: at the gate, behind this one ('' for none)}.
local at = tonumber(offset)
local last = redis.call('GET', gate)
local forced = '0'
if prev ~= '' and tonumber(last or '-1') < tonumber(prev) then
  local clock = tonumber(now)
  redis.call('ZADD', waiting, 'NX', clock, offset)
  local since = tonumber(redis.call('ZSCORE', waiting, offset))
  if clock - since < tonumber(order_wait) or redis.call('ZSCORE', waiting, prev) then
    redis.call('HSET', parked, prev, record)
    redis.call('EXPIRE', waiting, idle_ttl)
    redis.call('EXPIRE', parked, idle_ttl)
    return {'parked', '', '0', '', ''}
  end
  forced = '1'
end
redis.call('ZREM', waiting, offset)
if prev ~= '' then redis.call('HDEL', parked, prev) end
if at > tonumber(last or '-1') then
  redis.call('SET', gate, offset, 'EX', idle_ttl)
  last = offset
end
-- The parked record next to the gate, and, when this record passed below the
-- gate (the gate jumped: a record stamped without a predecessor, a forced
-- pass), the one parked behind this record itself, which nothing else names.
local due = ''
if last then due = redis.call('HGET', parked, last) or '' end
local behind = ''
if at < tonumber(last or '-1') then behind = redis.call('HGET', parked, offset) or '' end
if message then
  redis.call('ZREM', in_flight_index, msg_id)
  redis.call('HDEL', in_flight_envelopes, msg_id)
end
local marker = redis.call('GET', done)
if marker then return {'duplicate', marker, forced, due, behind} end
if skip == '1' then return {'skipped', '', forced, due, behind} end
local sid = redis.call('XADD', history, 'MAXLEN', maxlen, '*', 'f', frame_head)
if oldest ~= '' then redis.call('XTRIM', history, 'MINID', oldest) end
-- An idle channel's keys expire (a message to each of many new channels
-- must not hold Redis memory for ever).
redis.call('EXPIRE', history, idle_ttl)
redis.call('SET', epoch, sid, 'NX')
redis.call('EXPIRE', epoch, idle_ttl)
redis.call('SET', done, sid, 'EXAT', expires_at)
if message then
  redis.call('HSET', message, 'status', 'delivered', 'stream_id', sid)
  redis.call('EXPIREAT', message, expires_at)
end
redis.call(publish, message_channel, sid .. SEPARATOR .. frame_head .. sid .. frame_tail)
redis.call(publish, status_channel, status_frame)
if origin_channel ~= '' then redis.call(publish, origin_channel, origin_client .. SEPARATOR .. status_frame) end
return {'delivered', sid, forced, due, behind}
