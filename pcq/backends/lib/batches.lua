-- batches: what a script needs to know about the messages it moves (prepended
-- to every script whose header says "-- needs: batches").
--
-- A list element is one message; a task message holds a batch of tasks:
--   msgpack [0x70, 0, tag, seq, attempts, enqueued_at, [body, ...]]
-- (see pcq/envelope.py).  Counts of tasks (maxsize, status) and the two places
-- where a batch must come apart — a take that wants fewer tasks than a message
-- holds, and a dead consumer's messages, which become suspects one task each —
-- read the message here, on the server, so they stay one atomic step.  The
-- pieces are byte for byte what the client's encoder writes for those tasks.
-- Anything that is not a well-formed task message (a sentinel, garbage) is
-- never cut: a sentinel holds 0 tasks, anything else counts as 1.
local mp_byte, mp_sub, mp_char = string.byte, string.sub, string.char

-- the unsigned big-endian integer of n bytes at p
local function mp_uint(m, p, n)
  local v = 0
  for i = p, p + n - 1 do v = v * 256 + mp_byte(m, i) end
  return v
end

-- The index just past the msgpack object at p; errors on a truncated or
-- malformed one (callers run this under pcall).
local function mp_skip(m, p)
  local left, len = 1, #m
  while left > 0 do
    local b = mp_byte(m, p)
    left = left - 1
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3 then p = p + 1
    elseif b <= 0x8f then left, p = left + 2 * (b - 0x80), p + 1      -- fixmap
    elseif b <= 0x9f then left, p = left + (b - 0x90), p + 1          -- fixarray
    elseif b <= 0xbf then p = p + 1 + (b - 0xa0)                      -- fixstr
    elseif b == 0xca then p = p + 5                                   -- float 32
    elseif b == 0xcb then p = p + 9                                   -- float 64
    elseif b >= 0xcc and b <= 0xcf then p = p + 1 + 2 ^ (b - 0xcc)    -- uint
    elseif b >= 0xd0 and b <= 0xd3 then p = p + 1 + 2 ^ (b - 0xd0)    -- int
    elseif b >= 0xd4 and b <= 0xd8 then p = p + 2 + 2 ^ (b - 0xd4)    -- fixext
    else
      -- a length field of w bytes, then (raw) w more header bytes and n payload
      -- bytes, or (array, map) n or 2n objects
      local w, extra, per
      if b >= 0xc4 and b <= 0xc6 then w, extra, per = 2 ^ (b - 0xc4), 0, 0      -- bin
      elseif b >= 0xd9 and b <= 0xdb then w, extra, per = 2 ^ (b - 0xd9), 0, 0  -- str
      elseif b >= 0xc7 and b <= 0xc9 then w, extra, per = 2 ^ (b - 0xc7), 1, 0  -- ext
      elseif b == 0xdc or b == 0xdd then w, extra, per = 2 * (b - 0xdb), 0, 1   -- array
      elseif b == 0xde or b == 0xdf then w, extra, per = 2 * (b - 0xdd), 0, 2   -- map
      else error('not msgpack') end
      if p + w > len then error('truncated') end
      local n = mp_uint(m, p + 1, w)
      if per > 0 then left, p = left + per * n, p + 1 + w
      else p = p + 1 + w + extra + n end
    end
    if p > len + 1 then error('truncated') end
  end
  return p
end

-- The header of a task message: {seq at, seq, attempts at, bodies header at,
-- first body at, count}, or nil.
local function mp_head(m)
  if mp_sub(m, 1, 3) ~= '\151\112\000' then return nil end
  local ok, h = pcall(function()
    local tag_end = mp_skip(m, 4)
    local seq_end = mp_skip(m, tag_end)
    local b = mp_byte(m, tag_end)
    local seq
    if b <= 0x7f then seq = b
    elseif b >= 0xcc and b <= 0xcf then seq = mp_uint(m, tag_end + 1, seq_end - tag_end - 1)
    else error('seq') end
    local bodies_at = mp_skip(m, mp_skip(m, seq_end))
    local a = mp_byte(m, bodies_at)
    local count, first
    if a >= 0x90 and a <= 0x9f then count, first = a - 0x90, bodies_at + 1
    elseif a == 0xdc then count, first = mp_uint(m, bodies_at + 1, 2), bodies_at + 3
    elseif a == 0xdd then count, first = mp_uint(m, bodies_at + 1, 4), bodies_at + 5
    else error('bodies') end
    return {tag_end, seq, seq_end, bodies_at, first, count}
  end)
  if ok then return h end
  return nil
end

local function mp_pack_uint(v)
  if v < 128 then return mp_char(v) end
  local bytes, lead = 8, '\207'
  if v < 256 then bytes, lead = 1, '\204'
  elseif v < 65536 then bytes, lead = 2, '\205'
  elseif v < 4294967296 then bytes, lead = 4, '\206' end
  local out = {}
  for i = bytes, 1, -1 do out[i] = mp_char(v % 256); v = math.floor(v / 256) end
  return lead .. table.concat(out)
end

local function mp_array_head(n)
  if n < 16 then return mp_char(0x90 + n) end
  if n < 65536 then return '\220' .. mp_char(math.floor(n / 256), n % 256) end
  return '\221' .. mp_pack_uint(n):sub(2)  -- n < 2^32: 4 bytes after the lead
end

-- The first bytes of every sentinel (pcq.envelope.SENTINEL_PREFIX).
local SENTINEL_HEAD = '\147\112\001'

-- How many tasks message m holds (0 for a sentinel, 1 for anything not ours).
local function tasks_in(m)
  if mp_sub(m, 1, 3) == SENTINEL_HEAD then return 0 end
  local h = mp_head(m)
  if h then return h[6] end
  return 1
end

local function tasks_in_all(messages, from, to)
  local n = 0
  for i = from or 1, to or #messages do n = n + tasks_in(messages[i]) end
  return n
end

-- The tasks waiting in a ready list (sentinels left out): the field `queued`
-- of its counters hash, which every script that pushes to or takes from ready
-- moves in the same step.  A queue written before that field existed gets it
-- from one walk of the list, the first time it is asked (and keeps it, unless
-- `look_only`: a script that only reads writes nothing).
local function queued(ready, counters, look_only)
  local v = redis.call('HGET', counters, 'queued')
  if v then return tonumber(v) end
  local n = 0
  for at = 0, redis.call('LLEN', ready) - 1, 1000 do
    n = n + tasks_in_all(redis.call('LRANGE', ready, at, at + 999))
  end
  if not look_only then redis.call('HSET', counters, 'queued', n) end
  return n
end

-- Count `delta` tasks into or out of ready (as `queued` above, which the
-- script called before it first changed the list).
local function add_queued(counters, delta)
  if delta ~= 0 then redis.call('HINCRBY', counters, 'queued', delta) end
end

-- Message m cut into pieces of `sizes[i]` tasks each, in order (the sizes add
-- up to its count); nil when m is not a task message or does not parse whole.
local function cut(m, sizes)
  local h = mp_head(m)
  if not h then return nil end
  local ok, starts = pcall(function()
    local s, p = {}, h[5]
    for i = 1, h[6] do s[i] = p; p = mp_skip(m, p) end
    s[h[6] + 1] = p
    if p ~= #m + 1 then error('trailing bytes') end
    return s
  end)
  if not ok then return nil end
  local pre, mid = mp_sub(m, 1, h[1] - 1), mp_sub(m, h[3], h[4] - 1)
  local pieces, from = {}, 1
  for _, size in ipairs(sizes) do
    pieces[#pieces + 1] = pre .. mp_pack_uint(h[2] + from - 1) .. mid .. mp_array_head(size)
      .. mp_sub(m, starts[from], starts[from + size] - 1)
    from = from + size
  end
  return pieces
end

-- m as one message a task (m itself when it holds one task or is not ours).
local function one_each(m)
  local h = mp_head(m)
  if not h or h[6] <= 1 then return {m} end
  local sizes = {}
  for i = 1, h[6] do sizes[i] = 1 end
  return cut(m, sizes) or {m}
end
