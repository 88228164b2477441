//! The anchors room (one node): event streams' saved positions, by digest, the four newest of
//! each, forgotten with the credentials. In cluster mode Redis keeps them instead, in the
//! credentials' state (`bus/redis/scripts/anchor.lua`).

use std::sync::Arc;

use dashmap::DashMap;

use super::Registry;
use crate::{credentials::Digest, error::Error};

/// Anchors kept per digest.
const KEPT: usize = 4;

/// The anchors of each digest that has an event stream: `(number, positions)` in slot
/// `number mod 4`.
pub(super) type Anchors = DashMap<Digest, [Option<(u64, Arc<str>)>; KEPT]>;

impl Registry {
    /// Keeps anchor `number` of `digest`; `UnknownDigest` when the credentials are forgotten.
    pub(crate) fn save_anchor(
        &self,
        digest: &Digest,
        number: u64,
        positions: &str,
    ) -> Result<(), Error> {
        if !self.shared.sessions.contains_key(digest) {
            return Err(Error::UnknownDigest);
        }
        self.shared.anchors.entry(*digest).or_default()[number as usize % KEPT] =
            Some((number, positions.into()));
        Ok(())
    }

    /// Anchor `number` of `digest`, if still kept.
    pub(crate) fn load_anchor(&self, digest: &Digest, number: u64) -> Option<String> {
        let anchors = self.shared.anchors.get(digest)?;
        match &anchors[number as usize % KEPT] {
            Some((n, positions)) if *n == number => Some(positions.to_string()),
            _ => None,
        }
    }

    /// Forgets the anchors of credentials that are forgotten.
    pub(super) fn forget_anchors(&self, digest: &Digest) {
        self.shared.anchors.remove(digest);
    }
}
