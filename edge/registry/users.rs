//! The users room: the user (and its small JSON `info`) an application binds to credentials when
//! it issues them, and, by user, the credentials this node knows, so `Send` and `Disconnect`
//! can address every connection of one user ("log out everywhere").
//!
//! A user is the application's name for a person or account: opaque to the gateway, checked
//! only for size and printable characters. It lives in the credentials' session (here, or in
//! Redis in cluster mode) for as long as the credentials do.

use std::{collections::HashSet, sync::Arc};

use crate::domain::User;

use super::{sessions::State, Registry};
use crate::credentials::Digest;

impl Registry {
    /// Records that `digest` belongs to `user`.
    pub(super) fn index_user(&self, digest: Digest, user: &User) {
        self.shared
            .users
            .entry(user.name.clone())
            .or_default()
            .insert(digest);
    }

    /// Forgets that `digest` belongs to `user` (its session is gone).
    pub(super) fn unindex_user(&self, digest: &Digest, user: &str) {
        if let dashmap::mapref::entry::Entry::Occupied(mut entry) =
            self.shared.users.entry(Arc::from(user))
        {
            entry.get_mut().remove(digest);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
    }

    /// The credentials of `user` known here that have not ended (issued, live, or within
    /// their reconnect grace).
    pub(crate) fn user_digests(&self, user: &str) -> Vec<Digest> {
        let Some(digests) = self.shared.users.get(user).map(|d| d.clone()) else {
            return Vec::new();
        };
        digests
            .into_iter()
            .filter(|digest| {
                self.shared
                    .sessions
                    .get(digest)
                    .is_some_and(|s| !matches!(s.state, State::Dead))
            })
            .collect()
    }

    /// The user bound to `digest`'s credentials, if the application named one.
    pub(crate) fn user_of(&self, digest: &Digest) -> Option<User> {
        self.shared.sessions.get(digest)?.user.clone()
    }

    /// The users of the sockets live here (their Redis records are renewed with the sockets').
    pub(crate) fn live_users(&self) -> HashSet<Arc<str>> {
        self.shared
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Live(_)))
            .filter_map(|s| s.user.as_ref().map(|u| u.name.clone()))
            .collect()
    }
}

/// A user set in the registry's index.
pub(super) type UserIndex = dashmap::DashMap<Arc<str>, HashSet<Digest>>;
