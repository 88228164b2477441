//! [`Gateway`]: the one door through which the control plane (or a program embedding the edge)
//! drives a node: issue, subscribe, unsubscribe, push, history, send, disconnect, stats,
//! listen, and joining and replying as a `Handle` stream.
//!
//! Every operation works the same on one node or across a cluster: the [`Bus`] decides where
//! state lives. Nothing here knows gRPC; `control/` converts its messages to these calls.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::{
    bus::Bus,
    config::JoinLeave,
    domain::{check_user, Channel, Position, User},
    error::{Close, Error, NotReady},
    node::NodeState,
    registry::check_idempotency_key,
};
pub use crate::{
    bus::{HistoryQuery, Page, PushTicket},
    credentials::{BadDigest, Credentials, Digest},
    handlers::streams::{Member, MemberError},
    handoff::{Delivery, HandlerReply},
    registry::{Change, ListenEvent, Listener, Present, Pushed, Stats, Wants},
};

/// Most pushes one `History` call returns.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// A node's operations. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    node: Arc<NodeState>,
}

impl Gateway {
    pub(crate) fn new(node: Arc<NodeState>) -> Self {
        Self { node }
    }

    fn bus(&self) -> &dyn Bus {
        &*self.node.bus
    }

    /// Mints credentials valid for `ttl` (the node's default when `None`) and, when `channels`
    /// is not empty, subscribes them in the same call. Channels are checked before anything is
    /// minted, so a refused call leaves no credentials behind.
    /// With a `user`, the credentials belong to it: [`Gateway::send_user`] and
    /// [`Gateway::disconnect_user`] reach them.
    pub async fn issue(
        &self,
        ttl: Option<Duration>,
        channels: &[Channel],
        user: Option<&User>,
    ) -> Result<Credentials, Error> {
        if !channels.is_empty() {
            crate::registry::check_channel_count(channels)?;
        }
        let creds = self.bus().issue(ttl, user).await?;
        if !channels.is_empty() {
            self.bus().subscribe(&creds.digest, channels, true).await?;
        }
        Ok(creds)
    }

    /// Subscribes `digest` to `channels`; returns whether its socket is live (on any node).
    pub async fn subscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        self.bus().subscribe(digest, channels, true).await
    }

    /// Unsubscribes `digest` from `channels`; returns whether its socket is live.
    pub async fn unsubscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        self.bus().subscribe(digest, channels, false).await
    }

    /// Pushes `json` to `channels`: each channel gives it its next offset. Returns each
    /// channel's new position and the sockets it was queued to on this node. With an
    /// idempotency `key`, a retry within the window is accepted once: a channel that already
    /// took this key takes nothing and answers with the first push's position.
    pub async fn push(
        &self,
        channels: &[Channel],
        json: &str,
        key: Option<&str>,
    ) -> Result<Pushed, Error> {
        self.submit(channels, json, key).await?.await
    }

    /// Submits a push as [`Gateway::push`] does and returns once it is ordered against this
    /// node's other pushes; the ticket resolves to its outcome. A streaming publisher submits
    /// the next push before the last one resolved, and the order holds.
    pub async fn submit(
        &self,
        channels: &[Channel],
        json: &str,
        key: Option<&str>,
    ) -> Result<PushTicket, Error> {
        crate::registry::check_channel_count(channels)?;
        let json = self.node.registry.check_payload(json)?;
        if let Some(key) = key {
            check_idempotency_key(key)?;
        }
        if let Some(done) = self.bus().push_now(channels, &json, key) {
            return Ok(PushTicket::Ready(Some(done)));
        }
        self.bus().submit(channels, &json, key).await
    }

    /// A page of `channel`'s history (at most [`MAX_HISTORY_PAGE`] pushes) and its position.
    pub async fn history(&self, channel: &Channel, query: HistoryQuery) -> Result<Page, Error> {
        let query = HistoryQuery {
            limit: query.limit.min(MAX_HISTORY_PAGE),
            ..query
        };
        self.bus().history(channel, &query).await
    }

    /// Waits a little while the node's writers are far behind, so a publisher that streams
    /// pushes is held back instead of overflowing subscriber queues (see `Backlog::pace`).
    pub async fn pace(&self) {
        self.node.registry.backlog().pace().await;
    }

    /// Sends `json` to `digest`'s socket, framed as a push on `channel`; returns whether a live
    /// socket was found.
    pub async fn send(
        &self,
        digest: &Digest,
        channel: &Channel,
        json: &str,
    ) -> Result<bool, Error> {
        let frame = crate::protocol::send_frame(channel, &self.node.registry.check_payload(json)?);
        self.bus().send(digest, frame).await
    }

    /// Ends `digest`'s credentials and closes its socket with `close`; returns whether one
    /// was live.
    pub async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        self.bus().disconnect(digest, close).await
    }

    /// Sends `json` (framed as a push on `channel`) to every live socket of `user`, on every
    /// node; returns how many were live.
    pub async fn send_user(&self, user: &str, channel: &Channel, json: &str) -> Result<u64, Error> {
        check_user(user)?;
        let frame = crate::protocol::send_frame(channel, &self.node.registry.check_payload(json)?);
        let mut live = 0;
        for digest in self.bus().user_digests(user).await? {
            match self.bus().send(&digest, frame.clone()).await {
                Ok(true) => live += 1,
                Ok(false) => {}
                Err(Error::UnknownDigest) => self.bus().forget_user_digest(user, &digest).await,
                Err(err) => return Err(err),
            }
        }
        Ok(live)
    }

    /// Ends every set of credentials issued for `user` that has not ended (issued, live or
    /// within its grace), on every node, closing the live sockets with `close` ("log out
    /// everywhere"); returns how many sockets were live.
    pub async fn disconnect_user(&self, user: &str, close: Close) -> Result<u64, Error> {
        check_user(user)?;
        let mut live = 0;
        for digest in self.bus().user_digests(user).await? {
            match self.bus().disconnect(&digest, close.clone()).await {
                Ok(true) => live += 1,
                Ok(false) => {}
                Err(Error::UnknownDigest) => {}
                Err(err) => return Err(err),
            }
            self.bus().forget_user_digest(user, &digest).await;
        }
        Ok(live)
    }

    /// The connections present in `channel` (subscribed and connected), with their user,
    /// info and since when. `PresenceOff` unless the channel's namespace keeps presence.
    pub async fn presence(&self, channel: &Channel) -> Result<Vec<Present>, Error> {
        if !self.node.config.limits.presence(channel) {
            return Err(Error::PresenceOff);
        }
        self.bus().presence(channel).await
    }

    /// `(connections, users)` present in `channel`; as [`Gateway::presence`], cheaply.
    pub async fn presence_stats(&self, channel: &Channel) -> Result<(u64, u64), Error> {
        if !self.node.config.limits.presence(channel) {
            return Err(Error::PresenceOff);
        }
        self.bus().presence_stats(channel).await
    }

    /// Counts of what this node holds; per channel when `per_channel` (only `only`, when not
    /// empty).
    pub fn stats(&self, per_channel: bool, only: &[Channel]) -> Stats {
        self.node.registry.stats(per_channel, only)
    }

    /// Starts a `Listen` stream on `channels`; in a cluster, pushes from every node reach it
    /// once this returns. For a channel in `since`, the pushes after that position come first
    /// (or one gap event, when history does not reach back), then live ones, with no gap and no
    /// duplicate between them.
    ///
    /// `wants` adds the channels' presence events: joins and leaves need channels that keep
    /// presence, occupancy needs channels whose namespace enables it (else `PresenceOff`).
    pub async fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        wants: Wants,
    ) -> Result<Listener, Error> {
        crate::registry::check_channel_count(channels)?;
        let limits = &self.node.config.limits;
        for channel in channels {
            let ns = limits.namespace(channel);
            if (wants.join_leave != JoinLeave::Off && !ns.presence)
                || (wants.occupancy && ns.occupancy.is_none())
            {
                return Err(Error::PresenceOff);
            }
        }
        self.bus().listen(channels, since, wants).await
    }

    /// Joins `group` as a `Handle` stream handling `actions` (and lifecycle events when
    /// `lifecycle`). Returns the membership (leaving on drop) and the stream's deliveries.
    pub fn join(
        &self,
        group: &str,
        actions: Vec<String>,
        lifecycle: bool,
    ) -> Result<(Member, mpsc::Receiver<Delivery>), MemberError> {
        if let Some(action) = actions.iter().find(|a| self.node.handlers.is_builtin(a)) {
            return Err(MemberError::BadRegistration(format!(
                "action {action:?} is handled by the gateway itself"
            )));
        }
        self.node.handlers.remote().join(group, actions, lifecycle)
    }

    /// Takes a `Handle` stream's reply to one of its deliveries.
    pub fn reply(&self, member: &Member, reply: HandlerReply) -> Result<(), MemberError> {
        self.node.handlers.remote().reply(member, reply)
    }

    /// `Ok` when the node can take traffic; else why not (draining, Redis unreachable or
    /// stalled, not connected yet): what `/readyz` answers.
    pub fn readiness(&self) -> Result<(), NotReady> {
        self.node.readiness.check()
    }

    /// [`Gateway::readiness`] now and at every change.
    pub fn readiness_changes(&self) -> tokio::sync::watch::Receiver<Result<(), NotReady>> {
        self.node.readiness.watch()
    }

    /// Counts a control-plane call by its method (the gRPC path, or `other`) and gRPC status
    /// code, in `channelgate_control_requests_total`.
    pub fn count_control_call(&self, method: &str, code: &str) {
        self.node
            .registry
            .metrics()
            .control_requests
            .with_label_values(&[method, code])
            .inc();
    }

    /// Counts a connection closed as soon as it was accepted, by why, in
    /// `channelgate_refused_connections_total`.
    pub fn count_refused_connection(&self, reason: &str) {
        self.node
            .registry
            .metrics()
            .refused_connections
            .with_label_values(&[reason])
            .inc();
    }

    /// Whether the node shares its state with other nodes through Redis (cluster mode): then a
    /// push's idempotency record is seen by every node.
    pub fn is_clustered(&self) -> bool {
        self.node.config.redis.is_some()
    }

    /// Adds `collector` to the node's metrics (`GET /metrics`): how a way in that lives outside
    /// the edge (the ingest consumers) reports its own. A name already taken is an error.
    pub fn register_metrics(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.node.registry.metrics().register(collector)
    }

    /// Resolves once the node halts (its sockets are gone): long-lived calls end then.
    pub fn halted(&self) -> WaitForCancellationFutureOwned {
        self.node.halt.clone().cancelled_owned()
    }

    /// Runs `task` on the node's task tracker, so the node's drain waits for it.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.node.tracker.spawn(task)
    }
}
