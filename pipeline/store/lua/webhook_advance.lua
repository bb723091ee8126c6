-- KEYS: lease, cursor, stream, dead_letters, cursors...
-- ARGV: token, position, cap, field, reason, failed_at, letters...
-- Moves a receiver's cursor to `position`, only while `token` holds its
-- lease (a task whose lease lapsed and was taken by another moves nothing),
-- dead-lettering `letters` (events' JSON, under `field`) with `reason` in the same step, so
-- no batch is both dead-lettered and sent again. Then the stream is trimmed
-- up to the smallest cursor of every receiver (`cursors`): entries all have
-- passed. A receiver with no cursor yet has read nothing: no trim.
-- Returns 1 when moved, 0 when the lease is not ours.
if redis.call('GET', lease) ~= token then return 0 end
for i = 1, #letters do
  redis.call('XADD', dead_letters, 'MAXLEN', '~', cap, '*', field, letters[i], 'r', reason, 't', failed_at)
end
redis.call('SET', cursor, position)
local function older(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams < bms or (ams == bms and tonumber(aseq) < tonumber(bseq))
end
local least = nil
for i = 1, #cursors do
  local at = redis.call('GET', cursors[i])
  if not at then return 1 end
  if least == nil or older(at, least) then least = at end
end
if least then redis.call('XTRIM', stream, 'MINID', least) end
return 1
