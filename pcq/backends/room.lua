-- room: whether a stage may put its outputs on this queue now, as put.lua
-- decides for a producer: fewer than maxsize tasks ready.
--
-- KEYS[1] ready      list; its tasks are counted in `queued` (see put.lua)
-- KEYS[2] counters   hash: queued
-- KEYS[3] full       "someone waits for space": holds the maxsize (see take.lua)
-- KEYS[4] space      wake-up tokens pushed by take.lua; the waiter BLPOPs them
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] maxsize (> 0)
--
-- Returns 1 when there is room, 0 when there is none (the caller BLPOPs
-- `space`, then asks again).
--
-- Race prevented: as in put.lua, a full queue sets `full` and clears stale
-- tokens in the same step in which it finds itself full, so a take that frees
-- room afterwards always leaves a token: the waiting stage wakes when there is
-- room, no polling, no lost wake-up.  Nothing is put here: the stage's ack
-- puts its outputs, atomically with the lease, once there is room.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local maxsize = tonumber(ARGV[1])
if queued(KEYS[1], KEYS[2]) < maxsize then return 1 end
redis.call('SET', KEYS[3], maxsize, 'PX', 60000)
redis.call('DEL', KEYS[4])
return 0
