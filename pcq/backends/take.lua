-- take: move up to ARGV[1] tasks from ready into this consumer's in-flight list.
--
-- KEYS[1] ready            list; producers LPUSH, consumers take from the right
-- KEYS[2] inflight:<me>    list; LPUSH in take order, so its right end is the oldest
-- KEYS[3] delayed          zset of retries, member = 8 unique bytes .. message, score = due ms
-- KEYS[4] closed           exists while the queue is closed
-- KEYS[5] epoch            close epoch (integer, absent = 0)
-- KEYS[6] consumers:beat   zset consumer id -> heartbeat expiry ms (refreshed here too)
-- KEYS[7] full             set by a producer blocked on maxsize; value = its maxsize
-- KEYS[8] space            wake-up tokens for that producer (it BLPOPs them)
-- KEYS[9] acked            hash consumer id -> "token code" left by ack.lua
-- KEYS[10] suspects        list; tasks of consumers that died (see reap.lua)
-- KEYS[11] deaths          hash message -> consumers that died with it in flight
-- KEYS[12] holding         hash consumer id -> the suspect it holds
-- KEYS[13] counters        hash: queued (tasks in ready; see put.lua)
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] max tasks to take (a message that holds more is cut: the rest stays ready)
-- ARGV[2] nh: how many messages the caller holds (its open leases)
-- ARGV[3] epoch the caller knows; ARGV[4] the sentinel of that epoch (exact bytes)
-- ARGV[5] SENTINEL_PREFIX (first bytes of any sentinel)
-- ARGV[6] consumer id; ARGV[7] heartbeat ttl ms
-- ARGV[8] '', or the token of the ack sent just before in the same pipeline
-- ARGV[9 .. 8+nh] the messages of the caller's open leases
--
-- Returns {status, epoch, wait_ms, inflight_len, message...} with status
--   0 taken (maybe nothing), 1 the epoch changed (nothing done: call again),
--   2 closed and drained (the caller exits), 3 a sentinel waits behind delayed retries,
--   4 the ack with ARGV[8] is not in `acked` (nothing done; see ack.lua),
--   5 a suspect, taken alone; in place of wait_ms, its count in `deaths`.
-- wait_ms: ms until the next delayed retry is due, -1 if none.
--
-- Races prevented:
-- * Stranded tasks: whatever lies in our in-flight list and is not one of the
--   messages the caller holds was put there without the caller knowing — by a
--   BLMOVE, by a take whose reply was lost, or left behind by a lost write (an
--   ack an AOF-everysec crash or a failover forgot) — and is handed out first.
--   The list's contents decide, not a length the caller remembers: a reap or a
--   purge that emptied the list, followed by a BLMOVE, leaves the same length
--   with other contents.  Held messages no longer in the list were reaped: their
--   ack finds them stale.
-- * Ack, then take, in one pipeline: nothing moves unless the ack ran first (it
--   may have failed, e.g. NOSCRIPT, or a reap may have removed its entry since).
-- * Sentinels: a batch stops after a sentinel; a sentinel of an older epoch is
--   dropped (the compare is on bytes, no msgpack here); a current one is not taken
--   while retries are delayed, so the last consumers stay for them.
-- * Retries due now are moved to the consumer end of ready in the same step, so
--   they are taken before any sentinel.
-- * Poison tasks: a suspect is handed out alone, to a consumer that holds no
--   other suspect (`holding` says which one it holds), whatever else it holds:
--   two suspects never share a process, and none waits for a busy consumer.
-- * Counting: `queued` (tasks in ready, in counters) moves with every message
--   that enters or leaves ready here, in this step.  A message whose reply was
--   lost left ready (and `queued`) when it was first taken; adopting it counts
--   nothing again.
-- needs: batches
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local max, nh = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[8] ~= '' then
  local token = string.match(redis.call('HGET', KEYS[9], ARGV[6]) or '', '^(%S+) ')
  if token ~= ARGV[8] then return {4, -1, -1, redis.call('LLEN', KEYS[2])} end
end
local epoch = tonumber(redis.call('GET', KEYS[5]) or '0')
if epoch ~= tonumber(ARGV[3]) then return {1, epoch, -1, 0} end
local byte, sub = string.byte, string.sub
local current, prefix = ARGV[4], ARGV[5]
local plen, p1 = string.len(prefix), byte(prefix, 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[7]), ARGV[6])

queued(KEYS[1], KEYS[13])  -- read before the first push below
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  local msgs = {}
  for i = #due, 1, -1 do msgs[#msgs + 1] = sub(due[i], 9) end
  redis.call('RPUSH', KEYS[1], unpack(msgs))  -- earliest due ends rightmost: next taken
  add_queued(KEYS[13], tasks_in_all(msgs))
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, #due - 1)
end
local delayed = redis.call('ZCARD', KEYS[3])

-- The reply: 4 header fields, then the n messages taken (in take order), which
-- hold `got` tasks.
local reply, n, status, stop, got = {0, epoch, -1, 0}, 0, 0, false, 0
local function is_sentinel(m) return byte(m, 1) == p1 and sub(m, 1, plen) == prefix end
-- for a sentinel: 'drop' (stale), 'wait' (leave it: retries are due later), 'last'
local function sentinel_kind(m)
  if m ~= current then return 'drop' end
  if delayed > 0 then return 'wait' end
  return 'last'
end

-- Split our in-flight list into what the caller holds and what it does not.
local function unheld()
  local all = redis.call('LRANGE', KEYS[2], 0, -1)  -- newest first
  local want = {}
  for i = 9, 8 + nh do want[ARGV[i]] = (want[ARGV[i]] or 0) + 1 end
  local kept, extra = {}, {}
  for i = 1, #all do
    local c = want[all[i]]
    if c and c > 0 then want[all[i]] = c - 1; kept[#kept + 1] = all[i]
    else extra[#extra + 1] = all[i] end
  end
  return kept, extra
end

local kept, extra = unheld()
local suspect = redis.call('HGET', KEYS[12], ARGV[6])
local holds_suspect = false
if suspect then
  for _, m in ipairs(kept) do if m == suspect then holds_suspect = true end end
end
if #extra > 0 then
  local lone = nil  -- our suspect among the extras: handed out alone, the rest wait
  for _, m in ipairs(extra) do
    if m == suspect and not holds_suspect then lone = m end
  end
  redis.call('DEL', KEYS[2])
  if lone then
    local rest, skipped = {}, false
    for _, m in ipairs(extra) do
      if m == lone and not skipped then skipped = true else rest[#rest + 1] = m end
    end
    for i = 1, #rest, 1000 do redis.call('RPUSH', KEYS[2], unpack(rest, i, math.min(i + 999, #rest))) end
    for i = 1, #kept, 1000 do redis.call('RPUSH', KEYS[2], unpack(kept, i, math.min(i + 999, #kept))) end
    n, reply[5], stop, status, holds_suspect = 1, lone, true, 5, true
  else
    for i = 1, #kept, 1000 do redis.call('RPUSH', KEYS[2], unpack(kept, i, math.min(i + 999, #kept))) end
    local back = {}
    for i = #extra, 1, -1 do  -- oldest first
      local m = extra[i]
      local k = 'task'
      if stop then k = 'back' elseif is_sentinel(m) then k = sentinel_kind(m) end
      if k == 'task' or k == 'last' then n = n + 1; reply[n + 4] = m; got = got + tasks_in(m) end
      if k == 'last' then stop = true end
      if k == 'wait' then status = 3; stop = true end
      if k == 'wait' or k == 'back' then table.insert(back, 1, m) end
    end
    if #back > 0 then  -- the first back ends rightmost
      redis.call('RPUSH', KEYS[1], unpack(back))
      add_queued(KEYS[13], tasks_in_all(back))
    end
  end
end
if suspect and not holds_suspect then redis.call('HDEL', KEYS[12], ARGV[6]) end

-- A suspect is taken alone, before anything in ready (it was taken once already),
-- by a consumer that holds no other suspect: what else it holds are fresh tasks,
-- which a death beside a suspect does not count against (see reap.lua).
local suspects = redis.call('LLEN', KEYS[10])
if n == 0 and not stop and suspects > 0 and not holds_suspect then
  local m = redis.call('RPOP', KEYS[10])
  n, reply[5], stop, status = 1, m, true, 5
  redis.call('HSET', KEYS[12], ARGV[6], m)
end

-- Whole messages, oldest first, until `max` tasks; the message that would pass
-- `max` is cut, its rest left where it was (taken next).
local before, rest = got, nil
while not stop and got < max do
  local want = max - got
  local chunk = redis.call('LRANGE', KEYS[1], -want, -1)
  local used = 0
  for i = #chunk, 1, -1 do
    local m = chunk[i]
    if not is_sentinel(m) then
      local c = tasks_in(m)
      if c > max - got then
        local pieces = cut(m, {max - got, c - (max - got)})
        if pieces then m, rest, c = pieces[1], pieces[2], max - got end
      end
      used = used + 1; n = n + 1; reply[n + 4] = m; got = got + c
      if got >= max then break end
    else
      local k = sentinel_kind(m)
      if k == 'wait' then status = 3; stop = true; break end
      used = used + 1
      if k == 'last' then n = n + 1; reply[n + 4] = m; stop = true; break end
    end
  end
  if used > 0 then redis.call('LTRIM', KEYS[1], 0, -used - 1) end
  if rest then redis.call('RPUSH', KEYS[1], rest) end
  if #chunk < want or rest then break end
end
add_queued(KEYS[13], before - got)

for i = 5, n + 4, 1000 do
  redis.call('LPUSH', KEYS[2], unpack(reply, i, math.min(i + 999, n + 4)))
end

local ready = redis.call('LLEN', KEYS[1])
local full = redis.call('GET', KEYS[7])
if full and queued(KEYS[1], KEYS[13]) < tonumber(full) then
  redis.call('DEL', KEYS[7], KEYS[8])
  redis.call('LPUSH', KEYS[8], 1)
  redis.call('PEXPIRE', KEYS[8], 10000)
end
if n == 0 and status == 0 and ready == 0 and delayed == 0 and suspects == 0
    and redis.call('EXISTS', KEYS[4]) == 1 then
  status = 2
end
if delayed > 0 then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  reply[3] = math.max(0, tonumber(first[2]) - now)
end
if status == 5 then reply[3] = tonumber(redis.call('HGET', KEYS[11], reply[5]) or '0') end
reply[1], reply[4] = status, redis.call('LLEN', KEYS[2])
return reply
