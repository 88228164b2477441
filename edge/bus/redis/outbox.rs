//! The outbox: the lifecycle events that must not be lost with a node (`$disconnect`,
//! `$occupied`, `$vacated`). The script that decides one (ends credentials, changes a
//! channel's occupancy) appends it to the stream `P:out` in the same step
//! ([`scripts::TELL`](super::scripts::TELL)); every node relays the outbox to the queues of the
//! `Handle` groups advertised for lifecycle events (see [`queue`](super::queue)).
//!
//! A node takes entries with `XREADGROUP` (consumer group `relay`, one consumer per node) and
//! queues each to every group and acknowledges it in one `MULTI`, so a relay that completes
//! does so once. An entry a node took but did not relay (it died, or Redis failed it) stays
//! pending and is claimed by a node after [`CLAIM_IDLE`] (`XAUTOCLAIM`): every event reaches
//! every group that was advertised when it was relayed, at least once whatever node dies,
//! exactly once when none does, as long as Redis keeps its data.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{RedisBus, BACKOFF_MIN};
use crate::{
    credentials::Digest,
    error::Error,
    handlers::remote::{DISCONNECT, OCCUPIED, VACATED},
    handoff::Delivery,
};

/// Consumer group of the outbox.
const RELAY_GROUP: &str = "relay";
/// How long an entry taken and not relayed waits before another node claims it.
pub(crate) const CLAIM_IDLE: Duration = Duration::from_secs(5);
/// How long one `XREADGROUP` of the outbox blocks.
const RELAY_BLOCK: Duration = Duration::from_millis(1000);
/// Entries one read or claim takes.
const RELAY_BATCH: usize = 64;

impl RedisBus {
    /// Relays the outbox until `halt`.
    pub(super) async fn relay_outbox(self: Arc<Self>, halt: CancellationToken) {
        let key = self.outbox_key();
        let mut conn = None;
        let mut last_claim = tokio::time::Instant::now();
        let mut grouped = false;
        loop {
            if halt.is_cancelled() {
                return;
            }
            let mut c = match conn.take() {
                Some(c) => c,
                None => match self.blocking_connection(RELAY_BLOCK, &halt).await {
                    Some(c) => c,
                    None => return,
                },
            };
            if !grouped {
                grouped = self.create_relay_group(&mut c).await;
            }
            if last_claim.elapsed() >= CLAIM_IDLE / 2 {
                last_claim = tokio::time::Instant::now();
                let claimed: redis::RedisResult<redis::streams::StreamAutoClaimReply> =
                    redis::cmd("XAUTOCLAIM")
                        .arg(&key)
                        .arg(RELAY_GROUP)
                        .arg(&self.node)
                        .arg(CLAIM_IDLE.as_millis() as u64)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(RELAY_BATCH)
                        .query_async(&mut c)
                        .await;
                if let Ok(claimed) = claimed {
                    if !claimed.claimed.is_empty() {
                        tracing::info!(
                            events = claimed.claimed.len(),
                            "relaying lifecycle events another relay took and did not relay"
                        );
                    }
                    self.relay(&claimed.claimed).await;
                }
            }
            let read = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(RELAY_GROUP)
                .arg(&self.node)
                .arg("COUNT")
                .arg(RELAY_BATCH)
                .arg("BLOCK")
                .arg(RELAY_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .to_owned();
            let reply = tokio::select! {
                reply = read.query_async::<Option<redis::streams::StreamReadReply>>(&mut c) => reply,
                _ = halt.cancelled() => return,
            };
            match reply {
                Ok(reply) => {
                    conn = Some(c);
                    let entries: Vec<_> = reply
                        .into_iter()
                        .flat_map(|r| r.keys)
                        .flat_map(|k| k.ids)
                        .collect();
                    self.relay(&entries).await;
                }
                Err(err) => {
                    if err.code() == Some("NOGROUP") {
                        grouped = false;
                    }
                    tracing::debug!(%err, "outbox read failed");
                    tokio::select! {
                        _ = tokio::time::sleep(BACKOFF_MIN) => {}
                        _ = halt.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Creates the outbox's consumer group (from the start of the stream: an event written
    /// before any node read it is relayed too); whether it exists now.
    async fn create_relay_group(&self, conn: &mut redis::aio::MultiplexedConnection) -> bool {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.outbox_key())
            .arg(RELAY_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(()) => true,
            Err(err) if err.code() == Some("BUSYGROUP") => true,
            Err(err) => {
                tracing::warn!(%err, "could not create the outbox's consumer group");
                false
            }
        }
    }

    /// Queues `entries` to every lifecycle group and acknowledges them, in one `MULTI`; on a
    /// failure they stay pending, for a later claim.
    async fn relay(&self, entries: &[redis::streams::StreamId]) {
        if entries.is_empty() {
            return;
        }
        if let Err(err) = self.within(self.relay_now(entries)).await {
            tracing::warn!(%err, events = entries.len(), "lifecycle events not relayed yet; they are claimed again");
        }
    }

    async fn relay_now(&self, entries: &[redis::streams::StreamId]) -> Result<(), Error> {
        let groups = self.lifecycle_groups().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let key = self.outbox_key();
        for entry in entries {
            match outbox_delivery(entry) {
                Some(delivery) => self.queue_to(&mut pipe, &groups, 0, &delivery),
                None => {
                    self.registry.metrics().bus_malformed.inc();
                    tracing::warn!(id = %entry.id, "malformed outbox entry dropped");
                }
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        pipe.cmd("XACK")
            .arg(&key)
            .arg(RELAY_GROUP)
            .arg(&ids)
            .ignore();
        pipe.cmd("XDEL").arg(&key).arg(&ids).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
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
