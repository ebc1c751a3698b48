-- counters: one consistent snapshot of a queue.
--
-- KEYS[1] ready   KEYS[2] counters (hash)   KEYS[3] dead   KEYS[4] delayed
-- KEYS[5] consumers:beat   KEYS[6] producers:beat   KEYS[7] closed
-- KEYS[8] suspects (ready too: tasks of dead consumers, taken one at a time)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] in-flight key prefix ("pcq:{NAME}:inflight:"; same hash slot as KEYS)
-- ARGV[2] SENTINEL_PREFIX (first bytes of any sentinel)
--
-- Returns {ready, in_flight, pending, produced, done, failed, retried, dead,
--          delayed, live consumers, live producers, closed}.
-- One script, so the numbers belong to one instant (pending never looks done
-- while its tasks move between lists).
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local in_flight = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  in_flight = in_flight + redis.call('LLEN', ARGV[1] .. id)
end
-- Sentinels are not tasks: close LPUSHes them behind every task, so they wait
-- at the left end of ready. Count them from there, a chunk at a time, and leave
-- them out of ready.
local ready = redis.call('LLEN', KEYS[1])
local p = ARGV[2] or ''
local at, more = 0, p ~= ''
while more and at < ready do
  local chunk = redis.call('LRANGE', KEYS[1], at, at + 63)
  if #chunk == 0 then break end
  for _, m in ipairs(chunk) do
    if string.sub(m, 1, #p) ~= p then more = false; break end
    at = at + 1
  end
end
local c = redis.call('HMGET', KEYS[2], 'pending', 'produced', 'done', 'failed', 'retried')
return {
  ready - at + redis.call('LLEN', KEYS[8]), in_flight,
  tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0'),
  tonumber(c[4] or '0'), tonumber(c[5] or '0'),
  redis.call('LLEN', KEYS[3]), redis.call('ZCARD', KEYS[4]),
  redis.call('ZCOUNT', KEYS[5], '(' .. now, '+inf'),
  redis.call('ZCOUNT', KEYS[6], '(' .. now, '+inf'),
  redis.call('EXISTS', KEYS[7]),
}
