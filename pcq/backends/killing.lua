-- killing: a supervisor decided to kill a consumer process; its acks commit nothing.
--
-- KEYS[1] consumers:beat   zset consumer id ("host:pid:nonce") -> heartbeat expiry ms
-- KEYS[2] killing          hash consumer id -> 1 while its supervisor kills it
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] "host:pid:" of the process about to be killed
--
-- Returns how many registrations were marked.
--
-- Race prevented: a task that ran past its timeout is failed by the supervisor
-- (ack.lua with 'supervisor'); an ack the consumer sends between the decision
-- and the SIGKILL must not commit the task as well.  Marking the consumer here,
-- before the kill, makes every later ack of its own stale (ack.lua checks the
-- mark in the same step as the lease).  reap.lua removes the mark with the
-- registration (release, after the kill).
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(id, 1, string.len(ARGV[1])) == ARGV[1] then
    redis.call('HSET', KEYS[2], id, 1)
    n = n + 1
  end
end
return n
