//! The ends room: how a set of credentials that connected ends for good, told once to the
//! `Handle` groups that asked for lifecycle events (`$disconnect`).
//!
//! A socket's end is final at once when the client closed it or the application disconnected
//! it; the socket's task reports those. A socket dropped without a close may resume within the
//! reconnect grace, so its end is final only when the grace ran out: on one node the sweeper
//! decides that here; in cluster mode Redis does (the socket may have resumed on another node),
//! and a node that died has its sockets ended by the others (`node lost`). Every end, wherever
//! decided, goes through [`Registry::ended`] (counted once there) to the node's lifecycle task
//! ([`Registry::take_ends`]).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Registry;
use crate::credentials::Digest;

/// Ends waiting for the node's lifecycle task; past it, an end is logged and counted, not told.
pub const ENDS_QUEUE: usize = 16_384;

/// Why a set of credentials ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
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
    pub fn as_str(self) -> &'static str {
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
pub struct Ended {
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
    pub fn json(&self) -> String {
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

/// The queue of ends decided away from a socket's task.
#[derive(Debug)]
pub(super) struct Ends {
    tx: mpsc::Sender<Ended>,
    rx: parking_lot::Mutex<Option<mpsc::Receiver<Ended>>>,
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
    /// Counts a final end and hands it to the node's lifecycle task, which tells the `Handle`
    /// streams (never waits). Credentials that never connected (no connection id) end
    /// silently.
    pub fn ended(&self, ended: Ended) {
        if ended.connection_id.is_empty() {
            return;
        }
        self.shared
            .metrics
            .ends
            .with_label_values(&[ended.reason.as_str()])
            .inc();
        if let Err(err) = self.shared.ends.tx.try_send(ended) {
            self.shared.metrics.lifecycle_dropped.inc();
            tracing::warn!(%err, "final $disconnect not told: the lifecycle queue is full");
        }
    }

    /// The ends decided away from sockets' tasks; for the node's lifecycle task (once).
    pub fn take_ends(&self) -> Option<mpsc::Receiver<Ended>> {
        self.shared.ends.rx.lock().take()
    }
}
