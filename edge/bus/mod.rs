//! The bus: how credentials, subscriptions, pushes and socket commands cross nodes.
//!
//! [`Bus`] is what the [`Gateway`](crate::gateway::Gateway) and the handshake call; a node holds
//! one as `Arc<dyn Bus>`, chosen at start. Implementations:
//! * [`memory::Memory`] (the default): everything is in this node's [`Registry`];
//! * [`redis::RedisBus`] (`--redis`): credentials' state and subscriptions by digest live in
//!   Redis keys, pushes cross nodes over Redis pub/sub, and commands for a socket (subscribe,
//!   send, disconnect) go to the node that holds it. Nodes never talk to each other directly.
//!
//! A bus moves state and bytes; it runs no handler logic. Client messages for `Handle` streams
//! on other nodes cross through the [`handoff`](crate::handoff) link, which the bus carries.
//! Pushes always reach this node's sockets at once, whatever state the bus is in: the registry
//! delivers them and hands them to the bus afterwards ([`Registry::clustered`]).

pub(crate) mod memory;
pub(crate) mod redis;

use std::{fmt, sync::Arc, time::Duration};

use crate::{
    credentials::{Credentials, Digest, Verified},
    error::{Close, Error},
    protocol::{Channel, Frame},
    registry::{Conn, Ending, Refusal, Registry},
};

/// Why a handshake's credentials were not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AttachError {
    /// Refused: expired, live elsewhere, or used.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The shared state could not be reached.
    #[error("cluster state unavailable: {0}")]
    Unavailable(String),
}

/// The gateway's operations whose state may live beyond this node. A new kind of cluster
/// implements this trait; nothing else in the node changes.
#[async_trait::async_trait]
pub(crate) trait Bus: Send + Sync + fmt::Debug + 'static {
    /// This node's registry.
    fn registry(&self) -> &Registry;

    /// `Ok` when the node can take traffic; else why not.
    fn readiness(&self) -> Result<(), String>;

    /// Mints credentials valid for `ttl` (the default when `None`) and records them.
    async fn issue(&self, ttl: Option<Duration>) -> Result<Credentials, Error>;

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

    /// Makes pushes to `channels` from every node reach this node (a `Listen` stream started);
    /// returns once they do.
    async fn listen(&self, channels: &[Channel]);

    /// Accepts a handshake's credentials and binds the socket here with its subscriptions.
    async fn attach(&self, verified: &Verified) -> Result<Arc<Conn>, AttachError>;

    /// Unbinds a socket that ended (recording it beyond this node in the background).
    fn detach(&self, conn: &Conn, ending: Ending);
}
