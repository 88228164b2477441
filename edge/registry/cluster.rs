//! The cluster room: what the registry tells a cluster bus. Pushes accepted on this node go to
//! the bus in the order they were delivered here ([`ClusterFeed`]); channels that gained their
//! first or lost their last local subscriber or listener are collected for the bus to follow.
//! Empty on a single node.

use std::{collections::HashSet, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::Registry;
use crate::{
    config::Limits,
    credentials::Secrets,
    metrics::Metrics,
    protocol::{Channel, Frame},
};

/// What the registry tells the cluster bus (set once, at construction).
#[derive(Debug)]
pub(super) struct ClusterHooks {
    /// Pushes to relay to other nodes. Bounded: while the bus cannot keep up (Redis down or
    /// slow) pushes still reach local sockets, and the relay drops with a count.
    pub(super) relay: mpsc::Sender<Relay>,
    /// Channels that gained their first or lost their last local subscriber or listener.
    pub(super) changed: Mutex<HashSet<Channel>>,
    /// Wakes the bus when `changed` gains an entry.
    pub(super) changed_notify: tokio::sync::Notify,
}

/// A push accepted by this node, for other nodes: the encoded frame and where its payload
/// starts, so receivers pass the bytes through without re-encoding.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The channel.
    pub channel: Channel,
    /// The encoded push frame.
    pub frame: Frame,
    /// Byte offset of the payload within `frame` (it ends one byte before the frame does).
    pub payload_at: usize,
}

/// The bus's end of the cluster hooks.
#[derive(Debug)]
pub struct ClusterFeed {
    /// Pushes to relay, in order.
    pub relay: mpsc::Receiver<Relay>,
}

/// Pushes the relay may hold before it drops.
pub const RELAY_BUFFER: usize = 65_536;

impl Registry {
    /// A registry for cluster mode (see [`Registry::new`]), and the feed its bus consumes.
    pub fn clustered(
        secrets: Secrets,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> (Self, ClusterFeed) {
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let hooks = ClusterHooks {
            relay: tx,
            changed: Mutex::new(HashSet::new()),
            changed_notify: tokio::sync::Notify::new(),
        };
        (
            Self::build(secrets, limits, metrics, Some(hooks)),
            ClusterFeed { relay: rx },
        )
    }

    /// Whether this registry belongs to a cluster.
    pub fn is_clustered(&self) -> bool {
        self.shared.cluster.is_some()
    }

    pub(super) fn interest_changed(&self, channel: &Channel) {
        if let Some(hooks) = &self.shared.cluster {
            if hooks.changed.lock().insert(channel.clone()) {
                hooks.changed_notify.notify_one();
            }
        }
    }

    /// Waits for, then takes, the channels whose local interest changed (cluster mode).
    pub async fn changed_channels(&self) -> Vec<Channel> {
        let Some(hooks) = &self.shared.cluster else {
            return std::future::pending().await;
        };
        loop {
            {
                let mut changed = hooks.changed.lock();
                if !changed.is_empty() {
                    return changed.drain().collect();
                }
            }
            hooks.changed_notify.notified().await;
        }
    }

    /// Whether a local socket or listener uses `channel`.
    pub fn has_interest(&self, channel: &Channel) -> bool {
        self.shared.channels.contains_key(channel) || self.shared.listeners.contains_key(channel)
    }

    /// Every channel a local socket or listener uses.
    pub fn interest(&self) -> Vec<Channel> {
        let mut all: HashSet<Channel> = self
            .shared
            .channels
            .iter()
            .map(|e| e.key().clone())
            .collect();
        all.extend(self.shared.listeners.iter().map(|e| e.key().clone()));
        all.into_iter().collect()
    }
}
