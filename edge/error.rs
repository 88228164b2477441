//! Errors at the edge's boundaries and the one table of WebSocket close codes.
//!
//! * [`Close`] is every reason the gateway ends a socket; [`Close::code`] is the only place a
//!   close code is chosen. Ranges: 1000-1008 as in RFC 6455; 4000-4099 "do not reconnect";
//!   4100-4199 "reconnect with back-off"; 4200-4299 "reconnect now".
//! * [`Error`] is what a call through the [`crate::Gateway`] can meet: a request that breaks a
//!   rule (validation), or a node that cannot serve it now ([`Unavailable`], shutting down);
//!   mapped to gRPC statuses in `control/status.rs` and nowhere else.
//! * [`StartError`] is what keeps a node from starting (bad settings, unreadable files,
//!   listeners); [`NotReady`] is why a started node does not take traffic (`/readyz`, gRPC
//!   health). Causes are typed sources, never flattened into strings.

use std::{path::PathBuf, sync::Arc, time::Duration};

pub use crate::credentials::{BadDigest, WeakSecret};
use crate::domain::{BadChannel, BadJson, BadUser, MAX_INFO_LEN, MAX_USER_LEN};

/// An upstream URL (`--upstream`) that cannot be used (the URL).
#[derive(Debug, thiserror::Error)]
#[error("upstream must be an http:// URL with a host, like http://127.0.0.1:3000: {0}")]
pub struct BadUpstream(pub(crate) String);

/// A `trusted-proxies` or `client-address-header` value that does not parse (the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadProxies {
    /// A `trusted-proxies` entry.
    #[error("trusted-proxies: {0:?} is neither an address nor a network (CIDR)")]
    Network(String),
    /// The `client-address-header` value.
    #[error("client-address-header {0:?}: expected x-forwarded-for, forwarded or none")]
    Header(String),
}

/// An underlying failure (Redis's, rustls's, a task's), shared when one failure answers many
/// calls.
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

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
    /// Cluster mode: the cluster's state (Redis) cannot be used now.
    #[error("cluster state unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Why the node cannot use the cluster's shared state (Redis) now: calls fail fast with it
/// (gRPC `UNAVAILABLE`), and it is the reason `/readyz` and the health service give.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// The node has not connected to Redis yet.
    #[error("connecting to Redis")]
    Connecting,
    /// The pub/sub connection dropped; the node reconnects.
    #[error("lost the Redis connection; reconnecting")]
    Reconnecting,
    /// Redis did not answer a command within its deadline.
    #[error("Redis did not answer within {0:?}")]
    Stalled(Duration),
    /// A Redis command or connection failed.
    #[error("Redis: {0}")]
    Redis(#[source] Source),
    /// Redis answered something out of shape.
    #[error("unexpected answer from Redis: {what}")]
    Answer {
        /// What was out of shape.
        what: &'static str,
        /// The parser's complaint, when there is one.
        #[source]
        source: Option<Source>,
    },
    /// A task of the cluster bus ended (which); the node can no longer keep its part.
    #[error("cluster bus task {task:?} stopped")]
    Broken {
        /// The task's name.
        task: &'static str,
        /// How it failed, when it did not just return.
        #[source]
        source: Option<Source>,
    },
}

impl Unavailable {
    /// A Redis failure.
    pub(crate) fn redis(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Redis(Arc::new(err))
    }

    /// An answer out of shape (`what`).
    pub(crate) fn answer(what: &'static str) -> Self {
        Self::Answer { what, source: None }
    }

    /// An answer the parser refused (`what` was being read).
    pub(crate) fn malformed(
        what: &'static str,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Answer {
            what,
            source: Some(Arc::new(err)),
        }
    }
}

/// Why a started node does not take traffic now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotReady {
    /// It is draining, for good.
    #[error("draining")]
    Draining,
    /// The cluster's state cannot be used.
    #[error(transparent)]
    Cluster(#[from] Unavailable),
}

/// What keeps a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A deployment secret that is too short.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
    /// Cluster mode needs a deployment secret shared by every node.
    #[error("cluster mode (--redis) requires --secret, shared by every node")]
    ClusterNeedsSecret,
    /// The Redis URL cannot be used.
    #[error("redis {url}: {source}")]
    Redis {
        /// The URL (its password included only if the setting held one: the setting is the
        /// operator's own).
        url: String,
        /// Why.
        #[source]
        source: Source,
    },
    /// The `call-route` upstream is not a usable URL.
    #[error(transparent)]
    BadUpstream(#[from] BadUpstream),
    /// `trusted-proxies` or `client-address-header` does not parse.
    #[error(transparent)]
    BadProxies(#[from] BadProxies),
    /// A TLS certificate or key that cannot be read or used.
    #[error("reading the TLS {what} {}: {source}", path.display())]
    Tls {
        /// `certificate`, `key` or `certificate and key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Source,
    },
    /// A listener or signal handler failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The failure.
        #[source]
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
