-- purge: drop every task that is ready, delayed or in flight, and reset the counters.
--
-- KEYS[1] ready   KEYS[2] delayed   KEYS[3] counters   KEYS[4] closed
-- KEYS[5] epoch   KEYS[6] consumers:beat   KEYS[7] full   KEYS[8] space
-- KEYS[9] acked (ack tokens; see ack.lua)
-- KEYS[10] suspects   KEYS[11] deaths (poison tasks; see reap.lua)
-- KEYS[12] puts (ids of the puts of the run; see put.lua)
-- ARGV[1] in-flight key prefix ("pcq:{NAME}:inflight:"; same hash slot as KEYS)
--
-- Returns how many tasks were dropped: those pending (ready, suspects, delayed or
-- in flight).
-- Dead letters and registrations stay.  The epoch moves on instead of being reset,
-- so a sentinel some consumer of the purged run still holds is stale for the next.
local n = math.max(0, tonumber(redis.call('HGET', KEYS[3], 'pending') or '0'))
for _, id in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
  redis.call('DEL', ARGV[1] .. id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[7], KEYS[8], KEYS[9])
redis.call('DEL', KEYS[10], KEYS[11], KEYS[12])
redis.call('INCR', KEYS[5])
return n
