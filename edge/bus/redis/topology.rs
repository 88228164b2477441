//! Following a Redis Cluster's topology. The client library follows `MOVED` and `ASK`, but
//! after a master dies it keeps reconnecting to the dead address: it learns of the replica's
//! promotion only from a redirection. So every node reads the slot map (`CLUSTER SLOTS`, from
//! any node it knows that answers, each [`TOPOLOGY_EVERY`]), records the cluster's members as
//! the nodes its next connections start from (not only the seeds it was given, which may all
//! be gone), and, when a slot range changed master,
//! replaces its command connection, connects its pub/sub again (every channel re-subscribed
//! on its current master and caught up), and rebases the channels of the changed slots: a
//! promoted replica may lack the last pushes its master published, whose offsets it would
//! give again, so those channels start a new epoch and their sockets hear `recovered:false`
//! instead of missing pushes silently. Bound: a failover is followed within the cluster's
//! own detection (its `cluster-node-timeout`) plus [`TOPOLOGY_EVERY`].

use std::{collections::HashSet, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::sync::Notify;

use tokio_util::sync::CancellationToken;

use super::{keys::key_slot, link::Shards, RedisBus, BACKOFF_MAX, COMMAND_TIMEOUT};
use crate::domain::Channel;

/// How often a node reads the slot map.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);
/// How long reading it from one node may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Slot ranges and their master (`host:port`), sorted.
type SlotMap = Vec<(u16, u16, String)>;

/// The state of following a cluster's topology, in one place: the connections straight to
/// each master, the channels due for a new epoch, the subscriptions this node asked for whose
/// confirmation has not come, and the signal that tells the pub/sub task to connect again.
/// The topology watcher, the pub/sub task and the catch-up reads share it through its methods.
#[derive(Debug, Default)]
pub(super) struct Failover {
    /// A connection to each master and the master of each partition, for pipelines per
    /// master; `None` until the slot map was read (pipelines then go per partition).
    shards: Mutex<Option<Arc<Shards>>>,
    /// Channels to rebase before their next catch-up.
    rebase: Mutex<HashSet<Channel>>,
    /// Topics this node asked to subscribe to and whose confirmation has not come; a
    /// confirmation of another is the client's re-subscription after a shard's connection
    /// dropped (a failover, maybe), and its channel is rebased.
    confirming: Mutex<HashSet<String>>,
    /// Tells the pub/sub task to connect again (the topology changed).
    reset: Notify,
}

impl Failover {
    /// The masters' connections, when known.
    pub(super) fn shards(&self) -> Option<Arc<Shards>> {
        self.shards.lock().clone()
    }

    fn set_shards(&self, shards: Option<Arc<Shards>>) {
        *self.shards.lock() = shards;
    }

    /// `channels` start a new epoch before their next catch-up.
    pub(super) fn rebase_later(&self, channels: impl IntoIterator<Item = Channel>) {
        self.rebase.lock().extend(channels);
    }

    /// Those of `channels` due for a new epoch, no longer due (the caller rebases them, or
    /// gives them back with [`Failover::rebase_later`]).
    pub(super) fn take_due<'c>(&self, channels: &'c [Channel]) -> Vec<&'c Channel> {
        let mut rebase = self.rebase.lock();
        channels.iter().filter(|c| rebase.remove(*c)).collect()
    }

    /// This node is about to subscribe to `topics`: their confirmations are its own.
    pub(super) fn expect(&self, topics: &[String]) {
        self.confirming.lock().extend(topics.iter().cloned());
    }

    /// The subscription to `topics` failed: no confirmation comes.
    pub(super) fn forget(&self, topics: &[String]) {
        let mut confirming = self.confirming.lock();
        for topic in topics {
            confirming.remove(topic);
        }
    }

    /// A confirmation of `topic` came: whether this node asked for it (else the client
    /// re-subscribed by itself).
    pub(super) fn confirmed(&self, topic: &str) -> bool {
        self.confirming.lock().remove(topic)
    }

    /// Resolves when the pub/sub task must connect again.
    pub(super) async fn reset_requested(&self) {
        self.reset.notified().await
    }
}

impl RedisBus {
    /// Reads the slot map until `halt` and follows its changes (a no-op on one server).
    pub(super) async fn watch_topology(self: Arc<Self>, halt: CancellationToken) {
        if !self.endpoint.is_cluster() {
            halt.cancelled().await;
            return;
        }
        let mut last: Option<SlotMap> = None;
        // The connection the slot map is read on, kept between readings (one connection, not
        // one a second); replaced when it fails.
        let mut probe = None;
        let mut tick = tokio::time::interval(TOPOLOGY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = halt.cancelled() => return,
            }
            let Some((map, nodes)) = self.read_slots(&mut probe).await else {
                continue;
            };
            self.endpoint.learn(nodes);
            let changed = last.as_ref() != Some(&map);
            if let Some(old) = last.as_ref().filter(|old| **old != map) {
                self.follow_topology(old, &map);
            }
            if changed || self.failover.shards().is_none() {
                let shards = self.connect_shards(&map).await.map(Arc::new);
                self.failover.set_shards(shards);
            }
            last = Some(map);
        }
    }

    /// A connection to each master of `map`, and each partition's master; `None` when one
    /// cannot be reached (pipelines then go per partition, through the cluster client).
    async fn connect_shards(&self, map: &SlotMap) -> Option<Shards> {
        let mut masters: Vec<&str> = map.iter().map(|(_, _, m)| m.as_str()).collect();
        masters.sort_unstable();
        masters.dedup();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut conns = Vec::with_capacity(masters.len());
        for master in &masters {
            let client = redis::Client::open(self.endpoint.node_url(master)).ok()?;
            let conn = tokio::time::timeout(
                COMMAND_TIMEOUT,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .ok()?
            .ok()?;
            conns.push(conn);
        }
        let owner = (0..self.keys.partitions())
            .map(|p| {
                let slot = self.keys.slot(p);
                let (_, _, master) = map.iter().find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))?;
                masters.iter().position(|m| *m == master)
            })
            .collect();
        Some(Shards { conns, owner })
    }

    /// The slot map and every node's address (masters first): on `probe`, or else from the
    /// first node of [`Endpoint::nodes`](super::link::Endpoint::nodes) that answers (which
    /// becomes the probe).
    async fn read_slots(
        &self,
        probe: &mut Option<redis::aio::MultiplexedConnection>,
    ) -> Option<(SlotMap, Vec<String>)> {
        let read = |mut conn: redis::aio::MultiplexedConnection| async move {
            let reply = tokio::time::timeout(
                PROBE_TIMEOUT,
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<redis::Value>(&mut conn),
            )
            .await
            .ok()?
            .ok()?;
            Some((parse_slots(reply)?, conn))
        };
        if let Some(conn) = probe.take() {
            if let Some((parsed, conn)) = read(conn).await {
                *probe = Some(conn);
                return Some(parsed);
            }
        }
        for addr in self.endpoint.nodes() {
            let Ok(client) = redis::Client::open(self.endpoint.node_url(&addr)) else {
                continue;
            };
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(PROBE_TIMEOUT))
                .set_response_timeout(Some(PROBE_TIMEOUT));
            let Ok(conn) = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            else {
                continue;
            };
            if let Some((parsed, conn)) = read(conn).await {
                *probe = Some(conn);
                return Some(parsed);
            }
        }
        None
    }

    /// The slot map changed from `old` to `new`: new connections, and the channels of slots
    /// whose master changed are rebased.
    fn follow_topology(&self, old: &SlotMap, new: &SlotMap) {
        let master = |map: &SlotMap, slot: u16| {
            map.iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
                .map(|(_, _, m)| m.clone())
        };
        let moved: Vec<_> = self
            .registry
            .interest()
            .into_iter()
            .filter(|c| {
                let slot = key_slot(&self.keys.channel_topic(c));
                master(old, slot) != master(new, slot)
            })
            .collect();
        tracing::warn!(
            channels = moved.len(),
            "the Redis Cluster's slot map changed (a failover, or slots moved); reconnecting"
        );
        self.failover.set_shards(None);
        match self.endpoint.commands(COMMAND_TIMEOUT, BACKOFF_MAX) {
            Ok(link) => *self.conn.lock() = link,
            Err(err) => tracing::warn!(%err, "could not replace the command connection"),
        }
        self.failover.rebase_later(moved.iter().cloned());
        self.registry.resync(&moved);
        self.failover.reset.notify_one();
    }
}

/// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id], replicas...], ...]`.
fn parse_slots(reply: redis::Value) -> Option<(SlotMap, Vec<String>)> {
    let ranges: Vec<Vec<redis::Value>> = redis::from_redis_value(reply).ok()?;
    let mut map = SlotMap::new();
    let (mut masters, mut replicas) = (Vec::new(), Vec::new());
    for range in ranges {
        let mut fields = range.into_iter();
        let lo: u16 = redis::from_redis_value(fields.next()?).ok()?;
        let hi: u16 = redis::from_redis_value(fields.next()?).ok()?;
        let mut addrs = fields.filter_map(|node| {
            let node: Vec<redis::Value> = redis::from_redis_value(node).ok()?;
            let mut node = node.into_iter();
            let host: String = redis::from_redis_value(node.next()?).ok()?;
            let port: u16 = redis::from_redis_value(node.next()?).ok()?;
            Some(format!("{host}:{port}"))
        });
        let master = addrs.next()?;
        masters.push(master.clone());
        replicas.extend(addrs);
        map.push((lo, hi, master));
    }
    map.sort();
    masters.extend(replicas);
    Some((map, masters))
}
