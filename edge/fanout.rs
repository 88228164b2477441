//! The publish path's per-socket end: a bounded outbound queue ([`Outbox`]) that publishers
//! fill without waiting and the socket's writer drains in batches.
//!
//! Invariants:
//! * [`Outbox::push`] never waits. A push that would take the queue past its byte limit closes
//!   the socket as [`Close::TooSlow`] and drops what it held; other sockets never notice.
//! * Frames are [`Frame`]s: a push is encoded once and every queue holds a clone of the same
//!   reference-counted bytes.
//! * The writer takes the whole queue at once ([`Outbox::next`]), so frames that piled up
//!   while it was writing go out in one write.
//! * Once closed, an outbox takes no more frames; the first close reason wins.

use std::{collections::VecDeque, mem};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{error::Close, protocol::Frame};

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued for the writer.
    Queued,
    /// The queue was full: the socket is now closing as too slow.
    Full,
    /// The socket is already closing; the frame was dropped.
    Closed,
}

/// A socket's bounded outbound queue.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Short critical sections only (push, take); never held across an await.
    state: Mutex<State>,
    /// Wakes the writer when frames arrive or the outbox closes. `notify_one` stores a permit
    /// when the writer is not waiting, so no wake-up is lost.
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    close: Option<Close>,
}

/// What the writer gets from [`Outbox::next`].
#[derive(Debug)]
pub enum Batch {
    /// Every frame queued so far, oldest first.
    Frames(VecDeque<Frame>),
    /// The outbox is closed and empty: close the socket with this reason.
    Close(Close),
}

impl Outbox {
    /// Queues `frame` unless that would take the queue past `limit` bytes. Never waits.
    pub fn push(&self, frame: &Frame, limit: usize) -> Enqueued {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Enqueued::Closed;
        }
        let len = frame.len();
        if state.bytes + len > limit {
            state.close = Some(Close::TooSlow);
            state.frames = VecDeque::new();
            state.bytes = 0;
            drop(state);
            self.ready.notify_one();
            return Enqueued::Full;
        }
        state.frames.push_back(frame.clone());
        state.bytes += len;
        let first = state.frames.len() == 1;
        drop(state);
        if first {
            // The writer drains the whole queue per wake-up; later frames ride along.
            self.ready.notify_one();
        }
        Enqueued::Queued
    }

    /// Closes the outbox with `reason`, unless it is already closed. Frames already queued are
    /// still handed out before the close (so a message sent just before a disconnect arrives).
    /// Returns whether this call closed it.
    pub fn close(&self, reason: Close) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(reason);
        drop(state);
        self.ready.notify_one();
        true
    }

    /// Whether the outbox is closed.
    pub fn is_closed(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// Waits for frames or a close. Frames come first; the close reason comes once the queue
    /// is empty.
    pub async fn next(&self) -> Batch {
        loop {
            {
                let mut state = self.state.lock();
                if !state.frames.is_empty() {
                    state.bytes = 0;
                    return Batch::Frames(mem::take(&mut state.frames));
                }
                if let Some(close) = &state.close {
                    return Batch::Close(close.clone());
                }
            }
            self.ready.notified().await;
        }
    }

    /// Waits until the outbox is closed; used to abandon a write to a peer that stopped
    /// reading.
    pub async fn closed(&self) -> Close {
        loop {
            if let Some(close) = &self.state.lock().close {
                return close.clone();
            }
            // This may consume a wake-up meant for `next`; harmless, since `next` looks at the
            // queue before it waits.
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Frame {
        Frame::from(s)
    }

    #[tokio::test]
    async fn frames_come_out_in_order_in_one_batch() {
        let o = Outbox::default();
        for s in ["a", "b", "c"] {
            assert_eq!(o.push(&frame(s), 100), Enqueued::Queued);
        }
        match o.next().await {
            Batch::Frames(f) => assert_eq!(f.iter().map(|f| f.as_str()).collect::<String>(), "abc"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn full_queue_closes_as_too_slow_and_drops_frames() {
        let o = Outbox::default();
        assert_eq!(o.push(&frame("12345"), 8), Enqueued::Queued);
        assert_eq!(o.push(&frame("1234"), 8), Enqueued::Full);
        assert_eq!(o.push(&frame("1"), 8), Enqueued::Closed);
        assert!(matches!(o.next().await, Batch::Close(Close::TooSlow)));
    }

    #[tokio::test]
    async fn queued_frames_go_out_before_a_close() {
        let o = Outbox::default();
        o.push(&frame("bye"), 100);
        assert!(o.close(Close::GoingAway));
        assert!(!o.close(Close::TooSlow));
        assert!(matches!(o.next().await, Batch::Frames(_)));
        assert!(matches!(o.next().await, Batch::Close(Close::GoingAway)));
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_on_push() {
        let o = std::sync::Arc::new(Outbox::default());
        let writer = tokio::spawn({
            let o = o.clone();
            async move { matches!(o.next().await, Batch::Frames(_)) }
        });
        tokio::task::yield_now().await;
        o.push(&frame("x"), 100);
        assert!(writer.await.unwrap());
    }
}
