//! The sessions room: every set of credentials this node knows (by digest), its state machine
//! (see the parent module), its subscriptions, and the socket bound to it; the live count, kept
//! in one place ([`Registry::set_state`]); minting, the handshake's attach and the socket's
//! detach, the heartbeat and the sweeper.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use dashmap::{mapref::entry::Entry, mapref::one::RefMut};

use crate::{
    clock::{monotonic_ms, now_ms},
    domain::User,
};

use super::{
    channels::{Fetched, Join},
    check_channel_count, EndReason, Ended, Registry,
};
use crate::{
    credentials::{CredentialError, Credentials, Digest, Verified},
    domain::Channel,
    error::{Close, Error},
    fanout::{Backlog, Outbox},
    protocol::{connected_frame, Joined, Recover},
};

#[derive(Debug)]
pub(super) struct Session {
    pub(super) expires_at_ms: u64,
    pub(super) state: State,
    pub(super) channels: ChannelSet,
    /// Who the application issued the credentials for, if it said.
    pub(super) user: Option<User>,
    /// The public id, once a socket connected with it (for the final `$disconnect`).
    pub(super) connection_id: Option<Box<str>>,
}

impl Session {
    fn issued(expires_at_ms: u64, user: Option<User>) -> Self {
        Self {
            expires_at_ms,
            state: State::Issued,
            channels: ChannelSet::default(),
            user,
            connection_id: None,
        }
    }
}

/// A session's channels: a list sized to fit while they are few (most sockets have one to a
/// handful, and a one-channel list is a 16-byte allocation where the smallest hash set is 84),
/// a hash set past [`ChannelSet::LIST_MAX`].
#[derive(Debug, Clone)]
pub(super) enum ChannelSet {
    List(Vec<Channel>),
    Set(HashSet<Channel>),
}

impl Default for ChannelSet {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

impl ChannelSet {
    /// Channels kept as a list; a linear search over this many is as fast as hashing.
    const LIST_MAX: usize = 8;

    /// Adds `channel`; whether it was not there.
    pub(super) fn insert(&mut self, channel: Channel) -> bool {
        match self {
            Self::Set(set) => set.insert(channel),
            Self::List(list) if list.contains(&channel) => false,
            Self::List(list) if list.len() < Self::LIST_MAX => {
                // Grown one at a time: a list this short is not worth spare room.
                list.reserve_exact(1);
                list.push(channel);
                true
            }
            Self::List(list) => {
                let mut set: HashSet<Channel> = list.drain(..).collect();
                set.insert(channel);
                *self = Self::Set(set);
                true
            }
        }
    }

    /// Removes `channel`; whether it was there.
    pub(super) fn remove(&mut self, channel: &Channel) -> bool {
        match self {
            Self::Set(set) => set.remove(channel),
            Self::List(list) => match list.iter().position(|c| c == channel) {
                Some(at) => {
                    list.swap_remove(at);
                    list.shrink_to_fit();
                    true
                }
                None => false,
            },
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Self::List(list) => list.len(),
            Self::Set(set) => set.len(),
        }
    }

    pub(super) fn iter(&self) -> ChannelIter<'_> {
        match self {
            Self::List(list) => ChannelIter::List(list.iter()),
            Self::Set(set) => ChannelIter::Set(set.iter()),
        }
    }
}

impl FromIterator<Channel> for ChannelSet {
    fn from_iter<I: IntoIterator<Item = Channel>>(channels: I) -> Self {
        let mut set = Self::default();
        for channel in channels {
            set.insert(channel);
        }
        set
    }
}

impl<'a> IntoIterator for &'a ChannelSet {
    type Item = &'a Channel;
    type IntoIter = ChannelIter<'a>;
    fn into_iter(self) -> ChannelIter<'a> {
        self.iter()
    }
}

/// The channels of a [`ChannelSet`], in no particular order.
pub(super) enum ChannelIter<'a> {
    List(std::slice::Iter<'a, Channel>),
    Set(std::collections::hash_set::Iter<'a, Channel>),
}

impl<'a> Iterator for ChannelIter<'a> {
    type Item = &'a Channel;
    fn next(&mut self) -> Option<&'a Channel> {
        match self {
            Self::List(list) => list.next(),
            Self::Set(set) => set.next(),
        }
    }
}

/// A session's state; see the table in the parent module.
#[derive(Debug)]
pub(super) enum State {
    /// Minted, never used: may become `Live` before expiry.
    Issued,
    /// A socket on this node holds it.
    Live(Arc<Conn>),
    /// Dropped uncleanly: may become `Live` again until `until_ms`.
    Grace { until_ms: u64 },
    /// Ended: refused until forgotten at expiry.
    Dead,
}

/// The registry's side of a live socket: what publishers need to reach it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(super) serial: u64,
    pub(super) digest: Digest,
    /// When the client last sent anything (pongs included), in [`monotonic_ms`]; the node's
    /// heartbeat ([`Registry::heartbeat`]) closes sockets silent past the idle timeout. One
    /// shared clock instead of a timer per socket: an idle socket holds no timer at all.
    last_seen_ms: AtomicU64,
    /// Bounded outbound queue; closed by whoever ends the socket, drained by its writer.
    pub(crate) outbox: Outbox,
    /// The client asked for positions (the handshake's `recover`): it gets the `connected`
    /// frame, position frames on live subscribes, and gap frames.
    pub(super) positions: bool,
    /// The credentials were used before: this socket resumes within the reconnect grace.
    resumed: bool,
}

impl Conn {
    fn new(
        serial: u64,
        digest: Digest,
        backlog: &Arc<Backlog>,
        positions: bool,
        resumed: bool,
    ) -> Self {
        Self {
            serial,
            digest,
            last_seen_ms: AtomicU64::new(monotonic_ms()),
            outbox: Outbox::new(backlog.clone()),
            positions,
            resumed,
        }
    }

    /// Whether the socket resumed credentials that had a socket before (within the grace).
    pub(crate) fn resumed(&self) -> bool {
        self.resumed
    }

    /// Records that the client sent something just now.
    pub(crate) fn touch(&self) {
        self.last_seen_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// How long the client has been silent, as of `now_ms` ([`monotonic_ms`]).
    pub(crate) fn silent_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed)))
    }

    /// The socket's digest.
    pub(crate) fn digest(&self) -> Digest {
        self.digest
    }
}

/// Why a handshake's credentials were refused after their signature checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttachRefusal {
    /// The id was not used before its expiry.
    #[error("credentials expired")]
    Expired,
    /// A socket with this id is connected.
    #[error("connection id already in use")]
    AlreadyLive,
    /// The id's connection ended (clean close, `Disconnect`, or grace over).
    #[error("connection id already used")]
    Ended,
    /// Signed by this deployment but not recorded where the gateway keeps its state: issued
    /// before this node (single node) or Redis (cluster) lost that state, so whether it was
    /// used cannot be known. Refused, so a loss never reopens ended credentials.
    #[error("connection id unknown here: issued before the gateway lost its state")]
    Unknown,
}

/// A socket live on this node, as the bus re-records it in a Redis that came back empty.
#[derive(Debug, Clone)]
pub(crate) struct LiveSession {
    /// Its digest.
    pub digest: Digest,
    /// Its public connection id.
    pub connection_id: Box<str>,
    /// When its credentials expire (Unix ms).
    pub expires_at_ms: u64,
    /// Its subscriptions.
    pub channels: Vec<Channel>,
    /// Its user.
    pub user: Option<User>,
}

/// How a socket ended, as far as its credentials are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The client closed cleanly, or the application ended it: the id is dead.
    Final,
    /// Dropped without a close: the id may reconnect within the grace period.
    Resumable,
}

impl Registry {
    /// Moves `session` to `next`: the one place a session's state changes, so the live count
    /// follows every transition, and a session that dies drops its subscriptions. Returns the
    /// state it left.
    fn set_state(&self, digest: Digest, session: &mut Session, next: State) -> State {
        let was_live = matches!(session.state, State::Live(_));
        let is_live = matches!(next, State::Live(_));
        // Presence: a connection is present from its first socket to its final end; a drop
        // and a resume within the grace change nothing.
        let connected = |s: &State| matches!(s, State::Live(_) | State::Grace { .. });
        match (connected(&session.state), connected(&next)) {
            (false, true) => {
                for channel in &session.channels {
                    self.presence_join(digest, session, channel);
                }
            }
            (true, false) => {
                for channel in &session.channels {
                    self.presence_leave(&digest, channel);
                }
            }
            _ => {}
        }
        match (was_live, is_live) {
            (false, true) => {
                self.shared.live.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.shared.live.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if matches!(next, State::Dead) {
            session.channels = ChannelSet::default();
        }
        std::mem::replace(&mut session.state, next)
    }

    fn new_conn(&self, digest: Digest, positions: bool, resumed: bool) -> Arc<Conn> {
        Arc::new(Conn::new(
            self.shared.next_serial.fetch_add(1, Ordering::Relaxed),
            digest,
            &self.shared.backlog,
            positions,
            resumed,
        ))
    }

    /// Reports that `session` (of `digest`) ended for good away from its socket's task.
    fn report_end(&self, digest: Digest, session: &Session, reason: EndReason) {
        self.ended(Ended {
            connection_id: session.connection_id.clone().unwrap_or_default(),
            digest,
            user: session.user.as_ref().map(|u| u.name.clone()),
            reason,
            close: None,
        });
    }

    /// Joins a new socket to its channels, replaying what it missed where it asked to recover,
    /// and (when it asked for positions) puts the `connected` frame first in its queue.
    fn join_all<'a>(
        &self,
        conn: &Arc<Conn>,
        channels: impl Iterator<Item = &'a Channel>,
        recover: Option<&Recover>,
        fetched: Option<&std::collections::HashMap<Channel, Fetched>>,
        resumed: bool,
    ) {
        let mut joined: Vec<Joined> = Vec::new();
        for channel in channels {
            let how = Join::Connect {
                since: recover.and_then(|r| r.seen.get(channel)),
                lost: recover.is_some_and(|r| r.lost),
                fetched: fetched.and_then(|f| f.get(channel)),
            };
            joined.extend(self.join(channel, conn, how));
        }
        if recover.is_some() {
            conn.outbox.prepend(&connected_frame(resumed, &joined));
        }
    }

    /// Mints credentials without recording them here (cluster mode keeps them in Redis).
    pub(crate) fn mint(&self, ttl: Option<Duration>) -> Result<Credentials, Error> {
        let limits = &self.shared.limits;
        let ttl = ttl.unwrap_or(limits.credential_ttl);
        if ttl > limits.max_credential_ttl || ttl.is_zero() {
            return Err(Error::BadTtl {
                max_ms: limits.max_credential_ttl.as_millis() as u64,
            });
        }
        Ok(self
            .shared
            .secrets
            .issue(now_ms().saturating_add(ttl.as_millis() as u64)))
    }

    /// Checks a presented id and key (signature and key only; expiry is [`Registry::attach`]'s).
    pub(crate) fn verify(
        &self,
        connection_id: &str,
        socket_key: &str,
    ) -> Result<Verified, CredentialError> {
        self.shared.secrets.verify(connection_id, socket_key)
    }

    /// Mints credentials valid for `ttl` (the configured default when `None`) for `user`,
    /// and records them here.
    pub(crate) fn issue(
        &self,
        ttl: Option<Duration>,
        user: Option<&User>,
    ) -> Result<Credentials, Error> {
        let creds = self.mint(ttl)?;
        if let Some(user) = user {
            self.index_user(creds.digest, user);
        }
        self.shared.sessions.insert(
            creds.digest,
            Session::issued(creds.expires_at_ms, user.cloned()),
        );
        Ok(creds)
    }

    /// Binds a new socket to verified credentials: refuses an expired, live, ended or unknown
    /// id, and hands the socket every channel its digest is subscribed to (replaying what it
    /// missed where `recover` says what it saw).
    pub(crate) fn attach(
        &self,
        verified: &Verified,
        connection_id: &str,
        recover: Option<&Recover>,
    ) -> Result<Arc<Conn>, AttachRefusal> {
        let now = now_ms();
        let mut session = match self.shared.sessions.entry(verified.digest) {
            // Signed by this deployment but never recorded here: issued before a restart.
            Entry::Vacant(_) if now >= verified.expires_at_ms => {
                return Err(AttachRefusal::Expired)
            }
            Entry::Vacant(_) => return Err(AttachRefusal::Unknown),
            Entry::Occupied(occupied) => occupied.into_ref(),
        };
        let resumed = match session.state {
            State::Issued if now >= session.expires_at_ms => return Err(AttachRefusal::Expired),
            State::Issued => false,
            State::Grace { until_ms } if now < until_ms => true,
            State::Grace { .. } => {
                self.set_state(verified.digest, &mut session, State::Dead);
                return Err(AttachRefusal::Ended);
            }
            State::Live(_) => return Err(AttachRefusal::AlreadyLive),
            State::Dead => return Err(AttachRefusal::Ended),
        };
        let conn = self.new_conn(verified.digest, recover.is_some(), resumed);
        self.join_all(&conn, session.channels.iter(), recover, None, resumed);
        session.connection_id = Some(connection_id.into());
        self.set_state(verified.digest, &mut session, State::Live(conn.clone()));
        Ok(conn)
    }

    /// Binds a socket whose credentials the cluster already accepted, with the subscriptions
    /// the cluster holds for its digest (and what the bus read from Redis for recovery);
    /// replaces whatever this node remembered of it.
    #[allow(clippy::too_many_arguments)] // one call site, the Redis bus's attach
    pub(crate) fn attach_accepted(
        &self,
        verified: &Verified,
        connection_id: &str,
        channels: Vec<Channel>,
        user: Option<User>,
        recover: Option<&Recover>,
        fetched: &std::collections::HashMap<Channel, Fetched>,
        resumed: bool,
    ) -> Arc<Conn> {
        let conn = self.new_conn(verified.digest, recover.is_some(), resumed);
        if let Some(user) = &user {
            self.index_user(verified.digest, user);
        }
        let mut session = self
            .shared
            .sessions
            .entry(verified.digest)
            .or_insert_with(|| Session::issued(verified.expires_at_ms, user.clone()));
        session.user = user;
        session.connection_id = Some(connection_id.into());
        if let State::Live(old) = &session.state {
            // The cluster says the old socket is gone; make it so here too.
            let old = old.clone();
            for channel in &session.channels {
                self.remove_subscriber(channel, old.serial);
            }
            old.outbox.close(Close::GoingAway);
            self.set_state(verified.digest, &mut session, State::Issued);
        }
        session.channels = channels.into_iter().collect();
        self.join_all(
            &conn,
            session.channels.iter(),
            recover,
            Some(fetched),
            resumed,
        );
        self.set_state(verified.digest, &mut session, State::Live(conn.clone()));
        conn
    }

    /// Unbinds a socket that ended. Does nothing if the session already moved on (for example
    /// the application disconnected it).
    pub(crate) fn detach(&self, conn: &Conn, ending: Ending) {
        let Some(mut session) = self.shared.sessions.get_mut(&conn.digest) else {
            return;
        };
        match &session.state {
            State::Live(live) if live.serial == conn.serial => {}
            _ => return,
        }
        for channel in &session.channels {
            self.remove_subscriber(channel, conn.serial);
        }
        let grace = self.shared.limits.reconnect_grace;
        let next = match ending {
            Ending::Resumable if !grace.is_zero() => State::Grace {
                until_ms: now_ms().saturating_add(grace.as_millis() as u64),
            },
            _ => State::Dead,
        };
        self.set_state(conn.digest, &mut session, next);
    }

    /// Subscribes `digest` to `channels`. Returns whether a socket is live for it on this node.
    pub(crate) fn subscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        check_channel_count(channels)?;
        let mut session = self.known_session(digest)?;
        let live = match &session.state {
            State::Live(conn) => Some(conn.clone()),
            _ => None,
        };
        let connected = matches!(session.state, State::Live(_) | State::Grace { .. });
        for channel in channels {
            if session.channels.insert(channel.clone()) {
                if let Some(conn) = &live {
                    self.join(channel, conn, Join::Live);
                }
                if connected {
                    self.presence_join(*digest, &session, channel);
                }
            }
        }
        Ok(live.is_some())
    }

    /// Unsubscribes `digest` from `channels`; a live socket stops receiving at once.
    pub(crate) fn unsubscribe(&self, digest: &Digest, channels: &[Channel]) -> Result<bool, Error> {
        check_channel_count(channels)?;
        let mut session = self.known_session(digest)?;
        let live = match &session.state {
            State::Live(conn) => Some(conn.serial),
            _ => None,
        };
        for channel in channels {
            if session.channels.remove(channel) {
                if let Some(serial) = live {
                    self.remove_subscriber(channel, serial);
                }
                self.presence_leave(digest, channel);
            }
        }
        Ok(live.is_some())
    }

    /// `digest`'s socket if it is live here; an unknown or ended digest is an error.
    /// Whether `digest` has a live socket on this node.
    pub(crate) fn is_live(&self, digest: &Digest) -> bool {
        self.shared
            .sessions
            .get(digest)
            .is_some_and(|session| matches!(session.state, State::Live(_)))
    }

    pub(super) fn live_conn(&self, digest: &Digest) -> Result<Option<Arc<Conn>>, Error> {
        let session = self.known_session(digest)?;
        Ok(match &session.state {
            State::Live(conn) => Some(conn.clone()),
            _ => None,
        })
    }

    pub(super) fn known_session(
        &self,
        digest: &Digest,
    ) -> Result<RefMut<'_, Digest, Session>, Error> {
        match self.shared.sessions.get_mut(digest) {
            Some(session) if !matches!(session.state, State::Dead) => Ok(session),
            _ => Err(Error::UnknownDigest),
        }
    }

    /// Ends `digest`'s credentials and closes its socket, if live here, with `close`.
    /// Returns whether a live socket was closed.
    pub(crate) fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        let mut session = self.known_session(digest)?;
        if let State::Live(conn) = &session.state {
            let conn = conn.clone();
            for channel in &session.channels {
                self.remove_subscriber(channel, conn.serial);
            }
            conn.outbox.close(close);
        }
        let was = self.set_state(*digest, &mut session, State::Dead);
        // A live socket's end is told by its task; one in its grace ends here. (In cluster
        // mode this runs when Redis still had the socket live here: its drop had not reached
        // Redis yet; the `Disconnect`'s script told the end, and this only counts it.)
        if matches!(was, State::Grace { .. }) {
            self.report_end(*digest, &session, EndReason::Application);
        }
        Ok(matches!(was, State::Live(_)))
    }

    /// The sockets live on this node: digest, first-use deadline, channels, user.
    pub(crate) fn live_sessions(&self) -> Vec<LiveSession> {
        self.shared
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Live(_)))
            .map(|s| LiveSession {
                digest: *s.key(),
                connection_id: s.connection_id.clone().unwrap_or_default(),
                expires_at_ms: s.expires_at_ms,
                channels: s.channels.iter().cloned().collect(),
                user: s.user.clone(),
            })
            .collect()
    }

    /// Closes the outbox of every socket live on this node with `reason` (the node's drain):
    /// each writes what it has queued, then closes.
    pub(crate) fn close_live(&self, reason: crate::error::Close) {
        for session in self.shared.sessions.iter() {
            if let State::Live(conn) = &session.state {
                conn.outbox.close(reason.clone());
            }
        }
    }

    /// The digests of the sockets live on this node.
    pub(crate) fn live_digests(&self) -> Vec<Digest> {
        self.shared
            .sessions
            .iter()
            .filter(|s| matches!(s.state, State::Live(_)))
            .map(|s| *s.key())
            .collect()
    }

    /// Forgets sessions whose time is up: never-used ids past expiry, grace periods that ran
    /// out, and dead ids past expiry (a dead id past expiry is refused as expired anyway). Tells `vacated` for channels whose
    /// vacate delay passed.
    pub(crate) fn sweep(&self) {
        let now = now_ms();
        let mut forgotten = Vec::new();
        self.shared.sessions.retain(|digest, session| {
            let keep = match session.state {
                State::Live(_) => true,
                State::Issued | State::Dead => now < session.expires_at_ms,
                State::Grace { until_ms } if now >= until_ms => {
                    self.set_state(*digest, session, State::Dead);
                    // In cluster mode Redis decides (the socket may have resumed elsewhere).
                    if !self.is_clustered() {
                        self.report_end(*digest, session, EndReason::GraceExpired);
                    }
                    now < session.expires_at_ms
                }
                State::Grace { .. } => true,
            };
            if !keep {
                self.forget_anchors(digest);
                if let Some(user) = &session.user {
                    forgotten.push((*digest, user.name.clone()));
                }
            }
            keep
        });
        for (digest, user) in forgotten {
            self.unindex_user(&digest, &user);
        }
        self.sweep_vacated();
    }

    /// One beat of the node's heartbeat, for the live sockets whose serial is `slice` modulo
    /// `slices` (a beat covers one slice, so pings spread over the ping interval instead of
    /// going out in one burst): a socket silent for longer than `idle_timeout` is closed as
    /// idle, every other one gets a ping, which a live client answers with a pong.
    pub(crate) fn heartbeat(&self, slice: u64, slices: u64, idle_timeout: Duration) {
        let now = monotonic_ms();
        for session in self.shared.sessions.iter() {
            if let State::Live(conn) = &session.state {
                if conn.serial % slices != slice {
                    continue;
                }
                if conn.silent_for(now) > idle_timeout {
                    conn.outbox.close(Close::IdleTimeout);
                } else {
                    conn.outbox.ping();
                }
            }
        }
    }
}

#[cfg(test)]
mod channel_set_tests {
    use super::ChannelSet;
    use crate::domain::Channel;
    use std::collections::HashSet;

    fn channel(n: usize) -> Channel {
        Channel::new(&format!("c-{n}")).unwrap()
    }

    #[test]
    fn a_channel_set_is_a_set_as_a_list_and_past_it() {
        let mut set = ChannelSet::default();
        let mut model = HashSet::new();
        // Up past the list's size and back down, with repeats and removals of absent ones.
        for round in 0..3 {
            for n in 0..20 {
                assert_eq!(
                    set.insert(channel(n)),
                    model.insert(channel(n)),
                    "{round} {n}"
                );
                assert!(!set.insert(channel(n)));
                assert_eq!(set.len(), model.len());
            }
            for n in (0..25).step_by(2) {
                assert_eq!(
                    set.remove(&channel(n)),
                    model.remove(&channel(n)),
                    "{round} {n}"
                );
            }
            let seen: HashSet<Channel> = set.iter().cloned().collect();
            assert_eq!(seen, model);
        }
        let mut one = ChannelSet::default();
        one.insert(channel(1));
        assert!(matches!(&one, ChannelSet::List(list) if list.capacity() == 1));
        let collected: ChannelSet = [channel(1), channel(1), channel(2)].into_iter().collect();
        assert_eq!(collected.len(), 2);
    }
}
