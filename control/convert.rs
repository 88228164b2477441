//! Conversions between `pb` messages and edge types: validation at the boundary, so the
//! service never sees an unchecked channel, digest or close code.

use std::time::Duration;

use crate::{
    credentials::{Credentials, Digest},
    error::{code, Close, Error},
    pb,
    protocol::Channel,
    registry::Stats,
};

/// Longest close reason a WebSocket close frame carries, in bytes.
const MAX_CLOSE_REASON: usize = 123;

/// Checks every channel name.
pub(crate) fn channels(names: &[String]) -> Result<Vec<Channel>, Error> {
    names
        .iter()
        .map(|n| Channel::new(n).map_err(Error::from))
        .collect()
}

/// Parses a digest.
pub(crate) fn digest(text: &str) -> Result<Digest, Error> {
    Ok(text.parse()?)
}

/// A TTL in milliseconds; 0 means the default.
pub(crate) fn ttl(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

/// An application close: code in 4000..=4999 (0 means 4000), reason at most 123 bytes.
pub(crate) fn close(code: u32, reason: String) -> Result<Close, Error> {
    let code = match code {
        0 => code::APPLICATION,
        c @ 4000..=4999 => c as u16,
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
