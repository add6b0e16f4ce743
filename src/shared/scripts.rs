//! The Lua scripts the shared state runs in Redis: each decision is one
//! atomic script, and the rate limit reads Redis's own clock (`TIME`), so the
//! replicas' clocks do not matter. redis-rs sends them by SHA and reloads them
//! on NOSCRIPT by itself.

/// GCRA for one key and, optionally, the global cap, decided together: both
/// must admit, or neither bucket moves. The design of go-redis/redis_rate,
/// with times in integer microseconds (formatted with `%d`: Lua's default
/// number formatting would round a 16-digit timestamp).
///
/// KEYS[1] the key's bucket, KEYS[2] the global bucket (may be absent).
/// ARGV: burst, per_second, global per_second (0: none).
/// Returns {allowed (0/1), limit, remaining, retry_after_us}.
pub const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function look(key, burst, rate)
  local interval = math.floor(1000000 / rate)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  return new_tat, now - allow_at, interval
end

local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local global_rate = tonumber(ARGV[3])

local new_tat, diff, interval = look(KEYS[1], burst, rate)
if diff < 0 then
  return {0, burst, 0, -diff}
end
local g_new_tat, g_diff
if global_rate > 0 then
  local g_interval
  g_new_tat, g_diff, g_interval = look(KEYS[2], global_rate, global_rate)
  if g_diff < 0 then
    return {0, burst, 0, -g_diff}
  end
end
redis.call('SET', KEYS[1], string.format('%d', new_tat),
  'PX', math.floor((new_tat - now) / 1000) + 1)
if global_rate > 0 then
  redis.call('SET', KEYS[2], string.format('%d', g_new_tat),
    'PX', math.floor((g_new_tat - now) / 1000) + 1)
end
return {1, burst, math.floor(diff / interval), 0}
"#;

/// Takes a line lease if it is free and, in the same round trip, reads what
/// the residue check needs next: the line's cached residue and the list's
/// generation. KEYS[1] the lease, KEYS[2] the list, KEYS[3] the generation;
/// ARGV: owner token, lease ms, line.
/// Returns {1, residue or nil, generation, 0} or {0, nil, 0, lease ms left}.
pub const LEASE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('HGET', KEYS[2], ARGV[3]), tonumber(redis.call('GET', KEYS[3]) or '0'), 0}
end
return {0, false, 0, redis.call('PTTL', KEYS[1])}
"#;

/// Releases a line lease if we still hold it, and wakes the waiters.
/// KEYS[1] the lease, KEYS[2] its channel; ARGV[1] our owner token.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], '1')
  return 1
end
return 0
"#;

/// Stores a line list read from the vendor, unless a line of it was
/// invalidated since the read began (the generation moved): a fill that
/// raced an invalidation must not bring the old value back.
/// KEYS[1] the list (hash line -> residue), KEYS[2] the generation.
/// ARGV: generation seen before the read, TTL in ms, then line, residue pairs.
pub const FILL: &str = r#"
local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
if gen ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV >= 3 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"#;

/// After an update of one line: with ARGV[2] > 0 (an accepted update,
/// `after_update = "decrement"`) lowers that line's cached residue by it,
/// otherwise forgets the line; either way moves the generation so a fill
/// already in flight is dropped. Other lines stay cached.
/// With KEYS[3] (the lease) and KEYS[4] (its channel) and ARGV[4] (our
/// owner token), also releases the lease in the same round trip, after the
/// line is settled.
/// KEYS[1] the list, KEYS[2] the generation; ARGV: line, decrement, gen TTL ms.
pub const SETTLE: &str = r#"
local dec = tonumber(ARGV[2])
if dec > 0 and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -dec)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[4] then
  redis.call('DEL', KEYS[3])
  redis.call('PUBLISH', KEYS[4], '1')
end
return 1
"#;
