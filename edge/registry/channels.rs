//! The channels room: the channel index (one [`ChannelState`] per channel: its live
//! subscribers, its `Listen` streams and its [`History`]) and delivery.
//!
//! A push is given its offset, encoded once, queued to every subscriber and listener and kept in
//! the channel's history in one critical section of that channel, without waiting on any socket;
//! so every subscriber sees a channel's pushes in offset order, and a socket that joins (or
//! recovers) sees each push exactly once, either in its replay or live.
//!
//! On a single node the registry gives offsets itself ([`Registry::push`]). In cluster mode Redis
//! gives them, and pushes reach the registry from the bus ([`Registry::offer`]), possibly out of
//! order: they are delivered in order, and a hole is filled from Redis or signalled
//! ([`Registry::caught_up`]).
//!
//! Lifetime: single node, a channel's state stays while it has subscribers or listeners, then
//! until its retained pushes expired and `position-ttl` passed since it was last used. Cluster,
//! only while this node has a subscriber or listener on it (Redis keeps the rest).

use crate::clock::now_ms;
use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use parking_lot::Mutex;

use super::{
    check_channel_count,
    history::{Early, Entry, History, Sync, Unreachable},
    listeners::ListenerEntry,
    Conn, Registry,
};
use crate::{
    credentials::Digest,
    domain::{Channel, Epoch, Json, Position},
    error::Error,
    fanout::{Backlog, Enqueued},
    protocol::{gap_frame, position_frame, push_frame, DeltaBase, Frame, Joined},
};

/// One channel on this node.
#[derive(Debug)]
pub(super) struct ChannelState {
    /// Live sockets subscribed here, by connection serial.
    pub(super) subscribers: HashMap<u64, Arc<Conn>>,
    /// `Listen` streams on this channel.
    pub(super) listeners: Vec<ListenerEntry>,
    /// The channel's position and retained pushes.
    pub(super) history: History,
    /// Set (under this lock) when the state left the index; whoever holds it looks again.
    gone: bool,
    /// Unix ms of the last push, or of the last subscriber or listener leaving.
    touched_ms: u64,
    /// The last few deliveries' `(offset, sockets queued)`: in cluster mode the accepting
    /// node's call may find its push already delivered from pub/sub, and still answers how
    /// many sockets it reached here.
    recent: [(u64, u64); RECENT],
    /// A delta channel's last push here (`delta = true` in its namespace): the base of the next
    /// push's delta, with its epoch and offset.
    delta_base: Option<Box<(Epoch, u64, DeltaBase)>>,
}

/// Deliveries remembered per channel (see `ChannelState::recent`).
const RECENT: usize = 4;

impl ChannelState {
    /// Whether nothing on this node uses the channel.
    pub(super) fn unused(&self) -> bool {
        self.subscribers.is_empty() && self.listeners.is_empty()
    }
}

/// How long (ms) a cluster node keeps a channel prepared for a socket or listener that did not
/// join it.
pub(super) const PREPARED_TTL_MS: u64 = 30_000;

/// A channel's state, shared by the index and whoever works on it.
pub(super) type Slot = Arc<Mutex<ChannelState>>;

/// What the node read from Redis for a channel (cluster mode): its position, and the pushes
/// after the offset it asked from, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fetched {
    /// The channel's position when read.
    pub position: Position,
    /// Pushes after the asked offset: `(offset, pushed at Unix ms, payload JSON)`.
    pub entries: Vec<(u64, u64, Arc<str>)>,
    /// Whether `entries` reach the position (false when cut at the count asked for).
    pub complete: bool,
}

/// What a push did on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Sockets it was queued to here, summed over its channels.
    pub queued: u64,
    /// Each channel's position after the push, in the order the channels were given (inline
    /// for the usual one channel: no allocation per push).
    pub positions: smallvec::SmallVec<[(Channel, Position); 1]>,
}

/// How a socket joins a channel.
#[derive(Debug, Clone, Copy)]
pub(super) enum Join<'a> {
    /// At connect: the position goes into the socket's `connected` frame; with `since`, the
    /// pushes missed after it are replayed first (from history, or from `fetched`).
    Connect {
        since: Option<&'a Position>,
        fetched: Option<&'a Fetched>,
        /// Without `since`: the client's position is lost (a gap), not absent.
        lost: bool,
    },
    /// A live `Subscribe`: a socket that asked for positions gets a position frame.
    Live,
}

impl Registry {
    fn new_state(&self, channel: &Channel) -> ChannelState {
        let shared = &self.shared;
        ChannelState {
            subscribers: HashMap::new(),
            listeners: Vec::new(),
            history: History::new(
                shared.limits.history_policy(channel),
                shared.budget.clone(),
                self.is_clustered(),
            ),
            gone: false,
            touched_ms: now_ms(),
            recent: [(0, 0); RECENT],
            delta_base: None,
        }
    }

    /// The channel's state, created when missing.
    fn slot(&self, channel: &Channel) -> Slot {
        if let Some(slot) = self.shared.channels.get(channel) {
            return slot.clone();
        }
        self.shared
            .channels
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(Mutex::new(self.new_state(channel))))
            .clone()
    }

    /// Runs `f` on the channel's state (created when missing), under its lock.
    pub(super) fn with_channel<R>(
        &self,
        channel: &Channel,
        mut f: impl FnMut(&mut ChannelState) -> R,
    ) -> R {
        loop {
            let slot = self.slot(channel);
            let mut state = slot.lock();
            if state.gone {
                continue;
            }
            return f(&mut state);
        }
    }

    /// Runs `f` on the channel's state if there is one.
    pub(super) fn with_existing<R>(
        &self,
        channel: &Channel,
        f: impl FnOnce(&mut ChannelState) -> R,
    ) -> Option<R> {
        let slot = self.shared.channels.get(channel).map(|s| s.clone())?;
        let mut state = slot.lock();
        if state.gone {
            return None;
        }
        Some(f(&mut state))
    }

    /// After a subscriber or listener left: in cluster mode an unused channel leaves the index at
    /// once (and the bus unsubscribes); on a single node it stays for its history and position
    /// until swept.
    pub(super) fn release(&self, channel: &Channel) {
        let now = now_ms();
        let clustered = self.is_clustered();
        let removed = self.shared.channels.remove_if(channel, |_, slot| {
            let mut state = slot.lock();
            if !state.unused() {
                return false;
            }
            state.touched_ms = now;
            if clustered {
                state.gone = true;
            }
            clustered
        });
        if removed.is_some() {
            self.interest_changed(channel);
        }
    }

    /// Adds a socket to a channel (see [`Join`]). Returns what the `connected` frame says of the
    /// channel, when its position is known.
    pub(super) fn join(
        &self,
        channel: &Channel,
        conn: &Arc<Conn>,
        how: Join<'_>,
    ) -> Option<Joined> {
        let mut first = false;
        let joined = self.with_channel(channel, |state| {
            first = state.unused();
            let joined = match how {
                Join::Live => {
                    if conn.positions {
                        if let Some(position) = state.history.position() {
                            self.queue_one(conn, &position_frame(channel, &position));
                        }
                    }
                    None
                }
                Join::Connect {
                    since: None, lost, ..
                } => state.history.position().map(|position| {
                    if lost {
                        self.shared
                            .metrics
                            .recoveries
                            .with_label_values(&["gap"])
                            .inc();
                    }
                    Joined {
                        channel: channel.clone(),
                        position,
                        recovered: lost.then_some(false),
                    }
                }),
                Join::Connect {
                    since: Some(since),
                    fetched,
                    ..
                } => self.recover(channel, state, conn, since, fetched),
            };
            state.subscribers.insert(conn.serial, conn.clone());
            joined
        });
        if first {
            self.interest_changed(channel);
        }
        joined
    }

    /// Replays what `conn` missed on `channel` since `since`, all of it or none: from the
    /// channel's history, or from `fetched` (read from Redis) followed by history.
    fn recover(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        conn: &Conn,
        since: &Position,
        fetched: Option<&Fetched>,
    ) -> Option<Joined> {
        let position = state.history.position()?;
        let limits = &self.shared.limits;
        let now = now_ms();
        // Replays may fill at most half the socket's queue, so live pushes still fit behind.
        let room = (limits.outbound_queue / 2).saturating_sub(conn.outbox.bytes());
        let metrics = &self.shared.metrics;
        let frames = missed(
            channel,
            &mut state.history,
            since,
            fetched,
            limits.recovery_max,
            now,
        );
        let frames =
            frames.filter(|entries| entries.iter().map(|e| e.frame.len()).sum::<usize>() <= room);
        let Some(frames) = frames else {
            metrics.recoveries.with_label_values(&["gap"]).inc();
            return Some(Joined {
                channel: channel.clone(),
                position,
                recovered: Some(false),
            });
        };
        for entry in &frames {
            self.queue_one(conn, &entry.frame);
        }
        metrics.recoveries.with_label_values(&["recovered"]).inc();
        metrics.replayed.inc_by(frames.len() as u64);
        Some(Joined {
            channel: channel.clone(),
            position: since.clone(),
            recovered: Some(true),
        })
    }

    pub(super) fn remove_subscriber(&self, channel: &Channel, serial: u64) {
        let unused = self
            .with_existing(channel, |state| {
                state.subscribers.remove(&serial);
                state.unused()
            })
            .unwrap_or(false);
        if unused {
            self.release(channel);
        }
    }

    /// Pushes checked JSON to every channel (single node): each push gets the channel's next
    /// offset and is delivered to its sockets and listeners and kept in its history. With an
    /// idempotency `key`, a channel that already took a push with that key within the window
    /// takes nothing and reports the first push's position.
    pub(crate) fn push(
        &self,
        channels: &[Channel],
        json: &Json,
        key: Option<&str>,
    ) -> Result<Pushed, Error> {
        check_channel_count(channels)?;
        let mut pushed = Pushed::default();
        for channel in channels {
            let outcome = self.with_channel(channel, |state| {
                if let Some(key) = key {
                    if let Some(first) = self.idempotent(channel, key) {
                        return Ok::<_, Error>((first, 0));
                    }
                }
                let offset = state.history.last + 1;
                let queued = self.deliver(channel, state, offset, json.as_str());
                let position = state
                    .history
                    .position()
                    .expect("a single node's channel has an epoch");
                if let Some(key) = key {
                    self.remember(channel, key, &position)?;
                }
                Ok((position, queued))
            });
            let (position, queued) = outcome?;
            pushed.queued += queued;
            pushed.positions.push((channel.clone(), position));
        }
        Ok(pushed)
    }

    /// Delivers the push at `offset` (the channel's `last + 1`): encodes it once, queues the
    /// frame to every subscriber and listener, keeps it, and moves the channel on. Returns the
    /// sockets it was queued to. Never waits.
    fn deliver(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        offset: u64,
        payload: &str,
    ) -> u64 {
        debug_assert_eq!(offset, state.history.last + 1);
        let (mut frame, payload_at) = push_frame(channel, offset, payload);
        if self.shared.limits.namespace(channel).delta {
            frame = self.with_delta(channel, state, offset, frame, payload_at);
        }
        let metrics = &self.shared.metrics;
        metrics.pushes.inc();
        let limit = self.shared.limits.outbound_queue;
        let (mut queued, mut full, mut dropped) = (0u64, 0u64, 0u64);
        for conn in state.subscribers.values() {
            match conn.outbox.push_uncounted(&frame, limit) {
                Enqueued::Queued => queued += 1,
                Enqueued::Full => full += 1,
                Enqueued::Closed => dropped += 1,
            }
        }
        self.shared.backlog.add(queued as usize * frame.len());
        state.history.last = offset;
        state.recent[offset as usize % RECENT] = (offset, queued);
        let now = now_ms();
        state.touched_ms = now;
        if !state.listeners.is_empty() {
            let position = state
                .history
                .position()
                .expect("delivering: the epoch is known");
            self.notify_listeners(
                channel,
                &mut state.listeners,
                &position,
                Some((&frame, payload_at)),
            );
        }
        state.history.keep(
            Entry {
                offset,
                at_ms: now,
                frame: frame.clone(),
                payload_at: payload_at as u32,
            },
            now,
        );
        metrics.deliveries.inc_by(queued);
        metrics.bytes_out.inc_by(queued * frame.len() as u64);
        if full > 0 {
            metrics.slow_closes.inc_by(full);
            tracing::debug!(%channel, sockets = full, "closing sockets as too slow: outbound queue full");
        }
        metrics.dropped.inc_by(dropped);
        queued
    }

    /// `frame` (the push at `offset`) as a delta candidate against the channel's previous push
    /// here, when that one is at `offset - 1` of the same epoch; it becomes the next one's base.
    fn with_delta(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        offset: u64,
        frame: Frame,
        payload_at: usize,
    ) -> Frame {
        let serial = self.shared.next_serial.fetch_add(1, Ordering::Relaxed);
        let epoch = state.history.epoch.clone().unwrap_or_default();
        let base = state
            .delta_base
            .take()
            .filter(|b| b.0 == epoch && b.1 + 1 == offset)
            .map(|b| b.2);
        let frame = frame.with_delta(channel, offset, payload_at, serial, base);
        state.delta_base = Some(Box::new((epoch, offset, frame.as_base(serial, payload_at))));
        frame
    }

    /// Tells the channel's sockets (those that asked for positions) and listeners that the
    /// pushes before `position` could not all be delivered, and moves the channel there.
    fn gap(&self, channel: &Channel, state: &mut ChannelState, position: Position) {
        state.history.reset(&position);
        let frame = gap_frame(channel, &position);
        for conn in state.subscribers.values().filter(|c| c.positions) {
            self.queue_one(conn, &frame);
        }
        if !state.listeners.is_empty() {
            self.notify_listeners(channel, &mut state.listeners, &position, None);
        }
        self.shared.metrics.gaps.inc();
        tracing::warn!(%channel, epoch = %position.epoch, offset = position.offset,
            "pushes to this channel were lost in the cluster bus; subscribers were told (recovered:false)");
    }

    /// Takes a push Redis gave `offset` in `epoch` (cluster mode): from the pub/sub stream
    /// (`from_stream`), or from this node's own push call. Delivers it when it is next in turn,
    /// with whatever waited behind it; holds it when it is early; drops a duplicate. Returns the
    /// sockets it was queued to here, if it was delivered now.
    pub(crate) fn offer(
        &self,
        channel: &Channel,
        epoch: &Epoch,
        offset: u64,
        payload: &str,
        from_stream: bool,
    ) -> Option<u64> {
        let (queued, catch_up) = self.with_existing(channel, |state| {
            let history = &mut state.history;
            let known = history.epoch.as_ref() == Some(epoch);
            if known && offset <= history.last {
                // A duplicate: our own push, delivered from pub/sub before its call returned
                // (the count is for that call), or the echo of one delivered already.
                let (at, queued) = state.recent[offset as usize % RECENT];
                return ((!from_stream && at == offset).then_some(queued), false);
            }
            let in_turn = known && history.sync == Sync::Synced && offset == history.last + 1;
            if !in_turn {
                let held = history.hold(
                    offset,
                    Early {
                        epoch: epoch.clone(),
                        payload: payload.into(),
                    },
                );
                if !held {
                    // Too far behind for too long: say so, and read the position again.
                    let position = history.position().unwrap_or(Position {
                        epoch: epoch.clone(),
                        offset: offset - 1,
                    });
                    self.gap(channel, state, position);
                    state.history.sync = Sync::Unsynced;
                    return (None, true);
                }
                // The stream is in order: a push from it that skips ahead, or from another
                // epoch, means something was lost; a push from our own call may just be early.
                let lost = from_stream && history.sync == Sync::Synced;
                return (None, lost);
            }
            let queued = self.deliver(channel, state, offset, payload);
            let catch_up = self.drain_pending(channel, state);
            (Some(queued), catch_up)
        })?;
        if catch_up {
            self.want_catch_up(channel);
        }
        queued
    }

    /// Delivers the pushes that waited for their turn; returns whether some still wait behind
    /// a hole.
    fn drain_pending(&self, channel: &Channel, state: &mut ChannelState) -> bool {
        while let Some((offset, pending)) = state.history.next_pending() {
            self.deliver(channel, state, offset, &pending.payload);
        }
        !state.history.pending.is_empty()
    }

    /// What the bus should read from Redis to bring `channel` up to date (cluster mode):
    /// `Some(None)`, its position only (never read yet); `Some(Some(n))`, the pushes after `n`;
    /// `None`, nothing (no longer used here).
    pub(crate) fn catch_up_from(&self, channel: &Channel) -> Option<Option<u64>> {
        self.with_existing(channel, |state| {
            state.history.epoch.as_ref().map(|_| state.history.last)
        })
    }

    /// The position of `channel` this node has delivered up to, if it knows one.
    pub(crate) fn position_of(&self, channel: &Channel) -> Option<Position> {
        self.with_existing(channel, |state| state.history.position())
            .flatten()
    }

    /// Applies what the bus read from Redis for `channel` (asked with [`catch_up_from`]'s
    /// answer `after`): a first position, pushes this node missed (delivered in order), or, when
    /// Redis no longer has them or the epoch changed, a gap.
    ///
    /// [`catch_up_from`]: Registry::catch_up_from
    pub(crate) fn caught_up(&self, channel: &Channel, after: Option<u64>, read: &Fetched) {
        let again = self.with_existing(channel, |state| {
            let history = &mut state.history;
            match history.epoch.clone() {
                None => {
                    // The first position: every socket that asked for positions hears it.
                    history.epoch = Some(read.position.epoch.clone());
                    history.last = read.position.offset;
                    let frame = position_frame(channel, &read.position);
                    for conn in state.subscribers.values().filter(|c| c.positions) {
                        self.queue_one(conn, &frame);
                    }
                }
                Some(epoch) if epoch != read.position.epoch => {
                    self.gap(channel, state, read.position.clone());
                }
                Some(_) if after.is_none() => {}
                Some(epoch) => {
                    for (offset, _, payload) in &read.entries {
                        let next = state.history.last + 1;
                        if *offset > next {
                            // Redis no longer has what came before this one: say so, then go on
                            // from here, so no more is lost than was.
                            let position = Position {
                                epoch: epoch.clone(),
                                offset: offset - 1,
                            };
                            self.gap(channel, state, position);
                        }
                        if *offset == state.history.last + 1 {
                            self.deliver(channel, state, *offset, payload);
                        }
                    }
                    if state.history.last < read.position.offset {
                        if !read.complete
                            && read
                                .entries
                                .last()
                                .is_some_and(|e| e.0 == state.history.last)
                        {
                            return true; // cut at the count asked for: read on
                        }
                        self.gap(channel, state, read.position.clone());
                    }
                }
            }
            state.history.sync = Sync::Synced;
            self.drain_pending(channel, state)
        });
        if again == Some(true) {
            self.want_catch_up(channel);
        }
    }

    /// Marks `channels` as not in step with Redis (the pub/sub connection was lost, so pushes
    /// may have been missed; it is subscribed to them again). Returns those this node holds,
    /// for the bus to catch up.
    pub(crate) fn resync(&self, channels: &[Channel]) -> Vec<Channel> {
        channels
            .iter()
            .filter(|channel| {
                self.with_existing(channel, |state| state.history.sync = Sync::Unsynced)
                    .is_some()
            })
            .cloned()
            .collect()
    }

    /// Makes sure `channels` have a state here (cluster mode: before the bus subscribes to them
    /// and reads their positions, so what it reads has somewhere to go). One nobody joins is
    /// swept after [`PREPARED_TTL_MS`].
    pub(crate) fn prepare(&self, channels: &[Channel]) {
        for channel in channels {
            self.with_channel(channel, |_| ());
        }
    }

    /// Whether this node's history of `channel` holds every push after `since` (so a recovery
    /// needs nothing from Redis).
    pub(crate) fn covers(&self, channel: &Channel, since: &Position) -> bool {
        let max = self.shared.limits.recovery_max;
        self.with_existing(channel, |state| {
            state.history.after(since, max, now_ms()).is_ok()
        })
        .unwrap_or(false)
    }

    /// The position of `channel` on this node (single node: created when missing).
    #[cfg(test)]
    pub(crate) fn position(&self, channel: &Channel) -> Option<Position> {
        if self.is_clustered() {
            return self
                .with_existing(channel, |state| state.history.position())
                .flatten();
        }
        self.with_channel(channel, |state| state.history.position())
    }

    /// Pages through `channel`'s retained pushes (single node): after `from` oldest first, or
    /// before it newest first when `reverse`; at most `limit`. With `epoch`, refuses a channel
    /// whose epoch changed. Returns the channel's position and the pushes.
    pub(crate) fn history(
        &self,
        channel: &Channel,
        epoch: Option<&str>,
        from: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Position, Vec<(u64, String)>), Error> {
        self.with_channel(channel, |state| {
            let position = state.history.position().ok_or(Error::ShuttingDown)?;
            if epoch.is_some_and(|e| *e != *position.epoch) {
                return Err(Error::EpochChanged {
                    position: position.clone(),
                });
            }
            let page = if limit == 0 {
                Vec::new()
            } else {
                state.history.page(from, limit, reverse, now_ms())
            };
            Ok((position, page))
        })
    }

    /// Forgets what expired: pushes past their time to live; on a single node, channels nobody
    /// uses whose position is older than `position-ttl`; in cluster mode, channels prepared for
    /// a socket or listener that never came.
    pub(crate) fn sweep_channels(&self) {
        let now = now_ms();
        let clustered = self.is_clustered();
        let keep = if clustered {
            PREPARED_TTL_MS
        } else {
            self.shared.limits.position_ttl.as_millis() as u64
        };
        let mut removed = Vec::new();
        self.shared.channels.retain(|channel, slot| {
            let mut state = slot.lock();
            state.history.expire(now);
            let stale = state.unused()
                && (clustered || state.history.is_idle())
                && state.touched_ms.saturating_add(keep) <= now;
            if stale {
                state.gone = true;
                removed.push(channel.clone());
            }
            !stale
        });
        for channel in &removed {
            self.interest_changed(channel);
        }
        self.sweep_idempotency(now);
    }

    /// Queues an encoded frame (a `Send`) to `digest`'s socket. Returns whether it was queued
    /// to a live socket on this node; an unknown or ended digest is an error.
    pub(crate) fn send(&self, digest: &Digest, frame: &Frame) -> Result<bool, Error> {
        let conn = self.live_conn(digest)?;
        Ok(conn.is_some_and(|conn| self.queue_one(&conn, frame)))
    }

    /// Queues `frame` to one socket, counting the outcome. Never waits.
    pub(super) fn queue_one(&self, conn: &Conn, frame: &Frame) -> bool {
        let metrics = &self.shared.metrics;
        match conn.outbox.push(frame, self.shared.limits.outbound_queue) {
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
    pub(crate) fn send_frame(&self, digest: &Digest, frame: &Frame) -> bool {
        match self.live_conn(digest) {
            Ok(Some(conn)) => self.queue_one(&conn, frame),
            _ => false,
        }
    }

    /// Bytes queued in every outbox of this node.
    pub(crate) fn backlog(&self) -> &Backlog {
        &self.shared.backlog
    }

    /// Bytes of pushes this node retains for recovery, all channels together.
    pub(crate) fn history_bytes(&self) -> usize {
        self.shared.budget.bytes()
    }

    /// Channels with at least one live subscriber, and subscribers of each (only `only` when
    /// not empty; all when `per_channel`).
    pub(super) fn channel_counts(
        &self,
        per_channel: bool,
        only: &[Channel],
    ) -> (u64, Vec<(String, u64)>) {
        let mut with_subscribers = 0;
        let mut counts = Vec::new();
        for slot in self.shared.channels.iter() {
            let n = slot.value().lock().subscribers.len() as u64;
            if n > 0 {
                with_subscribers += 1;
                if per_channel && only.is_empty() {
                    counts.push((slot.key().to_string(), n));
                }
            }
        }
        if per_channel && !only.is_empty() {
            counts = only
                .iter()
                .map(|c| {
                    let n = self
                        .with_existing(c, |state| state.subscribers.len() as u64)
                        .unwrap_or(0);
                    (c.to_string(), n)
                })
                .collect();
        }
        (with_subscribers, counts)
    }
}

/// Every push after `since` up to the channel's last (at most `max`, none expired): from the
/// channel's history, or, when that was trimmed, from pushes read from Redis (`fetched`) followed
/// by history. `None` when they cannot all be had: a catch-up is all or nothing.
pub(super) fn missed(
    channel: &Channel,
    history: &mut History,
    since: &Position,
    fetched: Option<&Fetched>,
    max: usize,
    now_ms: u64,
) -> Option<Vec<Entry>> {
    match history.after(since, max, now_ms) {
        Ok(entries) => return Some(entries.cloned().collect()),
        Err(Unreachable::Trimmed) => {}
        Err(_) => return None,
    }
    let fetched = fetched?;
    if history.epoch.as_ref() != Some(&fetched.position.epoch)
        || since.epoch != fetched.position.epoch
    {
        return None;
    }
    let last = history.last;
    let ttl = history.policy.ttl.as_millis() as u64;
    let mut entries = Vec::new();
    let mut next = since.offset + 1;
    for (offset, at_ms, payload) in &fetched.entries {
        if next > last {
            break;
        }
        if *offset != next || at_ms.saturating_add(ttl) <= now_ms {
            return None;
        }
        let (frame, payload_at) = push_frame(channel, *offset, payload);
        entries.push(Entry {
            offset: *offset,
            at_ms: *at_ms,
            frame,
            payload_at: payload_at as u32,
        });
        next += 1;
    }
    if next <= last {
        // The rest must be in this node's history.
        let rest = Position {
            epoch: since.epoch.clone(),
            offset: next - 1,
        };
        entries.extend(history.after(&rest, max, now_ms).ok()?.cloned());
    }
    Some(entries)
}
