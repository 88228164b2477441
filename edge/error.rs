//! Errors at the edge's boundaries and the one table of WebSocket close codes.
//!
//! * [`Close`] is every reason the gateway ends a socket; [`Close::code`] is the only place a
//!   close code is chosen. Ranges: 1000-1008 as in RFC 6455; 4000-4099 "do not reconnect";
//!   4100-4199 "reconnect with back-off"; 4200-4299 "reconnect now".
//! * [`Error`] is what the control plane and the embedding API can get wrong, mapped to gRPC
//!   statuses in `control/status.rs` and nowhere else.

use crate::{
    credentials::{BadDigest, WeakSecret},
    domain::{BadChannel, BadJson, BadUser, MAX_INFO_LEN, MAX_USER_LEN},
};

/// Why the gateway closes (or closed) a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// 1001: the node is draining; reconnect (to another node).
    GoingAway,
    /// 1002: the client broke the WebSocket protocol.
    Protocol,
    /// 1007: a text frame that is not UTF-8.
    InvalidPayload,
    /// 1008: a message larger than the inbound limit, or another policy violation.
    Policy(&'static str),
    /// 4000-4099 (default 4000): the application disconnected the socket; its credentials are
    /// dead. The application picks the code and the reason.
    Application {
        /// A code in 4000..=4099: the "do not reconnect" range, because the credentials are
        /// dead (an application that wants the client back issues new ones).
        code: u16,
        /// Sent to the client (at most 123 bytes).
        reason: String,
    },
    /// 4100: the outbound queue filled up: the client does not read fast enough. Reconnect
    /// with back-off.
    TooSlow,
    /// 4101: nothing arrived from the client within the idle timeout (not even a pong).
    IdleTimeout,
}

/// Close codes, in one place. The README's table is written from these.
pub mod code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The node is going away (drain).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Invalid payload data (not UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation (e.g. message too large).
    pub const POLICY: u16 = 1008;
    /// Disconnected by the application (default code of `Disconnect`).
    pub const APPLICATION: u16 = 4000;
    /// Too slow: outbound queue full.
    pub const TOO_SLOW: u16 = 4100;
    /// Idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4101;
}

impl Close {
    /// Whether a close frame *from the client* with `code` keeps its credentials resumable: the
    /// "reconnect now" range 4200-4299, which the browser client sends when it gives up on a
    /// socket that stopped answering. Any other client close ends the credentials.
    pub fn is_client_reconnect(code: u16) -> bool {
        (4200..=4299).contains(&code)
    }

    /// The WebSocket close code.
    pub fn code(&self) -> u16 {
        match self {
            Self::GoingAway => code::GOING_AWAY,
            Self::Protocol => code::PROTOCOL,
            Self::InvalidPayload => code::INVALID_PAYLOAD,
            Self::Policy(_) => code::POLICY,
            Self::Application { code, .. } => *code,
            Self::TooSlow => code::TOO_SLOW,
            Self::IdleTimeout => code::IDLE_TIMEOUT,
        }
    }

    /// The close reason sent to the client.
    pub fn reason(&self) -> &str {
        match self {
            Self::GoingAway => "going away",
            Self::Protocol => "protocol error",
            Self::InvalidPayload => "invalid UTF-8",
            Self::Policy(why) => why,
            Self::Application { reason, .. } => reason,
            Self::TooSlow => "too slow: outbound queue full",
            Self::IdleTimeout => "idle timeout",
        }
    }

    /// Whether the credentials stay usable within the reconnect grace after this close.
    /// Only an application disconnect ends them at once (a client's own close does too, but
    /// that is not a [`Close`] of the gateway's).
    pub fn allows_resume(&self) -> bool {
        !matches!(self, Self::Application { .. })
    }
}

/// Errors of the gateway's API (control plane and embedding).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A channel name outside the rules.
    #[error(transparent)]
    BadChannel(#[from] BadChannel),
    /// A call that needs at least one channel got none.
    #[error("at least one channel is required")]
    NoChannels,
    /// Too many channels in one call.
    #[error("at most {max} channels per call")]
    TooManyChannels {
        /// The limit.
        max: usize,
    },
    /// A digest that is not 64 hex digits.
    #[error(transparent)]
    BadDigest(#[from] BadDigest),
    /// A digest this node does not know, or whose credentials have ended.
    #[error("no connection with this digest: never issued, expired or ended")]
    UnknownDigest,
    /// JSON that does not parse.
    #[error(transparent)]
    BadJson(#[from] BadJson),
    /// A JSON payload over the size limit.
    #[error("payload of {len} bytes is over the limit of {max} bytes")]
    PayloadTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A close code outside 4000..=4099, or a reason over 123 bytes.
    #[error(
        "close code must be in 4000..=4099 (disconnected: do not reconnect) and the reason at \
         most 123 bytes"
    )]
    BadClose,
    /// A credential TTL outside the allowed range.
    #[error("ttl must be at most {max_ms} ms")]
    BadTtl {
        /// The largest TTL allowed.
        max_ms: u64,
    },
    /// A deployment secret that is too short.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
    /// `History` from an epoch that is no longer the channel's: its past was lost.
    #[error("the channel's epoch changed (its history was lost); it is now at epoch {} offset {}", position.epoch, position.offset)]
    EpochChanged {
        /// Where the channel stands now.
        position: crate::domain::Position,
    },
    /// An idempotency key outside the rules.
    #[error("an idempotency key is 1 to {max} bytes of printable ASCII")]
    BadIdempotencyKey {
        /// The longest key.
        max: usize,
    },
    /// The node keeps as many idempotency records as it may.
    #[error("too many idempotency keys within the window (at most {max}); retry later")]
    TooManyIdempotencyKeys {
        /// The limit.
        max: usize,
    },
    /// A user name outside the rules.
    #[error("a user is 1 to {max} bytes without control characters")]
    BadUser {
        /// The longest name.
        max: usize,
    },
    /// User info over the size limit.
    #[error("user info is JSON of at most {max} bytes")]
    BadUserInfo {
        /// The limit.
        max: usize,
    },
    /// `Presence` on a channel whose namespace does not keep presence.
    #[error("presence is not kept for this channel: set `presence = true` in its namespace's table ([namespaces.NAME])")]
    PresenceOff,
    /// A call that addresses a connection needs a digest or a user, not both.
    #[error("give either a digest or a user")]
    DigestOrUser,
    /// The `call-route` upstream is not a usable URL (why).
    #[error("{0}")]
    BadUpstream(String),
    /// A setting that does not hold (why); the configuration's own check says it first.
    #[error("invalid setting: {0}")]
    BadConfig(String),
    /// Cluster mode: Redis could not be reached.
    #[error("cluster state unavailable: {0}")]
    ClusterUnavailable(String),
    /// Cluster mode needs a deployment secret shared by every node.
    #[error("cluster mode (--redis) requires --secret, shared by every node")]
    ClusterNeedsSecret,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A listener or socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl From<BadUser> for Error {
    /// The same answers as before users had a type of their own: the name's and the size's
    /// limits, or the JSON error.
    fn from(bad: BadUser) -> Self {
        match bad {
            BadUser::Name => Error::BadUser { max: MAX_USER_LEN },
            BadUser::InfoTooLarge => Error::BadUserInfo { max: MAX_INFO_LEN },
            BadUser::InfoNotJson(bad) => Error::BadJson(bad),
        }
    }
}
