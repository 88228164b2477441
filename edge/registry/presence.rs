//! The presence room (one node): for each channel whose namespace enables presence, the
//! connections subscribed to it that are connected (live, or dropped and within their
//! reconnect grace, so a resume is no leave and no join), with their user, info and since
//! when; and a count per user, so `PresenceStats` is two lengths. Fed from
//! [`sessions`](super::sessions): a session that connects for the first time joins its
//! channels, one that ends for good leaves them, and subscribes in between change them.
//! In cluster mode presence lives in Redis instead (the bus's scripts keep it the same way).

use std::{collections::HashMap, sync::Arc};

use super::{sessions::Session, users::User, Registry};
use crate::{credentials::Digest, protocol::Channel};

/// One connection present in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    /// The connection's digest.
    pub digest: Digest,
    /// Its public connection id.
    pub connection_id: Box<str>,
    /// Its user and info, when it was issued for one.
    pub user: Option<User>,
    /// When it joined the channel (Unix ms).
    pub since_ms: u64,
}

/// A channel's presence on this node.
#[derive(Debug, Default)]
pub(super) struct Room {
    members: HashMap<Digest, Present>,
    users: HashMap<Arc<str>, u32>,
}

impl Registry {
    /// Adds `digest` (its session connected) to `channel`'s presence, if the channel keeps it.
    pub(super) fn presence_join(&self, digest: Digest, session: &Session, channel: &Channel) {
        if self.is_clustered() || !self.shared.limits.presence(channel) {
            return;
        }
        let mut room = self.shared.presence.entry(channel.clone()).or_default();
        if room.members.contains_key(&digest) {
            return;
        }
        if let Some(user) = &session.user {
            *room.users.entry(user.name.clone()).or_default() += 1;
        }
        room.members.insert(
            digest,
            Present {
                digest,
                connection_id: session.connection_id.clone().unwrap_or_default(),
                user: session.user.clone(),
                since_ms: super::now_ms(),
            },
        );
    }

    /// Removes `digest` from `channel`'s presence.
    pub(super) fn presence_leave(&self, digest: &Digest, channel: &Channel) {
        if self.is_clustered() {
            return;
        }
        let dashmap::mapref::entry::Entry::Occupied(mut entry) =
            self.shared.presence.entry(channel.clone())
        else {
            return;
        };
        let room = entry.get_mut();
        if let Some(member) = room.members.remove(digest) {
            if let Some(user) = member.user {
                if let Some(n) = room.users.get_mut(&user.name) {
                    *n -= 1;
                    if *n == 0 {
                        room.users.remove(&user.name);
                    }
                }
            }
        }
        if room.members.is_empty() {
            entry.remove();
        }
    }

    /// The connections present in `channel` on this node.
    pub fn presence(&self, channel: &Channel) -> Vec<Present> {
        self.shared
            .presence
            .get(channel)
            .map(|room| room.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// `(connections, users)` present in `channel` on this node.
    pub fn presence_stats(&self, channel: &Channel) -> (u64, u64) {
        self.shared.presence.get(channel).map_or((0, 0), |room| {
            (room.members.len() as u64, room.users.len() as u64)
        })
    }
}
