//! Cluster mode: the bus over one Redis deployment, one server or a Redis Cluster.
//!
//! # What Redis holds (all keys under the configured prefix `P`)
//! Every key is `P:{t}:...`, where `{t}` is the Redis Cluster hash tag of a partition
//! ([`keys`]): the partition of the name the key is about (a digest `d`, a channel `C`, a user,
//! a group); per-partition indexes (`ends`, `nl`, `out`, `vacating`, `nodes`) exist once per
//! partition, and a script touches only the keys of one. One server has one partition.
//!
//! | key | type | what | lifetime |
//! | --- | --- | --- | --- |
//! | `P:{t(d)}:s:d` | hash `state, exp, until, node` | the credentials' state: `issued`, `live` (on `node`), `grace` (until `until`), `dead` | until the id expires (longer while live or in grace) |
//! | `P:{t(d)}:subs:d` | set | the digest's channels | as `P:{t}:s:d`; deleted when dead |
//! | `P:{t(u)}:u:<user>` | set | the digests issued for `<user>` (`s` holds `user` and `info` too) | the newest credentials' deadline plus [`LIVE_TTL`]; renewed with live sockets |
//! | `P:{t}:nodes` | sorted set | node id → last heartbeat (ms); every node writes every partition's copy | heartbeats every second; a dead node's entry is removed once its sockets are ended |
//! | `P:{t}:nl:{node}` | set | the partition's digests live on `node` | renewed with them |
//! | `P:{t}:ends` | sorted set | the partition's digests in their grace → when it ends (ms) | until resumed or ended |
//! | `P:{t(C)}:ch:C:m` | hash `e, o` | channel `C`'s epoch and last offset | `position-ttl` after its last push |
//! | `P:{t(C)}:ch:C:l` | stream, ids `0-<offset>`, fields `t` (ms), `p` (payload) | `C`'s last pushes, capped at `history-size` (`MAXLEN ~`) | `history-ttl` after its last push |
//! | `P:{t(C)}:ch:C:pr` / `:pu` / `:pn` | hashes | channels that keep presence: digest → `{cid,user,info,since}`, user → connections, digest → its socket's node | until the last member leaves |
//! | `P:{t}:out` | stream, fields `cid, digest, action, json` | lifecycle events the partition's scripts decided, until a node relayed them to the groups' queues (consumer group `relay`) | deleted once relayed; capped at `MAXLEN ~ 100000` |
//! | `P:{t0}:presence-gone` | sorted set | nodes whose connections left presence for silence → when | until the node heartbeats again or is reaped |
//! | `P:{t}:vacating` | sorted set | the partition's channels with occupancy whose last member left → when `vacated` is due (ms) | until told, or a member is back |
//! | `P:{t(C)}:ch:C:i:<key>` | string `epoch offset` | the position a push with idempotency key `<key>` got | `idempotency-window` |
//!
//! Pub/sub channels (sharded on a cluster: `SPUBLISH`/`SSUBSCRIBE`, so a push reaches only
//! its channel's shard and the nodes subscribed there): `P:{t(C)}:ch:C` carries pushes to `C`,
//! and its presence changes (messages starting with `!`), and a node subscribes only to
//! channels its sockets or listeners use; `P:{t(n)}:node:n` carries commands for node `n`'s
//! sockets; `P:{t}:out` wakes the outbox relays up. A cluster's topology is followed by
//! [`topology`].

//! # A push
//! One script per push per channel ([`scripts::PUSH`]) gives the push the channel's next offset,
//! appends it to the channel's log, records its idempotency key, and `PUBLISH`es
//! `{epoch} {offset}\n{payload}`, all atomically, so one channel has one order whichever node
//! accepted the push. A node's pushes go through one publisher task, pipelined, so they keep
//! the order they were made in. The accepting node delivers to its own sockets when the script
//! answers; every node (the accepting one too) takes pushes from pub/sub, and the registry
//! delivers each offset once, in order, holding early ones. Cost: one script per push per
//! channel, and the publish it makes.
//!
//! # Catching up
//! A node's copy of a channel can fall behind Redis: it just subscribed, its pub/sub connection
//! dropped, or the stream skipped an offset. The registry marks such channels; a task of the bus
//! reads each one's position and the pushes after the node's last offset ([`scripts::READ`]) and
//! hands them back: missed pushes are delivered in order; what Redis no longer holds, or a new
//! epoch (Redis lost its data), becomes a gap frame (`recovered:false`) to the channel's sockets.
//!
//! # Liveness
//! A `live` mark counts only while its node's heartbeat is fresh (within [`LEASE`]). When a node
//! dies, its sockets may resume elsewhere within the reconnect grace, counted from its last
//! heartbeat. State changes are Lua scripts, so two nodes never both accept one id; an id with
//! no state at all (issued before Redis lost its data) is refused.
//!
//! # Final ends
//! Every node runs a reaper ([`reaper`]) each second: credentials whose grace ran out without a
//! resume (`P:{t}:ends`), and those still live on a node whose heartbeat is older than its
//! lease plus the grace (`P:{t}:nl:{node}`), are ended by a script that only one node's call can win, and
//! that node tells the final `$disconnect` (`grace expired`, `node lost`).
//!
//! # Handle streams across nodes
//! Each node advertises the groups of its `Handle` streams in `P:{t}:act:{action}` (sorted set of
//! group → expiry; lifecycle groups under `$lifecycle`), renewed by the heartbeat. A client
//! message that no group on its node handles is added (`XADD`) to the Redis stream
//! `P:{t}:q:{group}` of every other group that handles it; nodes with streams of that group read it
//! with `XREADGROUP` (consumer group `handlers`, one consumer per node), hand it to a local
//! stream, acknowledge it, and publish the reply to the origin node's topic. Delivery is at most
//! once: a message whose node or stream dies before replying is answered 503 or 504, never
//! redelivered (the client would have given up). Each queue is capped (`MAXLEN ~ 10000`).
//! Lifecycle events are the exception: `$disconnect`, `$occupied` and `$vacated` come from the
//! [`outbox`] that the deciding scripts write, and one a node took from a queue and did not
//! hand over is claimed by another node of the group after [`outbox::CLAIM_IDLE`]: at least
//! once.
//!
//! # Rooms
//! `RedisBus` composes them, and its `impl Bus` delegates: [`keys`] (every name), [`link`]
//! (connections, pipelines), [`scripts`] (the Lua; their guarantees unit-tested against a real Redis),
//! [`sessions`] (credentials by digest, `HOLDER`, `ATTACH`, `DETACH`, node commands), [`relay`]
//! (the publisher and the heartbeat), [`pubsub`], [`reads`] (positions, catch-up, history
//! pages), [`presence`], [`reaper`], [`topology`] (`Failover`), [`queue`] and [`outbox`]
//! (`Handle` hand-off and lifecycle events), [`requests`] (what this node asked of others).
//!
//! # Faults
//! While Redis is unreachable, calls that need it fail with `UNAVAILABLE` (pushes included:
//! an offset comes from Redis, and a push no other node could see would be a silent loss);
//! `/readyz` reports the reason; new handshakes get 503; sockets stay connected. The node
//! reconnects with back-off, re-subscribes its channels and catches each one up.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{AttachError, Bus, HistoryQuery, Page, PushTicket};
use crate::{
    clock::now_ms,
    config::Limits,
    credentials::{Credentials, Digest, Verified},
    domain::User,
    domain::{Channel, Json, Position},
    error::{Close, Error},
    error::{StartError, Unavailable},
    handoff::{Arriving, ClusterEnd, LocalGroup},
    protocol::{Frame, Recover},
    readiness::{Cause, Readiness},
    registry::{AttachRefusal, Conn, EndReason, Ended, Ending, Listener, Present, Registry, Wants},
};

mod keys;
mod link;
mod outbox;
mod presence;
mod pubsub;
mod queue;
mod reads;
mod reaper;
mod relay;
mod requests;
mod scripts;
mod sessions;
mod topology;

use keys::Keys;
use link::{Answers, Batch, Endpoint, Link, Sink};
use outbox::Wakeups;
use relay::PushJob;
use requests::{ForwardEvent, Requests};
use topology::Failover;
#[cfg(any(test, fuzzing))]
pub(crate) use {
    presence::check_relayed_presence,
    pubsub::{check_node_command, check_relayed_push},
    reads::check_redis_read,
};

use scripts::Scripts;

/// How often a node renews its heartbeat.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose heartbeat is older than this is dead, and its sockets' ids may resume elsewhere.
pub(crate) const LEASE: Duration = Duration::from_secs(3);
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
/// Push scripts per pipeline.
const PUSH_BATCH: usize = 256;
/// Pushes waiting for the publisher task; a publisher beyond it waits its turn.
const PUSH_QUEUE: usize = 16_384;

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

/// The bus over Redis.
#[derive(Debug)]
pub(crate) struct RedisBus {
    registry: Registry,
    node: String,
    /// Key and topic names, and their partitions.
    keys: Keys,
    /// One server or a cluster.
    endpoint: Endpoint,
    /// Commands and scripts; reconnects by itself (on a cluster, routes each to its shard;
    /// replaced when the cluster's topology changes, see [`topology`]).
    conn: Mutex<Link>,
    /// The pub/sub connection's sending half and the Redis channels it is subscribed to.
    /// Async lock: (un)subscribing awaits Redis's confirmation, and the order of subscribe and
    /// unsubscribe for one channel must be the order they were decided in.
    pubsub: tokio::sync::Mutex<PubSub>,
    /// The node's readiness: the bus sets and clears its causes (connecting, stalled,
    /// broken) and fails calls fast while any is set.
    readiness: Arc<Readiness>,
    /// What this node asked of other nodes and waits to hear back about.
    requests: Requests,
    grace: Duration,
    scripts: Scripts,
    /// How long a stream here may take to answer a message another node forwarded.
    handler_timeout: Duration,
    /// The `Handle` groups with streams on this node (published by the local side).
    groups: watch::Receiver<Vec<LocalGroup>>,
    /// Messages forwarded by other nodes, for the streams here.
    inbound: mpsc::Sender<Arriving>,
    /// Every task the bus spawns; the node's drain waits for them.
    tracker: TaskTracker,
    /// This bus, for tasks spawned from `&self` (a weak pointer: no cycle).
    me: std::sync::Weak<RedisBus>,
    /// Pushes for the publisher task, which runs their scripts in order; closed when the
    /// publisher stops (the node halts).
    pushes: mpsc::Sender<PushJob>,
    /// The node's limits (history policies, windows).
    limits: Limits,
    /// Partitions whose outbox has news (a wake-up message arrived), for the relay.
    outbox_wakeups: Wakeups,
    /// What following a cluster's topology keeps: the masters' connections, the channels due
    /// for a new epoch, the subscriptions awaiting their confirmation (see [`topology`]).
    failover: Failover,
}

#[derive(Debug, Default)]
struct PubSub {
    sink: Option<Sink>,
    subscribed: HashSet<Channel>,
}

impl RedisBus {
    /// Connects lazily to `url`, and starts the tasks that keep this node in the cluster
    /// (they stop when `halt` is cancelled). The node reports itself not ready until Redis
    /// answers.
    #[allow(clippy::too_many_arguments)] // one call site, in `Node::start`
    pub(crate) fn start(
        url: &str,
        prefix: &str,
        registry: Registry,
        link: ClusterEnd,
        limits: &Limits,
        readiness: Arc<Readiness>,
        halt: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, StartError> {
        let redis_error = |err: redis::RedisError| StartError::Redis {
            url: url.to_owned(),
            source: Arc::new(err),
        };
        let endpoint = Endpoint::open(url).map_err(redis_error)?;
        let cluster = endpoint.is_cluster();
        let conn = endpoint
            .commands(COMMAND_TIMEOUT, BACKOFF_MAX)
            .map_err(redis_error)?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let (pushes, jobs) = mpsc::channel(PUSH_QUEUE);
        // Not ready until the pub/sub supervisor has connected.
        readiness.set(Cause::Connecting, Unavailable::Connecting);
        let bus = Arc::new_cyclic(|me| Self {
            pushes,
            limits: limits.clone(),
            me: me.clone(),
            registry,
            node: hex::encode(id),
            keys: Keys::new(prefix, cluster),
            endpoint,
            conn: Mutex::new(conn),
            pubsub: tokio::sync::Mutex::new(PubSub::default()),
            readiness,
            requests: Requests::default(),
            grace: limits.reconnect_grace,
            scripts: Scripts::new(cluster),
            handler_timeout: limits.handler_timeout,
            groups: link.groups,
            inbound: link.inbound,
            tracker: tracker.clone(),
            outbox_wakeups: Wakeups::default(),
            failover: Failover::default(),
        });
        tracing::info!(node = %bus.node, prefix, redis_cluster = cluster, "cluster mode on Redis");
        bus.spawn_task("pub/sub", bus.clone().supervise(halt.clone()), &halt);
        bus.spawn_task("publisher", bus.clone().publish(jobs, halt.clone()), &halt);
        bus.spawn_task("catch-up", bus.clone().catch_up(halt.clone()), &halt);
        bus.spawn_task("interest", bus.clone().reconcile(halt.clone()), &halt);
        bus.spawn_task(
            "handle groups",
            bus.clone().follow_groups(halt.clone()),
            &halt,
        );
        bus.spawn_task(
            "handle hand-off",
            bus.clone().hand_off(link.outbound, halt.clone()),
            &halt,
        );
        bus.spawn_task("heartbeat", bus.clone().heartbeat(halt.clone()), &halt);
        bus.spawn_task("reaper", bus.clone().reap(halt.clone()), &halt);
        bus.spawn_task("outbox", bus.clone().relay_outbox(halt.clone()), &halt);
        bus.spawn_task("topology", bus.clone().watch_topology(halt.clone()), &halt);
        Ok(bus)
    }

    /// Runs one of the bus's long-lived tasks. Should it end before the node halts (a panic,
    /// a bug), the node is marked not ready for good: it can no longer keep its part of the
    /// cluster, and an orchestrator should replace it.
    fn spawn_task<F>(self: &Arc<Self>, name: &'static str, task: F, halt: &CancellationToken)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = self.tracker.spawn(task);
        let (bus, halt) = (Arc::downgrade(self), halt.clone());
        self.tracker.spawn(async move {
            let result = handle.await;
            if halt.is_cancelled() {
                return;
            }
            let why = Unavailable::Broken {
                task: name,
                source: result
                    .err()
                    .map(|err| Arc::new(err) as crate::error::Source),
            };
            tracing::error!(reason = %why, "the node can no longer take part in the cluster");
            if let Some(bus) = bus.upgrade() {
                bus.readiness.set(Cause::Broken, why);
            }
        });
    }

    /// Spawns a short task of the bus (a socket's end, a reply to another node), tracked like
    /// every other; it holds the bus until it ends.
    fn spawn_short<F, Fut>(&self, task: F)
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(bus) = self.me.upgrade() {
            self.tracker.spawn(task(bus));
        }
    }

    /// The command connection (a handle: cloning it is cheap).
    fn link(&self) -> Link {
        self.conn.lock().clone()
    }

    /// The partition of a digest's keys (and of the indexes its scripts write with them).
    fn digest_part(&self, digest: &Digest) -> usize {
        self.keys.part(&digest.to_string())
    }

    /// `PUBLISH` on one server; `SPUBLISH` on a cluster (to the topic's shard only).
    fn publish_command(&self) -> &'static str {
        if self.endpoint.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A batch over this deployment's partitions whose script runs are of `loads` (loaded
    /// when a Redis answers `NOSCRIPT`).
    fn batch<'a>(&self, loads: &[&'a redis::Script]) -> Batch<'a> {
        Batch::new(self.keys.partitions(), loads)
    }

    /// Runs a batch of answered commands: one answer per command; the outer error when no
    /// partition's Redis could be reached.
    async fn run_batch(&self, batch: Batch<'_>) -> Result<Vec<Result<redis::Value, Error>>, Error> {
        let Answers { values, failed } = self.send(batch).await;
        if let Some(err) = &failed {
            if values.iter().all(Result::is_err) {
                return Err(self.unavailable(err));
            }
        }
        Ok(values
            .into_iter()
            .map(|v| v.map_err(|e| self.unavailable(&e)))
            .collect())
    }

    /// Runs a batch of commands whose answers are ignored; the first failure.
    async fn run_quiet(&self, batch: Batch<'_>) -> Result<(), redis::RedisError> {
        self.send(batch).await.failed.map_or(Ok(()), Err)
    }

    /// Sends `batch` on the current connections (per master, when the cluster's are known).
    async fn send(&self, batch: Batch<'_>) -> Answers {
        let shards = self.failover.shards();
        batch.run(&self.link(), shards.as_deref()).await
    }

    /// `Ok` when the node can use Redis now; else `UNAVAILABLE` at once (calls fail fast while
    /// Redis is down or stalls, instead of each waiting out its deadline).
    fn ready(&self) -> Result<(), Error> {
        self.readiness.check_redis().map_err(Error::Unavailable)
    }

    /// Runs `call` (Redis commands) within [`COMMAND_TIMEOUT`] in all; past it, the node counts
    /// Redis as stalled and the call fails with `UNAVAILABLE`.
    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(self.stall()),
        }
    }

    /// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`) of up to `block`,
    /// retried with back-off until it connects; `None` once `stop` is cancelled. Its response
    /// deadline outlasts the block: with the client's default (shorter than the block), every
    /// read timed out while Redis went on delivering to it, so an entry that arrived during a
    /// read was taken and never seen.
    async fn blocking_connection(&self, block: Duration, stop: &CancellationToken) -> Option<Link> {
        loop {
            let connecting = self
                .endpoint
                .blocking(COMMAND_TIMEOUT, block + COMMAND_TIMEOUT);
            if let Ok(Ok(c)) = tokio::time::timeout(COMMAND_TIMEOUT * 2, connecting).await {
                return Some(c);
            }
            tokio::select! {
                _ = tokio::time::sleep(BACKOFF_MAX) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// Records that Redis did not answer in time; the error for the caller.
    fn stall(&self) -> Error {
        let reason = Unavailable::Stalled(COMMAND_TIMEOUT);
        tracing::warn!(%reason, "Redis stalls");
        self.readiness.set(Cause::Stalled, reason.clone());
        reason.into()
    }

    fn unavailable(&self, err: &redis::RedisError) -> Error {
        if err.is_timeout() {
            return self.stall();
        }
        tracing::warn!(%err, "cluster call failed");
        Unavailable::redis(err.clone()).into()
    }
}

#[async_trait::async_trait]
impl Bus for RedisBus {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    async fn save_anchor(
        &self,
        digest: &Digest,
        number: u64,
        positions: &str,
    ) -> Result<(), Error> {
        Self::save_anchor(self, digest, number, positions).await
    }

    async fn load_anchor(&self, digest: &Digest, number: u64) -> Result<Option<String>, Error> {
        Self::load_anchor(self, digest, number).await
    }

    async fn is_live(&self, digest: &Digest) -> Result<bool, Error> {
        Self::is_live(self, digest).await
    }

    /// Mints credentials and records them as issued (for `user`, in the user's set too).
    async fn issue(
        &self,
        ttl: Option<Duration>,
        user: Option<&User>,
    ) -> Result<Credentials, Error> {
        Self::issue(self, ttl, user).await
    }

    async fn user_digests(&self, user: &str) -> Result<Vec<Digest>, Error> {
        Self::user_digests(self, user).await
    }

    async fn forget_user_digest(&self, user: &str, digest: &Digest) {
        Self::forget_user_digest(self, user, digest).await
    }

    /// Adds (or removes) `digest`'s subscriptions in Redis, and on the node holding its socket
    /// before returning. Returns whether a socket is live.
    async fn subscribe(
        &self,
        digest: &Digest,
        channels: &[Channel],
        add: bool,
    ) -> Result<bool, Error> {
        Self::subscribe(self, digest, channels, add).await
    }

    /// Sends to `digest`'s socket wherever it is. Returns whether one was live.
    async fn send(&self, digest: &Digest, frame: Frame) -> Result<bool, Error> {
        self.send_to(digest, frame).await
    }

    /// Ends `digest`'s credentials everywhere and closes its socket wherever it is.
    async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        Self::disconnect(self, digest, close).await
    }

    /// Accepts a handshake's credentials cluster-wide and binds the socket here with the
    /// digest's subscriptions: this node subscribes to them in Redis and brings them up to date
    /// (reading what recovery needs beyond its own history) before the socket joins them.
    async fn attach(
        &self,
        verified: &Verified,
        connection_id: &str,
        recover: Option<&Recover>,
    ) -> Result<Arc<Conn>, AttachError> {
        Self::attach(self, verified, connection_id, recover).await
    }

    /// Hands each channel's push to the publisher (which runs their scripts in order, see
    /// `relay`); the ticket resolves with their positions.
    async fn submit(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Result<PushTicket, Error> {
        Self::submit(self, channels, json, key).await
    }

    async fn presence(&self, channel: &Channel) -> Result<Vec<Present>, Error> {
        self.ready()?;
        self.read_presence(channel).await
    }

    async fn presence_stats(&self, channel: &Channel) -> Result<(u64, u64), Error> {
        self.ready()?;
        self.read_presence_stats(channel).await
    }

    async fn history(&self, channel: &Channel, query: &HistoryQuery) -> Result<Page, Error> {
        self.ready()?;
        self.read_history(channel, query).await
    }

    async fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        wants: Wants,
    ) -> Result<Listener, Error> {
        self.ready()?;
        // Subscribed and up to date before the listener joins, so it misses nothing.
        let fetched = self.follow(channels, Some(since)).await?;
        self.registry.listen(channels, since, &fetched, wants)
    }

    /// Records a socket's end in Redis (in the background: the socket is already gone here).
    fn detach(&self, conn: &Conn, ending: Ending, ended: Option<&Ended>) {
        Self::detach(self, conn, ending, ended)
    }
}
