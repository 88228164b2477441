//! The Lua scripts that change a digest's state in Redis atomically, so two nodes never both
//! accept one id. Keys and arguments are documented on each; replies are parsed in `mod.rs`.

use redis::Script;

pub(super) const ISSUE: &str = r"
redis.call('HSET', KEYS[1], 'state', 'issued', 'exp', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1";

/// KEYS: s, subs, nodes. ARGV: now, node, exp, grace, lease, live_ttl.
/// Returns {'ok', channels...} or {'expired'|'in_use'|'ended'}.
pub(super) const ATTACH: &str = r"
local now = tonumber(ARGV[1]); local exp = tonumber(ARGV[3])
local grace = tonumber(ARGV[4]); local lease = tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'until')
local state = s[1]
if state == 'dead' then return {'ended'} end
if state == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  if hb + lease > now then return {'in_use'} end
  if now >= hb + lease + grace then return {'ended'} end
elseif state == 'grace' then
  if now >= tonumber(s[3]) then return {'ended'} end
else
  if now >= exp then return {'expired'} end
end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[2], 'exp', exp)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local result = redis.call('SMEMBERS', KEYS[2])
table.insert(result, 1, 'ok')
return result";

/// KEYS: s, subs. ARGV: node, now, resumable (0/1), grace.
pub(super) const DETACH: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp')
if s[1] ~= 'live' or s[2] ~= ARGV[1] then return 0 end
local now = tonumber(ARGV[2]); local grace = tonumber(ARGV[4]); local exp = tonumber(s[3]) or now
if ARGV[3] == '1' and grace > 0 then
  redis.call('HSET', KEYS[1], 'state', 'grace', 'until', now + grace)
  local ttl = math.max(now + grace, exp) - now + 1000
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], math.max(exp - now, 0) + 1000)
end
return 1";

/// KEYS: s, subs, nodes. ARGV: now, lease, add (1) or remove (0), channels...
/// Returns {'unknown'} or {'offline'} or {'live', node}.
pub(super) const SUBSCRIBE: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
else
  redis.call('SREM', KEYS[2], unpack(ARGV, 4))
end
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  if hb + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return {'live', s[2]} end
end
return {'offline'}";

/// KEYS: s, subs, nodes. ARGV: now, lease, end (1: mark dead).
/// Returns {'unknown'} or {'offline'} or {'live', node}.
pub(super) const HOLDER: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
local live = false
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  live = hb + tonumber(ARGV[2]) > tonumber(ARGV[1])
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  local exp = tonumber(s[3]) or 0
  redis.call('PEXPIRE', KEYS[1], math.max(exp - tonumber(ARGV[1]), 0) + 1000)
end
if live then return {'live', s[2]} end
return {'offline'}";

/// Re-records a socket live on this node after Redis came back empty (a restart without
/// persistence); leaves existing state alone. KEYS: s, subs. ARGV: node, exp, live_ttl,
/// channels...
pub(super) const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if #ARGV > 3 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1";

/// The scripts, loaded once per node (redis-rs sends `EVALSHA`, and the source on `NOSCRIPT`).
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) issue: Script,
    pub(super) attach: Script,
    pub(super) detach: Script,
    pub(super) subscribe: Script,
    pub(super) holder: Script,
    pub(super) restore: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            issue: Script::new(ISSUE),
            attach: Script::new(ATTACH),
            detach: Script::new(DETACH),
            subscribe: Script::new(SUBSCRIBE),
            holder: Script::new(HOLDER),
            restore: Script::new(RESTORE),
        }
    }
}
