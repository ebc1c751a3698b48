-- run_state: where the queue's run stands, for a consumer that attaches.
--
-- KEYS[1] epoch            close epoch (integer, absent = 0): the run's number
-- KEYS[2] closed           exists while the queue is closed
-- KEYS[3] counters         hash: pending
-- KEYS[4] producers:beat   zset producer id -> heartbeat expiry ms
--
-- Returns {epoch, closed (0/1), pending, live producers}.
--
-- One script, so the four belong to one instant: a consumer never takes a run
-- that was reopened a moment ago for a finished one (it would wait for the run
-- after it), nor a finished run for one still closing (it would stop at once).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {
  tonumber(redis.call('GET', KEYS[1]) or '0'),
  redis.call('EXISTS', KEYS[2]),
  tonumber(redis.call('HGET', KEYS[3], 'pending') or '0'),
  redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf'),
}
