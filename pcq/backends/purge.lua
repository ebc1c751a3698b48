-- purge: drop every task that is ready, delayed or in flight, and reset the counters.
--
-- KEYS[1] ready   KEYS[2] delayed   KEYS[3] counters   KEYS[4] consumers:beat
-- KEYS[5] full   KEYS[6] space   KEYS[7] acked (ack tokens; see ack.lua)
-- KEYS[8] suspects   KEYS[9] deaths   KEYS[10] holding (poison tasks; see reap.lua)
-- KEYS[11] puts (ids of the puts of the run; see put.lua)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] in-flight key prefix ("pcq:{NAME}:inflight:"; same hash slot as KEYS)
-- ARGV[2] landing key prefix ("pcq:{NAME}:landing:"; see take.lua)
--
-- Returns how many tasks were dropped: those pending (ready, suspects, delayed or
-- in flight).
-- Dead letters and registrations stay, and so does whether the run is closed
-- (`closed`, `epoch`): purge empties a run, it does not reopen it.  On a closed
-- queue the live consumers find it drained and stop; consumers waiting for the
-- next run go on waiting.
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local n = math.max(0, tonumber(redis.call('HGET', KEYS[3], 'pending') or '0'))
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  redis.call('DEL', ARGV[1] .. id, ARGV[2] .. id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[7])
redis.call('DEL', KEYS[8], KEYS[9], KEYS[10], KEYS[11])
return n
