-- counters: one consistent snapshot of a queue.
--
-- KEYS[1] ready   KEYS[2] counters (hash)   KEYS[3] dead   KEYS[4] delayed
-- KEYS[5] consumers:beat   KEYS[6] producers:beat   KEYS[7] closed
-- KEYS[8] suspects (ready too: tasks of dead consumers, taken one at a time)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] in-flight key prefix ("pcq:{NAME}:inflight:"; same hash slot as KEYS)
--
-- Returns {ready, in_flight, pending, produced, done, failed, retried, dead,
--          delayed, live consumers, live producers, closed}.
-- One script, so the numbers belong to one instant (pending never looks done
-- while its tasks move between lists).  Counts are of tasks: ready is `queued`
-- (see put.lua) and the suspects (one task each); in flight is read from the
-- messages in the in-flight lists.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local in_flight = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  in_flight = in_flight + tasks_in_all(redis.call('LRANGE', ARGV[1] .. id, 0, -1))
end
local ready = queued(KEYS[1], KEYS[2], true)
local c = redis.call('HMGET', KEYS[2], 'pending', 'produced', 'done', 'failed', 'retried')
return {
  ready + redis.call('LLEN', KEYS[8]), in_flight,
  tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(c[3] or '0'),
  tonumber(c[4] or '0'), tonumber(c[5] or '0'),
  redis.call('LLEN', KEYS[3]), redis.call('ZCARD', KEYS[4]),
  redis.call('ZCOUNT', KEYS[5], '(' .. now, '+inf'),
  redis.call('ZCOUNT', KEYS[6], '(' .. now, '+inf'),
  redis.call('EXISTS', KEYS[7]),
}
