-- ack: finish one lease — check it is still ours, remove it, apply its outcome.
--
-- KEYS[1] inflight:<me>   list; LPUSH in take order (see take.lua)
-- KEYS[2] counters        hash: pending, done, failed, retried, queued (see put.lua)
-- KEYS[3] delayed         zset of retries, member = 8 unique bytes .. message, score = due ms
-- KEYS[4] dead            list of dead letters
-- KEYS[5] ready           list; its right end is taken next
-- KEYS[6] acked           hash consumer id -> "token code" of its last ack
-- KEYS[7] holding         hash consumer id -> the suspect it holds (see take.lua)
-- KEYS[8] deaths          hash message -> consumers that died with it in flight
-- KEYS[9] killing         hash consumer id -> 1 while its supervisor kills it
-- KEYS[10..13] only for a stage's outputs (no > 0): the target queue's ready,
--          counters, closed and epoch (as in put.lua)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] n   messages in the lease      ARGV[2] nr  retries
-- ARGV[3] nd  dead letters               ARGV[4] nb  give-backs
-- ARGV[5] done  ARGV[6] failed           (tasks that leave pending now)
-- ARGV[7] consumer id   ARGV[8] token: unique to this ack, the same when it is resent
-- ARGV[9] no  output messages for the target queue   ARGV[10] the tasks they hold
-- ARGV[11] 'supervisor' when the supervisor acks for a consumer it kills, else ''
-- ARGV[12] what a task costs this consumer (ns; 0 = no news): kept in counters
--          as `cost_ns`, a moving average, which put.lua hands producers
-- then the n lease messages in take order, nr pairs (delay ms, member),
-- nd dead letters, nb give-backs in RPUSH order (the first to take is last),
-- no outputs in LPUSH order.
--
-- Returns {1, inflight_len} when applied, {0, inflight_len} for a stale lease; a
-- repeat of an ack (same token: its reply was lost) does nothing and returns what
-- the first run returned, so a resent ack counts once, and is never taken for stale.
--
-- Race prevented: a lease whose consumer was reaped (its in-flight list went back
-- to ready, maybe to another consumer) is stale.  All its messages must still be
-- in our in-flight list, as the contiguous block take left there — normally at
-- the right end, so the check is one LRANGE; otherwise (leases acked out of
-- order) a scan.  A stale lease changes no counter and writes nothing (but the
-- token below), so a late acknowledgement never counts a task twice.  Garbage
-- messages were never pending: the caller leaves them out of done/failed but
-- sends their dead letters.
--
-- Every ack leaves "token code" in `acked` (one entry per consumer: a consumer's
-- acks go out one at a time).  If the reply is lost, the caller sends the same
-- ack again: the repeat must be a no-op even though a take may have moved new
-- messages into our in-flight list meanwhile — byte-equal copies of the lease's
-- messages (a put repeated after a lost reply) would pass the check above.  With
-- ack_and_take, take.lua takes nothing unless it finds this ack's token here.
-- reap.lua deletes the entry with the list.
--
-- A suspect's ack (the one message `holding` names) clears its death count and
-- the holding entry in the same step, so nothing is left in `deaths`.
--
-- Kills: once a supervisor decided to kill a consumer (`killing`, see
-- killing.lua), that consumer's own acks commit nothing: only the supervisor's
-- ack of the task that ran past its timeout does.
--
-- Outputs (a stage, `--to`): they are pushed onto the target queue and counted
-- pending there only after the lease check above, in this same script, so a
-- task's outputs reach the next queue exactly once however often its handler
-- ran: a consumer whose lease was reaped is stale here and commits nothing.  The
-- target's keys must live on this server (one Redis Cluster slot: give the
-- queues of one pipeline one hash tag, e.g. {crawl}.fetch, {crawl}.parse).
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local n, nr, nd, nb = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local me, token = ARGV[7], ARGV[8]
local no, out_tasks = tonumber(ARGV[9]), tonumber(ARGV[10])
local lease = 12  -- ARGV[lease + j] is the j-th message taken

local function finish(code)
  redis.call('HSET', KEYS[6], me, token .. ' ' .. code)
  return {code, redis.call('LLEN', KEYS[1])}
end

local mark, first = string.match(redis.call('HGET', KEYS[6], me) or '', '^(%S+) (%d)$')
if mark == token then  -- a repeat; it writes so that a WAIT after it covers the first
  redis.call('HSET', KEYS[6], me, token .. ' ' .. first)
  return {tonumber(first), redis.call('LLEN', KEYS[1])}
end
if ARGV[11] ~= 'supervisor' and redis.call('HEXISTS', KEYS[9], me) == 1 then return finish(0) end

-- list[at .. at+n-1] holds the lease (newest first, as LPUSH left it)
local function holds(list, at)
  for j = 1, n do
    if list[at + j - 1] ~= ARGV[lease + n - j + 1] then return false end
  end
  return true
end

-- cmd key values[from..to], 1000 at a time (Lua's stack limits unpack)
local function push(cmd, key, values, from, to)
  for i = from, to, 1000 do
    redis.call(cmd, key, unpack(values, i, math.min(i + 999, to)))
  end
end

if n > 0 then
  local tail = redis.call('LRANGE', KEYS[1], -n, -1)
  if #tail == n and holds(tail, 1) then
    redis.call('LTRIM', KEYS[1], 0, -n - 1)
  else
    local all = redis.call('LRANGE', KEYS[1], 0, -1)
    local at = nil
    for p = 1, #all - n + 1 do
      if holds(all, p) then at = p; break end
    end
    if not at then return finish(0) end
    local rest = {}
    for i = 1, #all do
      if i < at or i >= at + n then rest[#rest + 1] = all[i] end
    end
    redis.call('DEL', KEYS[1])
    push('RPUSH', KEYS[1], rest, 1, #rest)
  end
end

local cost = tonumber(ARGV[12])
if cost > 0 then
  local old = tonumber(redis.call('HGET', KEYS[2], 'cost_ns') or '0')
  if old > 0 then cost = math.floor((old * 3 + cost) / 4) end
  redis.call('HSET', KEYS[2], 'cost_ns', cost)
end
local done, failed = tonumber(ARGV[5]), tonumber(ARGV[6])
if done + failed ~= 0 then redis.call('HINCRBY', KEYS[2], 'pending', -(done + failed)) end
if done ~= 0 then redis.call('HINCRBY', KEYS[2], 'done', done) end
if failed ~= 0 then redis.call('HINCRBY', KEYS[2], 'failed', failed) end

local at = lease + n
if nr > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local pairs_ = {}
  for j = 1, nr do
    pairs_[#pairs_ + 1] = now + tonumber(ARGV[at + 2 * j - 1])
    pairs_[#pairs_ + 1] = ARGV[at + 2 * j]
  end
  push('ZADD', KEYS[3], pairs_, 1, #pairs_)  -- 1000 is even: pairs stay whole
  redis.call('HINCRBY', KEYS[2], 'retried', nr)
  at = at + 2 * nr
end
push('RPUSH', KEYS[4], ARGV, at + 1, at + nd)
at = at + nd
if nb > 0 then queued(KEYS[5], KEYS[2]) end  -- read before the push
push('RPUSH', KEYS[5], ARGV, at + 1, at + nb)
add_queued(KEYS[2], tasks_in_all(ARGV, at + 1, at + nb))
at = at + nb
if no > 0 then
  if redis.call('EXISTS', KEYS[12]) == 1 then  -- as put.lua: a closed target reopens
    redis.call('DEL', KEYS[12])
    redis.call('INCR', KEYS[13])
  end
  queued(KEYS[10], KEYS[11])  -- read before the push
  push('LPUSH', KEYS[10], ARGV, at + 1, at + no)
  add_queued(KEYS[11], tasks_in_all(ARGV, at + 1, at + no))
  if out_tasks > 0 then
    redis.call('HINCRBY', KEYS[11], 'pending', out_tasks)
    redis.call('HINCRBY', KEYS[11], 'produced', out_tasks)
  end
end
if n == 1 and redis.call('HGET', KEYS[7], me) == ARGV[lease + 1] then
  redis.call('HDEL', KEYS[7], me)
  redis.call('HDEL', KEYS[8], ARGV[lease + 1])
end
return finish(1)
