-- reap: give the in-flight tasks of consumers back to ready and unregister them.
--
-- KEYS[1] consumers        hash consumer id -> info
-- KEYS[2] consumers:beat   zset consumer id -> heartbeat expiry ms
-- KEYS[3] ready            list; RPUSH puts tasks at the consumer end (taken next)
-- KEYS[4] acked            hash consumer id -> its last ack token (see ack.lua)
-- KEYS[5] suspects         list; tasks of consumers that died, each taken alone
-- KEYS[6] deaths           hash message -> consumers that died with it in flight
-- KEYS[7] holding          hash consumer id -> the suspect it holds (see take.lua)
-- KEYS[8] killing          hash consumer id -> 1 while its supervisor kills it
-- KEYS[9] counters         hash: queued (tasks in ready; see put.lua)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] 'expired' (heartbeat expired), 'prefix' (ids starting with ARGV[2],
--         i.e. "host:pid:" of a process seen dead), 'id' (exactly ARGV[2]: detach)
--         or 'killed' (like 'prefix', for a process its supervisor killed on purpose)
-- ARGV[2] prefix or id ('' for 'expired')
-- ARGV[3] in-flight key prefix ("pcq:{NAME}:inflight:"; same hash slot as KEYS)
-- ARGV[4] SENTINEL_PREFIX
--
-- Returns how many tasks went back to ready.
--
-- Races prevented: moving a list and unregistering its consumer are one step, so a
-- task is never both in ready and in flight, and two reapers never move it twice.
-- (One script is its own lock: no reaper lock key is needed.)  The tasks go to the
-- consumer end in take order, ahead of any sentinel, so they are handled before
-- consumers stop; a sentinel the dead consumer held is dropped — a consumer that
-- finds the queue closed and drained stops anyway.  A reaped consumer that was in
-- fact alive finds its lease stale at ack (see ack.lua): nothing counts twice.
--
-- Poison tasks: when a consumer died ('expired', 'prefix'), its tasks go to
-- `suspects` instead, and each one's count in `deaths` goes up in the same step.
-- take.lua hands a suspect out alone, so a task that kills its consumer takes no
-- innocent task down with it again; at max deliveries the consumer that takes it
-- dead-letters it.  A detach ('id') or a kill for a known reason ('killed')
-- counts no death: those tasks go back to ready.  A consumer that died holding
-- a suspect (`holding`) is blamed on that suspect alone: the fresh tasks it held
-- beside it become suspects with no death counted against them.  A suspect is
-- one task: a message that holds a batch is cut into one message a task as it
-- becomes suspect, so a poison task is found alone, and its count in `deaths`
-- is its own.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode, arg, inflight, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local plen = string.len(prefix)
local victims = {}
local died = mode == 'expired' or mode == 'prefix'
local target = KEYS[3]
if died then target = KEYS[5] end
if mode == 'expired' then
  victims = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
elseif mode == 'prefix' or mode == 'killed' then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(id, 1, string.len(arg)) == arg then victims[#victims + 1] = id end
  end
else
  victims = {arg}
end
local moved = 0
queued(KEYS[3], KEYS[9])  -- read before the first push below
for _, id in ipairs(victims) do
  local key = inflight .. id
  local len = redis.call('LLEN', key)
  local suspect = died and redis.call('HGET', KEYS[7], id)
  for at = 0, len - 1, 1000 do  -- left to right = newest first, so the oldest ends rightmost
    local tasks = {}
    for _, m in ipairs(redis.call('LRANGE', key, at, at + 999)) do
      if string.sub(m, 1, plen) ~= prefix then
        local blamed = died and (not suspect or m == suspect)
        if m == suspect then suspect = nil; died = false end  -- blamed once
        if target == KEYS[5] then
          for _, one in ipairs(one_each(m)) do
            tasks[#tasks + 1] = one
            if blamed then redis.call('HINCRBY', KEYS[6], one, 1) end
          end
        else
          tasks[#tasks + 1] = m
        end
      end
    end
    if #tasks > 0 then
      for i = 1, #tasks, 1000 do redis.call('RPUSH', target, unpack(tasks, i, math.min(i + 999, #tasks))) end
    end
    local n = tasks_in_all(tasks)
    if target == KEYS[3] then add_queued(KEYS[9], n) end
    moved = moved + n
  end
  died = mode == 'expired' or mode == 'prefix'
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[4], id)  -- gone with the list: a repeated ack finds nothing
  redis.call('HDEL', KEYS[7], id)
  redis.call('HDEL', KEYS[8], id)
end
return moved
