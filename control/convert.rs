//! Conversions between `pb` messages and edge types: validation at the boundary, so the
//! service never sees an unchecked channel, digest or close code.

use std::time::Duration;

use tonic::Status;

use std::collections::HashMap;

use edge::{
    config::JoinLeave,
    domain::User,
    domain::{valid_epoch, Channel, Json, Position},
    error::{code, Close, Error},
    gateway::{
        Change, Credentials, Digest, HandlerReply, HistoryQuery, ListenEvent, Page, Present,
        Pushed, Stats, Wants,
    },
};

use crate::{pb, status::status};

/// Longest close reason a WebSocket close frame carries, in bytes.
const MAX_CLOSE_REASON: usize = 123;

/// Checks every channel name.
pub(crate) fn channels(names: &[String]) -> Result<Vec<Channel>, Status> {
    names
        .iter()
        .map(|n| Channel::new(n).map_err(|e| status(e.into())))
        .collect()
}

/// Checks one channel name.
pub(crate) fn channel(name: &str) -> Result<Channel, Status> {
    Channel::new(name).map_err(|e| status(e.into()))
}

/// Parses a digest.
pub(crate) fn digest(text: &str) -> Result<Digest, Status> {
    text.parse()
        .map_err(|e: edge::gateway::BadDigest| status(e.into()))
}

/// The user (and info) credentials are issued for; `None` when the application named none.
/// Info without a user is refused: it would be bound to nobody.
pub(crate) fn user(name: &str, info: &str) -> Result<Option<User>, Status> {
    if name.is_empty() {
        if !info.is_empty() {
            return Err(Status::invalid_argument("info_json needs a user"));
        }
        return Ok(None);
    }
    User::new(name, info)
        .map(Some)
        .map_err(|bad| status(edge::error::Error::from(bad)))
}

/// Whether a call that addresses connections names a user (`true`) or a digest (`false`);
/// both, or neither, is refused.
pub(crate) fn addresses_user(digest: &str, user: &str) -> Result<bool, Status> {
    match (digest.is_empty(), user.is_empty()) {
        (true, false) => Ok(true),
        (false, true) => Ok(false),
        _ => Err(status(Error::DigestOrUser)),
    }
}

/// A presence entry on the wire.
pub(crate) fn member(m: Present) -> pb::PresenceMember {
    let (user, info_json) = m.user.map_or_else(Default::default, |u| {
        (
            u.name.to_string(),
            u.info.as_deref().unwrap_or("").to_owned(),
        )
    });
    pb::PresenceMember {
        digest: m.digest.to_string(),
        connection_id: m.connection_id.into(),
        user,
        info_json,
        since_unix_ms: m.since_ms,
    }
}

/// What a `Listen` request asks beyond pushes.
pub(crate) fn wants(r: &pb::ListenRequest) -> Result<Wants, Status> {
    let join_leave = match pb::PresenceEvents::try_from(r.presence_events) {
        Ok(pb::PresenceEvents::None) => JoinLeave::Off,
        Ok(pb::PresenceEvents::Connection) => JoinLeave::Connection,
        Ok(pb::PresenceEvents::User) => JoinLeave::User,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "presence_events: unknown value {}",
                r.presence_events
            )))
        }
    };
    Ok(Wants {
        join_leave,
        occupancy: r.occupancy,
    })
}

/// One event of a `Listen` stream on the wire.
pub(crate) fn listen_event(event: &ListenEvent) -> pb::ListenEvent {
    let presence = event.presence();
    let change = presence.map_or(pb::PresenceChange::None, |p| match p.change {
        Change::Join => pb::PresenceChange::Join,
        Change::Leave => pb::PresenceChange::Leave,
        Change::Occupied => pb::PresenceChange::Occupied,
        Change::Vacated => pb::PresenceChange::Vacated,
    });
    pb::ListenEvent {
        channel: event.channel.to_string(),
        json: event.json().unwrap_or_default().to_owned(),
        offset: event.position.offset,
        epoch: event.position.epoch.to_string(),
        gap: event.is_gap(),
        presence: change.into(),
        member: presence.and_then(|p| p.member.clone()).map(member),
        of_user: presence.is_some_and(|p| p.of_user),
    }
}

/// A TTL in milliseconds; 0 means the default.
pub(crate) fn ttl(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

/// An application close: code in 4000..=4099 (0 means 4000), reason at most 123 bytes.
/// `Disconnect` ends the credentials, so only the "do not reconnect" range is allowed: a code
/// in 4100..=4299 would send the client back to credentials that are already dead.
pub(crate) fn close(code: u32, reason: String) -> Result<Close, Status> {
    checked_close(code, reason).map_err(status)
}

/// [`close`], with the edge's error (for callers that are not gRPC: `ingest`).
pub(crate) fn checked_close(code: u32, reason: String) -> Result<Close, Error> {
    let code = match code {
        0 => code::APPLICATION,
        c @ 4000..=4099 => c as u16,
        _ => return Err(Error::BadClose),
    };
    if reason.len() > MAX_CLOSE_REASON {
        return Err(Error::BadClose);
    }
    let reason = if reason.is_empty() {
        "disconnected by the application".to_owned()
    } else {
        reason
    };
    Ok(Close::Application { code, reason })
}

impl From<Credentials> for pb::IssueConnectionResponse {
    fn from(c: Credentials) -> Self {
        Self {
            connection_id: c.connection_id,
            socket_key: c.socket_key,
            digest: c.digest.to_string(),
            expires_at_unix_ms: c.expires_at_ms,
        }
    }
}

impl From<Stats> for pb::StatsResponse {
    fn from(s: Stats) -> Self {
        Self {
            connections: s.connections,
            channels: s.channels,
            subscriptions: s.subscriptions,
            sessions: s.sessions,
            channel_subscribers: s.per_channel.into_iter().collect(),
        }
    }
}

/// A `Handle` reply: status in 100..=599, `body_json` empty (null) or valid JSON.
pub(crate) fn remote_reply(reply: pb::Reply) -> Result<HandlerReply, Status> {
    let status = u16::try_from(reply.status)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| {
            Status::invalid_argument(format!("reply status {} is not in 100..=599", reply.status))
        })?;
    let body = if reply.body_json.trim().is_empty() {
        None
    } else {
        Some(Json::parse(&reply.body_json).map_err(|e| {
            Status::invalid_argument(format!("reply {}: body_json: {e}", reply.delivery_id))
        })?)
    };
    let mut headers: Vec<(String, String)> = reply.headers.into_iter().collect();
    headers.sort();
    Ok(HandlerReply {
        delivery_id: reply.delivery_id,
        status,
        headers,
        body,
    })
}

/// An idempotency key: empty means none (checked by the gateway).
pub(crate) fn idempotency_key(key: &str) -> Option<&str> {
    (!key.is_empty()).then_some(key)
}

fn position(channel: &Channel, p: &Position) -> pb::ChannelPosition {
    pb::ChannelPosition {
        channel: channel.to_string(),
        epoch: p.epoch.to_string(),
        offset: p.offset,
    }
}

impl From<Pushed> for pb::PushResponse {
    fn from(p: Pushed) -> Self {
        Self {
            queued: p.queued,
            positions: p.positions.iter().map(|(c, p)| position(c, p)).collect(),
        }
    }
}

/// What a `PushStream` did: its pushes, the sockets they were queued to, and the position of
/// each channel's last push.
#[derive(Debug, Default)]
pub(crate) struct StreamSummary {
    pub(crate) pushes: u64,
    queued: u64,
    /// One hash per push and channel: a fast hasher, since a stream may push to many channels.
    last: foldhash::HashMap<Channel, Position>,
}

impl StreamSummary {
    /// Counts one resolved push.
    pub(crate) fn add(&mut self, pushed: Pushed) {
        self.pushes += 1;
        self.queued += pushed.queued;
        for (channel, position) in pushed.positions {
            self.last.insert(channel, position);
        }
    }
}

impl From<StreamSummary> for pb::PushStreamResponse {
    fn from(s: StreamSummary) -> Self {
        Self {
            pushes: s.pushes,
            queued: s.queued,
            positions: s.last.iter().map(|(c, p)| position(c, p)).collect(),
        }
    }
}

/// A `History` request's query.
pub(crate) fn history_query(r: &pb::HistoryRequest) -> HistoryQuery {
    HistoryQuery {
        epoch: r
            .since
            .as_ref()
            .map(|s| s.epoch.clone())
            .filter(|e| !e.is_empty()),
        from: r.since.as_ref().map(|s| s.offset).filter(|o| *o > 0),
        limit: r.limit as usize,
        reverse: r.reverse,
    }
}

impl From<Position> for pb::Position {
    fn from(p: Position) -> Self {
        Self {
            epoch: p.epoch.to_string(),
            offset: p.offset,
        }
    }
}

/// A `History` answer.
pub(crate) fn history_page((position, page): Page) -> pb::HistoryResponse {
    pb::HistoryResponse {
        epoch: position.epoch.to_string(),
        offset: position.offset,
        publications: page
            .into_iter()
            .map(|(offset, json)| pb::Publication { offset, json })
            .collect(),
    }
}

/// `Listen`'s starting positions: valid channel names and epochs.
pub(crate) fn since(
    map: &HashMap<String, pb::Position>,
) -> Result<HashMap<Channel, Position>, Status> {
    map.iter()
        .map(|(name, p)| {
            let channel = channel(name)?;
            if !valid_epoch(&p.epoch) {
                return Err(Status::invalid_argument(format!(
                    "since[{name:?}]: an epoch is 1 to 64 characters of [0-9a-zA-Z_-]"
                )));
            }
            Ok((
                channel,
                Position {
                    epoch: p.epoch.as_str().into(),
                    offset: p.offset,
                },
            ))
        })
        .collect()
}
