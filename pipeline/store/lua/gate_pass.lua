-- KEYS: gate, history, epoch, waiting, done, message_channel, status_channel, message, in_flight_index, in_flight_envelopes
-- ARGV: offset, prev, expires_at, maxlen, frame_head, frame_tail, status_frame, origin_channel, origin_client, force, msg_id, oldest, idle_ttl, skip, now, stuck_after, publish
-- Every record of a channel passes this gate in Kafka order, whatever its
-- outcome: delivered, a duplicate of a message already handled (a retried
-- POST writes a second record under the same id), or skipped (dead-lettered,
-- rejected). A record waits until the gate reached its channel's previous
-- offset, then moves the gate to its own (docs/design.md: "Order"). A forced
-- record (its wait ran out) passes without its predecessor only when that one
-- is not itself waiting in line (recently seen in the waiting set): so
-- records forced together still pass one after the other, in order.
-- `message` and the in-flight keys are given on a single Redis only: on a
-- cluster they live in other slots, and the caller updates them once the
-- record passed. Returns {outcome, stream id, '1' when forced past its
-- predecessor}.
local at = tonumber(offset)
local last = tonumber(redis.call('GET', gate) or '-1')
local forced = '0'
if prev ~= '' and last < tonumber(prev) then
  local clock = tonumber(now)
  local queued = false
  if force == '1' then
    local seen = redis.call('ZSCORE', waiting, prev)
    queued = seen and tonumber(seen) > clock - tonumber(stuck_after)
  end
  if force ~= '1' or queued then
    redis.call('ZADD', waiting, clock, offset)
    redis.call('ZREMRANGEBYSCORE', waiting, '-inf', clock - tonumber(idle_ttl))
    redis.call('EXPIRE', waiting, idle_ttl)
    return {'wait', '', '0'}
  end
  forced = '1'
end
redis.call('ZREM', waiting, offset)
if at > last then redis.call('SET', gate, at, 'EX', idle_ttl) end
if message then
  redis.call('ZREM', in_flight_index, msg_id)
  redis.call('HDEL', in_flight_envelopes, msg_id)
end
local marker = redis.call('GET', done)
if marker then return {'duplicate', marker, forced} end
if skip == '1' then return {'skipped', '', forced} end
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
return {'delivered', sid, forced}
