//! The node's readiness: one answer to "may this node take traffic now?", read by `/readyz`,
//! by the control plane's gRPC health service and by the cluster bus (which fails calls fast
//! while Redis is not usable), so the probes can never disagree.
//!
//! Each [`Cause`] that can make a node not ready is set and cleared by its owner (the drain,
//! the bus's connection supervisor, its heartbeat, a bus task that died); the answer is the
//! first cause set, in the order of [`Cause`]. Every change is published on a watch channel,
//! so a health `Watch` stream follows it without polling.

use parking_lot::Mutex;
use tokio::sync::watch;

/// Why a node is not ready, most lasting first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The node is draining (for good).
    Draining,
    /// A task of the cluster bus died (for good: the node can no longer keep its part).
    Broken,
    /// The cluster bus is not connected to Redis (at start, and while it reconnects).
    Connecting,
    /// Redis did not answer a command within its deadline; cleared by the next answer.
    Stalled,
}

const CAUSES: usize = 4;

/// The node's readiness (see the module's documentation).
#[derive(Debug)]
pub(crate) struct Readiness {
    /// The reason of each cause that is set, indexed by `Cause as usize`.
    reasons: Mutex<[Option<String>; CAUSES]>,
    /// The answer, republished at every change; receivers are the health `Watch` streams.
    answer: watch::Sender<Result<(), String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            reasons: Mutex::new(Default::default()),
            answer: watch::Sender::new(Ok(())),
        }
    }
}

impl Readiness {
    /// Sets `cause` with its `reason` (replacing an earlier reason of the same cause).
    pub(crate) fn set(&self, cause: Cause, reason: impl Into<String>) {
        let mut reasons = self.reasons.lock();
        reasons[cause as usize] = Some(reason.into());
        self.publish(&reasons);
    }

    /// Clears `cause`; whether it was set.
    pub(crate) fn clear(&self, cause: Cause) -> bool {
        let mut reasons = self.reasons.lock();
        let was = reasons[cause as usize].take().is_some();
        if was {
            self.publish(&reasons);
        }
        was
    }

    /// `Ok` when the node may take traffic; else the reason of the first cause set.
    pub(crate) fn check(&self) -> Result<(), String> {
        first(&self.reasons.lock(), 0)
    }

    /// As [`Readiness::check`], without the drain: whether Redis is usable, for the cluster
    /// bus (the control plane keeps working while the sockets drain).
    pub(crate) fn check_redis(&self) -> Result<(), String> {
        first(&self.reasons.lock(), Cause::Broken as usize)
    }

    /// The answer now and at every change.
    pub(crate) fn watch(&self) -> watch::Receiver<Result<(), String>> {
        self.answer.subscribe()
    }

    fn publish(&self, reasons: &[Option<String>; CAUSES]) {
        let answer = first(reasons, 0);
        self.answer.send_if_modified(|current| {
            let changed = *current != answer;
            if changed {
                *current = answer;
            }
            changed
        });
    }
}

/// The first reason set at or after index `from`.
fn first(reasons: &[Option<String>; CAUSES], from: usize) -> Result<(), String> {
    match reasons[from..].iter().flatten().next() {
        Some(reason) => Err(reason.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_set_answers_and_every_change_is_published() {
        let readiness = Readiness::default();
        let mut watch = readiness.watch();
        assert_eq!(readiness.check(), Ok(()));
        readiness.set(Cause::Stalled, "slow");
        assert_eq!(readiness.check(), Err("slow".into()));
        assert!(watch.has_changed().unwrap());
        assert_eq!(*watch.borrow_and_update(), Err("slow".into()));
        readiness.set(Cause::Draining, "draining");
        assert_eq!(readiness.check(), Err("draining".into()));
        // The bus ignores the drain.
        assert_eq!(readiness.check_redis(), Err("slow".into()));
        assert!(readiness.clear(Cause::Stalled));
        assert!(!readiness.clear(Cause::Stalled));
        assert_eq!(readiness.check_redis(), Ok(()));
        assert_eq!(*watch.borrow_and_update(), Err("draining".into()));
        // Clearing a cause that was not set publishes nothing.
        readiness.clear(Cause::Connecting);
        assert!(!watch.has_changed().unwrap());
    }
}
