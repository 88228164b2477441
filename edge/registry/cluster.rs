//! The cluster room: what the registry tells a cluster bus. Channels that gained their first or
//! lost their last local subscriber or listener are collected for the bus to follow (subscribe
//! or unsubscribe in Redis); channels whose copy here may have fallen behind Redis (a hole in
//! the pub/sub stream, a new subscription, a lost connection) are collected for the bus to read
//! from Redis. Empty on a single node.

use std::{collections::HashSet, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::Registry;
use crate::{config::Limits, credentials::Secrets, domain::Channel, metrics::Metrics};

/// What the registry tells the cluster bus (set once, at construction).
#[derive(Debug, Default)]
pub(super) struct ClusterHooks {
    /// Channels that gained their first or lost their last local subscriber or listener.
    changed: Mutex<HashSet<Channel>>,
    /// Wakes the bus when `changed` gains an entry.
    changed_notify: Notify,
    /// Channels to bring up to date from Redis.
    behind: Mutex<HashSet<Channel>>,
    /// Wakes the bus when `behind` gains an entry.
    behind_notify: Notify,
}

impl Registry {
    /// A registry for cluster mode (see [`Registry::new`]): offsets come from Redis, through
    /// [`Registry::offer`] and [`Registry::caught_up`].
    pub(crate) fn clustered(secrets: Secrets, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self::build(secrets, limits, metrics, Some(ClusterHooks::default()))
    }

    /// Whether this registry belongs to a cluster.
    pub(crate) fn is_clustered(&self) -> bool {
        self.shared.cluster.is_some()
    }

    pub(super) fn interest_changed(&self, channel: &Channel) {
        if let Some(hooks) = &self.shared.cluster {
            if hooks.changed.lock().insert(channel.clone()) {
                hooks.changed_notify.notify_one();
            }
        }
    }

    /// Asks the bus to read `channel`'s position (and what this node missed) from Redis.
    pub(crate) fn want_catch_up(&self, channel: &Channel) {
        if let Some(hooks) = &self.shared.cluster {
            if hooks.behind.lock().insert(channel.clone()) {
                hooks.behind_notify.notify_one();
            }
        }
    }

    /// Waits for, then takes, the channels whose local interest changed (cluster mode).
    pub(crate) async fn changed_channels(&self) -> Vec<Channel> {
        let Some(hooks) = &self.shared.cluster else {
            return std::future::pending().await;
        };
        take(&hooks.changed, &hooks.changed_notify).await
    }

    /// Waits for, then takes, the channels to bring up to date from Redis (cluster mode).
    pub(crate) async fn behind_channels(&self) -> Vec<Channel> {
        let Some(hooks) = &self.shared.cluster else {
            return std::future::pending().await;
        };
        take(&hooks.behind, &hooks.behind_notify).await
    }

    /// Whether this node follows `channel` (cluster mode: a local socket or listener uses it,
    /// or one is about to).
    pub(crate) fn has_interest(&self, channel: &Channel) -> bool {
        self.shared.channels.contains_key(channel)
    }

    /// Every channel this node follows.
    pub(crate) fn interest(&self) -> Vec<Channel> {
        self.shared
            .channels
            .iter()
            .map(|slot| slot.key().clone())
            .collect()
    }
}

async fn take(set: &Mutex<HashSet<Channel>>, notify: &Notify) -> Vec<Channel> {
    loop {
        {
            let mut set = set.lock();
            if !set.is_empty() {
                return set.drain().collect();
            }
        }
        notify.notified().await;
    }
}
