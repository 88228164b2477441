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

use crate::error::{NotReady, Unavailable};

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
    reasons: Mutex<[Option<NotReady>; CAUSES]>,
    /// The answer, republished at every change; receivers are the health `Watch` streams.
    answer: watch::Sender<Result<(), NotReady>>,
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
    pub(crate) fn set(&self, cause: Cause, reason: Unavailable) {
        self.set_reason(cause, NotReady::Cluster(reason));
    }

    /// The node drains, for good.
    pub(crate) fn set_draining(&self) {
        self.set_reason(Cause::Draining, NotReady::Draining);
    }

    fn set_reason(&self, cause: Cause, reason: NotReady) {
        let mut reasons = self.reasons.lock();
        reasons[cause as usize] = Some(reason);
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
    pub(crate) fn check(&self) -> Result<(), NotReady> {
        first(&self.reasons.lock(), 0)
    }

    /// As [`Readiness::check`], without the drain: whether Redis is usable, for the cluster
    /// bus (the control plane keeps working while the sockets drain).
    pub(crate) fn check_redis(&self) -> Result<(), Unavailable> {
        match first(&self.reasons.lock(), Cause::Broken as usize) {
            Ok(()) => Ok(()),
            Err(NotReady::Cluster(why)) => Err(why),
            // Not stored past the drain's index.
            Err(NotReady::Draining) => Ok(()),
        }
    }

    /// The answer now and at every change.
    pub(crate) fn watch(&self) -> watch::Receiver<Result<(), NotReady>> {
        self.answer.subscribe()
    }

    fn publish(&self, reasons: &[Option<NotReady>; CAUSES]) {
        let answer = first(reasons, 0);
        self.answer.send_if_modified(|current| {
            // Compared by what the probes say.
            let said = |a: &Result<(), NotReady>| a.as_ref().err().map(ToString::to_string);
            let changed = said(current) != said(&answer);
            if changed {
                *current = answer;
            }
            changed
        });
    }
}

/// The first reason set at or after index `from`.
fn first(reasons: &[Option<NotReady>; CAUSES], from: usize) -> Result<(), NotReady> {
    match reasons[from..].iter().flatten().next() {
        Some(reason) => Err(reason.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said<E: std::fmt::Display>(answer: Result<(), E>) -> String {
        answer.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn the_first_cause_set_answers_and_every_change_is_published() {
        let readiness = Readiness::default();
        let mut watch = readiness.watch();
        assert!(readiness.check().is_ok());
        readiness.set(Cause::Stalled, Unavailable::Connecting);
        assert_eq!(said(readiness.check()), "connecting to Redis");
        assert!(watch.has_changed().unwrap());
        assert_eq!(
            said(watch.borrow_and_update().clone()),
            "connecting to Redis"
        );
        readiness.set_draining();
        assert_eq!(said(readiness.check()), "draining");
        // The bus ignores the drain.
        assert_eq!(said(readiness.check_redis()), "connecting to Redis");
        assert!(readiness.clear(Cause::Stalled));
        assert!(!readiness.clear(Cause::Stalled));
        assert!(readiness.check_redis().is_ok());
        assert_eq!(said(watch.borrow_and_update().clone()), "draining");
        // Clearing a cause that was not set publishes nothing.
        readiness.clear(Cause::Connecting);
        assert!(!watch.has_changed().unwrap());
    }
}
