//! The listeners room: `Listen` streams. A stream's entries sit in the channel states of the
//! channels it listens to (so a push reaches listeners in offset order, under the same lock as
//! subscribers), and every push is copied to them without waiting; a stream that falls
//! [`LISTEN_BUFFER`] events behind is dropped (and told so), never waited on.
//!
//! A stream may start from positions (`since`): per channel it first gets every push after the
//! position, then the live ones, with no gap and no duplicate, or, when the channel's history
//! does not reach back that far, one gap event with the current position and then live pushes.
//!
//! A stream may also ask for the presence events of its channels ([`Wants`]): joins and leaves
//! (per connection or per user) and occupancy changes, which come between its pushes.

use crate::clock::now_ms;
use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    channels::{missed, ChannelState, Fetched},
    check_channel_count, PresenceEvent, Registry,
};
use crate::{
    config::JoinLeave,
    domain::{Channel, Position},
    error::Error,
    protocol::Frame,
};

/// Events a `Listen` stream may fall behind before it is dropped.
pub(crate) const LISTEN_BUFFER: usize = 4096;

/// Most events one `Listen` call replays in all, so a replay never overflows the stream.
const LISTEN_REPLAY_MAX: usize = LISTEN_BUFFER / 2;

#[derive(Debug)]
pub(super) struct ListenerEntry {
    id: u64,
    tx: mpsc::Sender<ListenEvent>,
    /// Cancelled when the listener falls behind on any of its channels.
    overflowed: CancellationToken,
    wants: Wants,
}

/// The presence events a `Listen` stream asks for, beyond pushes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    /// Joins and leaves: none, every connection's, or each user's first and last.
    pub join_leave: JoinLeave,
    /// `occupied` and `vacated`.
    pub occupancy: bool,
}

/// One event of a `Listen` stream: a push, a gap, or a presence change.
#[derive(Debug, Clone)]
pub struct ListenEvent {
    /// The channel.
    pub channel: Channel,
    /// For a push, its epoch and offset; for a gap, the position the stream continues from
    /// (the next push has `offset + 1`); for a presence event, the channel's position then.
    pub position: Position,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The push frame and where its payload starts.
    Push(Frame, u32),
    Gap,
    Presence(Arc<PresenceEvent>),
}

impl ListenEvent {
    /// The pushed JSON text; `None` for a gap or a presence event.
    pub fn json(&self) -> Option<&str> {
        let Kind::Push(frame, at) = &self.kind else {
            return None;
        };
        let frame: &str = frame;
        frame.get(*at as usize..frame.len().saturating_sub(1))
    }

    /// Whether this event says pushes before its position could not be delivered.
    pub fn is_gap(&self) -> bool {
        matches!(self.kind, Kind::Gap)
    }

    /// The presence change this event tells, if it is one.
    pub fn presence(&self) -> Option<&PresenceEvent> {
        match &self.kind {
            Kind::Presence(event) => Some(event),
            _ => None,
        }
    }
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
    /// The next event; `None` once the listener was dropped for falling behind (see
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

impl Registry {
    /// Starts a `Listen` stream on `channels`: every push to them is copied to the returned
    /// [`Listener`], which stops (and reports it) if it falls [`LISTEN_BUFFER`] events behind.
    /// For a channel in `since`, the pushes after that position come first (from history, or
    /// from `fetched`, read from Redis in cluster mode), or one gap event. Presence events
    /// come as `wants` asks (the caller checked that the channels keep presence).
    pub(crate) fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        fetched: &HashMap<Channel, Fetched>,
        wants: Wants,
    ) -> Result<Listener, Error> {
        check_channel_count(channels)?;
        let id = self.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LISTEN_BUFFER);
        let overflowed = CancellationToken::new();
        let mut budget = LISTEN_REPLAY_MAX;
        for channel in channels {
            let mut first = false;
            self.with_channel(channel, |state| {
                first = state.unused();
                if let Some(since) = since.get(channel) {
                    self.replay_to_listener(
                        channel,
                        state,
                        since,
                        fetched.get(channel),
                        &tx,
                        &mut budget,
                    );
                }
                state.listeners.push(ListenerEntry {
                    id,
                    tx: tx.clone(),
                    overflowed: overflowed.clone(),
                    wants,
                });
            });
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

    /// Queues the pushes after `since` to a starting listener, or a gap event.
    fn replay_to_listener(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        since: &Position,
        fetched: Option<&Fetched>,
        tx: &mpsc::Sender<ListenEvent>,
        budget: &mut usize,
    ) {
        let Some(position) = state.history.position() else {
            return;
        };
        let max = self.shared.limits.recovery_max.min(*budget);
        let Some(events) = missed(channel, &mut state.history, since, fetched, max, now_ms())
        else {
            let _ = tx.try_send(ListenEvent {
                channel: channel.clone(),
                position,
                kind: Kind::Gap,
            });
            return;
        };
        *budget -= events.len().min(*budget);
        for entry in events {
            let _ = tx.try_send(ListenEvent {
                channel: channel.clone(),
                position: Position {
                    epoch: position.epoch.clone(),
                    offset: entry.offset,
                },
                kind: Kind::Push(entry.frame, entry.payload_at),
            });
        }
    }

    /// Copies a push (`Some(frame, payload offset)`) or a gap (`None`) at `position` to the
    /// channel's listeners, dropping any that fell behind.
    pub(super) fn notify_listeners(
        &self,
        channel: &Channel,
        listeners: &mut Vec<ListenerEntry>,
        position: &Position,
        push: Option<(&Frame, usize)>,
    ) {
        let kind = match push {
            Some((frame, at)) => Kind::Push(frame.clone(), at as u32),
            None => Kind::Gap,
        };
        send_each(channel, listeners, position, &kind, |_| true);
    }

    /// Copies a presence event to the channel's listeners that asked for it.
    pub(super) fn notify_presence(
        &self,
        channel: &Channel,
        listeners: &mut Vec<ListenerEntry>,
        position: Option<Position>,
        event: &Arc<PresenceEvent>,
    ) {
        let position = position.unwrap_or_else(|| Position {
            epoch: "".into(),
            offset: 0,
        });
        let kind = Kind::Presence(event.clone());
        send_each(channel, listeners, &position, &kind, |wants| {
            event.wanted(wants.join_leave, wants.occupancy)
        });
    }

    fn unlisten(&self, id: u64, channels: &[Channel]) {
        for channel in channels {
            let unused = self
                .with_existing(channel, |state| {
                    state.listeners.retain(|e| e.id != id);
                    state.unused()
                })
                .unwrap_or(false);
            if unused {
                self.release(channel);
            }
        }
    }
}

/// Queues one event (`kind` at `position`) to each listener `wants` accepts, dropping any that
/// fell behind.
fn send_each(
    channel: &Channel,
    listeners: &mut Vec<ListenerEntry>,
    position: &Position,
    kind: &Kind,
    wants: impl Fn(&Wants) -> bool,
) {
    listeners.retain(|entry| {
        if !wants(&entry.wants) {
            return !entry.overflowed.is_cancelled();
        }
        let event = ListenEvent {
            channel: channel.clone(),
            position: position.clone(),
            kind: kind.clone(),
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
}
