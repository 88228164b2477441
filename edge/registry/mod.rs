//! The registry: every digest this node knows, the channels each is subscribed to, the live
//! sockets each channel delivers to, and the `Listen` streams. [`Registry`] is the one handle
//! the rest of the edge (the handshake, connection tasks, the bus, the [`Gateway`]) uses.
//!
//! # Rooms
//! One file per kind of data, each owning its part of [`Shared`] and the methods that change it:
//! * [`sessions`]: credentials known here and their state machine (below), the live count, the
//!   clocks; minting, attaching and detaching sockets, subscriptions by digest, the heartbeat;
//! * [`channels`]: the channel index (one state per channel: live subscribers, listeners,
//!   history) and delivery: a push gets its offset, is encoded once and queued to every
//!   subscriber without waiting;
//! * [`history`]: a channel's position (epoch, last offset) and its last pushes, within bounds;
//!   recovery reads from here; in cluster mode, the sequencer that orders pushes from Redis;
//! * [`listeners`]: `Listen` streams, which sit in the channels they listen to;
//! * [`idempotency`]: which `Push` keys each channel took (single node);
//! * [`users`]: the user bound to credentials at issue, and each user's credentials;
//! * [`ends`]: final ends of credentials decided away from a socket (grace over, a node lost),
//!   for the `$disconnect` lifecycle event, and the queue of lifecycle events;
//! * [`presence`]: who is present in each channel that keeps presence (one node), fed from
//!   [`sessions`]' state changes and subscriptions; its join, leave and occupancy events, and
//!   their delivery to sockets and `Listen` streams (every node);
//! * [`cluster`]: what the registry tells a cluster bus: channels whose local interest changed,
//!   and channels to bring up to date from Redis.
//!
//! The node owns the [`Metrics`]; the registry counts into them.
//!
//! # Model
//! Subscriptions belong to a digest, not to a socket: they are kept in the digest's session
//! whether or not a socket is connected. The channel index holds only live sockets, so a push
//! touches nothing but its recipients.
//!
//! A session moves through these states:
//!
//! | state | entered by | may go to |
//! | --- | --- | --- |
//! | `Issued` | `IssueConnection` | `Live` (handshake before expiry), gone (expiry) |
//! | `Live` | a handshake | `Grace` (unclean drop), `Dead` (clean close, `Disconnect`) |
//! | `Grace` | an unclean drop | `Live` (handshake within grace), `Dead` (grace over) |
//! | `Dead` | clean close, `Disconnect`, grace over | gone, once the id's expiry has passed |
//!
//! A `Dead` session is kept until its id expires, so a used id cannot be replayed.
//!
//! # Locking
//! Locks are taken in one order: a session's map shard, then a channel's map shard, then that
//! channel's state, then the idempotency records. A push takes only the last two, briefly, and
//! never waits on a socket: it calls [`Outbox::push`](crate::fanout::Outbox::push). No lock is
//! held across an await.

mod anchors;
mod channels;
mod cluster;
mod ends;
mod history;
mod idempotency;
mod listeners;
mod presence;
mod sessions;
#[cfg(test)]
mod tests;
mod users;

use std::sync::{
    atomic::{AtomicU64, AtomicUsize},
    Arc,
};

use dashmap::DashMap;

use crate::domain::MAX_CHANNELS_PER_CALL;
use crate::{
    config::Limits,
    credentials::{Digest, Secrets},
    domain::{Channel, Json},
    error::Error,
    fanout::Backlog,
    metrics::Metrics,
};

pub(crate) use channels::Fetched;
pub use channels::Pushed;
pub(crate) use ends::{EndReason, Ended, Lifecycle};
pub(crate) use idempotency::check_idempotency_key;
pub use listeners::{ListenEvent, Listener, Wants};
pub(crate) use presence::PresenceEvent;
pub use presence::{Change, Present};
pub(crate) use sessions::{AttachRefusal, Conn, Ending, LiveSession};

/// Handle to the registry. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    shared: Arc<Shared>,
}

/// The registry's data, by room.
#[derive(Debug)]
struct Shared {
    secrets: Secrets,
    limits: Limits,
    /// [`sessions`]: credentials known here, by digest.
    sessions: DashMap<Digest, sessions::Session>,
    /// [`users`]: the credentials known here, by the user they were issued for.
    users: users::UserIndex,
    /// [`presence`]: per channel (whose namespace keeps it), the connections present.
    presence: DashMap<Channel, presence::Room>,
    /// [`presence`]: channels (with occupancy) whose last member left, by when `vacated` is due.
    vacating: parking_lot::Mutex<std::collections::HashMap<Channel, u64>>,
    /// [`ends`]: final ends decided away from sockets' tasks, for the lifecycle task.
    ends: ends::Ends,
    /// [`sessions`]: sockets live on this node; changed only by `Registry::set_state`.
    live: AtomicUsize,
    /// [`sessions`]: a number for each socket, unique on this node.
    next_serial: AtomicU64,
    /// [`channels`]: each channel's subscribers, listeners and history (see `channels` for how
    /// long an entry stays).
    channels: DashMap<Channel, channels::Slot>,
    /// [`channels`]: bytes queued in all outboxes, for publishers that pace themselves.
    backlog: Arc<Backlog>,
    /// [`history`]: the node's budget of retained push bytes (`history-memory`).
    budget: Arc<history::Budget>,
    /// [`listeners`]: a number for each stream.
    next_listener: AtomicU64,
    /// [`idempotency`]: `Push` keys taken within the window, by channel and key.
    idempotency: DashMap<(Channel, Box<str>), idempotency::Record>,
    /// [`idempotency`]: the records in the order they expire.
    expiries: idempotency::Expiries,
    /// [`cluster`], cluster mode only: the channels whose local interest changed, and those to
    /// bring up to date from Redis.
    cluster: Option<cluster::ClusterHooks>,
    /// [`anchors`]: event streams' saved positions (one node).
    anchors: anchors::Anchors,
    /// The node's metrics.
    metrics: Arc<Metrics>,
}

/// Counts of what the registry holds, for `Stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live sockets.
    pub connections: u64,
    /// Channels with at least one live subscriber.
    pub channels: u64,
    /// Subscriptions of every known digest, live or not.
    pub subscriptions: u64,
    /// Known digests: issued, live, in grace, or dead and not yet expired.
    pub sessions: u64,
    /// Live subscribers per channel, when asked for.
    pub per_channel: Vec<(String, u64)>,
}

impl Registry {
    /// An empty registry signing ids with `secrets`, counting into the node's `metrics`.
    pub(crate) fn new(secrets: Secrets, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self::build(secrets, limits, metrics, None)
    }

    fn build(
        secrets: Secrets,
        limits: Limits,
        metrics: Arc<Metrics>,
        cluster: Option<cluster::ClusterHooks>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                secrets,
                sessions: DashMap::new(),
                users: DashMap::new(),
                ends: Default::default(),
                anchors: Default::default(),
                presence: DashMap::new(),
                vacating: Default::default(),
                live: AtomicUsize::new(0),
                next_serial: AtomicU64::new(1),
                channels: DashMap::new(),
                backlog: Arc::default(),
                budget: Arc::new(history::Budget::new(limits.history_memory)),
                next_listener: AtomicU64::new(1),
                idempotency: DashMap::new(),
                expiries: Default::default(),
                cluster,
                metrics,
                limits,
            }),
        }
    }

    /// The limits this registry enforces.
    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The node's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Checks a payload against the JSON rules and the size limit.
    pub(crate) fn check_payload(&self, json: &str) -> Result<Json, Error> {
        let max = self.shared.limits.max_push_size;
        if json.len() > max {
            return Err(Error::PayloadTooLarge {
                len: json.len(),
                max,
            });
        }
        Ok(Json::parse(json)?)
    }

    /// Counts of what the registry holds; per channel when `per_channel`, limited to `only`
    /// when that is not empty.
    pub(crate) fn stats(&self, per_channel: bool, only: &[Channel]) -> Stats {
        let shared = &self.shared;
        let subscriptions = shared
            .sessions
            .iter()
            .map(|s| s.channels.len() as u64)
            .sum();
        let (channels, per_channel) = self.channel_counts(per_channel, only);
        Stats {
            connections: shared.live.load(std::sync::atomic::Ordering::Relaxed) as u64,
            channels,
            subscriptions,
            sessions: shared.sessions.len() as u64,
            per_channel,
        }
    }
}

/// Checks the number of channels in one call.
pub(crate) fn check_channel_count(channels: &[Channel]) -> Result<(), Error> {
    match channels.len() {
        0 => Err(Error::NoChannels),
        n if n > MAX_CHANNELS_PER_CALL => Err(Error::TooManyChannels {
            max: MAX_CHANNELS_PER_CALL,
        }),
        _ => Ok(()),
    }
}
