//! What this node asked of other nodes and waits to hear back about: a subscription change's
//! acknowledgement, and a forwarded client message's reply. Each request has a number (its
//! `rid`) the answer carries; the pub/sub task hands answers in here, the asker waits on what
//! it got back, and an entry leaves when its asker stops waiting, however it stops.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::handoff::HandlerReply;

/// What the origin of a forwarded message hears back.
#[derive(Debug)]
pub(super) enum ForwardEvent {
    Reply(HandlerReply),
    Unhandled,
}

/// The requests in flight (see the module's documentation).
#[derive(Debug)]
pub(super) struct Requests {
    next: AtomicU64,
    /// Subscription changes sent to a socket's node, waiting for its acknowledgement.
    acks: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Forwarded client messages waiting for a reply (or for word that none comes).
    forwards: Mutex<HashMap<u64, mpsc::Sender<ForwardEvent>>>,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            acks: Mutex::default(),
            forwards: Mutex::default(),
        }
    }
}

impl Requests {
    /// A new acknowledgement to wait for: its number, and where it arrives.
    pub(super) fn expect_ack(&self) -> (u64, oneshot::Receiver<()>) {
        let rid = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.lock().insert(rid, tx);
        (rid, rx)
    }

    /// The acknowledgement `rid` will not be waited for any more.
    pub(super) fn forget_ack(&self, rid: u64) {
        self.acks.lock().remove(&rid);
    }

    /// Acknowledgement `rid` arrived.
    pub(super) fn ack(&self, rid: u64) {
        if let Some(tx) = self.acks.lock().remove(&rid) {
            let _ = tx.send(());
        }
    }

    /// A new forward to `copies` groups: its number, and where their answers arrive.
    pub(super) fn expect_forward(&self, copies: usize) -> (u64, mpsc::Receiver<ForwardEvent>) {
        let rid = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(copies + 1);
        self.forwards.lock().insert(rid, tx);
        (rid, rx)
    }

    /// Forward `rid` will not be waited for any more.
    pub(super) fn forget_forward(&self, rid: u64) {
        self.forwards.lock().remove(&rid);
    }

    /// An answer to forward `rid` arrived (dropped when nobody waits for it any more).
    pub(super) fn answer(&self, rid: u64, event: ForwardEvent) {
        if let Some(tx) = self.forwards.lock().get(&rid) {
            let _ = tx.try_send(event);
        }
    }
}
