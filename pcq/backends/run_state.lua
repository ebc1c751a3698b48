-- run_state: where the queue's run stands, for a consumer that attaches.
--
-- KEYS[1] epoch            close epoch (integer, absent = 0): the run's number
-- KEYS[2] closed           exists while the queue is closed
-- KEYS[3] counters         hash: pending
-- KEYS[4] producers:beat   zset producer id -> heartbeat expiry ms
-- KEYS[5] consumers        hash consumer id -> info (json)
-- KEYS[6] consumers:beat   zset consumer id -> heartbeat expiry ms
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] consumer id to register first, or ''; ARGV[2] its info; ARGV[3] ttl ms
--
-- Returns {epoch, closed (0/1), pending, live producers}.
--
-- One script, so the four belong to one instant, and to the instant the consumer
-- registers: a close after it places a sentinel for this consumer, so the run it
-- reads here is the run it serves.  Read apart, a whole run could start and end
-- in between: the consumer would take it for finished, ignore its sentinel and
-- wait for the run after it.
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then  -- as heartbeat.lua registers
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[3]), ARGV[1])
end
return {
  tonumber(redis.call('GET', KEYS[1]) or '0'),
  redis.call('EXISTS', KEYS[2]),
  tonumber(redis.call('HGET', KEYS[3], 'pending') or '0'),
  redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf'),
}
