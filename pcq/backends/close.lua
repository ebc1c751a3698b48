-- close: one sentinel per live consumer behind all tasks; optionally first detach
-- a producer, and close only if it was the last live one.
--
-- KEYS[1] closed           exists while the queue is closed
-- KEYS[2] epoch            close epoch (integer, absent = 0)
-- KEYS[3] ready            list; LPUSH puts the sentinels behind every task
-- KEYS[4] consumers:beat   zset consumer id -> heartbeat expiry ms
-- KEYS[5] producers        hash producer id -> info
-- KEYS[6] producers:beat   zset producer id -> heartbeat expiry ms
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] epoch the caller knows; ARGV[2] the sentinel of that epoch (exact bytes)
-- ARGV[3] producer id to detach, or ''
-- ARGV[4] 'always' (close), 'if_last' (close if no live producer is left), 'never'
--
-- Returns {1, sentinels} closed now; {0, 0} not closed (already closed, producers
-- left, or 'never'); {-1, epoch} the caller's epoch is old: nothing done, call again.
--
-- Races prevented: detaching, counting the producers left and closing are one step,
-- so of two producers finishing together exactly one closes, and none closes while
-- another is still attached.  A producer whose heartbeat expired died without
-- detaching: it is forgotten here, so it cannot keep the queue open for ever.  The
-- closed flag makes close idempotent: a second close adds no sentinels.
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[4] ~= 'never' and epoch ~= tonumber(ARGV[1]) then return {-1, epoch} end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[6], ARGV[3])
  redis.call('HDEL', KEYS[5], ARGV[3])
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now)
for _, id in ipairs(gone) do redis.call('HDEL', KEYS[5], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
if ARGV[4] == 'never' then return {0, 0} end
if ARGV[4] == 'if_last' and redis.call('ZCARD', KEYS[6]) > 0 then return {0, 0} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
redis.call('SET', KEYS[1], epoch)
local live = redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf')
local batch = {}
for i = 1, math.min(live, 1000) do batch[i] = ARGV[2] end
for i = 1, live, 1000 do
  redis.call('LPUSH', KEYS[3], unpack(batch, 1, math.min(1000, live - i + 1)))
end
return {1, live}
