//! The hand-off of client messages between this node's `Handle` streams (the handlers' remote
//! side, which imports this module, never the reverse) and the cluster bus, which offers them to
//! streams on other nodes: the types both sides share, and the [`link`] between them.
//!
//! Neither side holds the other. The local side holds a [`LocalEnd`] (senders), the bus a
//! [`ClusterEnd`] (receivers and one sender), and a task of the node feeds what the bus
//! receives to the local streams. Every channel is bounded; what does not fit is refused at
//! once (the client gets 503) and logged, never waited on.

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

/// Reserved action of connect events.
pub(crate) const CONNECT: &str = "$connect";
/// Reserved action of disconnect events.
pub(crate) const DISCONNECT: &str = "$disconnect";
/// Reserved action of a channel's first member anywhere.
pub(crate) const OCCUPIED: &str = "$occupied";
/// Reserved action of a channel left by its last member (after the vacate delay).
pub(crate) const VACATED: &str = "$vacated";

use crate::{credentials::Digest, domain::Json};

/// Requests from the local side to the bus that may wait before the bus takes them.
pub(crate) const OUTBOUND_BUFFER: usize = 4096;
/// Forwarded messages from the bus that may wait for a local stream.
pub(crate) const INBOUND_BUFFER: usize = 1024;

/// A message for a `Handle` stream.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Names the delivery in the reply; 0 for lifecycle events (no reply expected).
    pub delivery_id: u64,
    /// The socket's connection id.
    pub connection_id: Box<str>,
    /// The socket's digest (`None` for `$occupied` / `$vacated`, which concern a channel).
    pub digest: Option<Digest>,
    /// The action (or `$connect`, `$disconnect`, `$occupied`, `$vacated`).
    pub action: Box<str>,
    /// The client's id as JSON text, if any.
    pub id: Option<Box<RawValue>>,
    /// The whole client message (for lifecycle events, a small JSON object).
    pub json: Box<str>,
}

impl Delivery {
    /// Whether this is a lifecycle event (`$connect`, `$disconnect`, `$occupied`,
    /// `$vacated`) rather than a client message.
    pub fn is_lifecycle(&self) -> bool {
        self.action.starts_with('$')
    }
}

/// A stream's answer to one delivery.
#[derive(Debug)]
pub struct HandlerReply {
    /// The delivery it answers.
    pub delivery_id: u64,
    /// HTTP-like status, 100..=599.
    pub status: u16,
    /// Reply headers.
    pub headers: Vec<(String, String)>,
    /// Reply body (`None`: null).
    pub body: Option<Json>,
}

/// What offering a message to other nodes came to.
#[derive(Debug)]
pub(crate) enum Forwarded {
    /// The first reply.
    Reply(HandlerReply),
    /// No group elsewhere handles the action.
    NoGroups,
    /// Groups exist, but none took the message or every stream holding it ended.
    Failed,
}

/// A group with streams on this node: its name, the actions its streams handle, and whether
/// any asked for lifecycle events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalGroup {
    /// Group name.
    pub name: Box<str>,
    /// Actions handled by at least one of its streams here.
    pub actions: Vec<Box<str>>,
    /// Whether a stream here asked for lifecycle events.
    pub lifecycle: bool,
}

/// What the local side asks of the bus.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Offer a client message to the groups elsewhere that handle its action, except
    /// `exclude` (groups that got it here); the outcome goes to `outcome`.
    Forward {
        /// The message.
        delivery: Delivery,
        /// Groups already offered the message on this node.
        exclude: Vec<Box<str>>,
        /// Where the outcome goes.
        outcome: oneshot::Sender<Forwarded>,
    },
    /// A lifecycle event, for the groups elsewhere that asked for them, except `exclude`.
    Event {
        /// The event.
        delivery: Delivery,
        /// Groups that got it on this node.
        exclude: Vec<Box<str>>,
    },
}

/// A message another node forwarded, for a stream of `group` on this node.
#[derive(Debug)]
pub(crate) struct Arriving {
    /// The group it was queued for.
    pub group: Box<str>,
    /// The message (its `delivery_id` is assigned here).
    pub delivery: Delivery,
    /// Where the reply goes: `None` when no stream here took it, or the one that did ended
    /// first. Dropped unanswered for lifecycle events.
    pub reply: oneshot::Sender<Option<HandlerReply>>,
}

/// The local side's end: held by the `Handle` stream registry.
#[derive(Debug)]
pub(crate) struct LocalEnd {
    /// Requests to the bus.
    pub outbound: mpsc::Sender<Outbound>,
    /// The groups with streams here, republished on every join and leave.
    pub groups: watch::Sender<Vec<LocalGroup>>,
}

/// The bus's end.
#[derive(Debug)]
pub(crate) struct ClusterEnd {
    /// Requests from the local side; closed when the local side is gone.
    pub outbound: mpsc::Receiver<Outbound>,
    /// The groups with streams on this node, to advertise and consume for.
    pub groups: watch::Receiver<Vec<LocalGroup>>,
    /// Messages forwarded by other nodes, for local streams.
    pub inbound: mpsc::Sender<Arriving>,
}

/// A new link: the local side's end, the bus's end, and the receiver of forwarded messages
/// that a task of the node feeds to the local streams.
pub(crate) fn link() -> (LocalEnd, ClusterEnd, mpsc::Receiver<Arriving>) {
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_BUFFER);
    let (groups_tx, groups_rx) = watch::channel(Vec::new());
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_BUFFER);
    (
        LocalEnd {
            outbound: outbound_tx,
            groups: groups_tx,
        },
        ClusterEnd {
            outbound: outbound_rx,
            groups: groups_rx,
            inbound: inbound_tx,
        },
        inbound_rx,
    )
}
