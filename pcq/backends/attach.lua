-- attach: register a producer (and reopen the queue if it is closed).
--
-- KEYS[1] producers        hash producer id -> info (json)
-- KEYS[2] producers:beat   zset producer id -> heartbeat expiry ms
-- KEYS[3] closed           exists while the queue is closed
-- KEYS[4] epoch            close epoch (integer, absent = 0)
-- KEYS[5] counters         hash: gets run_* (see below)
-- KEYS[6] dead             list
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] producer id; ARGV[2] info; ARGV[3] heartbeat ttl ms
--
-- Returns the epoch now current.
--
-- Race prevented: registering and reopening are one step, so a close can only
-- come before (and is undone: new epoch, its sentinels go stale) or after (and
-- sees this producer live, so an 'if_last' close leaves the queue open).
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[3])
  -- A new run starts: note where the counters stand, so that `pcq status` can
  -- show this run's own numbers beside the totals (run_* fields; purge drops them).
  local c = redis.call('HMGET', KEYS[5], 'produced', 'done', 'failed', 'retried')
  redis.call('HSET', KEYS[5], 'run_produced', c[1] or '0', 'run_done', c[2] or '0',
             'run_failed', c[3] or '0', 'run_retried', c[4] or '0',
             'run_dead', redis.call('LLEN', KEYS[6]))
  return redis.call('INCR', KEYS[4])
end
return tonumber(redis.call('GET', KEYS[4]) or '0')
