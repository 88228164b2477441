//! The bus: how credentials, subscriptions, pushes and socket commands cross nodes.
//!
//! [`Bus`] is what the gateway (the control plane's door) and the handshake call; a node holds
//! one as `Arc<dyn Bus>`, chosen at start. Implementations:
//! * [`memory::Memory`] (the default): everything is in this node's [`Registry`];
//! * [`redis::RedisBus`] (`--redis`): credentials' state and subscriptions by digest live in
//!   Redis keys, pushes cross nodes over Redis pub/sub, and commands for a socket (subscribe,
//!   send, disconnect) go to the node that holds it. Nodes never talk to each other directly.
//!
//! A bus moves state and bytes; it runs no handler logic. Client messages for `Handle` streams
//! on other nodes cross through the [`handoff`](crate::handoff) link, which the bus carries.
//!
//! Pushes get their offsets where the channel's history lives: in the registry on one node; in
//! Redis in cluster mode, where one script per push per channel gives the offset, keeps the push
//! and publishes it, so every node sees one order. The registry then delivers in that order
//! ([`Registry::offer`]).

pub(crate) mod memory;
pub(crate) mod redis;

use std::{fmt, sync::Arc, time::Duration};

use std::collections::HashMap;

use crate::{
    credentials::{Credentials, Digest, Verified},
    domain::User,
    domain::{Channel, Json, Position},
    error::{Close, Error},
    protocol::{Frame, Recover},
    registry::{AttachRefusal, Conn, Ended, Ending, Listener, Present, Pushed, Registry, Wants},
};

/// A submitted push: resolves to what it did. A push that is done when submitted (one node)
/// costs no allocation.
pub enum PushTicket {
    /// Done already.
    Ready(Option<Result<Pushed, Error>>),
    /// Waits for the bus (Redis answers each channel's script).
    Pending(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Pushed, Error>> + Send>>),
}

impl fmt::Debug for PushTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready(_) => f.write_str("PushTicket::Ready"),
            Self::Pending(_) => f.write_str("PushTicket::Pending"),
        }
    }
}

impl std::future::Future for PushTicket {
    type Output = Result<Pushed, Error>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready(done) => {
                std::task::Poll::Ready(done.take().unwrap_or_else(|| Err(Error::ShuttingDown)))
            }
            Self::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

/// A page of a channel's history: its position and the pushes asked for, `(offset, JSON)`.
pub type Page = (Position, Vec<(u64, String)>);

/// What a `History` call asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Refuse the call (`EpochChanged`) when the channel's epoch is no longer this one.
    pub epoch: Option<String>,
    /// Pushes after this offset (before it, when `reverse`); `None`: from the oldest (newest).
    pub from: Option<u64>,
    /// Most pushes to return; 0 returns the position only.
    pub limit: usize,
    /// Newest first.
    pub reverse: bool,
}

/// Why a handshake's credentials were not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AttachError {
    /// Refused: expired, live elsewhere, or used.
    #[error(transparent)]
    Refused(#[from] AttachRefusal),
    /// The shared state could not be reached.
    #[error("cluster state unavailable: {0}")]
    Unavailable(#[from] crate::error::Unavailable),
}

/// The gateway's operations whose state may live beyond this node. A new kind of cluster
/// implements this trait; nothing else in the node changes.
#[async_trait::async_trait]
pub(crate) trait Bus: Send + Sync + fmt::Debug + 'static {
    /// This node's registry.
    fn registry(&self) -> &Registry;

    /// Keeps an event stream's positions (`positions`, as a `recover` parameter) under its
    /// digest as anchor `number`; the four newest numbers are kept, as long as the
    /// credentials' state. `UnknownDigest` when that state is gone.
    async fn save_anchor(&self, digest: &Digest, number: u64, positions: &str)
        -> Result<(), Error>;

    /// Whether `digest`'s credentials have a live socket (on any node).
    async fn is_live(&self, digest: &Digest) -> Result<bool, Error>;

    /// Anchor `number` of `digest`, if it is still kept.
    async fn load_anchor(&self, digest: &Digest, number: u64) -> Result<Option<String>, Error>;

    /// Mints credentials valid for `ttl` (the default when `None`) for `user`, and records
    /// them.
    async fn issue(&self, ttl: Option<Duration>, user: Option<&User>)
        -> Result<Credentials, Error>;

    /// The credentials issued for `user` that may not have ended, on every node. May name some
    /// that ended since (calls on them answer `UnknownDigest`).
    async fn user_digests(&self, user: &str) -> Result<Vec<Digest>, Error>;

    /// Forgets that `digest` (found ended) belongs to `user`.
    async fn forget_user_digest(&self, _user: &str, _digest: &Digest) {}

    /// Adds (`add`) or removes `digest`'s subscriptions to `channels`, and applies the change
    /// to its live socket wherever it is. Returns whether a socket is live.
    async fn subscribe(
        &self,
        digest: &Digest,
        channels: &[Channel],
        add: bool,
    ) -> Result<bool, Error>;

    /// Queues an encoded frame to `digest`'s socket wherever it is. Returns whether one is live.
    async fn send(&self, digest: &Digest, frame: Frame) -> Result<bool, Error>;

    /// Ends `digest`'s credentials and closes its socket wherever it is; returns whether one
    /// was live.
    async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error>;

    /// Pushes checked JSON to `channels`, each getting its channel's next offset; with an
    /// idempotency `key`, a channel that already took a push with it takes nothing and reports
    /// the first push's position. The push is ordered (against this node's other pushes) when
    /// this returns; the ticket resolves once every channel took it. So a publisher may submit
    /// many pushes before the first resolves, and they keep their order.
    async fn submit(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Result<PushTicket, Error>;

    /// For a bus that pushes without waiting (one node): does [`Bus::submit`]'s work now and
    /// returns its outcome; `None` for a bus that must wait (then call `submit`).
    fn push_now(
        &self,
        _channels: &[Channel],
        _json: &Json,
        _key: Option<&str>,
    ) -> Option<Result<Pushed, Error>> {
        None
    }

    /// The connections present in `channel` (subscribed and connected), on every node.
    async fn presence(&self, channel: &Channel) -> Result<Vec<Present>, Error>;

    /// `(connections, users)` present in `channel`, on every node.
    async fn presence_stats(&self, channel: &Channel) -> Result<(u64, u64), Error>;

    /// A page of `channel`'s history.
    async fn history(&self, channel: &Channel, query: &HistoryQuery) -> Result<Page, Error>;

    /// Starts a `Listen` stream on `channels`, replaying from `since` where given; pushes from
    /// every node reach it once this returns.
    async fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        wants: Wants,
    ) -> Result<Listener, Error>;

    /// Accepts a handshake's credentials and binds the socket here with its subscriptions,
    /// recovering what it missed where `recover` says what it saw.
    async fn attach(
        &self,
        verified: &Verified,
        connection_id: &str,
        recover: Option<&Recover>,
    ) -> Result<Arc<Conn>, AttachError>;

    /// Unbinds a socket that ended (recording it beyond this node in the background);
    /// `ended` is its final end, when this end is final.
    fn detach(&self, conn: &Conn, ending: Ending, ended: Option<&Ended>);
}
