//! `Handle` streams across nodes: advertising this node's groups, the per-group Redis stream
//! queues (`XADD` / `XREADGROUP`), and the hand-off task that offers a client message to groups
//! with no stream on its node. What crosses is [`handoff`](crate::handoff)'s types: this side
//! moves them, the local streams answer them. See the parent module's "Handle streams across
//! nodes".

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    outbox::CLAIM_IDLE, Batch, Command, ForwardEvent, RedisBus, BACKOFF_MIN, HEARTBEAT, NODES_TTL,
};
use crate::{
    clock::now_ms,
    credentials::Digest,
    error::Error,
    handoff::{Arriving, Delivery, Forwarded, LocalGroup, Outbound},
};

/// Pseudo-action under which groups that want lifecycle events are advertised.
const LIFECYCLE: &str = "$lifecycle";
/// Consumer group of every handler queue.
const CONSUMER_GROUP: &str = "handlers";
/// Entries kept per handler queue.
const QUEUE_MAXLEN: usize = 10_000;
/// How long one `XREADGROUP` blocks.
const QUEUE_BLOCK: Duration = Duration::from_millis(1000);

impl RedisBus {
    /// Adds this node's groups to the advertisement sets (valid for three heartbeats).
    pub(super) fn advertise(&self, batch: &mut Batch<'_>, groups: &[LocalGroup]) {
        let until = now_ms() + 3 * HEARTBEAT.as_millis() as u64;
        for group in groups {
            // A queue whose group is gone from every node expires a day later.
            batch
                .ignored(self.keys.part(&group.name))
                .cmd("PEXPIRE")
                .arg(self.keys.queue(&group.name))
                .arg(NODES_TTL.as_millis() as u64)
                .ignore();
            let actions = group.actions.iter().map(|a| &**a);
            let lifecycle = group.lifecycle.then_some(LIFECYCLE);
            for action in actions.chain(lifecycle) {
                let key = self.keys.action(action);
                batch
                    .ignored(self.keys.part(action))
                    .cmd("ZADD")
                    .arg(&key)
                    .arg(until)
                    .arg(&*group.name)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now_ms())
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(NODES_TTL.as_millis() as u64)
                    .ignore();
            }
        }
    }

    /// Groups advertised for `action`, except `exclude`; none when Redis fails.
    async fn groups_for(&self, action: &str, exclude: &[Box<str>]) -> Vec<String> {
        self.advertised(action)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|g| !exclude.iter().any(|e| **e == **g))
            .collect()
    }

    async fn advertised(&self, action: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.link();
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.action(action))
            .arg(now_ms())
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))
    }

    /// The groups advertised for lifecycle events.
    pub(super) async fn lifecycle_groups(&self) -> Result<Vec<String>, Error> {
        self.advertised(LIFECYCLE).await
    }

    fn queue_entry(&self, rid: u64, delivery: &Delivery) -> Vec<(&'static str, String)> {
        vec![
            ("origin", self.node.clone()),
            ("rid", rid.to_string()),
            ("cid", delivery.connection_id.to_string()),
            (
                "digest",
                delivery.digest.map(|d| d.to_string()).unwrap_or_default(),
            ),
            ("action", delivery.action.to_string()),
            (
                "id",
                delivery
                    .id
                    .as_ref()
                    .map(|i| i.get().to_owned())
                    .unwrap_or_default(),
            ),
            ("json", delivery.json.to_string()),
        ]
    }

    async fn enqueue(&self, groups: &[String], rid: u64, delivery: &Delivery) -> bool {
        let mut batch = self.batch(&[]);
        self.queue_to(&mut batch, groups, rid, delivery);
        self.run_quiet(batch).await.is_ok()
    }

    /// Adds to `batch` the queueing of `delivery` to each of `groups`.
    pub(super) fn queue_to(
        &self,
        batch: &mut Batch<'_>,
        groups: &[String],
        rid: u64,
        delivery: &Delivery,
    ) {
        let fields = self.queue_entry(rid, delivery);
        for group in groups {
            batch
                .ignored(self.keys.part(group))
                .cmd("XADD")
                .arg(self.keys.queue(group))
                .arg("MAXLEN")
                .arg("~")
                .arg(QUEUE_MAXLEN)
                .arg("*")
                .arg(&fields)
                .ignore();
        }
    }

    /// Starts a consumer for each group that gained its first stream here, and stops those
    /// whose last stream left.
    pub(super) async fn follow_groups(self: Arc<Self>, halt: CancellationToken) {
        let mut consumers: HashMap<Box<str>, CancellationToken> = HashMap::new();
        let mut watched = self.groups.clone();
        loop {
            let groups = watched.borrow_and_update().clone();
            let names: HashSet<Box<str>> = groups.iter().map(|g| g.name.clone()).collect();
            consumers.retain(|name, stop| {
                let keep = names.contains(name);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            let mut fresh = Vec::new();
            for group in &groups {
                if !consumers.contains_key(&group.name) {
                    let stop = halt.child_token();
                    consumers.insert(group.name.clone(), stop.clone());
                    // The consumer group exists before the group is advertised, so nothing
                    // queued after the advertisement is missed.
                    self.create_queue(&group.name).await;
                    self.tracker
                        .spawn(self.clone().consume(group.name.clone(), stop));
                    fresh.push(group.clone());
                }
            }
            let mut batch = self.batch(&[]);
            self.advertise(&mut batch, &groups);
            let _ = self.run_quiet(batch).await;
            tokio::select! {
                changed = watched.changed() => if changed.is_err() { return },
                _ = halt.cancelled() => return,
            }
        }
    }

    async fn create_queue(&self, group: &str) {
        let mut conn = self.link();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.queue(group))
            .arg(CONSUMER_GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(err) = created {
            if err.code() != Some("BUSYGROUP") {
                tracing::warn!(%err, group, "could not create the handler queue");
            }
        }
    }

    /// Reads `group`'s queue and hands each message to a stream of the group here; also claims
    /// the lifecycle events another node of the group took and did not hand over (it died), so
    /// they still reach a stream.
    async fn consume(self: Arc<Self>, group: Box<str>, stop: CancellationToken) {
        let key = self.keys.queue(&group);
        let mut conn = None;
        let mut last_claim = tokio::time::Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            if last_claim.elapsed() >= CLAIM_IDLE / 2 {
                last_claim = tokio::time::Instant::now();
                self.claim_stale(&group, &key).await;
            }
            let mut c = match conn.take() {
                Some(c) => c,
                None => match self.blocking_connection(QUEUE_BLOCK, &stop).await {
                    Some(c) => c,
                    None => return,
                },
            };
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP")
                .arg(CONSUMER_GROUP)
                .arg(&self.node)
                .arg("COUNT")
                .arg(64)
                .arg("BLOCK")
                .arg(QUEUE_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&key)
                .arg(">");
            let reply = tokio::select! {
                reply = read.query_async::<Option<redis::streams::StreamReadReply>>(&mut c) => reply,
                _ = stop.cancelled() => return,
            };
            match reply {
                Ok(reply) => {
                    conn = Some(c);
                    let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
                    let mut ids = Vec::new();
                    for entry in entries {
                        self.take_forwarded(&group, &entry).await;
                        ids.push(entry.id);
                    }
                    if !ids.is_empty() {
                        let mut conn = self.link();
                        let _ = redis::cmd("XACK")
                            .arg(&key)
                            .arg(CONSUMER_GROUP)
                            .arg(&ids)
                            .query_async::<i64>(&mut conn)
                            .await;
                    }
                }
                Err(err) if err.code() == Some("NOGROUP") => self.create_queue(&group).await,
                Err(err) => {
                    tracing::debug!(%err, %group, "handler queue read failed");
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MIN) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Takes the entries of `group`'s queue that a consumer took more than [`CLAIM_IDLE`] ago
    /// and did not acknowledge: lifecycle events go to a stream here; client messages are only
    /// acknowledged (their socket's node gave up on them; handling one twice is worse).
    async fn claim_stale(self: &Arc<Self>, group: &str, key: &str) {
        let mut conn = self.link();
        let claimed: redis::RedisResult<redis::streams::StreamAutoClaimReply> =
            redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(CONSUMER_GROUP)
                .arg(&self.node)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(64)
                .query_async(&mut conn)
                .await;
        let Ok(claimed) = claimed else { return };
        let mut ids = Vec::new();
        for entry in &claimed.claimed {
            if entry
                .get::<String>("action")
                .is_some_and(|a| a.starts_with('$'))
            {
                self.take_forwarded(group, entry).await;
            }
            ids.push(entry.id.clone());
        }
        if !ids.is_empty() {
            tracing::info!(
                group,
                entries = ids.len(),
                "claimed handler queue entries another node took and did not hand over"
            );
            let _ = redis::cmd("XACK")
                .arg(key)
                .arg(CONSUMER_GROUP)
                .arg(&ids)
                .query_async::<i64>(&mut conn)
                .await;
        }
    }

    /// Hands one queued message to the streams here; a reply (or the news that no stream
    /// here took it) goes back to the node that queued it.
    async fn take_forwarded(self: &Arc<Self>, group: &str, entry: &redis::streams::StreamId) {
        let field = |name: &str| entry.get::<String>(name);
        // A digest, or none for a channel's occupancy event.
        let (Some(origin), Some(rid), Some(digest)) = (
            field("origin"),
            field("rid").and_then(|r| r.parse::<u64>().ok()),
            field("digest").and_then(|d| {
                if d.is_empty() {
                    Some(None)
                } else {
                    d.parse::<Digest>().ok().map(Some)
                }
            }),
        ) else {
            self.registry.metrics().bus_malformed.inc();
            tracing::warn!(group, "malformed handler queue entry dropped");
            return;
        };
        let id = field("id")
            .filter(|i| !i.is_empty())
            .and_then(|i| serde_json::value::RawValue::from_string(i).ok());
        let delivery = Delivery {
            delivery_id: 0,
            connection_id: field("cid").unwrap_or_default().into(),
            digest,
            action: field("action").unwrap_or_default().into(),
            id,
            json: field("json").unwrap_or_default().into(),
        };
        let lifecycle = delivery.is_lifecycle();
        let (reply, answer) = oneshot::channel();
        let inbound = Arriving {
            group: group.into(),
            delivery,
            reply,
        };
        // Waits while the streams here are behind: the queue in Redis holds the rest.
        if self.inbound.send(inbound).await.is_err() || lifecycle {
            return;
        }
        let timeout = self.handler_timeout;
        self.tracker.spawn({
            let bus = self.clone();
            async move {
                // The origin gives up after the same time; after it, a reply is useless.
                let reply = tokio::time::timeout(timeout, answer)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                let command = match reply {
                    Some(r) => Command::Reply {
                        rid,
                        status: r.status,
                        headers: r.headers,
                        body: r.body.map(|b| b.as_str().to_owned()),
                    },
                    None => Command::Unhandled { rid },
                };
                let _ = bus.command(&origin, &command).await;
            }
        });
    }

    /// Takes the local side's requests: each message for other nodes, and each lifecycle
    /// event, is handled on a task of its own.
    pub(super) async fn hand_off(
        self: Arc<Self>,
        mut requests: mpsc::Receiver<Outbound>,
        halt: CancellationToken,
    ) {
        loop {
            let request = tokio::select! {
                request = requests.recv() => request,
                _ = halt.cancelled() => return,
            };
            let Some(request) = request else { return };
            let bus = self.clone();
            match request {
                Outbound::Forward {
                    delivery,
                    exclude,
                    outcome,
                } => {
                    self.tracker.spawn(async move {
                        let forwarded = bus.forward(delivery, exclude).await;
                        let _ = outcome.send(forwarded);
                    });
                }
                Outbound::Event { delivery, exclude } => {
                    self.tracker.spawn(async move {
                        let groups = bus.groups_for(LIFECYCLE, &exclude).await;
                        if !groups.is_empty() {
                            bus.enqueue(&groups, 0, &delivery).await;
                        }
                    });
                }
            }
        }
    }

    /// Offers `delivery` to every group elsewhere that handles its action, except `exclude`;
    /// resolves with the first reply.
    async fn forward(self: &Arc<Self>, delivery: Delivery, exclude: Vec<Box<str>>) -> Forwarded {
        let groups = self.groups_for(&delivery.action, &exclude).await;
        if groups.is_empty() {
            return Forwarded::NoGroups;
        }
        let (rid, mut rx) = self.requests.expect_forward(groups.len());
        let _guard = ForwardGuard {
            bus: self.clone(),
            rid,
        };
        if !self.enqueue(&groups, rid, &delivery).await {
            return Forwarded::Failed;
        }
        let mut outstanding = groups.len();
        while let Some(event) = rx.recv().await {
            match event {
                ForwardEvent::Reply(reply) => return Forwarded::Reply(reply),
                ForwardEvent::Unhandled => {
                    outstanding -= 1;
                    if outstanding == 0 {
                        break;
                    }
                }
            }
        }
        Forwarded::Failed
    }
}

/// Removes a forwarded message's waiter when its future ends, however it ends.
struct ForwardGuard {
    bus: Arc<RedisBus>,
    rid: u64,
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.bus.requests.forget_forward(self.rid);
    }
}
