//! The listeners room: `Listen` streams. A stream's entries sit in the channel states of the
//! channels it listens to (so a push reaches listeners in offset order, under the same lock as
//! subscribers), and every push is copied to them without waiting; a stream that falls
//! [`LISTEN_BUFFER`] events behind is dropped (and told so), never waited on.
//!
//! A stream may start from positions (`since`): per channel it first gets every push after the
//! position, then the live ones, with no gap and no duplicate, or, when the channel's history
//! does not reach back that far, one gap event with the current position and then live pushes.

use std::{collections::HashMap, sync::atomic::Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    channels::{missed, ChannelState, Fetched},
    check_channel_count, now_ms, Registry,
};
use crate::{
    error::Error,
    protocol::{Channel, Frame, Position},
};

/// Events a `Listen` stream may fall behind before it is dropped.
pub const LISTEN_BUFFER: usize = 4096;

/// Most events one `Listen` call replays in all, so a replay never overflows the stream.
const LISTEN_REPLAY_MAX: usize = LISTEN_BUFFER / 2;

#[derive(Debug)]
pub(super) struct ListenerEntry {
    id: u64,
    tx: mpsc::Sender<ListenEvent>,
    /// Cancelled when the listener falls behind on any of its channels.
    overflowed: CancellationToken,
}

/// One event of a `Listen` stream: a push, or a gap.
#[derive(Debug, Clone)]
pub struct ListenEvent {
    /// The channel.
    pub channel: Channel,
    /// For a push, its epoch and offset; for a gap, the position the stream continues from
    /// (the next push has `offset + 1`).
    pub position: Position,
    /// The push frame and where its payload starts; `None` for a gap.
    push: Option<(Frame, u32)>,
}

impl ListenEvent {
    /// The pushed JSON text; `None` for a gap.
    pub fn json(&self) -> Option<&str> {
        let (frame, at) = self.push.as_ref()?;
        let frame: &str = frame;
        frame.get(*at as usize..frame.len().saturating_sub(1))
    }

    /// Whether this event says pushes before its position could not be delivered.
    pub fn is_gap(&self) -> bool {
        self.push.is_none()
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
    /// from `fetched`, read from Redis in cluster mode), or one gap event.
    pub fn listen(
        &self,
        channels: &[Channel],
        since: &HashMap<Channel, Position>,
        fetched: &HashMap<Channel, Fetched>,
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
                push: None,
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
                push: Some((entry.frame, entry.payload_at)),
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
        let push = push.map(|(frame, at)| (frame.clone(), at as u32));
        listeners.retain(|entry| {
            let event = ListenEvent {
                channel: channel.clone(),
                position: position.clone(),
                push: push.clone(),
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
