//! The idempotency room (single node): which `Push` idempotency keys each channel took within
//! the window, and the position each push got, so a retried push is accepted once and answers
//! with the first call's position. Cluster mode keeps the same record in Redis, written by the
//! push's own script.
//!
//! Records expire in the order they were made (one window for all), so sweeping pops from the
//! front of a queue. At most [`MAX_IDEMPOTENCY_KEYS`] are kept; a push with a new key beyond
//! that is refused rather than accepted without the guarantee.

use std::collections::VecDeque;

use super::Registry;
use crate::clock::now_ms;
use crate::{
    domain::{Channel, Position},
    error::Error,
};

/// Most idempotency records a node keeps (per channel and key).
pub(crate) const MAX_IDEMPOTENCY_KEYS: usize = 1_000_000;

/// Longest idempotency key, in bytes.
pub(crate) const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// One key's record.
#[derive(Debug)]
pub(super) struct Record {
    position: Position,
    expires_ms: u64,
}

/// Checks an idempotency key: 1 to 128 bytes of printable ASCII.
pub(crate) fn check_idempotency_key(key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(Error::BadIdempotencyKey {
            max: MAX_IDEMPOTENCY_KEY_LEN,
        })
    }
}

/// The records' expiry order.
pub(super) type Expiries = parking_lot::Mutex<VecDeque<(u64, Channel, Box<str>)>>;

impl Registry {
    /// The position of the push `channel` took with `key` within the window, if any.
    pub(super) fn idempotent(&self, channel: &Channel, key: &str) -> Option<Position> {
        let record = self
            .shared
            .idempotency
            .get(&(channel.clone(), Box::<str>::from(key)))?;
        (record.expires_ms > now_ms()).then(|| record.position.clone())
    }

    /// Records that `channel` took a push with `key` at `position`.
    pub(super) fn remember(
        &self,
        channel: &Channel,
        key: &str,
        position: &Position,
    ) -> Result<(), Error> {
        let shared = &self.shared;
        if shared.idempotency.len() >= MAX_IDEMPOTENCY_KEYS {
            return Err(Error::TooManyIdempotencyKeys {
                max: MAX_IDEMPOTENCY_KEYS,
            });
        }
        let expires_ms =
            now_ms().saturating_add(shared.limits.idempotency_window.as_millis() as u64);
        let key: Box<str> = key.into();
        shared.idempotency.insert(
            (channel.clone(), key.clone()),
            Record {
                position: position.clone(),
                expires_ms,
            },
        );
        shared
            .expiries
            .lock()
            .push_back((expires_ms, channel.clone(), key));
        Ok(())
    }

    /// Forgets records past the window.
    pub(super) fn sweep_idempotency(&self, now: u64) {
        let shared = &self.shared;
        let mut expiries = shared.expiries.lock();
        while expiries.front().is_some_and(|(at, _, _)| *at <= now) {
            if let Some((_, channel, key)) = expiries.pop_front() {
                shared
                    .idempotency
                    .remove_if(&(channel, key), |_, record| record.expires_ms <= now);
            }
        }
    }
}
