//! Cluster mode: the bus over one Redis deployment.
//!
//! # What Redis holds (all keys under the configured prefix `P`)
//! | key | type | what | lifetime |
//! | --- | --- | --- | --- |
//! | `P:s:{digest}` | hash `state, exp, until, node` | the credentials' state: `issued`, `live` (on `node`), `grace` (until `until`), `dead` | until the id expires (longer while live or in grace) |
//! | `P:subs:{digest}` | set | the digest's channels | as `P:s:{digest}`; deleted when dead |
//! | `P:nodes` | sorted set | node id → last heartbeat (ms) | heartbeats every second |
//!
//! Pub/sub channels: `P:ch:{channel}` carries pushes (a node subscribes only to channels its
//! sockets or listeners use); `P:node:{id}` carries commands for one node's sockets.
//!
//! # A push
//! The node that accepts a push delivers it to its own sockets, then `PUBLISH`es the encoded
//! frame once (one command per channel, pipelined): `{node id}:{payload offset}\n{frame}`.
//! Other nodes pass the frame's bytes to their sockets without re-encoding; a node ignores its
//! own pushes. One publisher connection per node keeps its pushes in order.
//!
//! # Liveness
//! A `live` mark counts only while its node's heartbeat is fresh (within [`LEASE`]). When a node
//! dies, its sockets may resume elsewhere within the reconnect grace, counted from its last
//! heartbeat. State changes are Lua scripts, so two nodes never both accept one id.
//!
//! # Handle streams across nodes
//! Each node advertises the groups of its `Handle` streams in `P:act:{action}` (sorted set of
//! group → expiry; lifecycle groups under `$lifecycle`), renewed by the heartbeat. A client
//! message that no group on its node handles is added (`XADD`) to the Redis stream
//! `P:q:{group}` of every other group that handles it; nodes with streams of that group read it
//! with `XREADGROUP` (consumer group `handlers`, one consumer per node), hand it to a local
//! stream, acknowledge it, and publish the reply to the origin node's topic. Delivery is at most
//! once: a message whose node or stream dies before replying is answered 503 or 504, never
//! redelivered (the client would have given up). Each queue is capped (`MAXLEN ~ 10000`).
//!
//! # Faults
//! While Redis is unreachable, sockets on this node keep receiving pushes made on this node;
//! `/readyz` reports the reason; calls that need shared state fail with `UNAVAILABLE`; new
//! handshakes get 503. The node reconnects with back-off and re-subscribes its channels.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;
use parking_lot::Mutex;
use rand::RngCore;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink},
    Script,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::AttachError;
use crate::{
    config::Limits,
    credentials::{Credentials, Digest, Verified},
    error::{Close, Error},
    handlers::remote::{Remote, RemoteReply},
    protocol::{push_frame, Channel, Frame},
    registry::{now_ms, ClusterFeed, Conn, Ending, Refusal, Registry, Relay},
};

mod queue;

/// How often a node renews its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose heartbeat is older than this is dead, and its sockets' ids may resume elsewhere.
pub const LEASE: Duration = Duration::from_secs(3);
/// Time to live of a live socket's keys, renewed by its node every [`LIVE_RENEW`].
const LIVE_TTL: Duration = Duration::from_secs(600);
const LIVE_RENEW: Duration = Duration::from_secs(120);
/// Time to live of the heartbeat set, renewed by every heartbeat.
const NODES_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a command for another node's socket waits for that node's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection back-off.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Redis commands time out after this (the node then reports itself not ready).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Pushes published per pipeline.
const RELAY_BATCH: usize = 256;

const ISSUE: &str = r"
redis.call('HSET', KEYS[1], 'state', 'issued', 'exp', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1";

/// KEYS: s, subs, nodes. ARGV: now, node, exp, grace, lease, live_ttl.
/// Returns {'ok', channels...} or {'expired'|'in_use'|'ended'}.
const ATTACH: &str = r"
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
const DETACH: &str = r"
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
const SUBSCRIBE: &str = r"
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
const HOLDER: &str = r"
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
const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if #ARGV > 3 then
  redis.call('SADD', KEYS[2], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1";

/// A command for the node holding a socket, or an acknowledgement.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Command {
    Subscribe {
        from: String,
        rid: u64,
        digest: String,
        channels: Vec<String>,
        add: bool,
    },
    Send {
        digest: String,
        frame: String,
    },
    Disconnect {
        digest: String,
        code: u16,
        reason: String,
    },
    Ack {
        rid: u64,
    },
    /// A reply to a forwarded client message.
    Reply {
        rid: u64,
        status: u16,
        headers: Vec<(String, String)>,
        body: Option<String>,
    },
    /// A forwarded client message found no stream to take it (or its stream ended).
    Unhandled {
        rid: u64,
    },
}

/// What the origin of a forwarded message hears back.
enum ForwardEvent {
    Reply(RemoteReply),
    Unhandled,
}

/// The bus over Redis.
#[derive(Debug)]
pub struct RedisBus {
    registry: Registry,
    node: String,
    prefix: String,
    client: redis::Client,
    /// Commands and scripts; reconnects by itself.
    conn: ConnectionManager,
    /// The pub/sub connection's sending half and the Redis channels it is subscribed to.
    /// Async lock: (un)subscribing awaits Redis's confirmation, and the order of subscribe and
    /// unsubscribe for one channel must be the order they were decided in.
    pubsub: tokio::sync::Mutex<PubSub>,
    /// `None` when ready; else why not.
    not_ready: Mutex<Option<String>>,
    /// Commands sent to other nodes, waiting for their acknowledgement.
    acks: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_rid: AtomicU64,
    grace: Duration,
    scripts: Scripts,
    /// This node's `Handle` streams.
    remote: Remote,
    /// Forwarded client messages waiting for a reply from another node.
    forwards: Mutex<HashMap<u64, tokio::sync::mpsc::Sender<ForwardEvent>>>,
    /// Wakes the task that follows this node's `Handle` groups.
    groups_changed: tokio::sync::Notify,
    /// Tracks the consumer tasks of the groups.
    tracker: TaskTracker,
    /// This bus, for futures that outlive a borrow of it.
    me: std::sync::Weak<RedisBus>,
}

#[derive(Debug, Default)]
struct PubSub {
    sink: Option<PubSubSink>,
    subscribed: HashSet<Channel>,
}

#[derive(Debug)]
struct Scripts {
    issue: Script,
    attach: Script,
    detach: Script,
    subscribe: Script,
    holder: Script,
    restore: Script,
}

/// Where a digest's socket is.
enum Holder {
    Unknown,
    Offline,
    Live(String),
}

impl RedisBus {
    /// Connects lazily to `url`, and starts the tasks that keep this node in the cluster
    /// (they stop when `halt` is cancelled). The node reports itself not ready until Redis
    /// answers.
    #[allow(clippy::too_many_arguments)] // one call site, in `run`
    pub fn start(
        url: &str,
        prefix: &str,
        registry: Registry,
        feed: ClusterFeed,
        remote: Remote,
        limits: &Limits,
        halt: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, Error> {
        let redis_error = |err: redis::RedisError| Error::Io {
            context: format!("redis {url}"),
            source: std::io::Error::other(err),
        };
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(redis_error)?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let bus = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            registry,
            node: hex::encode(id),
            prefix: prefix.to_owned(),
            client,
            conn,
            pubsub: tokio::sync::Mutex::new(PubSub::default()),
            not_ready: Mutex::new(Some("connecting to Redis".into())),
            acks: Mutex::new(HashMap::new()),
            next_rid: AtomicU64::new(1),
            grace: limits.reconnect_grace,
            scripts: Scripts {
                issue: Script::new(ISSUE),
                attach: Script::new(ATTACH),
                detach: Script::new(DETACH),
                subscribe: Script::new(SUBSCRIBE),
                holder: Script::new(HOLDER),
                restore: Script::new(RESTORE),
            },
            remote: remote.clone(),
            forwards: Mutex::new(HashMap::new()),
            groups_changed: tokio::sync::Notify::new(),
            tracker: tracker.clone(),
        });
        remote.set_forwarder(bus.clone());
        tracing::info!(node = %bus.node, prefix, "cluster mode on Redis");
        tracker.spawn(bus.clone().supervise(halt.clone()));
        tracker.spawn(bus.clone().relay(feed, halt.clone()));
        tracker.spawn(bus.clone().reconcile(halt.clone()));
        tracker.spawn(bus.clone().follow_groups(halt.clone()));
        tracker.spawn(bus.clone().heartbeat(halt));
        Ok(bus)
    }

    fn this(&self) -> Option<Arc<Self>> {
        self.me.upgrade()
    }

    /// The node's registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// This node's id in the cluster.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `Ok` when Redis answers; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        self.not_ready.lock().clone().map_or(Ok(()), Err)
    }

    fn key(&self, kind: &str, digest: &Digest) -> String {
        format!("{}:{kind}:{digest}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn channel_topic(&self, channel: &str) -> String {
        format!("{}:ch:{channel}", self.prefix)
    }

    fn node_topic(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    fn unavailable(&self, err: &redis::RedisError) -> Error {
        let reason = format!("Redis: {err}");
        tracing::warn!(%reason, "cluster call failed");
        Error::ClusterUnavailable(reason)
    }

    /// Mints credentials and records them as issued.
    pub async fn issue(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        let creds = self.registry.mint(ttl)?;
        let mut conn = self.conn.clone();
        self.scripts
            .issue
            .key(self.key("s", &creds.digest))
            .arg(creds.expires_at_ms)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(creds)
    }

    /// Adds (or removes) `digest`'s subscriptions in Redis, and on the node holding its socket
    /// before returning. Returns whether a socket is live.
    pub async fn subscribe(
        &self,
        digest: &Digest,
        channels: &[Channel],
        add: bool,
    ) -> Result<bool, Error> {
        crate::registry::check_channel_count(channels)?;
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.subscribe.prepare_invoke();
        invocation
            .key(self.key("s", digest))
            .key(self.key("subs", digest))
            .key(self.nodes_key())
            .arg(now_ms())
            .arg(LEASE.as_millis() as u64)
            .arg(u8::from(add));
        for channel in channels {
            invocation.arg(channel.as_str());
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        match parse_holder(reply) {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => Ok(false),
            Holder::Live(node) if node == self.node => {
                self.apply_subscribe(digest, channels, add).await;
                Ok(true)
            }
            Holder::Live(node) => {
                let rid = self.next_rid.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                self.acks.lock().insert(rid, tx);
                let command = Command::Subscribe {
                    from: self.node.clone(),
                    rid,
                    digest: digest.to_string(),
                    channels: channels.iter().map(|c| c.to_string()).collect(),
                    add,
                };
                self.command(&node, &command).await?;
                if tokio::time::timeout(ACK_TIMEOUT, rx).await.is_err() {
                    self.acks.lock().remove(&rid);
                    tracing::warn!(%node, "no acknowledgement of a subscription change; it applies when the socket reconnects");
                }
                Ok(true)
            }
        }
    }

    /// Applies a subscription change to a socket on this node; subscribes this node to the
    /// channels in Redis before returning, so no push is missed.
    async fn apply_subscribe(&self, digest: &Digest, channels: &[Channel], add: bool) {
        let applied = if add {
            self.registry.subscribe(digest, channels)
        } else {
            self.registry.unsubscribe(digest, channels)
        };
        if let Err(err) = applied {
            tracing::debug!(%err, "subscription change for a socket no longer here");
        }
        if add {
            self.ensure_subscribed(channels).await;
        }
    }

    async fn holder(&self, digest: &Digest, end: bool) -> Result<Holder, Error> {
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .scripts
            .holder
            .key(self.key("s", digest))
            .key(self.key("subs", digest))
            .key(self.nodes_key())
            .arg(now_ms())
            .arg(LEASE.as_millis() as u64)
            .arg(u8::from(end))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(parse_holder(reply))
    }

    /// Sends to `digest`'s socket wherever it is. Returns whether one was live.
    pub async fn send(
        &self,
        digest: &Digest,
        channel: &Channel,
        json: &str,
    ) -> Result<bool, Error> {
        // Checked and encoded once, wherever the socket is.
        let frame = push_frame(channel, &self.registry.check_payload(json)?);
        match self.holder(digest, false).await? {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => Ok(false),
            Holder::Live(node) if node == self.node => Ok(self.registry.send_frame(digest, &frame)),
            Holder::Live(node) => {
                self.command(
                    &node,
                    &Command::Send {
                        digest: digest.to_string(),
                        frame: frame.to_string(),
                    },
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// Ends `digest`'s credentials everywhere and closes its socket wherever it is.
    pub async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        match self.holder(digest, true).await? {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => Ok(false),
            Holder::Live(node) if node == self.node => {
                let _ = self.registry.disconnect(digest, close);
                Ok(true)
            }
            Holder::Live(node) => {
                let command = Command::Disconnect {
                    digest: digest.to_string(),
                    code: close.code(),
                    reason: close.reason().to_owned(),
                };
                self.command(&node, &command).await?;
                Ok(true)
            }
        }
    }

    /// Accepts a handshake's credentials cluster-wide and binds the socket here with the
    /// digest's subscriptions (this node subscribed to them in Redis before it returns).
    pub async fn attach(&self, verified: &Verified) -> Result<Arc<Conn>, AttachError> {
        self.readiness().map_err(AttachError::Unavailable)?;
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .scripts
            .attach
            .key(self.key("s", &verified.digest))
            .key(self.key("subs", &verified.digest))
            .key(self.nodes_key())
            .arg(now_ms())
            .arg(&self.node)
            .arg(verified.expires_at_ms)
            .arg(self.grace.as_millis() as u64)
            .arg(LEASE.as_millis() as u64)
            .arg(LIVE_TTL.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| AttachError::Unavailable(e.to_string()))?;
        let mut reply = reply.into_iter();
        match reply.next().as_deref() {
            Some("ok") => {}
            Some("expired") => return Err(Refusal::Expired.into()),
            Some("in_use") => return Err(Refusal::AlreadyLive.into()),
            _ => return Err(Refusal::Ended.into()),
        }
        let channels: Vec<Channel> = reply.filter_map(|c| Channel::new(&c).ok()).collect();
        let socket = self.registry.attach_accepted(verified, channels.clone());
        self.ensure_subscribed(&channels).await;
        Ok(socket)
    }

    /// Records a socket's end in Redis (in the background: the socket is already gone here).
    pub fn detach(self: &Arc<Self>, digest: Digest, ending: Ending) {
        let bus = self.clone();
        // Not on the tracker: it must run during the drain, and it is bounded by the command
        // timeout.
        tokio::spawn(async move {
            let mut conn = bus.conn.clone();
            let result = bus
                .scripts
                .detach
                .key(bus.key("s", &digest))
                .key(bus.key("subs", &digest))
                .arg(&bus.node)
                .arg(now_ms())
                .arg(u8::from(ending == Ending::Resumable))
                .arg(bus.grace.as_millis() as u64)
                .invoke_async::<i64>(&mut conn)
                .await;
            if let Err(err) = result {
                tracing::warn!(%err, "could not record a socket's end in Redis; its id frees up when this node's heartbeat lapses");
            }
        });
    }

    async fn command(&self, node: &str, command: &Command) -> Result<(), Error> {
        let text = serde_json::to_string(command).expect("commands serialize");
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.node_topic(node))
            .arg(text)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(())
    }

    /// Subscribes this node to `channels` in Redis (those it is not subscribed to yet), and
    /// waits for Redis to confirm.
    pub async fn ensure_subscribed(&self, channels: &[Channel]) {
        let mut pubsub = self.pubsub.lock().await;
        let missing: Vec<Channel> = channels
            .iter()
            .filter(|c| !pubsub.subscribed.contains(*c))
            .cloned()
            .collect();
        if missing.is_empty() {
            return;
        }
        let Some(sink) = pubsub.sink.as_mut() else {
            // Redis is down; the reconnection re-subscribes everything in use.
            return;
        };
        let topics: Vec<String> = missing.iter().map(|c| self.channel_topic(c)).collect();
        match sink.subscribe(&topics).await {
            Ok(()) => pubsub.subscribed.extend(missing),
            Err(err) => tracing::warn!(%err, "Redis SUBSCRIBE failed"),
        }
    }

    /// Follows local interest: subscribes to channels that gained their first local user and
    /// unsubscribes from channels that lost their last.
    async fn reconcile(self: Arc<Self>, halt: CancellationToken) {
        loop {
            let changed = tokio::select! {
                changed = self.registry.changed_channels() => changed,
                _ = halt.cancelled() => return,
            };
            let mut pubsub = self.pubsub.lock().await;
            let (mut add, mut remove) = (Vec::new(), Vec::new());
            for channel in changed {
                let wanted = self.registry.has_interest(&channel);
                let have = pubsub.subscribed.contains(&channel);
                if wanted && !have {
                    add.push(channel);
                } else if !wanted && have {
                    remove.push(channel);
                }
            }
            let Some(sink) = pubsub.sink.as_mut() else {
                continue;
            };
            if !add.is_empty() {
                let topics: Vec<String> = add.iter().map(|c| self.channel_topic(c)).collect();
                if sink.subscribe(&topics).await.is_ok() {
                    pubsub.subscribed.extend(add);
                }
            }
            if !remove.is_empty() {
                let topics: Vec<String> = remove.iter().map(|c| self.channel_topic(c)).collect();
                let sink = pubsub.sink.as_mut().expect("checked above");
                if sink.unsubscribe(&topics).await.is_ok() {
                    for channel in &remove {
                        pubsub.subscribed.remove(channel);
                    }
                }
            }
        }
    }

    /// Keeps a pub/sub connection: connects with back-off, subscribes to this node's topic and
    /// every channel in use, and handles what arrives until the connection drops.
    async fn supervise(self: Arc<Self>, halt: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = tokio::select! {
                connected = self.connect_pubsub() => connected,
                _ = halt.cancelled() => return,
            };
            match connected {
                Ok(mut stream) => {
                    if let Err(err) = self.restore_live().await {
                        let reason = format!("Redis unreachable: {err}");
                        tracing::warn!(%reason, retry_in = ?backoff);
                        *self.not_ready.lock() = Some(reason);
                        self.pubsub.lock().await.sink = None;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = halt.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    backoff = BACKOFF_MIN;
                    *self.not_ready.lock() = None;
                    tracing::info!("connected to Redis");
                    loop {
                        let message = tokio::select! {
                            message = stream.next() => message,
                            _ = halt.cancelled() => return,
                        };
                        match message {
                            Some(message) => self.on_message(&message).await,
                            None => break,
                        }
                    }
                    let reason = "lost the Redis connection; reconnecting".to_owned();
                    tracing::warn!("{reason}");
                    *self.not_ready.lock() = Some(reason);
                    let mut pubsub = self.pubsub.lock().await;
                    pubsub.sink = None;
                    pubsub.subscribed.clear();
                }
                Err(err) => {
                    let reason = format!("Redis unreachable: {err}");
                    tracing::warn!(%reason, retry_in = ?backoff);
                    *self.not_ready.lock() = Some(reason);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = halt.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Renews this node's heartbeat and records its live sockets in Redis where Redis has lost
    /// them (a restart without persistence).
    async fn restore_live(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZADD")
            .arg(self.nodes_key())
            .arg(now_ms())
            .arg(&self.node)
            .query_async::<i64>(&mut conn)
            .await?;
        let mut restored = 0;
        for (digest, expires_at_ms, channels) in self.registry.live_sessions() {
            let mut invocation = self.scripts.restore.prepare_invoke();
            invocation
                .key(self.key("s", &digest))
                .key(self.key("subs", &digest))
                .arg(&self.node)
                .arg(expires_at_ms)
                .arg(LIVE_TTL.as_millis() as u64);
            for channel in &channels {
                invocation.arg(channel.as_str());
            }
            restored += invocation.invoke_async::<i64>(&mut conn).await?;
        }
        if restored > 0 {
            tracing::info!(sockets = restored, "restored live sockets' state in Redis");
        }
        Ok(())
    }

    async fn connect_pubsub(&self) -> Result<redis::aio::PubSubStream, redis::RedisError> {
        let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        let (mut sink, stream) = pubsub.split();
        let mut state = self.pubsub.lock().await;
        sink.subscribe(self.node_topic(&self.node)).await?;
        let interest = self.registry.interest();
        for chunk in interest.chunks(1000) {
            let topics: Vec<String> = chunk.iter().map(|c| self.channel_topic(c)).collect();
            sink.subscribe(&topics).await?;
        }
        state.subscribed = interest.into_iter().collect();
        state.sink = Some(sink);
        Ok(stream)
    }

    async fn on_message(&self, message: &redis::Msg) {
        let topic = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if let Some(channel) = topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix(":ch:"))
        {
            match self.decode_push(channel, payload) {
                Some(Some(relay)) => {
                    self.registry.deliver_relayed(&relay);
                }
                Some(None) => {} // our own push, delivered when it was accepted
                None => tracing::warn!(%channel, "malformed push from Redis dropped"),
            }
        } else if topic == self.node_topic(&self.node) {
            match serde_json::from_slice::<Command>(payload) {
                Ok(command) => self.on_command(command).await,
                Err(err) => tracing::warn!(%err, "malformed node command dropped"),
            }
        }
    }

    /// `None`: malformed. `Some(None)`: this node's own push.
    fn decode_push(&self, channel: &str, payload: &[u8]) -> Option<Option<Relay>> {
        let newline = payload.iter().position(|b| *b == b'\n')?;
        let header = std::str::from_utf8(&payload[..newline]).ok()?;
        let (origin, at) = header.split_once(':')?;
        if origin == self.node {
            return Some(None);
        }
        let frame = String::from_utf8(payload[newline + 1..].to_vec()).ok()?;
        let payload_at: usize = at.parse().ok()?;
        if payload_at >= frame.len() || !frame.is_char_boundary(payload_at) {
            return None;
        }
        Some(Some(Relay {
            channel: Channel::new(channel).ok()?,
            frame: Frame::from(frame),
            payload_at,
        }))
    }

    async fn on_command(&self, command: Command) {
        match command {
            Command::Subscribe {
                from,
                rid,
                digest,
                channels,
                add,
            } => {
                let channels: Vec<Channel> = channels
                    .iter()
                    .filter_map(|c| Channel::new(c).ok())
                    .collect();
                if let Ok(digest) = digest.parse() {
                    self.apply_subscribe(&digest, &channels, add).await;
                }
                let _ = self.command(&from, &Command::Ack { rid }).await;
            }
            Command::Send { digest, frame } => {
                if let Ok(digest) = digest.parse() {
                    let _ = self.registry.send_frame(&digest, &Frame::from(frame));
                }
            }
            Command::Disconnect {
                digest,
                code,
                reason,
            } => {
                if let Ok(digest) = digest.parse() {
                    let _ = self
                        .registry
                        .disconnect(&digest, Close::Application { code, reason });
                }
            }
            Command::Ack { rid } => {
                if let Some(tx) = self.acks.lock().remove(&rid) {
                    let _ = tx.send(());
                }
            }
            Command::Reply {
                rid,
                status,
                headers,
                body,
            } => {
                let body = body.and_then(|b| crate::protocol::Json::parse(&b).ok());
                let reply = RemoteReply {
                    delivery_id: 0,
                    status,
                    headers,
                    body,
                };
                if let Some(tx) = self.forwards.lock().get(&rid) {
                    let _ = tx.try_send(ForwardEvent::Reply(reply));
                }
            }
            Command::Unhandled { rid } => {
                if let Some(tx) = self.forwards.lock().get(&rid) {
                    let _ = tx.try_send(ForwardEvent::Unhandled);
                }
            }
        }
    }

    /// Publishes this node's pushes, in order, pipelined.
    async fn relay(self: Arc<Self>, mut feed: ClusterFeed, halt: CancellationToken) {
        let mut batch = Vec::with_capacity(RELAY_BATCH);
        loop {
            let n = tokio::select! {
                n = feed.relay.recv_many(&mut batch, RELAY_BATCH) => n,
                _ = halt.cancelled() => return,
            };
            if n == 0 {
                return;
            }
            if self.readiness().is_err() {
                self.registry.metrics().relay_dropped.inc_by(n as u64);
                batch.clear();
                continue;
            }
            let mut pipe = redis::pipe();
            for relay in batch.drain(..) {
                let mut message = format!("{}:{}\n", self.node, relay.payload_at).into_bytes();
                message.extend_from_slice(relay.frame.as_bytes());
                pipe.cmd("PUBLISH")
                    .arg(self.channel_topic(&relay.channel))
                    .arg(message)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            if let Err(err) = pipe.query_async::<()>(&mut conn).await {
                self.registry.metrics().relay_dropped.inc_by(n as u64);
                tracing::warn!(%err, pushes = n, "cross-node pushes dropped: Redis PUBLISH failed");
            }
        }
    }

    /// Renews this node's heartbeat, and the keys of its live sockets.
    async fn heartbeat(self: Arc<Self>, halt: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut last_renew = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = halt.cancelled() => break,
            }
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(self.nodes_key())
                .arg(now_ms())
                .arg(&self.node)
                .ignore();
            // A deployment that stops leaves nothing behind for long.
            pipe.cmd("PEXPIRE")
                .arg(self.nodes_key())
                .arg(NODES_TTL.as_millis() as u64)
                .ignore();
            self.advertise(&mut pipe, &self.remote.local_groups());
            if last_renew.elapsed() >= LIVE_RENEW {
                last_renew = tokio::time::Instant::now();
                for digest in self.registry.live_digests() {
                    for kind in ["s", "subs"] {
                        pipe.cmd("PEXPIRE")
                            .arg(self.key(kind, &digest))
                            .arg(LIVE_TTL.as_millis() as u64)
                            .ignore();
                    }
                }
            }
            if let Err(err) = pipe.query_async::<()>(&mut conn).await {
                tracing::debug!(%err, "heartbeat failed");
            }
        }
        // Leaving: backdate our heartbeat by a lease, so ids still marked live here (their
        // socket's end may not have reached Redis) can resume elsewhere at once, within grace.
        let mut conn = self.conn.clone();
        let _ = redis::cmd("ZADD")
            .arg(self.nodes_key())
            .arg(now_ms().saturating_sub(LEASE.as_millis() as u64))
            .arg(&self.node)
            .query_async::<i64>(&mut conn)
            .await;
    }
}

fn parse_holder(reply: Vec<String>) -> Holder {
    let mut reply = reply.into_iter();
    match (reply.next().as_deref(), reply.next()) {
        (Some("live"), Some(node)) => Holder::Live(node),
        (Some("offline"), _) => Holder::Offline,
        _ => Holder::Unknown,
    }
}
