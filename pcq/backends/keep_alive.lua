-- keep_alive: a supervisor vouches for its live consumer processes.
--
-- KEYS[1] consumers:beat   zset consumer id ("host:pid:nonce") -> heartbeat expiry ms
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] ttl ms; ARGV[2] host; ARGV[3..] pids of live consumer processes on host
--
-- Returns how many registrations were refreshed.
--
-- Why: a handler that holds the GIL (a C extension, a long regex) starves its
-- consumer's heartbeat thread; the supervisor sees the process alive through its
-- process handle, so it refreshes the heartbeat instead.  Only registrations that
-- exist are refreshed (ZADD XX): one reaped or detached meanwhile stays gone, and
-- the consumer registers again by itself (heartbeat.lua).
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local live = {}
for i = 3, #ARGV do live[ARGV[2] .. ':' .. ARGV[i]] = true end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if live[string.match(id, '^(.*):[^:]*$') or ''] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
    n = n + 1
  end
end
return n
