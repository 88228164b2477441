//! The history room: one channel's place in its stream (its epoch and the offset of its last
//! push), its last pushes for recovery and `History`, and, in cluster mode, the sequencer that
//! puts pushes from Redis back in offset order before anything is delivered.
//!
//! A [`History`] lives inside its channel's state (see `channels`), under the same lock as the
//! channel's subscribers and listeners, so assigning an offset, keeping the push and queueing
//! it to subscribers is one step: a recovering socket that replays from here and then joins
//! the live stream can neither miss a push nor see one twice.
//!
//! Bounds. Each channel keeps at most its policy's `size` pushes, none older than its `ttl`;
//! the node keeps at most `history-memory` bytes of frames in all (a push over it evicts its own
//! channel's oldest first). A retained push costs its frame (shared with the deliveries) plus
//! an [`Entry`] (56 bytes). Expired pushes are dropped lazily, when the channel is next touched
//! or swept.
//!
//! Invariants:
//! * the ring holds consecutive offsets, ending at `last` (it may be empty);
//! * `epoch` changes only together with a reset of `last` and the ring;
//! * a push is delivered only when its offset is `last + 1` (cluster: out-of-order ones wait in
//!   `pending`, a hole is filled from Redis or signalled, never skipped silently).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use crate::{
    config::HistoryPolicy,
    domain::{new_epoch, Epoch, Position},
    protocol::Frame,
};

/// Most pushes a cluster node holds for one channel while it waits for an earlier one; past
/// it, the channel's subscribers are told of a gap.
pub(super) const MAX_PENDING: usize = 4096;

/// The node's budget for retained frames, shared by every channel.
#[derive(Debug)]
pub(super) struct Budget {
    bytes: AtomicUsize,
    max: usize,
}

impl Budget {
    pub(super) fn new(max: usize) -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes of frames retained now, on the whole node.
    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One retained push.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) offset: u64,
    /// When it was pushed, in [`crate::clock::monotonic_ms`] (single node) or Unix ms (from Redis).
    pub(super) at_ms: u64,
    /// The push frame, as sockets got it.
    pub(super) frame: Frame,
    /// Where the payload starts in `frame`.
    pub(super) payload_at: u32,
}

impl Entry {
    /// The pushed JSON text.
    pub(super) fn payload(&self) -> &str {
        let frame: &str = &self.frame;
        frame
            .get(self.payload_at as usize..frame.len().saturating_sub(1))
            .unwrap_or("null")
    }
}

/// A push that arrived ahead of its turn (cluster mode): its epoch and payload.
#[derive(Debug, Clone)]
pub(super) struct Early {
    pub(super) epoch: Epoch,
    pub(super) payload: Arc<str>,
}

/// Where a cluster node's copy of a channel stands against Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sync {
    /// In step: pushes are delivered as they come, in order.
    Synced,
    /// Not yet (just subscribed, or the pub/sub connection was lost): pushes wait in `pending`
    /// until the bus has read the channel's position from Redis.
    Unsynced,
}

/// A channel's stream position and retained pushes.
#[derive(Debug)]
pub(super) struct History {
    /// `None` only in cluster mode, until the channel's position was first read from Redis.
    pub(super) epoch: Option<Epoch>,
    /// The offset of the last push delivered here (0: none).
    pub(super) last: u64,
    ring: VecDeque<Entry>,
    /// Frame bytes in `ring` (counted in `budget` too).
    bytes: usize,
    pub(super) policy: HistoryPolicy,
    budget: Arc<Budget>,
    pub(super) sync: Sync,
    /// Cluster mode: pushes that came before their turn, by offset.
    pub(super) pending: BTreeMap<u64, Early>,
}

impl Drop for History {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Why a catch-up from a position cannot be served: the client gets a gap instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreachable {
    /// The position is from another epoch (the channel's past was lost since).
    Epoch,
    /// The position is past the channel's last push.
    Ahead,
    /// More pushes were missed than one catch-up may replay.
    TooMany,
    /// The pushes after the position are no longer kept (trimmed or expired).
    Trimmed,
}

impl History {
    /// A channel's history with a new epoch (single node), or with none until the cluster's
    /// position is known (`epoch: None`).
    pub(super) fn new(policy: HistoryPolicy, budget: Arc<Budget>, clustered: bool) -> Self {
        Self {
            epoch: (!clustered).then(new_epoch),
            last: 0,
            ring: VecDeque::new(),
            bytes: 0,
            policy,
            budget,
            sync: if clustered {
                Sync::Unsynced
            } else {
                Sync::Synced
            },
            pending: BTreeMap::new(),
        }
    }

    /// The channel's position, once known.
    pub(super) fn position(&self) -> Option<Position> {
        self.epoch.as_ref().map(|epoch| Position {
            epoch: epoch.clone(),
            offset: self.last,
        })
    }

    /// Pushes retained now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ring.len()
    }

    /// Keeps a push just delivered at offset `last + 1` (the caller moved `last`), within the
    /// policy and the node's budget.
    pub(super) fn keep(&mut self, entry: Entry, now_ms: u64) {
        debug_assert_eq!(entry.offset, self.last);
        if !self.policy.keeps() {
            return;
        }
        let len = entry.frame.len();
        self.ring.push_back(entry);
        self.bytes += len;
        let total = self.budget.bytes.fetch_add(len, Ordering::Relaxed) + len;
        let over_budget = total > self.budget.max;
        while self.ring.len() > self.policy.size || (over_budget && self.over_budget()) {
            if !self.pop_front() {
                break;
            }
        }
        self.expire(now_ms);
    }

    fn over_budget(&self) -> bool {
        self.budget.bytes() > self.budget.max
    }

    fn pop_front(&mut self) -> bool {
        match self.ring.pop_front() {
            Some(entry) => {
                let len = entry.frame.len();
                self.bytes -= len;
                self.budget.bytes.fetch_sub(len, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Drops pushes older than the policy's time to live.
    pub(super) fn expire(&mut self, now_ms: u64) {
        let ttl = self.policy.ttl.as_millis() as u64;
        while self
            .ring
            .front()
            .is_some_and(|e| e.at_ms.saturating_add(ttl) <= now_ms)
        {
            self.pop_front();
        }
    }

    /// Forgets every retained push (the stream jumped: what is kept no longer leads to `last`).
    pub(super) fn clear(&mut self) {
        while self.pop_front() {}
    }

    /// Moves to a new position after a loss: a new epoch or a jump within one.
    pub(super) fn reset(&mut self, position: &Position) {
        self.clear();
        self.epoch = Some(position.epoch.clone());
        self.last = position.offset;
    }

    /// The retained pushes after `since`, when they are all still here: every push from
    /// `since.offset + 1` to `last`, at most `max` of them.
    pub(super) fn after(
        &mut self,
        since: &Position,
        max: usize,
        now_ms: u64,
    ) -> Result<impl Iterator<Item = &Entry>, Unreachable> {
        let first = self.first_after(since, max, now_ms)?;
        Ok(self.ring.iter().skip(first))
    }

    /// Index in the ring of the first push after `since` (the ring's length when none was
    /// missed), or why it cannot be reached.
    fn first_after(
        &mut self,
        since: &Position,
        max: usize,
        now_ms: u64,
    ) -> Result<usize, Unreachable> {
        if self.epoch.as_ref() != Some(&since.epoch) {
            return Err(Unreachable::Epoch);
        }
        if since.offset > self.last {
            return Err(Unreachable::Ahead);
        }
        let missed = self.last - since.offset;
        if missed == 0 {
            return Ok(self.ring.len());
        }
        if missed > max as u64 {
            return Err(Unreachable::TooMany);
        }
        self.expire(now_ms);
        match self.ring.front() {
            Some(front) if front.offset <= since.offset + 1 => {
                Ok((since.offset + 1 - front.offset) as usize)
            }
            _ => Err(Unreachable::Trimmed),
        }
    }

    /// Retained pushes for `History`: after `after` (oldest first) or before `before` (newest
    /// first when `reverse`), at most `limit`.
    pub(super) fn page(
        &mut self,
        from: Option<u64>,
        limit: usize,
        reverse: bool,
        now_ms: u64,
    ) -> Vec<(u64, String)> {
        self.expire(now_ms);
        let pick = |e: &Entry| (e.offset, e.payload().to_owned());
        if reverse {
            let before = from.unwrap_or(u64::MAX);
            self.ring
                .iter()
                .rev()
                .filter(|e| e.offset < before)
                .take(limit)
                .map(pick)
                .collect()
        } else {
            let after = from.unwrap_or(0);
            self.ring
                .iter()
                .filter(|e| e.offset > after)
                .take(limit)
                .map(pick)
                .collect()
        }
    }

    /// Whether nothing is retained and nothing waits.
    pub(super) fn is_idle(&self) -> bool {
        self.ring.is_empty() && self.pending.is_empty()
    }

    /// Holds a push that came before its turn. Returns `false` when the pending set is full.
    pub(super) fn hold(&mut self, offset: u64, pending: Early) -> bool {
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&offset) {
            return false;
        }
        self.pending.insert(offset, pending);
        true
    }

    /// Takes the pending push that is next in turn, dropping those already delivered or from
    /// another epoch.
    pub(super) fn next_pending(&mut self) -> Option<(u64, Early)> {
        let epoch = self.epoch.clone()?;
        while let Some(entry) = self.pending.first_entry() {
            let offset = *entry.key();
            if offset <= self.last || entry.get().epoch != epoch {
                entry.remove();
                continue;
            }
            if offset == self.last + 1 {
                return Some((offset, entry.remove()));
            }
            return None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What the README and this module say a kept push costs besides its frame.
    #[test]
    fn a_kept_push_costs_its_frame_and_56_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    fn history(size: usize, ttl_ms: u64, budget: usize) -> History {
        History::new(
            HistoryPolicy {
                size,
                ttl: Duration::from_millis(ttl_ms),
            },
            Arc::new(Budget::new(budget)),
            false,
        )
    }

    fn push(h: &mut History, now_ms: u64) {
        h.last += 1;
        let text = format!(r#"{{"offset":{},"payload":{}}}"#, h.last, h.last);
        let payload_at = text.rfind(':').unwrap() + 1;
        let entry = Entry {
            offset: h.last,
            at_ms: now_ms,
            frame: Frame::from(text),
            payload_at: payload_at as u32,
        };
        h.keep(entry, now_ms);
    }

    fn at(h: &History, offset: u64) -> Position {
        Position {
            epoch: h.epoch.clone().unwrap(),
            offset,
        }
    }

    fn offsets(h: &mut History, since: u64) -> Result<Vec<u64>, Unreachable> {
        let since = at(h, since);
        h.after(&since, 100, 0)
            .map(|entries| entries.map(|e| e.offset).collect())
    }

    #[test]
    fn a_catch_up_replays_every_push_after_the_position_or_says_why_not() {
        let mut h = history(5, 60_000, usize::MAX);
        for _ in 0..8 {
            push(&mut h, 0);
        }
        assert_eq!(h.len(), 5, "bounded by count");
        assert_eq!(offsets(&mut h, 8), Ok(vec![]), "nothing missed");
        assert_eq!(offsets(&mut h, 5), Ok(vec![6, 7, 8]));
        assert_eq!(
            offsets(&mut h, 3),
            Ok(vec![4, 5, 6, 7, 8]),
            "the oldest kept is 4"
        );
        assert_eq!(offsets(&mut h, 2), Err(Unreachable::Trimmed));
        assert_eq!(offsets(&mut h, 9), Err(Unreachable::Ahead));
        let other = Position {
            epoch: "another".into(),
            offset: 7,
        };
        assert!(matches!(h.after(&other, 100, 0), Err(Unreachable::Epoch)));
        let since = at(&h, 4);
        assert!(matches!(h.after(&since, 3, 0), Err(Unreachable::TooMany)));
        assert_eq!(
            h.page(None, 2, false, 0)
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(
            h.page(Some(7), 10, true, 0)
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            [6, 5, 4]
        );
        assert_eq!(h.page(None, 1, false, 0)[0].1, "4");
    }

    #[test]
    fn pushes_expire_and_an_expired_one_cannot_be_replayed() {
        let mut h = history(100, 1_000, usize::MAX);
        push(&mut h, 0);
        push(&mut h, 500);
        push(&mut h, 900);
        let since = at(&h, 0);
        assert_eq!(h.after(&since, 100, 999).map(|e| e.count()), Ok(3));
        assert!(matches!(
            h.after(&since, 100, 1_000),
            Err(Unreachable::Trimmed)
        ));
        let since = at(&h, 1);
        assert_eq!(h.after(&since, 100, 1_000).map(|e| e.count()), Ok(2));
        h.expire(2_000);
        assert!(h.is_idle());
        assert_eq!(h.last, 3, "the position outlives the pushes");
    }

    #[test]
    fn the_node_budget_evicts_the_pushing_channels_oldest() {
        let budget = Arc::new(Budget::new(100));
        let policy = HistoryPolicy {
            size: 1000,
            ttl: Duration::from_secs(60),
        };
        let mut a = History::new(policy, budget.clone(), false);
        let mut b = History::new(policy, budget.clone(), false);
        for _ in 0..3 {
            push(&mut a, 0);
        }
        let frame = a.ring.front().unwrap().frame.len();
        assert_eq!(budget.bytes(), 3 * frame);
        for _ in 0..10 {
            push(&mut b, 0);
        }
        assert!(budget.bytes() <= 100, "{}", budget.bytes());
        assert_eq!(a.len(), 3, "a did not push: it keeps its own");
        drop(b);
        assert_eq!(
            budget.bytes(),
            3 * frame,
            "a dropped channel gives its bytes back"
        );
        a.clear();
        assert_eq!(budget.bytes(), 0);
    }

    #[test]
    fn history_off_still_counts_offsets() {
        let mut h = history(0, 60_000, usize::MAX);
        push(&mut h, 0);
        push(&mut h, 0);
        assert_eq!((h.len(), h.last), (0, 2));
        assert_eq!(offsets(&mut h, 2), Ok(vec![]));
        assert_eq!(offsets(&mut h, 1), Err(Unreachable::Trimmed));
    }

    #[test]
    fn pending_pushes_come_out_in_turn() {
        let mut h = history(10, 60_000, usize::MAX);
        let epoch = h.epoch.clone().unwrap();
        let p = |e: &Epoch| Early {
            epoch: e.clone(),
            payload: "1".into(),
        };
        h.last = 4;
        assert!(h.hold(6, p(&epoch)));
        assert!(h.hold(3, p(&epoch)));
        assert!(h.hold(5, p(&"old".into())));
        assert!(
            h.next_pending().is_none(),
            "5 is from another epoch: still a hole"
        );
        assert!(h.hold(5, p(&epoch)));
        assert_eq!(h.next_pending().map(|(o, _)| o), Some(5));
        h.last = 5;
        assert_eq!(h.next_pending().map(|(o, _)| o), Some(6));
        h.last = 6;
        assert!(h.next_pending().is_none());
        assert!(h.pending.is_empty());
    }
}
