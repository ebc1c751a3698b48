-- put: append tasks to ready and count them pending, in one step.
--
-- KEYS[1] ready      list; producers LPUSH, consumers take from the right
-- KEYS[2] counters   hash: pending, produced, queued (tasks in ready), cost_ns
-- KEYS[3] closed     exists while the queue is closed
-- KEYS[4] epoch      close epoch (integer, absent = 0)
-- KEYS[5] full       "a producer waits for space": holds its maxsize (see take.lua)
-- KEYS[6] space      wake-up tokens pushed by take.lua; the waiting producer BLPOPs them
-- KEYS[7] puts       hash batch id -> how many messages that put pushed (this run)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] maxsize (0 = unbounded)
-- ARGV[2] 1 when the messages' tasks count as pending (always, but for a test's
--         foreign messages, which hold none)
-- ARGV[3] the batch id: unique to this put, the same when it is resent ('' = none)
-- ARGV[4..] messages, each a batch of tasks
--
-- Returns {pushed, cost_ns}: how many messages were pushed — all of them, or
-- with maxsize only until ready holds maxsize tasks (so ready exceeds it by
-- less than one message; 0 = full: the caller BLPOPs `space`, then calls again
-- with the rest) — and what a task costs the consumers (ns, 0 = not known yet;
-- see ack.lua), which sizes the producer's next message.
--
-- Races prevented: the push and the pending count are one step, so `pending` never
-- lags or leads the list (a retried put may duplicate a task, never miscount it).
-- A full queue sets `full` and clears stale tokens in the same step in which it
-- finds itself full, so a take that frees space afterwards always leaves a token:
-- no lost wake-up, no polling.  Putting to a closed queue reopens it: a new epoch,
-- so the sentinels already queued are stale and no consumer obeys them.
--
-- Resending (a reply lost in a cut or a failover, or a WAIT that no replica
-- answered in time): a put whose id is in `puts` pushes nothing and returns what
-- it pushed the first time, so `produced` stays exact.  It still writes (the same
-- entry again): a WAIT after the repeat then covers the first put's writes, which
-- came before it in the replication stream.  A put that pushed nothing is not
-- recorded (its retry after `space` must push).  A new run (the queue reopens)
-- forgets the ids of the last.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local id = ARGV[3]
if id ~= '' then
  local seen = redis.call('HGET', KEYS[7], id)
  if seen then
    redis.call('HSET', KEYS[7], id, seen)
    return {tonumber(seen), tonumber(redis.call('HGET', KEYS[2], 'cost_ns') or '0')}
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[3], KEYS[7])
  redis.call('INCR', KEYS[4])
end
local n = #ARGV - 3
local maxsize = tonumber(ARGV[1])
local free = math.huge
local before = queued(KEYS[1], KEYS[2])  -- read before the push below
if maxsize > 0 then
  free = maxsize - before
  if free <= 0 then
    redis.call('SET', KEYS[5], maxsize, 'PX', 60000)
    redis.call('DEL', KEYS[6])
    return {0, tonumber(redis.call('HGET', KEYS[2], 'cost_ns') or '0')}
  end
end
local tasks, pushed = 0, 0
while pushed < n and tasks < free do
  pushed = pushed + 1
  tasks = tasks + tasks_in(ARGV[pushed + 3])
end
n = pushed
for i = 4, n + 3, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, n + 3)))
end
add_queued(KEYS[2], tasks)
if ARGV[2] ~= '0' and tasks > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending', tasks)
  redis.call('HINCRBY', KEYS[2], 'produced', tasks)
end
if id ~= '' and n > 0 then redis.call('HSET', KEYS[7], id, n) end
return {n, tonumber(redis.call('HGET', KEYS[2], 'cost_ns') or '0')}
