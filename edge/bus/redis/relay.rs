//! This node's periodic writes to Redis: its pushes, published in order and pipelined, and its
//! heartbeat (which also renews its live sockets' keys and advertises its `Handle` groups).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{super::Bus, RedisBus, HEARTBEAT, LEASE, LIVE_RENEW, LIVE_TTL, NODES_TTL, RELAY_BATCH};
use crate::registry::{now_ms, ClusterFeed};

impl RedisBus {
    /// Publishes this node's pushes, in order, pipelined.
    pub(super) async fn relay(self: Arc<Self>, mut feed: ClusterFeed, halt: CancellationToken) {
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
    pub(super) async fn heartbeat(self: Arc<Self>, halt: CancellationToken) {
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
            self.advertise(&mut pipe, &self.groups.borrow());
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
