//! The bus: how credentials, subscriptions, pushes and socket commands cross nodes.
//!
//! [`Bus`] is what the control plane and the handshake call. It has two implementations:
//! * in-process (the default): everything is in this node's [`Registry`];
//! * Redis ([`redis::RedisBus`], `--redis`): credentials' state and subscriptions by digest live
//!   in Redis keys, pushes cross nodes over Redis pub/sub, and commands for a socket (subscribe,
//!   send, disconnect) go to the node that holds it. Nodes never talk to each other directly.
//!
//! Pushes always reach this node's sockets at once, whatever state Redis is in.

pub mod redis;

use std::{sync::Arc, time::Duration};

use crate::{
    credentials::{Credentials, Digest, Verified},
    error::{Close, Error},
    protocol::Channel,
    registry::{Conn, Ending, Listener, Refusal, Registry},
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

/// The gateway's operations, on one node or across a cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    registry: Registry,
    redis: Option<Arc<redis::RedisBus>>,
}

impl Bus {
    /// A single node: everything stays in `registry`.
    pub fn memory(registry: Registry) -> Self {
        Self {
            registry,
            redis: None,
        }
    }

    /// A cluster node over `redis`.
    pub fn redis(redis: Arc<redis::RedisBus>) -> Self {
        Self {
            registry: redis.registry().clone(),
            redis: Some(redis),
        }
    }

    /// This node's registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `Ok` when the node can take traffic; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        self.redis.as_ref().map_or(Ok(()), |r| r.readiness())
    }

    /// Mints credentials valid for `ttl` (the default when `None`).
    pub async fn issue(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        match &self.redis {
            None => self.registry.issue(ttl),
            Some(redis) => redis.issue(ttl).await,
        }
    }

    /// Subscribes `digest` to `channels`; returns whether its socket is live (on any node).
    pub async fn subscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        match &self.redis {
            None => self.registry.subscribe(digest, channels),
            Some(redis) => redis.subscribe(digest, channels, true).await,
        }
    }

    /// Unsubscribes `digest` from `channels`; returns whether its socket is live.
    pub async fn unsubscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        match &self.redis {
            None => self.registry.unsubscribe(digest, channels),
            Some(redis) => redis.subscribe(digest, channels, false).await,
        }
    }

    /// Pushes `json` to `channels`; returns the sockets it was queued to on this node.
    pub fn push(&self, channels: &[Channel], json: &str) -> Result<u64, Error> {
        self.registry.push(channels, json)
    }

    /// Sends `json` to `digest`'s socket; returns whether a live socket was found.
    pub async fn send(
        &self,
        digest: &Digest,
        channel: &Channel,
        json: &str,
    ) -> Result<bool, Error> {
        match &self.redis {
            None => self.registry.send(digest, channel, json),
            Some(redis) => redis.send(digest, channel, json).await,
        }
    }

    /// Ends `digest`'s credentials and closes its socket; returns whether one was live.
    pub async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        match &self.redis {
            None => self.registry.disconnect(digest, close),
            Some(redis) => redis.disconnect(digest, close).await,
        }
    }

    /// Starts a `Listen` stream; in a cluster, pushes from every node reach it once this returns.
    pub async fn listen(&self, channels: &[Channel]) -> Result<Listener, Error> {
        let listener = self.registry.listen(channels)?;
        if let Some(redis) = &self.redis {
            redis.ensure_subscribed(channels).await;
        }
        Ok(listener)
    }

    /// Binds a new socket to verified credentials.
    pub async fn attach(&self, verified: &Verified) -> Result<Arc<Conn>, AttachError> {
        match &self.redis {
            None => Ok(self.registry.attach(verified)?),
            Some(redis) => redis.attach(verified).await,
        }
    }

    /// Unbinds a socket that ended.
    pub fn detach(&self, conn: &Conn, ending: Ending) {
        self.registry.detach(conn, ending);
        if let Some(redis) = &self.redis {
            redis.detach(conn.digest(), ending);
        }
    }
}
