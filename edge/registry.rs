//! The registry: every digest this node knows, the channels each is subscribed to, and the
//! live sockets each channel delivers to. [`Registry`] is the one handle the rest of the gateway
//! (the handshake, connection tasks, the control plane) uses.
//!
//! # Model
//! Subscriptions belong to a digest, not to a socket: they are kept in the digest's [`Session`]
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
//! channel's subscriber list. A push takes only the last two, briefly, and never waits on a
//! socket: it calls [`Outbox::push`]. No lock is held across an await.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dashmap::{mapref::entry::Entry, DashMap};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Limits,
    credentials::{Credentials, Digest, Secrets, Verified},
    error::{Close, Error},
    fanout::{Backlog, Enqueued, Outbox},
    metrics::Metrics,
    protocol::{push_frame, Channel, Frame, Json},
};

/// Most channels in one `Subscribe`, `Unsubscribe` or `Push` call.
pub const MAX_CHANNELS_PER_CALL: usize = 1024;

/// The current Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Handle to the registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    secrets: Secrets,
    limits: Limits,
    sessions: DashMap<Digest, Session>,
    /// Live subscribers per channel. An entry exists only while it has a subscriber.
    channels: DashMap<Channel, Arc<Subscribers>>,
    /// `Listen` streams per channel. An entry exists only while it has a listener.
    listeners: DashMap<Channel, Vec<ListenerEntry>>,
    next_listener: AtomicU64,
    next_serial: AtomicU64,
    /// Bytes queued in all outboxes, for publishers that pace themselves.
    backlog: Arc<Backlog>,
    live: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Cluster mode only: pushes accepted here, handed to the bus in the order they were
    /// delivered locally, and the channels whose local interest changed.
    cluster: Option<ClusterHooks>,
}

/// What the registry tells the cluster bus (set once, at construction).
#[derive(Debug)]
struct ClusterHooks {
    /// Pushes to relay to other nodes. Bounded: while the bus cannot keep up (Redis down or
    /// slow) pushes still reach local sockets, and the relay drops with a count.
    relay: mpsc::Sender<Relay>,
    /// Channels that gained their first or lost their last local subscriber or listener.
    changed: Mutex<HashSet<Channel>>,
    /// Wakes the bus when `changed` gains an entry.
    changed_notify: tokio::sync::Notify,
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

/// The live sockets subscribed to one channel, by connection serial.
type Subscribers = Mutex<HashMap<u64, Arc<Conn>>>;

#[derive(Debug)]
struct Session {
    expires_at_ms: u64,
    state: State,
    channels: HashSet<Channel>,
}

#[derive(Debug)]
enum State {
    Issued,
    Live(Arc<Conn>),
    Grace { until_ms: u64 },
    Dead,
}

/// The registry's side of a live socket: what publishers need to reach it.
#[derive(Debug)]
pub struct Conn {
    serial: u64,
    digest: Digest,
    /// When the client last sent anything (pongs included), in [`monotonic_ms`]; the node's
    /// heartbeat ([`Registry::heartbeat`]) closes sockets silent past the idle timeout. One
    /// shared clock instead of a timer per socket: an idle socket holds no timer at all.
    last_seen_ms: AtomicU64,
    /// Bounded outbound queue; closed by whoever ends the socket, drained by its writer.
    pub outbox: Outbox,
}

/// Milliseconds on a monotonic clock that starts with the process.
pub fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

impl Conn {
    fn new(serial: u64, digest: Digest, backlog: &Arc<Backlog>) -> Self {
        Self {
            serial,
            digest,
            last_seen_ms: AtomicU64::new(monotonic_ms()),
            outbox: Outbox::new(backlog.clone()),
        }
    }

    /// Records that the client sent something just now.
    pub fn touch(&self) {
        self.last_seen_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// How long the client has been silent, as of `now_ms` ([`monotonic_ms`]).
    pub fn silent_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed)))
    }

    /// The socket's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// A number unique to this socket on this node.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// Events a `Listen` stream may fall behind before it is dropped.
pub const LISTEN_BUFFER: usize = 4096;

#[derive(Debug)]
struct ListenerEntry {
    id: u64,
    tx: mpsc::Sender<ListenEvent>,
    /// Cancelled when the listener falls behind on any of its channels.
    overflowed: CancellationToken,
}

/// One push, as a `Listen` stream sees it.
#[derive(Debug, Clone)]
pub struct ListenEvent {
    /// The channel it was pushed to.
    pub channel: Channel,
    /// The pushed JSON text, shared by every listener.
    pub json: Arc<str>,
}

/// A `Listen` stream's end of the registry; stops listening when dropped.
#[derive(Debug)]
pub struct Listener {
    id: u64,
    rx: mpsc::Receiver<ListenEvent>,
    overflowed: CancellationToken,
    channels: Vec<Channel>,
    registry: Registry,
}

impl Listener {
    /// The next push; `None` once the listener was dropped for falling behind (see
    /// [`Listener::overflowed`]) after the events it had.
    pub async fn recv(&mut self) -> Option<ListenEvent> {
        tokio::select! {
            biased;
            event = self.rx.recv() => event,
            _ = self.overflowed.cancelled() => None,
        }
    }

    /// Whether the registry dropped this listener for falling behind.
    pub fn overflowed(&self) -> bool {
        self.overflowed.is_cancelled()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.registry.unlisten(self.id, &self.channels);
    }
}

/// Why a handshake's credentials were refused after their signature checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The id was not used before its expiry.
    #[error("credentials expired")]
    Expired,
    /// A socket with this id is connected.
    #[error("connection id already in use")]
    AlreadyLive,
    /// The id's connection ended (clean close, `Disconnect`, or grace over).
    #[error("connection id already used")]
    Ended,
}

/// How a socket ended, as far as its credentials are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed cleanly, or the application ended it: the id is dead.
    Final,
    /// Dropped without a close: the id may reconnect within the grace period.
    Resumable,
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
    /// An empty registry signing ids with `secrets`.
    pub fn new(secrets: Secrets, limits: Limits) -> Self {
        Self::build(secrets, limits, None)
    }

    /// A registry for cluster mode, and the feed its bus consumes.
    pub fn clustered(secrets: Secrets, limits: Limits) -> (Self, ClusterFeed) {
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let hooks = ClusterHooks {
            relay: tx,
            changed: Mutex::new(HashSet::new()),
            changed_notify: tokio::sync::Notify::new(),
        };
        (
            Self::build(secrets, limits, Some(hooks)),
            ClusterFeed { relay: rx },
        )
    }

    fn build(secrets: Secrets, limits: Limits, cluster: Option<ClusterHooks>) -> Self {
        Self {
            shared: Arc::new(Shared {
                secrets,
                limits,
                sessions: DashMap::new(),
                channels: DashMap::new(),
                listeners: DashMap::new(),
                next_listener: AtomicU64::new(1),
                next_serial: AtomicU64::new(1),
                backlog: Arc::default(),
                live: AtomicUsize::new(0),
                metrics: Arc::new(Metrics::new()),
                cluster,
            }),
        }
    }

    /// Whether this registry belongs to a cluster.
    pub fn is_clustered(&self) -> bool {
        self.shared.cluster.is_some()
    }

    fn interest_changed(&self, channel: &Channel) {
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

    /// Mints credentials without recording them here (cluster mode keeps them in Redis).
    pub fn mint(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        let limits = &self.shared.limits;
        let ttl = ttl.unwrap_or(limits.credential_ttl);
        if ttl > limits.max_credential_ttl || ttl.is_zero() {
            return Err(Error::BadTtl {
                max_ms: limits.max_credential_ttl.as_millis() as u64,
            });
        }
        Ok(self
            .shared
            .secrets
            .issue(now_ms().saturating_add(ttl.as_millis() as u64)))
    }

    /// Binds a socket whose credentials the cluster already accepted, with the subscriptions
    /// the cluster holds for its digest; replaces whatever this node remembered of it.
    pub fn attach_accepted(&self, verified: &Verified, channels: Vec<Channel>) -> Arc<Conn> {
        let conn = Arc::new(Conn::new(
            self.shared.next_serial.fetch_add(1, Ordering::Relaxed),
            verified.digest,
            &self.shared.backlog,
        ));
        let mut session = self
            .shared
            .sessions
            .entry(verified.digest)
            .or_insert_with(|| Session {
                expires_at_ms: verified.expires_at_ms,
                state: State::Issued,
                channels: HashSet::new(),
            });
        if let State::Live(old) = &session.state {
            // The cluster says the old socket is gone; make it so here too.
            let old = old.clone();
            for channel in &session.channels {
                self.remove_subscriber(channel, old.serial);
            }
            old.outbox.close(Close::GoingAway);
            self.shared.live.fetch_sub(1, Ordering::Relaxed);
        }
        session.channels = channels.into_iter().collect();
        for channel in &session.channels {
            self.add_subscriber(channel, &conn);
        }
        session.state = State::Live(conn.clone());
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        conn
    }

    /// The limits this registry enforces.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The node's metrics, shared.
    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Checks a presented id and key (signature and key only; expiry is [`Registry::attach`]'s).
    pub fn verify(
        &self,
        connection_id: &str,
        socket_key: &str,
    ) -> Result<Verified, crate::credentials::CredentialError> {
        self.shared.secrets.verify(connection_id, socket_key)
    }

    /// Mints credentials valid for `ttl` (the configured default when `None`) and records
    /// them here.
    pub fn issue(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        let creds = self.mint(ttl)?;
        self.shared.sessions.insert(
            creds.digest,
            Session {
                expires_at_ms: creds.expires_at_ms,
                state: State::Issued,
                channels: HashSet::new(),
            },
        );
        Ok(creds)
    }

    /// Binds a new socket to verified credentials: refuses an expired, live or ended id, and
    /// hands the socket every channel its digest is subscribed to.
    pub fn attach(&self, verified: &Verified) -> Result<Arc<Conn>, Refusal> {
        let now = now_ms();
        let shared = &self.shared;
        let conn = || {
            Arc::new(Conn::new(
                shared.next_serial.fetch_add(1, Ordering::Relaxed),
                verified.digest,
                &shared.backlog,
            ))
        };
        let conn = match shared.sessions.entry(verified.digest) {
            Entry::Vacant(vacant) => {
                // Signed by this deployment but unknown here (issued before a restart, or by
                // another node): the signature is the authority.
                if now >= verified.expires_at_ms {
                    return Err(Refusal::Expired);
                }
                let conn = conn();
                vacant.insert(Session {
                    expires_at_ms: verified.expires_at_ms,
                    state: State::Live(conn.clone()),
                    channels: HashSet::new(),
                });
                conn
            }
            Entry::Occupied(mut occupied) => {
                let session = occupied.get_mut();
                match session.state {
                    State::Issued if now >= session.expires_at_ms => return Err(Refusal::Expired),
                    State::Issued => {}
                    State::Grace { until_ms } if now < until_ms => {}
                    State::Grace { .. } => {
                        session.state = State::Dead;
                        session.channels = HashSet::new();
                        return Err(Refusal::Ended);
                    }
                    State::Live(_) => return Err(Refusal::AlreadyLive),
                    State::Dead => return Err(Refusal::Ended),
                }
                let conn = conn();
                for channel in &session.channels {
                    self.add_subscriber(channel, &conn);
                }
                session.state = State::Live(conn.clone());
                conn
            }
        };
        shared.live.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }

    /// Unbinds a socket that ended. Does nothing if the session already moved on (for example
    /// the application disconnected it).
    pub fn detach(&self, conn: &Conn, ending: Ending) {
        let Some(mut session) = self.shared.sessions.get_mut(&conn.digest) else {
            return;
        };
        match &session.state {
            State::Live(live) if live.serial == conn.serial => {}
            _ => return,
        }
        let grace = self.shared.limits.reconnect_grace;
        session.state = match ending {
            Ending::Resumable if !grace.is_zero() => State::Grace {
                until_ms: now_ms().saturating_add(grace.as_millis() as u64),
            },
            _ => State::Dead,
        };
        for channel in &session.channels {
            self.remove_subscriber(channel, conn.serial);
        }
        if matches!(session.state, State::Dead) {
            session.channels = HashSet::new();
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subscribes `digest` to `channels`. Returns whether a socket is live for it on this node.
    pub fn subscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        check_channel_count(channels)?;
        let mut session = self.known_session(digest)?;
        let live = match &session.state {
            State::Live(conn) => Some(conn.clone()),
            _ => None,
        };
        for channel in channels {
            if session.channels.insert(channel.clone()) {
                if let Some(conn) = &live {
                    self.add_subscriber(channel, conn);
                }
            }
        }
        Ok(live.is_some())
    }

    /// Unsubscribes `digest` from `channels`; a live socket stops receiving at once.
    pub fn unsubscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        check_channel_count(channels)?;
        let mut session = self.known_session(digest)?;
        let live = match &session.state {
            State::Live(conn) => Some(conn.serial),
            _ => None,
        };
        for channel in channels {
            if session.channels.remove(channel) {
                if let Some(serial) = live {
                    self.remove_subscriber(channel, serial);
                }
            }
        }
        Ok(live.is_some())
    }

    fn known_session(
        &self,
        digest: &Digest,
    ) -> Result<dashmap::mapref::one::RefMut<'_, Digest, Session>, Error> {
        match self.shared.sessions.get_mut(digest) {
            Some(session) if !matches!(session.state, State::Dead) => Ok(session),
            _ => Err(Error::UnknownDigest),
        }
    }

    fn add_subscriber(&self, channel: &Channel, conn: &Arc<Conn>) {
        let mut created = false;
        let entry = self
            .shared
            .channels
            .entry(channel.clone())
            .or_insert_with(|| {
                created = true;
                Arc::default()
            });
        entry.lock().insert(conn.serial, conn.clone());
        drop(entry);
        if created {
            self.interest_changed(channel);
        }
    }

    fn remove_subscriber(&self, channel: &Channel, serial: u64) {
        if let Some(subscribers) = self.shared.channels.get(channel) {
            subscribers.lock().remove(&serial);
        }
        let removed = self
            .shared
            .channels
            .remove_if(channel, |_, subscribers| subscribers.lock().is_empty());
        if removed.is_some() {
            self.interest_changed(channel);
        }
    }

    /// Checks a push's JSON and delivers it to every channel's sockets and listeners. Returns
    /// the number of sockets it was queued to.
    pub fn push(&self, channels: &[Channel], json: &str) -> Result<u64, Error> {
        check_channel_count(channels)?;
        let json = self.check_payload(json)?;
        let mut shared_json: Option<Arc<str>> = None;
        let mut queued = 0;
        for channel in channels {
            let frame = push_frame(channel, &json);
            let payload_at = frame.len() - json.as_str().len() - 1;
            queued += self.deliver(channel, &frame, Some(payload_at));
            if !self.shared.listeners.is_empty() {
                let text = shared_json.get_or_insert_with(|| json.as_str().into());
                self.notify_listeners(channel, text);
            }
        }
        Ok(queued)
    }

    /// Starts a `Listen` stream on `channels`: every push to them is copied to the returned
    /// [`Listener`], which stops (and reports it) if it falls [`LISTEN_BUFFER`] events behind.
    pub fn listen(&self, channels: &[Channel]) -> Result<Listener, Error> {
        check_channel_count(channels)?;
        let id = self.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LISTEN_BUFFER);
        let overflowed = CancellationToken::new();
        for channel in channels {
            let mut entries = self.shared.listeners.entry(channel.clone()).or_default();
            let first = entries.is_empty();
            entries.push(ListenerEntry {
                id,
                tx: tx.clone(),
                overflowed: overflowed.clone(),
            });
            drop(entries);
            if first {
                self.interest_changed(channel);
            }
        }
        Ok(Listener {
            id,
            rx,
            overflowed,
            channels: channels.to_vec(),
            registry: self.clone(),
        })
    }

    fn notify_listeners(&self, channel: &Channel, json: &Arc<str>) {
        let Some(mut entries) = self.shared.listeners.get_mut(channel) else {
            return;
        };
        entries.retain(|entry| {
            let event = ListenEvent {
                channel: channel.clone(),
                json: json.clone(),
            };
            match entry.tx.try_send(event) {
                // Dropped on another channel: prune here too.
                Ok(()) if entry.overflowed.is_cancelled() => false,
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(%channel, "dropping a Listen stream that fell behind");
                    entry.overflowed.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        let empty = entries.is_empty();
        drop(entries);
        if empty {
            self.shared
                .listeners
                .remove_if(channel, |_, e| e.is_empty());
        }
    }

    fn unlisten(&self, id: u64, channels: &[Channel]) {
        for channel in channels {
            if let Some(mut entries) = self.shared.listeners.get_mut(channel) {
                entries.retain(|e| e.id != id);
            }
            self.shared
                .listeners
                .remove_if(channel, |_, e| e.is_empty());
        }
    }

    /// Checks a payload against the JSON rules and the size limit.
    pub fn check_payload(&self, json: &str) -> Result<Json, Error> {
        let max = self.shared.limits.max_push_bytes;
        if json.len() > max {
            return Err(Error::PayloadTooLarge {
                len: json.len(),
                max,
            });
        }
        Ok(Json::parse(json)?)
    }

    /// Delivers a push another node accepted: the frame as it was encoded there, to local
    /// subscribers and listeners.
    pub fn deliver_relayed(&self, relay: &Relay) -> u64 {
        let queued = self.deliver(&relay.channel, &relay.frame, None);
        if !self.shared.listeners.is_empty() {
            let payload = &relay.frame[relay.payload_at..relay.frame.len() - 1];
            self.notify_listeners(&relay.channel, &Arc::from(payload));
        }
        queued
    }

    /// Queues an encoded frame to every live subscriber of `channel`, in one critical section
    /// per channel, so all subscribers see pushes to a channel in the same order; in cluster
    /// mode a push accepted here (`relay_payload_at` set) is handed to the bus in that same
    /// order. Never waits.
    fn deliver(&self, channel: &Channel, frame: &Frame, relay_payload_at: Option<usize>) -> u64 {
        let metrics = &self.shared.metrics;
        metrics.pushes.inc();
        let relay = |payload_at| {
            let Some(hooks) = &self.shared.cluster else {
                return;
            };
            let relay = Relay {
                channel: channel.clone(),
                frame: frame.clone(),
                payload_at,
            };
            if hooks.relay.try_send(relay).is_err() {
                metrics.relay_dropped.inc();
                tracing::warn!(%channel, "cross-node push dropped: the cluster bus is not keeping up");
            }
        };
        let Some(subscribers) = self.shared.channels.get(channel).map(|s| s.clone()) else {
            if let Some(at) = relay_payload_at {
                relay(at);
            }
            return 0;
        };
        let limit = self.shared.limits.outbound_queue_bytes;
        let (mut queued, mut full, mut dropped) = (0u64, 0u64, 0u64);
        let subscribers = subscribers.lock();
        for conn in subscribers.values() {
            match conn.outbox.push_uncounted(frame, limit) {
                Enqueued::Queued => queued += 1,
                Enqueued::Full => full += 1,
                Enqueued::Closed => dropped += 1,
            }
        }
        self.shared.backlog.add(queued as usize * frame.len());
        if let Some(at) = relay_payload_at {
            relay(at);
        }
        drop(subscribers);
        metrics.deliveries.inc_by(queued);
        metrics.bytes_out.inc_by(queued * frame.len() as u64);
        if full > 0 {
            metrics.slow_closes.inc_by(full);
            tracing::debug!(%channel, sockets = full, "closing sockets as too slow: outbound queue full");
        }
        metrics.dropped.inc_by(dropped);
        queued
    }

    /// Sends one message to `digest`'s socket, framed as a push on `channel`. Returns whether
    /// it was queued to a live socket on this node.
    pub fn send(&self, digest: &Digest, channel: &Channel, json: &str) -> Result<bool, Error> {
        let json = self.check_payload(json)?;
        let conn = {
            let session = self.known_session(digest)?;
            match &session.state {
                State::Live(conn) => conn.clone(),
                _ => return Ok(false),
            }
        };
        Ok(self.queue_one(&conn, &push_frame(channel, &json)))
    }

    /// Queues `frame` to one socket, counting the outcome. Never waits.
    fn queue_one(&self, conn: &Conn, frame: &Frame) -> bool {
        let metrics = &self.shared.metrics;
        match conn
            .outbox
            .push(frame, self.shared.limits.outbound_queue_bytes)
        {
            Enqueued::Queued => {
                metrics.deliveries.inc();
                metrics.bytes_out.inc_by(frame.len() as u64);
                true
            }
            Enqueued::Full => {
                metrics.slow_closes.inc();
                false
            }
            Enqueued::Closed => {
                metrics.dropped.inc();
                false
            }
        }
    }

    /// Queues an encoded frame to `digest`'s socket if it is live here (a cluster `Send`, from
    /// this node or relayed from another). Returns whether it was queued.
    pub fn send_frame(&self, digest: &Digest, frame: &Frame) -> bool {
        let conn = match self.shared.sessions.get(digest).as_deref() {
            Some(Session {
                state: State::Live(conn),
                ..
            }) => conn.clone(),
            _ => return false,
        };
        self.queue_one(&conn, frame)
    }

    /// The sockets live on this node: digest, first-use deadline, channels.
    pub fn live_sessions(&self) -> Vec<(Digest, u64, Vec<Channel>)> {
        self.shared
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Live(_)))
            .map(|s| {
                (
                    *s.key(),
                    s.expires_at_ms,
                    s.channels.iter().cloned().collect(),
                )
            })
            .collect()
    }

    /// The digests of the sockets live on this node.
    pub fn live_digests(&self) -> Vec<Digest> {
        self.shared
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Live(_)))
            .map(|s| *s.key())
            .collect()
    }

    /// Ends `digest`'s credentials and closes its socket, if live here, with `close`.
    /// Returns whether a live socket was closed.
    pub fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        let mut session = self.known_session(digest)?;
        let closed = match std::mem::replace(&mut session.state, State::Dead) {
            State::Live(conn) => {
                for channel in &session.channels {
                    self.remove_subscriber(channel, conn.serial);
                }
                conn.outbox.close(close);
                self.shared.live.fetch_sub(1, Ordering::Relaxed);
                true
            }
            _ => false,
        };
        session.channels = HashSet::new();
        Ok(closed)
    }

    /// Counts of what the registry holds; per channel when `per_channel`, limited to `only`
    /// when that is not empty.
    pub fn stats(&self, per_channel: bool, only: &[Channel]) -> Stats {
        let shared = &self.shared;
        let subscriptions = shared
            .sessions
            .iter()
            .map(|s| s.channels.len() as u64)
            .sum();
        let count = |subscribers: &Subscribers| subscribers.lock().len() as u64;
        let per_channel = if !per_channel {
            Vec::new()
        } else if only.is_empty() {
            shared
                .channels
                .iter()
                .map(|e| (e.key().to_string(), count(e.value())))
                .collect()
        } else {
            only.iter()
                .map(|c| {
                    let n = shared.channels.get(c).map_or(0, |s| count(&s));
                    (c.to_string(), n)
                })
                .collect()
        };
        Stats {
            connections: shared.live.load(Ordering::Relaxed) as u64,
            channels: shared.channels.len() as u64,
            subscriptions,
            sessions: shared.sessions.len() as u64,
            per_channel,
        }
    }

    /// Forgets sessions whose time is up: never-used ids past expiry, grace periods that ran
    /// out, and dead ids past expiry (a dead id past expiry is refused as expired anyway).
    pub fn sweep(&self) {
        let now = now_ms();
        self.shared
            .sessions
            .retain(|_, session| match session.state {
                State::Live(_) => true,
                State::Issued | State::Dead => now < session.expires_at_ms,
                State::Grace { until_ms } if now >= until_ms => {
                    session.state = State::Dead;
                    session.channels = HashSet::new();
                    now < session.expires_at_ms
                }
                State::Grace { .. } => true,
            });
    }

    /// One beat of the node's heartbeat, for the live sockets whose serial is `slice` modulo
    /// `slices` (a beat covers one slice, so pings spread over the ping interval instead of
    /// going out in one burst): a socket silent for longer than `idle_timeout` is closed as
    /// idle, every other one gets a ping, which a live client answers with a pong.
    pub fn heartbeat(&self, slice: u64, slices: u64, idle_timeout: Duration) {
        let now = monotonic_ms();
        for session in self.shared.sessions.iter() {
            if let State::Live(conn) = &session.state {
                if conn.serial % slices != slice {
                    continue;
                }
                if conn.silent_for(now) > idle_timeout {
                    conn.outbox.close(Close::IdleTimeout);
                } else {
                    conn.outbox.ping();
                }
            }
        }
    }

    /// Bytes queued in every outbox of this node.
    pub fn backlog(&self) -> &Backlog {
        &self.shared.backlog
    }

    /// Closes every live socket's outbox with `close` (used when draining).
    pub fn close_all(&self, close: &Close) {
        for session in self.shared.sessions.iter() {
            if let State::Live(conn) = &session.state {
                conn.outbox.close(close.clone());
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::Batch;

    fn registry() -> Registry {
        Registry::new(
            Secrets::new(b"registry test secret 0123456789", None).unwrap(),
            Limits::default(),
        )
    }

    fn ch(name: &str) -> Channel {
        Channel::new(name).unwrap()
    }

    fn connect(r: &Registry, c: &Credentials) -> Arc<Conn> {
        let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
        r.attach(&v).unwrap()
    }

    async fn frames(conn: &Conn) -> Vec<String> {
        match conn.outbox.next().await {
            Batch::Frames(f) => f.iter().map(|f| f.to_string()).collect(),
            Batch::Close(c) => panic!("closed: {c:?}"),
        }
    }

    #[tokio::test]
    async fn subscriptions_made_before_connect_apply_on_connect() {
        let r = registry();
        let c = r.issue(None).unwrap();
        assert!(!r.subscribe(&c.digest, &[ch("a"), ch("b")]).unwrap());
        let conn = connect(&r, &c);
        assert_eq!(r.push(&[ch("b")], "1").unwrap(), 1);
        assert_eq!(frames(&conn).await, [r#"{"channel":"b","payload":1}"#]);
    }

    #[tokio::test]
    async fn fan_out_counts_every_subscriber_in_the_backlog_until_written() {
        let r = registry();
        let conns: Vec<_> = (0..3)
            .map(|_| {
                let c = r.issue(None).unwrap();
                r.subscribe(&c.digest, &[ch("a")]).unwrap();
                connect(&r, &c)
            })
            .collect();
        assert_eq!(r.push(&[ch("a")], "1").unwrap(), 3);
        let len = r#"{"channel":"a","payload":1}"#.len();
        assert_eq!(r.backlog().bytes(), 3 * len);
        for conn in &conns {
            frames(conn).await; // taken and settled, as a writer does
        }
        assert_eq!(r.backlog().bytes(), 0);
    }

    #[test]
    fn ids_are_single_use() {
        let r = registry();
        let c = r.issue(None).unwrap();
        let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
        let conn = r.attach(&v).unwrap();
        assert_eq!(r.attach(&v).unwrap_err(), Refusal::AlreadyLive);
        r.detach(&conn, Ending::Final);
        assert_eq!(r.attach(&v).unwrap_err(), Refusal::Ended);
        assert!(matches!(
            r.subscribe(&c.digest, &[ch("a")]),
            Err(Error::UnknownDigest)
        ));
    }

    #[test]
    fn resumable_drop_keeps_subscriptions_within_grace() {
        let r = registry();
        let c = r.issue(None).unwrap();
        r.subscribe(&c.digest, &[ch("a")]).unwrap();
        let conn = connect(&r, &c);
        r.detach(&conn, Ending::Resumable);
        assert_eq!(r.stats(false, &[]).connections, 0);
        assert_eq!(r.push(&[ch("a")], "1").unwrap(), 0);
        let again = connect(&r, &c);
        assert_eq!(r.push(&[ch("a")], "1").unwrap(), 1);
        // The old socket's late detach must not end the new one.
        r.detach(&conn, Ending::Final);
        assert_eq!(r.stats(false, &[]).connections, 1);
        drop(again);
    }

    #[test]
    fn disconnect_ends_credentials_and_closes_outbox() {
        let r = registry();
        let c = r.issue(None).unwrap();
        r.subscribe(&c.digest, &[ch("a")]).unwrap();
        let conn = connect(&r, &c);
        let close = Close::Application {
            code: 4001,
            reason: "bye".into(),
        };
        assert!(r.disconnect(&c.digest, close).unwrap());
        assert!(conn.outbox.is_closed());
        assert_eq!(r.push(&[ch("a")], "1").unwrap(), 0);
        r.detach(&conn, Ending::Resumable);
        let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
        assert_eq!(r.attach(&v).unwrap_err(), Refusal::Ended);
        let s = r.stats(true, &[]);
        assert_eq!((s.connections, s.channels, s.subscriptions), (0, 0, 0));
    }

    #[test]
    fn expired_credentials_are_refused() {
        let r = registry();
        let secrets = Secrets::new(b"registry test secret 0123456789", None).unwrap();
        let c = secrets.issue(now_ms() - 1);
        let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
        assert_eq!(r.attach(&v).unwrap_err(), Refusal::Expired);
    }

    #[test]
    fn invalid_calls_are_refused() {
        let r = registry();
        let c = r.issue(None).unwrap();
        assert!(matches!(
            r.subscribe(&c.digest, &[]),
            Err(Error::NoChannels)
        ));
        assert!(matches!(r.push(&[ch("a")], "{"), Err(Error::BadJson(_))));
        let other: Digest = "00".repeat(32).parse().unwrap();
        assert!(matches!(
            r.subscribe(&other, &[ch("a")]),
            Err(Error::UnknownDigest)
        ));
        assert!(matches!(
            r.issue(Some(Duration::ZERO)),
            Err(Error::BadTtl { .. })
        ));
    }

    #[test]
    fn stats_count_what_is_held() {
        let r = registry();
        let a = r.issue(None).unwrap();
        let b = r.issue(None).unwrap();
        r.subscribe(&a.digest, &[ch("x"), ch("y")]).unwrap();
        r.subscribe(&b.digest, &[ch("x")]).unwrap();
        let _conn = connect(&r, &a);
        let s = r.stats(true, &[ch("x"), ch("z")]);
        assert_eq!(s.connections, 1);
        assert_eq!(s.channels, 2);
        assert_eq!(s.subscriptions, 3);
        assert_eq!(s.sessions, 2);
        assert_eq!(s.per_channel, [("x".to_string(), 1), ("z".to_string(), 0)]);
    }
}
