-- requeue: turn dead letters read from the head of `dead` back into pending tasks.
--
-- KEYS[1] dead   KEYS[2] ready   KEYS[3] counters (pending, failed, queued)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] k: letters the caller read from the head of dead
-- ARGV[2] nn: fresh task messages made from them (attempts reset), in RPUSH order
-- ARGV[3] nk: letters that hold no task (undecodable input), kept
-- then the k letters as read, the nn messages, the nk kept letters.
--
-- Returns nn, or -1 when the head of dead changed since it was read (read again).
--
-- Races prevented: the letters leave dead and the tasks enter ready (counted
-- pending again, failed no more) in one step, and only if nobody requeued or
-- purged them meanwhile, so a letter is never requeued twice.  The tasks go to the
-- consumer end, like retries: ahead of any sentinel, so on a closed queue the
-- consumers handle them before they stop (and a consumer started later drains
-- them, then stops); the queue stays closed or open as it was.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local k, nn, nk = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local head = redis.call('LRANGE', KEYS[1], 0, k - 1)
if #head ~= k then return -1 end
for i = 1, k do
  if head[i] ~= ARGV[3 + i] then return -1 end
end
redis.call('LTRIM', KEYS[1], k, -1)
queued(KEYS[2], KEYS[3])  -- read before the push below
local at = 3 + k
for i = at + 1, at + nn, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, at + nn)))
end
add_queued(KEYS[3], tasks_in_all(ARGV, at + 1, at + nn))
at = at + nn
for i = at + 1, at + nk, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, at + nk)))
end
if nn > 0 then
  redis.call('HINCRBY', KEYS[3], 'pending', nn)
  local failed = tonumber(redis.call('HGET', KEYS[3], 'failed') or '0')
  redis.call('HSET', KEYS[3], 'failed', math.max(0, failed - nn))
end
return nn
