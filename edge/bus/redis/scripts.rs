//! The Lua scripts that change a digest's state in Redis atomically, so two nodes never both
//! accept one id. Keys and arguments are documented on each; replies are parsed in `mod.rs`.
//!
//! A script that ends credentials for good, or changes a channel's occupancy, also writes the
//! lifecycle event (`$disconnect`, `$occupied`, `$vacated`) to the outbox in the same step
//! ([`TELL`]), so the event exists exactly when the change does, whichever node dies next;
//! the [`outbox`](super::outbox) relays it to the `Handle` groups.

use redis::Script;

/// Shared by the scripts that tell lifecycle events: `tell(outbox, cid, digest, action, json)`
/// appends one event to the outbox stream (of the partition the script runs in) and wakes
/// the relays up (a message on the topic named like the stream); `ended(reason, user, code, close reason)` is the
/// `$disconnect` JSON (`{"reason","final":true,"user"}`, with `code` and `close_reason` when a
/// close ended it).
pub(super) const TELL: &str = r"
local function tell(outbox, cid, digest, action, json)
  redis.call('XADD', outbox, 'MAXLEN', '~', 100000, '*',
    'cid', cid, 'digest', digest, 'action', action, 'json', json)
  redis.call(PUB, outbox, '')
end
local function ended(reason, user, code, close_reason)
  local e = {reason = reason, final = true}
  if user and user ~= '' then e.user = user else e.user = cjson.null end
  if code and code ~= '' then
    e.code = tonumber(code)
    e.close_reason = close_reason
  end
  return cjson.encode(e)
end
";

/// KEYS: s. ARGV: exp, user ('' for none), info.
/// (The user's set is another partition's: [`USER`].)
pub(super) const ISSUE: &str = r"
redis.call('HSET', KEYS[1], 'state', 'issued', 'exp', ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'user', ARGV[2], 'info', ARGV[3])
end
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1";

/// Adds a digest to its user's set, which lives at least `ttl` from now.
/// KEYS: the user's set. ARGV: digest, ttl (ms).
pub(super) const USER: &str = r"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1";

/// KEYS: s, subs, nodes, ends, this node's live set. ARGV: now, node, exp, grace, lease,
/// live_ttl, connection id, digest.
/// Returns {'ok', 'fresh'|'resumed', user, info, channels...} (user and info '' when none) or {'expired'|'in_use'|'ended'|'unknown'}.
/// An id with no state here was issued before Redis lost its data (issuing records every id):
/// it is refused, so a Redis that comes back empty never reopens ended credentials.
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
  if not state then return {'unknown'} end
end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[2], 'exp', exp, 'cid', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[8])
redis.call('SADD', KEYS[5], ARGV[8])
redis.call('PEXPIRE', KEYS[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local result = redis.call('SMEMBERS', KEYS[2])
local who = redis.call('HMGET', KEYS[1], 'user', 'info')
table.insert(result, 1, who[2] or '')
table.insert(result, 1, who[1] or '')
table.insert(result, 1, state == 'issued' and 'fresh' or 'resumed')
table.insert(result, 1, 'ok')
return result";

/// A socket's end. A resumable one waits in `ends` (scored by the grace's end) for a node's
/// reaper to end it, unless it resumes first.
/// A final end tells its `$disconnect` (the socket's node gave the reason and close).
/// KEYS: s, subs, ends, this node's live set, outbox. ARGV: node, now, resumable (0/1), grace,
/// digest, reason, close code ('' for none), close reason.
/// Returns {} or, for a final end, {user, channels...} (for presence).
pub(super) const DETACH: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp', 'cid')
if s[1] ~= 'live' or s[2] ~= ARGV[1] then return {} end
redis.call('SREM', KEYS[4], ARGV[5])
local now = tonumber(ARGV[2]); local grace = tonumber(ARGV[4]); local exp = tonumber(s[3]) or now
if ARGV[3] == '1' and grace > 0 then
  redis.call('HSET', KEYS[1], 'state', 'grace', 'until', now + grace)
  redis.call('ZADD', KEYS[3], now + grace, ARGV[5])
  -- Kept a minute past the grace, so a late reaper still finds whom to tell.
  local ttl = math.max(now + grace, exp) - now + 60000
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
else
  local gone = redis.call('SMEMBERS', KEYS[2])
  local user = redis.call('HGET', KEYS[1], 'user') or ''
  table.insert(gone, 1, user)
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], math.max(exp - now, 0) + 1000)
  if s[4] and s[4] ~= '' then
    tell(KEYS[5], s[4], ARGV[5], '$disconnect', ended(ARGV[6], user, ARGV[7], ARGV[8]))
  end
  return gone
end
return {}";

/// KEYS: s, subs, nodes. ARGV: now, lease, add (1) or remove (0), channels...
/// Returns {'unknown'} or {'offline'|'live', node, connected, connection id, user, info,
/// channels...} (see `Held`): connected (1) when the credentials have had a socket and not
/// ended (for presence); the channels are those this call actually added or removed.
pub(super) const SUBSCRIBE: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'cid', 'user', 'info')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
local changed = {}
for i = 4, #ARGV do
  local n
  if ARGV[3] == '1' then n = redis.call('SADD', KEYS[2], ARGV[i]) else n = redis.call('SREM', KEYS[2], ARGV[i]) end
  if n == 1 then table.insert(changed, ARGV[i]) end
end
if ARGV[3] == '1' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
local kind = 'offline'
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  if hb + tonumber(ARGV[2]) > tonumber(ARGV[1]) then kind = 'live' end
end
local connected = (s[1] == 'live' or s[1] == 'grace') and '1' or '0'
local result = {kind, s[2] or '', connected, s[3] or '', s[4] or '', s[5] or ''}
for _, c in ipairs(changed) do table.insert(result, c) end
return result";

/// Adds a connection to a channel's presence, or removes it, keeping the count per user, and
/// publishes the change on the channel's topic in the same step (so every node with the
/// channel hears each change once, in order): `!join <first of its user: 0|1> <digest>\n<entry>`,
/// `!leave <last of its user> <digest>\n<entry>`, and with occupancy `!occupied` (the first
/// member, unless one left within the vacate delay) or, after the last member left, an entry
/// in the vacating set (or `!vacated` at once for a delay of 0).
/// An occupancy change is told to the `Handle` groups too (`$occupied`, `$vacated`).
/// A leave with a node in ARGV[9] happens only while the digest is still live on that node
/// (a dead node's presence, unless its socket resumed elsewhere).
/// Each member's node is kept beside it (`pn`: digest → the node its socket is on), for that
/// condition.
/// KEYS: the channel's presence hash, its user counts, the vacating set, outbox, the members'
/// nodes. ARGV: 'join'|'leave', digest, entry (JSON), user ('' for none), topic, vacate delay
/// (ms; -1 without occupancy), now (ms), channel, node (a join: where the socket is; a leave:
/// '' for no condition). Returns
/// 'occupied' or 'vacated' when this call changed the occupancy, else ''.
pub(super) const PRESENCE: &str = r"
local topic, delay, channel = ARGV[5], tonumber(ARGV[6]), ARGV[8]
if ARGV[1] == 'join' then
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[5], ARGV[2], ARGV[9]) end
  if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return '' end
  local first = 1
  if ARGV[4] ~= '' and redis.call('HINCRBY', KEYS[2], ARGV[4], 1) > 1 then first = 0 end
  local told = ''
  if delay >= 0 and redis.call('HLEN', KEYS[1]) == 1
      and redis.call('ZREM', KEYS[3], channel) == 0 then
    redis.call(PUB, topic, '!occupied')
    tell(KEYS[4], '', '', '$occupied', cjson.encode({channel = channel}))
    told = 'occupied'
  end
  redis.call(PUB, topic, '!join ' .. first .. ' ' .. ARGV[2] .. '\n' .. ARGV[3])
  return told
end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[5], ARGV[2]) ~= ARGV[9] then return '' end
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return '' end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
local last = 1
if ARGV[4] ~= '' then
  if redis.call('HINCRBY', KEYS[2], ARGV[4], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[4])
  else
    last = 0
  end
end
redis.call(PUB, topic, '!leave ' .. last .. ' ' .. ARGV[2] .. '\n' .. entry)
if delay < 0 or redis.call('HLEN', KEYS[1]) > 0 then return '' end
if delay == 0 then
  redis.call(PUB, topic, '!vacated')
  tell(KEYS[4], '', '', '$vacated', cjson.encode({channel = channel}))
  return 'vacated'
end
redis.call('ZADD', KEYS[3], tonumber(ARGV[7]) + delay, channel)
return ''";

/// Tells `vacated` once for a channel whose vacate delay passed with no member back.
/// KEYS: vacating, pr, outbox. ARGV: channel, now, topic. Returns 1 when this call told it.
pub(super) const VACATE: &str = r"
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at or tonumber(at) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call(PUB, ARGV[3], '!vacated')
tell(KEYS[3], '', '', '$vacated', cjson.encode({channel = ARGV[1]}))
return 1";

/// Where a digest's socket is; with `end`, ends its credentials (the application's
/// `Disconnect`), telling the final `$disconnect` when they had a socket.
/// KEYS: s, subs, nodes, ends, outbox. ARGV: now, lease, end (1: mark dead), digest, close
/// code, close reason.
/// Returns {'unknown'} or {'offline'|'live', node, ended offline, connection id, user, info,
/// channels...} (see `Held`): the flag is 1 when this call ended credentials that had a socket
/// but none live now (in their grace, or on a node that stopped heartbeating); the channels
/// (for presence) come when this call ended credentials that had a socket.
pub(super) const HOLDER: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'node', 'exp', 'cid', 'user', 'info')
if not s[1] or s[1] == 'dead' then return {'unknown'} end
local live = false
if s[1] == 'live' then
  local hb = tonumber(redis.call('ZSCORE', KEYS[3], s[2]) or 0)
  live = hb + tonumber(ARGV[2]) > tonumber(ARGV[1])
end
local ends = ARGV[3] == '1' and s[1] ~= 'issued'
local result = {live and 'live' or 'offline', s[2] or '', (ends and not live) and '1' or '0',
  s[4] or '', s[5] or '', s[6] or ''}
if ends then
  for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do table.insert(result, c) end
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'dead')
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[4], ARGV[4])
  local exp = tonumber(s[3]) or 0
  redis.call('PEXPIRE', KEYS[1], math.max(exp - tonumber(ARGV[1]), 0) + 1000)
  if ends and s[4] and s[4] ~= '' then
    tell(KEYS[5], s[4], ARGV[4], '$disconnect',
      ended('disconnected by the application', s[5], ARGV[5], ARGV[6]))
  end
end
return result";

/// Ends, once, credentials no socket will resume (the node whose call ends them tells it):
/// mode `grace`, those whose grace ran out (the index is `ends`); mode `lost`, those still live
/// on `node`, which stopped heartbeating (the index is that node's live set; the caller checked
/// that its lease and the grace passed). The digest leaves the index either way.
/// It tells the final `$disconnect` (`grace expired` or `node lost`).
/// KEYS: s, subs, index, outbox. ARGV: now, digest, mode, node.
/// Returns {} or {connection id, user, channels...}.
pub(super) const REAP: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'until', 'node', 'cid', 'user', 'exp')
local now = tonumber(ARGV[1])
local due
if ARGV[3] == 'grace' then
  if s[1] == 'grace' and tonumber(s[2]) > now then return {} end
  redis.call('ZREM', KEYS[3], ARGV[2])
  due = s[1] == 'grace'
else
  redis.call('SREM', KEYS[3], ARGV[2])
  due = s[1] == 'live' and s[3] == ARGV[4]
end
if not due then return {} end
local result = redis.call('SMEMBERS', KEYS[2])
table.insert(result, 1, s[5] or '')
table.insert(result, 1, s[4] or '')
redis.call('HSET', KEYS[1], 'state', 'dead')
redis.call('DEL', KEYS[2])
redis.call('PEXPIRE', KEYS[1], math.max((tonumber(s[6]) or 0) - now, 0) + 1000)
if s[4] and s[4] ~= '' then
  local reason = ARGV[3] == 'grace' and 'grace expired' or 'node lost'
  tell(KEYS[4], s[4], ARGV[2], '$disconnect', ended(reason, s[5]))
end
return result";

/// Re-records a socket live on this node after Redis came back empty (a restart without
/// persistence); leaves existing state alone (the user's set is [`USER`]'s). KEYS: s, subs,
/// this node's live set. ARGV: node, exp, live_ttl, user ('' for none), info, digest,
/// channels...
pub(super) const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'user', ARGV[4], 'info', ARGV[5])
end
if #ARGV > 6 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 7))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1";

/// One push to one channel: gives it the channel's next offset (creating the channel's epoch
/// when Redis has none), keeps it in the channel's log (capped, with a time to live), publishes
/// it, and records its idempotency key, all at once; so every node sees one order, and a
/// retried push with the same key is taken once.
/// KEYS: meta, log, idempotency (the meta key again when there is no key).
/// ARGV: candidate epoch, payload, history size, history ttl (ms), position ttl (ms), topic,
/// now (ms), idempotency window (ms), has key (0/1).
/// Returns {epoch, offset, duplicate (0/1)}.
pub(super) const PUSH: &str = r"
if ARGV[9] == '1' then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    local sp = string.find(prior, ' ', 1, true)
    return {string.sub(prior, 1, sp - 1), tonumber(string.sub(prior, sp + 1)), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if tonumber(ARGV[3]) > 0 and tonumber(ARGV[4]) > 0 then
  -- Pushes past their time to live leave: every 16th push looks at the oldest 32, so the log
  -- keeps up at a fraction of a command per push.
  local cut = nil
  local oldest = {}
  if offset % 16 == 0 then oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 32) end
  for _, e in ipairs(oldest) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 't' and tonumber(f[i + 1]) + tonumber(ARGV[4]) <= tonumber(ARGV[7]) then
        cut = tonumber(string.sub(e[1], 3))
      end
    end
  end
  if cut then redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (cut + 1)) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-' .. offset, 't', ARGV[7], 'p', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call(PUB, ARGV[6], epoch .. ' ' .. offset .. '\n' .. ARGV[2])
if ARGV[9] == '1' then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'PX', ARGV[8])
end
return {epoch, offset, 0}";

/// A channel's position and some of its log, read at once (so they agree): the position only,
/// the pushes after an offset (oldest first), or before one (newest first; 0: from the newest).
/// Creates the channel's epoch when Redis has none, so a position read here is the one later
/// pushes continue.
/// KEYS: meta, log. ARGV: candidate epoch, position ttl (ms), mode ('pos'|'after'|'before'),
/// offset, count.
/// Returns {epoch, last offset, then offset, time (ms), payload for each push}.
pub(super) const READ: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local result = {epoch, tonumber(redis.call('HGET', KEYS[1], 'o'))}
local entries = {}
local count = tonumber(ARGV[5])
if ARGV[3] == 'after' and count > 0 then
  entries = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[4], '+', 'COUNT', count)
elseif ARGV[3] == 'before' and count > 0 then
  local from = '+'
  if tonumber(ARGV[4]) > 0 then from = '(0-' .. ARGV[4] end
  entries = redis.call('XREVRANGE', KEYS[2], from, '-', 'COUNT', count)
end
for _, e in ipairs(entries) do
  local id = e[1]
  local fields = e[2]
  local t, p = '0', 'null'
  for i = 1, #fields, 2 do
    if fields[i] == 't' then t = fields[i + 1] elseif fields[i] == 'p' then p = fields[i + 1] end
  end
  table.insert(result, tonumber(string.sub(id, 3)))
  table.insert(result, tonumber(t))
  table.insert(result, p)
end
return result";

/// Starts a new epoch for a channel whose shard failed over (its new master may lack the
/// last pushes, whose offsets would then be given again): the sockets see a gap
/// (`recovered:false`) instead of pushes taken for ones they had. Only when the channel is
/// still in the epoch the caller knew, so one failover starts one epoch.
/// KEYS: meta, log. ARGV: known epoch, new epoch, position ttl (ms). Returns 1 when it did.
pub(super) const REBASE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and epoch ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 'o', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1";

/// The scripts, loaded once per node (redis-rs sends `EVALSHA`, and the source on `NOSCRIPT`).
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) issue: Script,
    pub(super) user: Script,
    pub(super) attach: Script,
    pub(super) detach: Script,
    pub(super) subscribe: Script,
    pub(super) holder: Script,
    pub(super) reap: Script,
    pub(super) presence: Script,
    pub(super) vacate: Script,
    pub(super) restore: Script,
    pub(super) push: Script,
    pub(super) read: Script,
    pub(super) rebase: Script,
}

impl Scripts {
    /// The scripts for one server (`PUBLISH`) or a cluster (`SPUBLISH`: a script's topic is
    /// on its keys' slot, so it reaches only the nodes subscribed on that shard).
    pub(super) fn new(cluster: bool) -> Self {
        let publish = if cluster { "SPUBLISH" } else { "PUBLISH" };
        let with_pub = |body: &str| Script::new(&format!("local PUB = '{publish}'\n{body}"));
        Self {
            issue: Script::new(ISSUE),
            user: Script::new(USER),
            attach: Script::new(ATTACH),
            detach: with_pub(&format!("{TELL}{DETACH}")),
            subscribe: Script::new(SUBSCRIBE),
            holder: with_pub(&format!("{TELL}{HOLDER}")),
            reap: with_pub(&format!("{TELL}{REAP}")),
            presence: with_pub(&format!("{TELL}{PRESENCE}")),
            vacate: with_pub(&format!("{TELL}{VACATE}")),
            restore: Script::new(RESTORE),
            push: with_pub(PUSH),
            read: Script::new(READ),
            rebase: Script::new(REBASE),
        }
    }
}
