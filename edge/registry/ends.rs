//! The ends room: how a set of credentials that connected ends for good, told once to the
//! `Handle` groups that asked for lifecycle events (`$disconnect`); and the queue that carries
//! those ends, and channels' occupancy changes (`$occupied`, `$vacated`), to the node's
//! lifecycle task.
//!
//! A socket's end is final at once when the client closed it or the application disconnected
//! it; the socket's task reports those. A socket dropped without a close may resume within the
//! reconnect grace, so its end is final only when the grace ran out: on one node the sweeper
//! decides that here; in cluster mode Redis does (the socket may have resumed on another node),
//! and a node that died has its sockets ended by the others (`node lost`). Every end, wherever
//! decided, goes through [`Registry::ended`] (counted once there); on one node it goes on to
//! the node's lifecycle task ([`Registry::take_lifecycle`]), in cluster mode the Redis script
//! that decided it wrote it to the outbox, which the bus relays.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Registry;
use crate::{credentials::Digest, domain::Channel};

/// Events waiting for the node's lifecycle task; past it, an event is logged and counted, not
/// told.
pub(crate) const ENDS_QUEUE: usize = 16_384;

/// What the node's lifecycle task tells the `Handle` groups that asked for lifecycle events.
#[derive(Debug, Clone)]
pub(crate) enum Lifecycle {
    /// A final end: `$disconnect`.
    Ended(Ended),
    /// A channel got its first member anywhere (`$occupied`), or its last left and the vacate
    /// delay passed (`$vacated`).
    Occupancy {
        /// The channel.
        channel: Channel,
        /// `true` for occupied.
        occupied: bool,
    },
}

/// Why a set of credentials ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// The client closed its socket (a close frame outside the "reconnect now" range).
    ClientClosed,
    /// The application's `Disconnect`.
    Application,
    /// Dropped (or closed by the gateway in a way that allows a resume) and not resumed within
    /// the reconnect grace.
    GraceExpired,
    /// Its node stopped heartbeating and the grace passed without a resume elsewhere.
    NodeLost,
    /// Dropped with no reconnect grace configured.
    Dropped,
}

impl EndReason {
    /// The `reason` field of `$disconnect`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client closed",
            Self::Application => "disconnected by the application",
            Self::GraceExpired => "grace expired",
            Self::NodeLost => "node lost",
            Self::Dropped => "connection lost",
        }
    }
}

/// A final end, for `$disconnect`.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    /// The credentials' public id.
    pub connection_id: Box<str>,
    /// Their digest.
    pub digest: Digest,
    /// The user they were issued for.
    pub user: Option<Arc<str>>,
    /// Why they ended.
    pub reason: EndReason,
    /// The WebSocket close code and reason, when a close ended them.
    pub close: Option<(u16, String)>,
}

impl Ended {
    /// The `json` of the `$disconnect` event.
    pub(crate) fn json(&self) -> String {
        let mut event = serde_json::json!({
            "reason": self.reason.as_str(),
            "final": true,
            "user": self.user.as_deref(),
        });
        if let Some((code, reason)) = &self.close {
            event["code"] = (*code).into();
            event["close_reason"] = reason.as_str().into();
        }
        event.to_string()
    }
}

/// The queue of lifecycle events for the node's lifecycle task.
#[derive(Debug)]
pub(super) struct Ends {
    tx: mpsc::Sender<Lifecycle>,
    rx: parking_lot::Mutex<Option<mpsc::Receiver<Lifecycle>>>,
}

impl Default for Ends {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(ENDS_QUEUE);
        Self {
            tx,
            rx: parking_lot::Mutex::new(Some(rx)),
        }
    }
}

impl Registry {
    /// Counts a final end and, on one node, hands it to the node's lifecycle task, which tells
    /// the `Handle` streams (never waits). In cluster mode the Redis script that ended the
    /// credentials told it (see the bus's outbox). Credentials that never connected (no
    /// connection id) end silently.
    pub(crate) fn ended(&self, ended: Ended) {
        if ended.connection_id.is_empty() {
            return;
        }
        self.shared
            .metrics
            .ends
            .with_label_values(&[ended.reason.as_str()])
            .inc();
        if !self.is_clustered() {
            self.tell(Lifecycle::Ended(ended));
        }
    }

    /// Hands an occupancy change on one node to the node's lifecycle task (`$occupied` /
    /// `$vacated`); in cluster mode the presence scripts tell them.
    pub(super) fn occupancy(&self, channel: &Channel, occupied: bool) {
        self.tell(Lifecycle::Occupancy {
            channel: channel.clone(),
            occupied,
        });
    }

    fn tell(&self, event: Lifecycle) {
        if let Err(err) = self.shared.ends.tx.try_send(event) {
            self.shared.metrics.lifecycle_dropped.inc();
            tracing::warn!(%err, "lifecycle event not told: the lifecycle queue is full");
        }
    }

    /// The lifecycle events for `Handle` groups; for the node's lifecycle task (once).
    pub(crate) fn take_lifecycle(&self) -> Option<mpsc::Receiver<Lifecycle>> {
        self.shared.ends.rx.lock().take()
    }
}
