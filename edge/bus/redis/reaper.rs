//! The reaper: ends, once across the cluster, the credentials whose reconnect grace ran out
//! without a resume, and those still live on a node that died, and tells their final
//! `$disconnect`. Every node runs it; each end is one script that only one call can win, and
//! that tells it.
//!
//! It also tells `vacated` for channels whose vacate delay passed (see
//! [`presence`](super::presence)).
//!
//! Bounds: a grace that ends is told within [`REAP_EVERY`] of its end; a dead node's sockets
//! are told within its lease, plus the grace, plus [`REAP_EVERY`], after its last heartbeat;
//! `vacated` within [`REAP_EVERY`] after the delay; a silent node's connections leave presence
//! within [`PRESENCE_LEASE`](super::presence::PRESENCE_LEASE) plus [`REAP_EVERY`]. The script that ends credentials writes
//! their `$disconnect` to the outbox itself ([`outbox`](super::outbox)), so a reaper that dies
//! after winning an end loses nothing.

use crate::clock::now_ms;
use crate::error::Unavailable;
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{RedisBus, LEASE};
use crate::{
    credentials::Digest,
    error::Error,
    registry::{EndReason, Ended},
};

/// How often each node looks for ends.
pub(crate) const REAP_EVERY: Duration = Duration::from_secs(1);
/// Most ends of each kind one pass takes (the next pass takes the rest).
const REAP_BATCH: usize = 512;

impl RedisBus {
    /// Runs the reaper until `halt`.
    pub(super) async fn reap(self: Arc<Self>, halt: CancellationToken) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = halt.cancelled() => return,
            }
            if self.ready().is_err() {
                continue;
            }
            // No deadline on the whole pass (a long one is not a stalled Redis): each of its
            // commands has the connection's own response deadline.
            if let Err(err) = self.reap_once().await {
                tracing::debug!(%err, "reaper pass failed; the next one retries");
            }
        }
    }

    async fn reap_once(&self) -> Result<(), Error> {
        let now = now_ms();
        let mut conn = self.link();
        let parts = self.keys.partitions();
        // Every partition's due ends and vacating channels, in one batch.
        let mut batch = self.batch(&[]);
        for p in 0..parts {
            batch.cmd(p, scored_up_to(&self.keys.ends(p), now, REAP_BATCH));
            batch.cmd(p, scored_up_to(&self.keys.vacating(p), now, REAP_BATCH));
        }
        let mut due = self.run_batch(batch).await?.into_iter();
        for p in 0..parts {
            let ends = members(due.next())?;
            let vacating = members(due.next())?;
            for text in &ends {
                self.reap_digest(&mut conn, text, &self.keys.ends(p), None, now)
                    .await?;
            }
            if !vacating.is_empty() {
                self.vacate_due(&mut conn, p, &vacating, now).await?;
            }
        }
        self.drop_lost_presence(&mut conn, now).await?;
        // Nodes silent for longer than their lease and the grace: whatever is still live there
        // did not resume anywhere.
        let cutoff = now.saturating_sub((LEASE + self.grace).as_millis() as u64);
        let dead: Vec<String> = scored_up_to(&self.keys.nodes(0), cutoff, 16)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        for node in dead.into_iter().filter(|n| *n != self.node) {
            let mut batch = self.batch(&[]);
            for p in 0..parts {
                let mut cmd = redis::cmd("SRANDMEMBER");
                cmd.arg(self.keys.node_live(p, &node)).arg(REAP_BATCH);
                batch.cmd(p, cmd);
            }
            let mut found = self.run_batch(batch).await?.into_iter();
            let mut all_ended = true;
            let mut ended = 0;
            for p in 0..parts {
                let members = members(found.next())?;
                let live_key = self.keys.node_live(p, &node);
                for text in &members {
                    self.reap_digest(&mut conn, text, &live_key, Some(&node), now)
                        .await?;
                }
                all_ended &= members.len() < REAP_BATCH;
                ended += members.len();
            }
            if all_ended {
                // Every socket of the node is ended: it leaves the heartbeat sets.
                let mut batch = self.batch(&[]);
                for p in 0..parts {
                    batch
                        .ignored(p)
                        .cmd("ZREM")
                        .arg(self.keys.nodes(p))
                        .arg(&node)
                        .ignore();
                }
                batch
                    .ignored(0)
                    .cmd("ZREM")
                    .arg(self.keys.presence_gone())
                    .arg(&node)
                    .ignore();
                self.run_quiet(batch)
                    .await
                    .map_err(|e| self.unavailable(&e))?;
                tracing::info!(%node, ended, "a node that stopped heartbeating was reaped");
            }
        }
        Ok(())
    }

    /// Ends `text`'s credentials if they are still due (grace over when `node` is `None`; else
    /// still live on that dead node), takes them out of presence and tells their end; the
    /// digest leaves `index` either way.
    async fn reap_digest(
        &self,
        conn: &mut super::Link,
        text: &str,
        index: &str,
        node: Option<&str>,
        now: u64,
    ) -> Result<(), Error> {
        let Ok(digest) = text.parse::<Digest>() else {
            // Not a digest: it can never be due; drop it from the index.
            let _: Result<i64, _> = redis::cmd(if node.is_some() { "SREM" } else { "ZREM" })
                .arg(index)
                .arg(text)
                .query_async(conn)
                .await;
            return Ok(());
        };
        let reply: Vec<String> = self
            .scripts
            .reap
            .key(self.keys.session(&digest))
            .key(self.keys.subscriptions(&digest))
            .key(index)
            .key(self.keys.outbox(self.digest_part(&digest)))
            .arg(now)
            .arg(text)
            .arg(if node.is_some() { "lost" } else { "grace" })
            .arg(node.unwrap_or(""))
            .invoke_async(conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        if let [connection_id, user, channels @ ..] = reply.as_slice() {
            let channels = channels.iter().map(String::as_str);
            self.presence_change(false, &digest, channels, "", user, "")
                .await;
            let reason = if node.is_some() {
                EndReason::NodeLost
            } else {
                EndReason::GraceExpired
            };
            self.report_end(digest, connection_id, user, reason);
        }
        Ok(())
    }

    /// Tells the final end of credentials this node's call ended away from their socket.
    pub(super) fn report_end(
        &self,
        digest: Digest,
        connection_id: &str,
        user: &str,
        reason: EndReason,
    ) {
        self.registry.ended(Ended {
            connection_id: connection_id.into(),
            digest,
            user: (!user.is_empty()).then(|| Arc::from(user)),
            reason,
            close: None,
        });
    }
}

/// `ZRANGEBYSCORE key -inf max LIMIT 0 count`: up to `count` members scored at most `max`.
fn scored_up_to(key: &str, max: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("ZRANGEBYSCORE");
    cmd.arg(key)
        .arg("-inf")
        .arg(max)
        .arg("LIMIT")
        .arg(0)
        .arg(count);
    cmd
}

/// The members a batched command answered.
fn members(answer: Option<Result<redis::Value, Error>>) -> Result<Vec<String>, Error> {
    let value = answer.ok_or_else(|| Error::from(Unavailable::answer("too few answers")))??;
    redis::from_redis_value(value)
        .map_err(|e| Unavailable::malformed("the reaper's members", e).into())
}
