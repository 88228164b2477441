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

use std::{
    collections::VecDeque,
    future::poll_fn,
    mem,
    sync::{
        atomic::{AtomicIsize, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::Notify;

use std::collections::HashMap;

use bytes::Bytes;

use crate::{domain::Channel, error::Close, protocol::Frame};

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Queued for the writer.
    Queued,
    /// The queue was full: the socket is now closing as too slow.
    Full,
    /// The socket is already closing; the frame was dropped.
    Closed,
}

/// Bytes waiting in all of a node's outboxes, or in a writer's hands: queued and not yet
/// handed to the kernel. Slow readers keep it up, so publishers
/// that can wait ([`Backlog::pace`], used by `PushStream`) hold off while it is high, so a
/// flood from one publisher is delivered (and coalesced) instead of overflowing every
/// subscriber's queue. Unary pushes never wait.
///
/// Fan-out adds a push's bytes once for all its subscribers ([`Outbox::push_uncounted`], then
/// [`Backlog::add`]), not once per subscriber: one shared atomic per push. Signed, because a
/// writer may settle a frame before the push that queued it has added it.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    bytes: AtomicIsize,
    drained: Notify,
}

impl Backlog {
    /// Above this, pacing publishers wait...
    pub(crate) const HIGH: usize = 16 << 20;
    /// ...until it is down to this.
    pub(crate) const LOW: usize = 8 << 20;
    /// Longest a publisher waits in one go. Sockets whose peers stopped reading hold their
    /// bytes until their own queue limit closes them; the pushes that fill those queues must
    /// keep coming, so pacing slows publishers down but never stalls them.
    pub(crate) const MAX_WAIT: Duration = Duration::from_millis(250);

    /// Bytes queued now.
    pub(crate) fn bytes(&self) -> usize {
        usize::try_from(self.bytes.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Counts `n` bytes just queued.
    pub(crate) fn add(&self, n: usize) {
        self.bytes.fetch_add(signed(n), Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        if n == 0 {
            return;
        }
        let n = signed(n);
        let before = self.bytes.fetch_sub(n, Ordering::Relaxed);
        let low = signed(Self::LOW);
        if before > low && before - n <= low {
            self.drained.notify_waiters();
        }
    }

    /// Returns at once while the backlog is at most [`HIGH`](Self::HIGH); above it, waits until
    /// writers bring it down to [`LOW`](Self::LOW), or [`MAX_WAIT`](Self::MAX_WAIT).
    pub(crate) async fn pace(&self) {
        if self.bytes() <= Self::HIGH {
            return;
        }
        let _ = tokio::time::timeout(Self::MAX_WAIT, async {
            loop {
                let drained = self.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if self.bytes() <= Self::LOW {
                    return;
                }
                drained.await;
            }
        })
        .await;
    }
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// A socket's bounded outbound queue.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Short critical sections only (push, take); never held across an await.
    state: Mutex<State>,
    /// The node's total, kept in step with `State::bytes`.
    backlog: Arc<Backlog>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.backlog.sub(self.state.get_mut().bytes);
    }
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    close: Option<Close>,
    /// The heartbeat asked for a ping; it goes out with the next write.
    ping: bool,
    /// A client's ping to answer (its payload), with the next write.
    pong: Option<Bytes>,
    /// The writer, when it waits for frames or the close. It looks at the state and leaves
    /// its waker under the same lock, so a frame queued in between finds the waker: no
    /// wake-up is lost. A waker in the state rather than a `Notify`: the writer's wait is
    /// then a poll function, not a `Notified` future of 64 bytes in every idle socket's task.
    writer: Option<Waker>,
}

impl State {
    /// Wakes the writer, if it waits, once the lock is released.
    fn wake(mut state: parking_lot::MutexGuard<'_, Self>) {
        let writer = state.writer.take();
        drop(state);
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    /// Leaves `cx`'s waker for the next [`State::wake`].
    fn wait(&mut self, cx: &Context<'_>) {
        match &self.writer {
            Some(writer) if writer.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
    }
}

/// What [`Outbox::next_into`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Write: a ping first when `ping`, then the frames now in the batch (maybe none), which
    /// hold `bytes`; the writer settles them ([`Outbox::settle`]) once written or abandoned.
    Write {
        ping: bool,
        pong: Option<Bytes>,
        bytes: usize,
    },
    /// The outbox is closed and empty: close the socket with this reason.
    Close(Close),
}

/// What [`Outbox::next`] yields (tests only: the socket's writer uses
/// [`Outbox::next_into`]).
/// Takes a batch's bytes off the node's backlog when dropped ([`Outbox::settle_on_drop`]).
pub(crate) struct Settle<'a> {
    outbox: &'a Outbox,
    bytes: usize,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.outbox.settle(self.bytes);
    }
}

#[cfg(test)]
#[derive(Debug)]
pub(crate) enum Drained {
    /// Every frame queued so far, oldest first.
    Frames(VecDeque<Frame>),
    /// The outbox is closed and empty: close the socket with this reason.
    Close(Close),
}

impl Outbox {
    /// An empty outbox counted in `backlog`.
    pub(crate) fn new(backlog: Arc<Backlog>) -> Self {
        Self {
            state: Mutex::default(),
            backlog,
        }
    }

    /// Queues `frame` unless that would take the queue past `limit` bytes, and counts it in
    /// the node's backlog. Never waits.
    pub(crate) fn push(&self, frame: &Frame, limit: usize) -> Enqueued {
        let enqueued = self.push_uncounted(frame, limit);
        if enqueued == Enqueued::Queued {
            self.backlog.add(frame.len());
        }
        enqueued
    }

    /// As [`push`](Self::push), but the caller adds the queued bytes to the backlog itself:
    /// fan-out does it once per push for all subscribers.
    pub(crate) fn push_uncounted(&self, frame: &Frame, limit: usize) -> Enqueued {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Enqueued::Closed;
        }
        let len = frame.len();
        if state.bytes + len > limit {
            state.close = Some(Close::TooSlow);
            state.frames = VecDeque::new();
            self.backlog.sub(mem::take(&mut state.bytes));
            State::wake(state);
            return Enqueued::Full;
        }
        state.frames.push_back(frame.clone());
        state.bytes += len;
        // The writer drains the whole queue per wake-up: only the first frame finds its waker,
        // later ones ride along.
        State::wake(state);
        Enqueued::Queued
    }

    /// Puts `frame` ahead of everything queued (the `connected` frame, written once the
    /// socket's channels were joined), counted in the backlog. Ignores the byte limit: it is
    /// called once per socket, before its writer starts. Never waits.
    pub(crate) fn prepend(&self, frame: &Frame) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return;
        }
        state.frames.push_front(frame.clone());
        state.bytes += frame.len();
        State::wake(state);
        self.backlog.add(frame.len());
    }

    /// Bytes queued now.
    pub(crate) fn bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Asks the writer for a ping (the node's heartbeat). Never waits.
    pub(crate) fn ping(&self) {
        let mut state = self.state.lock();
        if state.close.is_some() || state.ping {
            return;
        }
        state.ping = true;
        State::wake(state);
    }

    /// Asks the writer to answer a client's ping with `payload` (a later ping replaces an
    /// unanswered one, as RFC 6455 5.5.3 allows). Never waits.
    pub(crate) fn pong(&self, payload: Bytes) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return;
        }
        state.pong = Some(payload);
        State::wake(state);
    }

    /// Closes the outbox with `reason`, unless it is already closed. Frames already queued are
    /// still handed out before the close (so a message sent just before a disconnect arrives).
    /// Returns whether this call closed it.
    pub(crate) fn close(&self, reason: Close) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(reason);
        State::wake(state);
        true
    }

    /// Whether the outbox is closed.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().close.is_some()
    }

    /// Waits for frames or a close, settling what it takes; frames come first, the close
    /// reason once the queue is empty. Tests only: a view of the queue without the writer's
    /// buffer reuse and pings ([`next_into`](Self::next_into)).
    #[cfg(test)]
    pub(crate) async fn next(&self) -> Drained {
        let mut frames = VecDeque::new();
        loop {
            match self.next_into(&mut frames).await {
                Next::Write { bytes, .. } => {
                    self.settle(bytes);
                    if !frames.is_empty() {
                        return Drained::Frames(frames);
                    }
                }
                Next::Close(close) => return Drained::Close(close),
            }
        }
    }

    /// For the writer: swaps every queued frame into `batch` (which must be empty) and says
    /// whether a ping is due too, or returns the close reason once the queue is empty. The
    /// writer hands back its emptied `batch` each time, so the two buffers are reused and a
    /// busy socket allocates nothing per write.
    pub(crate) async fn next_into(&self, batch: &mut VecDeque<Frame>) -> Next {
        debug_assert!(batch.is_empty());
        poll_fn(|cx| {
            let mut state = self.state.lock();
            let control = (state.ping || state.pong.is_some()) && state.close.is_none();
            if !state.frames.is_empty() || control {
                mem::swap(&mut state.frames, batch);
                return Poll::Ready(Next::Write {
                    ping: mem::take(&mut state.ping),
                    pong: state.pong.take(),
                    bytes: mem::take(&mut state.bytes),
                });
            }
            if let Some(close) = &state.close {
                return Poll::Ready(Next::Close(close.clone()));
            }
            state.wait(cx);
            Poll::Pending
        })
        .await
    }

    /// Takes `bytes` (from [`Next::Write`]) off the node's backlog: the writer wrote them, or
    /// gave up on them.
    pub(crate) fn settle(&self, bytes: usize) {
        self.backlog.sub(bytes);
    }

    /// [`Outbox::settle`] when the guard is dropped: the batch was written, failed, or was
    /// dropped with its writer's task.
    pub(crate) fn settle_on_drop(&self, bytes: usize) -> Settle<'_> {
        Settle {
            outbox: self,
            bytes,
        }
    }

    /// Waits until the outbox is closed; used to abandon a write to a peer that stopped
    /// reading.
    pub(crate) async fn closed(&self) -> Close {
        // The writer's own wait, while a write is stuck (never beside `next_into`).
        poll_fn(|cx| {
            let mut state = self.state.lock();
            if let Some(close) = &state.close {
                return Poll::Ready(close.clone());
            }
            state.wait(cx);
            Poll::Pending
        })
        .await
    }
}

/// What a socket that takes deltas last got per delta channel: the serial of that push
/// ([`DeltaOf::serial`]). A push goes as a delta only when its base is the push this socket got
/// last on the channel, so the client holds the base; anything else (the first push after a
/// subscribe, a recovery's first replayed push, a push after a gap) goes whole.
///
/// Boxed, so a socket that takes no deltas holds 8 bytes for this, not a map's 48.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
pub(crate) struct Deltas(Option<Box<HashMap<Channel, u64>>>);

impl Deltas {
    /// Channels remembered per socket before it starts over (every channel's next push whole).
    const MAX_CHANNELS: usize = 4096;

    /// For a socket that asked for deltas (`wanted`), or not.
    pub(crate) fn new(wanted: bool) -> Self {
        Self(wanted.then(Box::default))
    }

    /// The form of `frame` this socket gets: its delta (counted in `sent`), or itself.
    pub(crate) fn choose(&mut self, frame: Frame, sent: &prometheus::IntCounter) -> Frame {
        let (Some(last), Some(delta)) = (self.0.as_mut(), frame.delta_of()) else {
            return frame;
        };
        // The channel is named once per socket, not once per push.
        let previous = match last.get_mut(&delta.channel) {
            Some(serial) => Some(std::mem::replace(serial, delta.serial)),
            None => {
                if last.len() >= Self::MAX_CHANNELS {
                    last.clear();
                }
                last.insert(delta.channel.clone(), delta.serial);
                None
            }
        };
        if previous.is_some() && previous == delta.base {
            if let Some(delta) = frame.as_delta() {
                sent.inc();
                return delta;
            }
        }
        frame
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
            Drained::Frames(f) => {
                assert_eq!(f.iter().map(|f| f.as_str()).collect::<String>(), "abc")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn full_queue_closes_as_too_slow_and_drops_frames() {
        let o = Outbox::default();
        assert_eq!(o.push(&frame("12345"), 8), Enqueued::Queued);
        assert_eq!(o.push(&frame("1234"), 8), Enqueued::Full);
        assert_eq!(o.push(&frame("1"), 8), Enqueued::Closed);
        assert!(matches!(o.next().await, Drained::Close(Close::TooSlow)));
    }

    #[tokio::test]
    async fn queued_frames_go_out_before_a_close() {
        let o = Outbox::default();
        o.push(&frame("bye"), 100);
        assert!(o.close(Close::GoingAway));
        assert!(!o.close(Close::TooSlow));
        assert!(matches!(o.next().await, Drained::Frames(_)));
        assert!(matches!(o.next().await, Drained::Close(Close::GoingAway)));
    }

    #[tokio::test]
    async fn a_ping_wakes_the_writer_and_rides_with_frames() {
        let o = Outbox::default();
        let mut batch = VecDeque::new();
        o.ping();
        o.ping();
        assert_eq!(
            o.next_into(&mut batch).await,
            Next::Write {
                ping: true,
                pong: None,
                bytes: 0
            }
        );
        assert!(batch.is_empty());
        o.push(&frame("a"), 100);
        o.ping();
        assert_eq!(
            o.next_into(&mut batch).await,
            Next::Write {
                ping: true,
                pong: None,
                bytes: 1
            }
        );
        assert_eq!(batch.len(), 1);
        batch.clear();
        o.ping();
        o.close(Close::GoingAway);
        assert_eq!(o.next_into(&mut batch).await, Next::Close(Close::GoingAway));
    }

    #[tokio::test]
    async fn the_backlog_counts_queued_bytes_until_taken_dropped_or_gone() {
        let backlog = Arc::new(Backlog::default());
        let a = Outbox::new(backlog.clone());
        let b = Outbox::new(backlog.clone());
        a.push(&frame("1234"), 100);
        a.push(&frame("56"), 100);
        b.push(&frame("789"), 4);
        assert_eq!(backlog.bytes(), 9);
        let mut batch = VecDeque::new();
        let Next::Write { bytes, .. } = a.next_into(&mut batch).await else {
            panic!("frames expected")
        };
        assert_eq!(backlog.bytes(), 9, "in the writer's hands: still counted");
        a.settle(bytes);
        assert_eq!(backlog.bytes(), 3);
        b.push(&frame("xx"), 4); // over the limit: closed as too slow, its frames dropped
        assert_eq!(backlog.bytes(), 0);
        a.push(&frame("yy"), 100);
        drop(a);
        assert_eq!(backlog.bytes(), 0);
        backlog.pace().await; // low: returns at once
    }

    #[tokio::test]
    async fn pacing_waits_while_the_backlog_is_high_and_resumes_when_it_drains() {
        use futures_util::FutureExt as _;
        let backlog = Arc::new(Backlog::default());
        let o = Outbox::new(backlog.clone());
        let big = Frame::from("x".repeat(Backlog::HIGH / 4).as_str());
        for _ in 0..5 {
            o.push(&big, usize::MAX);
        }
        assert!(backlog.bytes() > Backlog::HIGH);
        let mut pace = Box::pin(backlog.pace());
        assert!(
            (&mut pace).now_or_never().is_none(),
            "a high backlog holds the publisher"
        );
        // The writer takes the batch: still in its hands, still counted.
        let mut batch = VecDeque::new();
        let Next::Write { bytes, .. } = o.next_into(&mut batch).await else {
            panic!("frames expected")
        };
        assert!((&mut pace).now_or_never().is_none());
        // Written: down to zero, past the low mark, and the publisher goes on.
        o.settle(bytes);
        assert_eq!((&mut pace).now_or_never(), Some(()));
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_on_push() {
        let o = std::sync::Arc::new(Outbox::default());
        let writer = tokio::spawn({
            let o = o.clone();
            async move { matches!(o.next().await, Drained::Frames(_)) }
        });
        tokio::task::yield_now().await;
        o.push(&frame("x"), 100);
        assert!(writer.await.unwrap());
    }
}
