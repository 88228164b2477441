//! The listeners room: `Listen` streams per channel. Every push to a channel is copied to its
//! streams without waiting; a stream that falls [`LISTEN_BUFFER`] events behind is dropped
//! (and told so), never waited on.

use std::sync::{atomic::Ordering, Arc};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{check_channel_count, Registry};
use crate::{error::Error, protocol::Channel};

/// Events a `Listen` stream may fall behind before it is dropped.
pub const LISTEN_BUFFER: usize = 4096;

#[derive(Debug)]
pub(super) struct ListenerEntry {
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

impl Registry {
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

    pub(super) fn notify_listeners(&self, channel: &Channel, json: &Arc<str>) {
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
}
