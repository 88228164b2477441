//! This node's writes to Redis that keep time: its pushes, each one's script run in order and
//! pipelined ([`PushJob`], the publisher task), and its heartbeat (which also renews its live
//! sockets' keys and advertises its `Handle` groups).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    keys::ChannelKey, Batch, RedisBus, COMMAND_TIMEOUT, HEARTBEAT, LEASE, LIVE_RENEW, LIVE_TTL,
    NODES_TTL, PUSH_BATCH,
};
use crate::{
    bus::PushTicket,
    clock::now_ms,
    domain::{new_epoch, valid_epoch, Channel, Json, Position},
    error::Error,
    error::Unavailable,
    readiness::Cause,
};

/// One push to one channel, for the publisher task.
#[derive(Debug)]
pub(super) struct PushJob {
    pub(super) channel: Channel,
    /// The checked JSON text.
    pub(super) payload: Arc<str>,
    /// The push's idempotency key, if any.
    pub(super) key: Option<Box<str>>,
    /// The position the push got, and whether it was a retry already taken.
    pub(super) reply: oneshot::Sender<Result<(Position, bool), Error>>,
}

impl RedisBus {
    /// Runs the scripts of this node's pushes in the order they were submitted, up to
    /// [`PUSH_BATCH`] in one pipeline, and answers each.
    pub(super) async fn publish(
        self: Arc<Self>,
        mut jobs: mpsc::Receiver<PushJob>,
        halt: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(PUSH_BATCH);
        loop {
            let n = tokio::select! {
                n = jobs.recv_many(&mut batch, PUSH_BATCH) => n,
                _ = halt.cancelled() => return,
            };
            if n == 0 {
                return;
            }
            if let Err(why) = self.readiness.check_redis() {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(why.clone().into()));
                }
                continue;
            }
            let results = self.run_pushes(&batch).await;
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
            }
        }
    }

    /// One pipeline: the push script for each job, in order.
    async fn run_pushes(&self, batch: &[PushJob]) -> Vec<Result<(Position, bool), Error>> {
        let limits = &self.limits;
        let now = now_ms();
        // One pipeline per partition (on one server, one in all), each loading the script, so
        // a Redis that restarted (and lost its script cache) never fails a batch with
        // NOSCRIPT. A channel is in one partition, so its pushes keep their order.
        let mut pipes = self.batch(&[&self.scripts.push]);
        for job in batch {
            let policy = limits.history_policy(&job.channel);
            let meta = self.keys.channel(&job.channel, ChannelKey::Meta);
            let idempotency = match &job.key {
                Some(key) => self
                    .keys
                    .channel(&job.channel, ChannelKey::Idempotency(key)),
                None => meta.clone(),
            };
            let mut invocation = self.scripts.push.prepare_invoke();
            invocation
                .key(&meta)
                .key(self.keys.channel(&job.channel, ChannelKey::Log))
                .key(idempotency)
                .arg(&*new_epoch())
                .arg(&*job.payload)
                .arg(policy.size)
                .arg(policy.ttl.as_millis() as u64)
                .arg(limits.position_ttl.as_millis() as u64)
                .arg(self.keys.channel_topic(&job.channel))
                .arg(now)
                .arg(limits.idempotency_window.as_millis() as u64)
                .arg(u8::from(job.key.is_some()));
            pipes.invoke(self.keys.part(&job.channel), &invocation);
        }
        let answers = match self.run_batch(pipes).await {
            Ok(answers) => answers,
            Err(err) => {
                let reason = match err {
                    Error::Unavailable(reason) => reason,
                    other => Unavailable::redis(other),
                };
                return batch.iter().map(|_| Err(reason.clone().into())).collect();
            }
        };
        answers
            .into_iter()
            .map(|answer| {
                let (epoch, offset, duplicate): (String, u64, u8) =
                    redis::from_redis_value(answer?)
                        .map_err(|e| Error::from(Unavailable::malformed("a push's position", e)))?;
                if !valid_epoch(&epoch) {
                    return Err(Unavailable::answer("a malformed epoch").into());
                }
                Ok((
                    Position {
                        epoch: epoch.into(),
                        offset,
                    },
                    duplicate == 1,
                ))
            })
            .collect()
    }

    /// Adds to `batch` this node's heartbeat at `at` (ms), in every partition's copy (a script
    /// reads its digest's holder's on its own slot).
    pub(super) fn stamp_heartbeat(&self, batch: &mut Batch<'_>, at: u64) {
        for p in 0..self.keys.partitions() {
            batch
                .ignored(p)
                .cmd("ZADD")
                .arg(self.keys.nodes(p))
                .arg(at)
                .arg(&self.node)
                .ignore()
                // A deployment that stops leaves nothing behind for long.
                .cmd("PEXPIRE")
                .arg(self.keys.nodes(p))
                .arg(NODES_TTL.as_millis() as u64)
                .ignore();
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
            let mut batch = self.batch(&[]);
            self.stamp_heartbeat(&mut batch, now_ms());
            self.advertise(&mut batch, &self.groups.borrow());
            if last_renew.elapsed() >= LIVE_RENEW {
                last_renew = tokio::time::Instant::now();
                let ttl = LIVE_TTL.as_millis() as u64;
                for digest in self.registry.live_digests() {
                    let pipe = batch.ignored(self.digest_part(&digest));
                    for key in [self.keys.session(&digest), self.keys.subscriptions(&digest)] {
                        pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
                    }
                }
                for p in 0..self.keys.partitions() {
                    batch
                        .ignored(p)
                        .cmd("PEXPIRE")
                        .arg(self.keys.node_live(p, &self.node))
                        .arg(ttl)
                        .ignore();
                }
                for user in self.registry.live_users() {
                    batch
                        .ignored(self.keys.part(&user))
                        .cmd("PEXPIRE")
                        .arg(self.keys.user(&user))
                        .arg(ttl)
                        .arg("GT")
                        .ignore();
                }
            }
            // The heartbeat is also the node's probe of Redis: no answer within the deadline
            // and the node is not ready (calls fail fast) until one comes.
            match tokio::time::timeout(COMMAND_TIMEOUT, self.run_quiet(batch)).await {
                Ok(Ok(())) => {
                    if self.readiness.clear(Cause::Stalled) {
                        tracing::info!("Redis answers again");
                    }
                    self.presence_back().await;
                }
                Ok(Err(err)) if !err.is_timeout() => tracing::debug!(%err, "heartbeat failed"),
                _ => {
                    self.stall();
                }
            }
        }
        // Leaving: backdate our heartbeat by a lease, so ids still marked live here (their
        // socket's end may not have reached Redis) can resume elsewhere at once, within grace.
        let mut batch = self.batch(&[]);
        self.stamp_heartbeat(
            &mut batch,
            now_ms().saturating_sub(LEASE.as_millis() as u64),
        );
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, self.run_quiet(batch)).await;
    }
}

impl RedisBus {
    /// Queues a push to each of `channels` for the publisher; the ticket resolves with their
    /// positions once Redis ordered them, and delivers here at once.
    pub(super) async fn submit(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Result<PushTicket, Error> {
        self.ready()?;
        let payload: Arc<str> = json.as_str().into();
        let mut replies = Vec::with_capacity(channels.len());
        for channel in channels {
            let (reply, answer) = oneshot::channel();
            let job = PushJob {
                channel: channel.clone(),
                payload: payload.clone(),
                key: key.map(Into::into),
                reply,
            };
            self.pushes
                .send(job)
                .await
                .map_err(|_| Error::ShuttingDown)?;
            replies.push((channel.clone(), answer));
        }
        let registry = self.registry.clone();
        Ok(PushTicket::Pending(Box::pin(async move {
            let mut pushed = crate::registry::Pushed::default();
            for (channel, answer) in replies {
                let (position, duplicate) = answer.await.map_err(|_| Error::ShuttingDown)??;
                if !duplicate {
                    // Deliver here at once; the copy that comes back over pub/sub is dropped.
                    pushed.queued += registry
                        .offer(&channel, &position.epoch, position.offset, &payload, false)
                        .unwrap_or(0);
                }
                pushed.positions.push((channel, position));
            }
            Ok(pushed)
        })))
    }
}
