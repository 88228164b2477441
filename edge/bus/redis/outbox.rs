//! The outbox: the lifecycle events that must not be lost with a node (`$disconnect`,
//! `$occupied`, `$vacated`). The script that decides one (ends credentials, changes a
//! channel's occupancy) appends it to the outbox stream in the same step
//! ([`scripts::TELL`](super::scripts::TELL)); there is one outbox per partition
//! (`P:{tag}:out`), and the script also publishes on the topic of that name, which wakes every
//! node's relay up. Every node relays the outboxes to the queues of the `Handle` groups
//! advertised for lifecycle events (see [`queue`](super::queue)).
//!
//! A node takes entries with `XREADGROUP` (consumer group `relay`, one consumer per node),
//! queues each to every group, then acknowledges it (the queues live on other slots, so not in
//! one `MULTI`): a relay that completes does so once; one that dies between the two steps is
//! relayed again. An entry a node took but did not relay (it died, or Redis failed it) stays
//! pending and is claimed by a node after [`CLAIM_IDLE`] (`XAUTOCLAIM`): every event reaches
//! every group that was advertised when it was relayed, at least once whatever node dies,
//! exactly once when none does, as long as Redis keeps its data.

use crate::error::Unavailable;
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::RedisBus;
use crate::{
    credentials::Digest,
    error::Error,
    handoff::Delivery,
    handoff::{DISCONNECT, OCCUPIED, VACATED},
};

/// Consumer group of the outbox.
const RELAY_GROUP: &str = "relay";
/// How long an entry taken and not relayed waits before another node claims it.
pub(crate) const CLAIM_IDLE: Duration = Duration::from_secs(5);
/// Entries one read or claim takes.
const RELAY_BATCH: usize = 64;

/// The partitions whose outbox has news (a wake-up message arrived on its topic), for the
/// relay: the pub/sub task marks them, the relay takes them all at once.
#[derive(Debug, Default)]
pub(super) struct Wakeups {
    woken: parking_lot::Mutex<std::collections::HashSet<usize>>,
    wake: tokio::sync::Notify,
}

impl Wakeups {
    /// Partition `p`'s outbox has news.
    fn wake(&self, p: usize) {
        self.woken.lock().insert(p);
        self.wake.notify_one();
    }

    /// Waits for news, then takes every partition that has some.
    async fn woken(&self) -> Vec<usize> {
        self.wake.notified().await;
        self.woken.lock().drain().collect()
    }
}

impl RedisBus {
    /// Relays the outboxes until `halt`: a partition's when its wake-up message arrives, and
    /// every partition's (claims included) each [`CLAIM_IDLE`] / 2, so a wake-up lost with a
    /// connection delays an event, never loses it.
    pub(super) async fn relay_outbox(self: Arc<Self>, halt: CancellationToken) {
        let parts = self.keys.partitions();
        let mut grouped = vec![false; parts];
        let mut sweep = tokio::time::interval(CLAIM_IDLE / 2);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let woken: Vec<usize> = tokio::select! {
                _ = sweep.tick() => (0..parts).collect(),
                woken = self.outbox_wakeups.woken() => woken,
                _ = halt.cancelled() => return,
            };
            if self.ready().is_err() {
                continue;
            }
            let sweeping = woken.len() == parts;
            let missing: Vec<usize> = woken.iter().copied().filter(|p| !grouped[*p]).collect();
            for p in self.create_relay_groups(&missing).await {
                grouped[p] = true;
            }
            if sweeping {
                self.claim_stale_events(&grouped).await;
            }
            let mut batch = self.batch(&[]);
            let reading: Vec<usize> = woken.into_iter().filter(|p| grouped[*p]).collect();
            for &p in &reading {
                let mut read = redis::cmd("XREADGROUP");
                read.arg("GROUP")
                    .arg(RELAY_GROUP)
                    .arg(&self.node)
                    .arg("COUNT")
                    .arg(RELAY_BATCH)
                    .arg("STREAMS")
                    .arg(self.keys.outbox(p))
                    .arg(">");
                batch.cmd(p, read);
            }
            let Ok(answers) = self.within(self.run_batch(batch)).await else {
                continue;
            };
            for (p, answer) in reading.into_iter().zip(answers) {
                let read = answer.and_then(|v| {
                    redis::from_redis_value::<Option<redis::streams::StreamReadReply>>(v)
                        .map_err(|e| Error::from(Unavailable::malformed("an outbox read", e)))
                });
                match read {
                    Ok(reply) => {
                        let entries: Vec<_> = reply
                            .into_iter()
                            .flat_map(|r| r.keys)
                            .flat_map(|k| k.ids)
                            .collect();
                        if entries.len() == RELAY_BATCH {
                            // More waiting: read this partition again at once.
                            self.wake_outbox(p);
                        }
                        self.relay(p, &entries).await;
                    }
                    Err(err) => {
                        if err.to_string().contains("NOGROUP") {
                            grouped[p] = false;
                        }
                        tracing::debug!(%err, "outbox read failed");
                    }
                }
            }
        }
    }

    /// Has partition `p`'s outbox read at once.
    pub(super) fn wake_outbox(&self, p: usize) {
        self.outbox_wakeups.wake(p);
    }

    /// Claims the events another relay took and did not relay (it died) for [`CLAIM_IDLE`].
    async fn claim_stale_events(&self, grouped: &[bool]) {
        let mut batch = self.batch(&[]);
        let parts: Vec<usize> = (0..grouped.len()).filter(|p| grouped[*p]).collect();
        for &p in &parts {
            let mut claim = redis::cmd("XAUTOCLAIM");
            claim
                .arg(self.keys.outbox(p))
                .arg(RELAY_GROUP)
                .arg(&self.node)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(RELAY_BATCH);
            batch.cmd(p, claim);
        }
        let Ok(answers) = self.within(self.run_batch(batch)).await else {
            return;
        };
        for (p, answer) in parts.into_iter().zip(answers) {
            let Some(claimed) = answer.ok().and_then(|v| {
                redis::from_redis_value::<redis::streams::StreamAutoClaimReply>(v).ok()
            }) else {
                continue;
            };
            if !claimed.claimed.is_empty() {
                tracing::info!(
                    events = claimed.claimed.len(),
                    "relaying lifecycle events another relay took and did not relay"
                );
            }
            self.relay(p, &claimed.claimed).await;
        }
    }

    /// Creates the consumer groups of the outboxes of `parts` (from the start of each stream:
    /// an event written before any node read it is relayed too); those that exist now.
    async fn create_relay_groups(&self, parts: &[usize]) -> Vec<usize> {
        if parts.is_empty() {
            return Vec::new();
        }
        let mut batch = self.batch(&[]);
        for &p in parts {
            let mut create = redis::cmd("XGROUP");
            create
                .arg("CREATE")
                .arg(self.keys.outbox(p))
                .arg(RELAY_GROUP)
                .arg("0")
                .arg("MKSTREAM");
            batch.cmd(p, create);
        }
        let Ok(answers) = self.within(self.run_batch(batch)).await else {
            return Vec::new();
        };
        let mut made = Vec::new();
        for (&p, answer) in parts.iter().zip(answers) {
            match answer {
                Ok(_) => made.push(p),
                Err(err) if err.to_string().contains("BUSYGROUP") => made.push(p),
                Err(err) => {
                    tracing::warn!(%err, "could not create an outbox's consumer group");
                }
            }
        }
        made
    }

    /// Queues `entries` of partition `p`'s outbox to every lifecycle group, then acknowledges
    /// them; on a failure they stay pending, for a later claim.
    async fn relay(&self, p: usize, entries: &[redis::streams::StreamId]) {
        if entries.is_empty() {
            return;
        }
        if let Err(err) = self.within(self.relay_now(p, entries)).await {
            tracing::warn!(%err, events = entries.len(), "lifecycle events not relayed yet; they are claimed again");
        }
    }

    async fn relay_now(&self, p: usize, entries: &[redis::streams::StreamId]) -> Result<(), Error> {
        let groups = self.lifecycle_groups().await?;
        // The queues are in their groups' partitions: queued first, acknowledged once queued
        // (a relay that dies between the two relays again: at least once).
        let mut batch = self.batch(&[]);
        for entry in entries {
            match outbox_delivery(entry) {
                Some(delivery) => self.queue_to(&mut batch, &groups, 0, &delivery),
                None => {
                    self.registry.metrics().bus_malformed.inc();
                    tracing::warn!(id = %entry.id, "malformed outbox entry dropped");
                }
            }
        }
        self.run_quiet(batch)
            .await
            .map_err(|e| self.unavailable(&e))?;
        let key = self.keys.outbox(p);
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut conn = self.link();
        redis::pipe()
            .cmd("XACK")
            .arg(&key)
            .arg(RELAY_GROUP)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(&key)
            .arg(&ids)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))
    }
}

/// The delivery an outbox entry carries; `None` when it is malformed.
fn outbox_delivery(entry: &redis::streams::StreamId) -> Option<Delivery> {
    let field = |name: &str| entry.get::<String>(name);
    let action = field("action")?;
    if ![DISCONNECT, OCCUPIED, VACATED].contains(&action.as_str()) {
        return None;
    }
    let digest = match field("digest")?.as_str() {
        "" => None,
        d => Some(d.parse::<Digest>().ok()?),
    };
    let json = field("json")?;
    serde_json::from_str::<serde_json::Value>(&json).ok()?;
    Some(Delivery {
        delivery_id: 0,
        connection_id: field("cid")?.into(),
        digest,
        action: action.into(),
        id: None,
        json: json.into(),
    })
}
