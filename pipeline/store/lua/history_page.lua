-- KEYS: history
-- ARGV: start, most, budget
-- A page of a channel's history from `start` ('-' or '(<id>'): entries in
-- order, until their 'f' fields pass `budget` bytes (at least one, so paging
-- always moves on), at most `most`. Returns {entries, more}: `more` is 1 when
-- the stream holds more after the last. Read a chunk at a time in Redis, so
-- the reply and the page built from it stay near the budget.
most, budget = tonumber(most), tonumber(budget)
local page, used = {}, 0
while true do
  local want = math.min(most + 1 - #page, 64)
  local chunk = redis.call('XRANGE', history, start, '+', 'COUNT', want)
  for _, entry in ipairs(chunk) do
    local size = string.len(entry[2][2])
    if #page == most or (#page > 0 and used + size > budget) then return {page, 1} end
    page[#page + 1] = entry
    used = used + size
  end
  if #chunk < want then return {page, 0} end
  start = '(' .. chunk[#chunk][1]
end
