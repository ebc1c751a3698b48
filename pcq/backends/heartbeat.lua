-- heartbeat: push back the expiry of this process's consumer and producers.
--
-- KEYS[1] consumers        hash consumer id -> info (json)
-- KEYS[2] consumers:beat   zset consumer id -> heartbeat expiry ms
-- KEYS[3] producers        hash producer id -> info (json)
-- KEYS[4] producers:beat   zset producer id -> heartbeat expiry ms
-- KEYS[#KEYS] marker     the queue's data marker: gone means the server lost the queue
-- ARGV[1] ttl ms; ARGV[2] consumer id or ''; ARGV[3] its info; ARGV[4..] producer ids
--
-- Server time, so hosts with skewed clocks agree on who is dead.
-- Races prevented: a consumer is upserted — one that was reaped while alive (a long
-- pause) registers again, so whatever it takes next is protected by its heartbeat.
-- A producer is refreshed only while registered: a detach (maybe by another process
-- that inherited the queue object) is never undone by a late heartbeat.
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return redis.error_reply('PCQ_DATA_LOST') end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[2], expiry, ARGV[2])
end
for i = 4, #ARGV do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[4], expiry, ARGV[i])
  end
end
return 1
