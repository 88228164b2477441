//! The presence room. On one node: for each channel whose namespace enables presence, the
//! connections subscribed to it that are connected (live, or dropped and within their
//! reconnect grace, so a resume is no leave and no join), with their user, info and since
//! when; and a count per user, so `PresenceStats` is two lengths. Fed from
//! [`sessions`](super::sessions): a session that connects for the first time joins its
//! channels, one that ends for good leaves them, and subscribes in between change them. In
//! cluster mode presence lives in Redis instead (the bus's scripts keep it the same way).
//!
//! Every change becomes a [`PresenceEvent`]: a join or a leave (with whether it was the user's
//! first or last connection in the channel), and, where the namespace enables occupancy,
//! `occupied` when the channel gets its first member and `vacated` when the last one left and
//! the vacate delay passed with no one back (a reconnect does not flap). Events are delivered
//! here to the node's sockets subscribed to the channel (when the namespace says `join-leave`)
//! and to its `Listen` streams that asked; in cluster mode they arrive from Redis pub/sub.
//! Occupancy changes also go to the `Handle` lifecycle groups, once, through
//! [`Registry::occupancy`].
//!
//! Lock order: a session, then a room, then the vacating table, then the channel's state; an
//! event is delivered under its room's lock, so every stream sees a channel's events in the
//! order they happened.

use std::{collections::HashMap, sync::Arc};

use super::{sessions::Session, Registry};
use crate::clock::now_ms;
use crate::domain::User;
use crate::{config::JoinLeave, credentials::Digest, domain::Channel, protocol::presence_frame};

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

/// What changed in a channel's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A connection joined.
    Join,
    /// A connection left for good.
    Leave,
    /// The channel got its first member.
    Occupied,
    /// The channel's last member left, and the vacate delay passed.
    Vacated,
}

impl Change {
    /// The event's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Occupied => "occupied",
            Self::Vacated => "vacated",
        }
    }

    /// The change named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Join, Self::Leave, Self::Occupied, Self::Vacated]
            .into_iter()
            .find(|c| c.as_str() == name)
    }
}

/// One change of a channel's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    /// What changed.
    pub change: Change,
    /// Who joined or left (`None` for occupancy).
    pub member: Option<Present>,
    /// For a join, whether it was its user's first connection in the channel; for a leave,
    /// its last. Always true for a connection issued for no user.
    pub of_user: bool,
}

impl PresenceEvent {
    /// An occupancy change.
    pub fn occupancy(occupied: bool) -> Self {
        Self {
            change: if occupied {
                Change::Occupied
            } else {
                Change::Vacated
            },
            member: None,
            of_user: false,
        }
    }

    /// Whether a stream asking for `join_leave` events (and occupancy when `occupancy`) takes it.
    pub fn wanted(&self, join_leave: JoinLeave, occupancy: bool) -> bool {
        match self.change {
            Change::Occupied | Change::Vacated => occupancy,
            Change::Join | Change::Leave => match join_leave {
                JoinLeave::Off => false,
                JoinLeave::Connection => true,
                JoinLeave::User => self.of_user,
            },
        }
    }
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
        let of_user = match &session.user {
            Some(user) => {
                let n = room.users.entry(user.name.clone()).or_default();
                *n += 1;
                *n == 1
            }
            None => true,
        };
        let member = Present {
            digest,
            connection_id: session.connection_id.clone().unwrap_or_default(),
            user: session.user.clone(),
            since_ms: now_ms(),
        };
        let first = room.members.is_empty();
        room.members.insert(digest, member.clone());
        // A member back within the vacate delay: the channel never stopped being occupied.
        if first
            && self.shared.limits.namespace(channel).occupancy.is_some()
            && self.shared.vacating.lock().remove(channel).is_none()
        {
            self.occupancy_changed(channel, true);
        }
        self.presence_event(
            channel,
            &PresenceEvent {
                change: Change::Join,
                member: Some(member),
                of_user,
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
        let Some(member) = room.members.remove(digest) else {
            return;
        };
        let mut of_user = true;
        if let Some(user) = &member.user {
            if let Some(n) = room.users.get_mut(&user.name) {
                *n -= 1;
                of_user = *n == 0;
                if of_user {
                    room.users.remove(&user.name);
                }
            }
        }
        self.presence_event(
            channel,
            &PresenceEvent {
                change: Change::Leave,
                member: Some(member),
                of_user,
            },
        );
        if room.members.is_empty() {
            match self.shared.limits.namespace(channel).occupancy {
                Some(delay) if !delay.is_zero() => {
                    let due = now_ms() + delay.as_millis() as u64;
                    self.shared.vacating.lock().insert(channel.clone(), due);
                }
                Some(_) => self.occupancy_changed(channel, false),
                None => {}
            }
            entry.remove();
        }
    }

    /// Tells `vacated` for the channels whose vacate delay passed with no member back (one node;
    /// the sweeper calls it every second, so `vacated` comes within a second after the delay).
    pub(super) fn sweep_vacated(&self) {
        let now = now_ms();
        let due: Vec<Channel> = {
            let vacating = self.shared.vacating.lock();
            vacating
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(c, _)| c.clone())
                .collect()
        };
        for channel in due {
            // Under the room's lock, so a join now either comes first (and cancels it) or after.
            let room = self.shared.presence.entry(channel.clone());
            let empty = match &room {
                dashmap::mapref::entry::Entry::Occupied(r) => r.get().members.is_empty(),
                dashmap::mapref::entry::Entry::Vacant(_) => true,
            };
            let still_due = self
                .shared
                .vacating
                .lock()
                .remove_entry(&channel)
                .is_some_and(|(_, at)| at <= now);
            if still_due && empty {
                self.occupancy_changed(&channel, false);
            }
            drop(room);
        }
    }

    /// An occupancy change on this node: to the `Listen` streams here and the `Handle` groups.
    fn occupancy_changed(&self, channel: &Channel, occupied: bool) {
        self.presence_event(channel, &PresenceEvent::occupancy(occupied));
        self.occupancy(channel, occupied);
    }

    /// Delivers a presence event to this node's sockets subscribed to `channel` (joins and
    /// leaves of other connections, when its namespace says `join-leave`) and to its `Listen` streams that asked for
    /// such events. Never waits.
    pub(crate) fn presence_event(&self, channel: &Channel, event: &PresenceEvent) {
        let join_leave = self.shared.limits.namespace(channel).join_leave;
        let event = Arc::new(event.clone());
        self.with_existing(channel, |state| {
            if event.wanted(join_leave, false) {
                if let Some(member) = &event.member {
                    let (user, info) = User::texts(member.user.as_ref());
                    let frame = presence_frame(
                        channel,
                        event.change == Change::Join,
                        &member.connection_id,
                        user,
                        info,
                    );
                    // Not to the connection itself: it knows it joined (and on one node its
                    // socket may not be in the channel yet when it joins).
                    for conn in state.subscribers.values() {
                        if conn.digest != member.digest {
                            self.queue_one(conn, &frame);
                        }
                    }
                }
            }
            let position = state.history.position();
            self.notify_presence(channel, &mut state.listeners, position, &event);
        });
    }

    /// The connections present in `channel` on this node.
    pub(crate) fn presence(&self, channel: &Channel) -> Vec<Present> {
        self.shared
            .presence
            .get(channel)
            .map(|room| room.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// `(connections, users)` present in `channel` on this node.
    pub(crate) fn presence_stats(&self, channel: &Channel) -> (u64, u64) {
        self.shared.presence.get(channel).map_or((0, 0), |room| {
            (room.members.len() as u64, room.users.len() as u64)
        })
    }
}
