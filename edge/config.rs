//! Configuration: the [`Config`] a node runs with, its [`Limits`], and how settings are read.
//!
//! Settings come from flags, then `CHANNELGATE_*` environment variables, then a TOML file
//! (`--config`), then the defaults documented on each field; the first that sets a value wins.
//! [`Settings`] is that one list of settings: clap reads it from flags and environment, serde
//! reads it from the file (unknown keys are an error that names the key), and
//! [`Settings::merge`] + [`Settings::into_config`] combine them.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;

/// Limits, each with its unit and default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest client message, in bytes; larger closes the socket with 1008. Default: 64 KiB.
    pub max_message_bytes: usize,
    /// Outbound queue per socket, in bytes; a push that would overflow it closes the socket
    /// with 4100 (too slow). Default: 1 MiB.
    pub outbound_queue_bytes: usize,
    /// Largest JSON payload of a `Push` or `Send`, in bytes. Default: 256 KiB.
    pub max_push_bytes: usize,
    /// Interval of server pings. Default: 25 s.
    pub ping_interval: Duration,
    /// A socket that sends nothing (not even a pong) for this long is closed (4101). Checked
    /// with each socket's ping, so the close comes up to one ping interval later. Default: 60 s.
    pub idle_timeout: Duration,
    /// Time a client has to complete the HTTP upgrade. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Most live WebSockets per node; the next handshake gets 503. Default: 100,000.
    pub max_connections: usize,
    /// Time to live of issued credentials (first use must come before). Default: 5 min.
    pub credential_ttl: Duration,
    /// Longest TTL `IssueConnection` may ask for. Default: 24 h.
    pub max_credential_ttl: Duration,
    /// After an unclean drop, the same credentials may reconnect within this period and find
    /// their subscriptions; 0 makes every close final. Default: 30 s.
    pub reconnect_grace: Duration,
    /// Time a draining node gives its sockets and tasks to finish. Default: 10 s.
    pub shutdown_grace: Duration,
    /// Longest a `call-route` upstream request may take; then 504. Default: 10 s.
    pub upstream_timeout: Duration,
    /// Longest a `Handle` stream may take to reply; then 504. Default: 10 s.
    pub handler_timeout: Duration,
    /// Client messages being handled at once per socket (call-route, Handle); beyond it the
    /// client gets 429. Default: 16.
    pub max_inflight: usize,
    /// Client messages per second per socket (token bucket); over it the client gets 429, and
    /// `message_burst` refusals in a row close the socket with 1008. 0: unlimited. Default: 50.
    pub message_rate: u32,
    /// Client messages a socket may send at once before the rate applies. Default: 100.
    pub message_burst: u32,
    /// Most live sockets from one client address; the next handshake gets 429. 0: no limit.
    /// Default: 0 (clients behind one NAT share an address; set it to fit your users).
    pub max_connections_per_ip: usize,
    /// WebSocket handshakes per second from one client address (burst: twice that); over it
    /// the handshake gets 429. 0: no limit. Default: 0.
    pub handshake_rate_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 10,
            outbound_queue_bytes: 1 << 20,
            max_push_bytes: 256 << 10,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            credential_ttl: Duration::from_secs(300),
            max_credential_ttl: Duration::from_secs(24 * 3600),
            reconnect_grace: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(10),
            handler_timeout: Duration::from_secs(10),
            max_inflight: 16,
            message_rate: 50,
            message_burst: 100,
            max_connections_per_ip: 0,
            handshake_rate_per_ip: 0,
        }
    }
}

/// Everything a node runs with.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// Client plane (WebSocket, `/healthz`, `/readyz`). Default: 127.0.0.1:8080.
    pub listen: SocketAddr,
    /// Control plane (gRPC). Default: 127.0.0.1:50051.
    pub grpc_listen: SocketAddr,
    /// The deployment secret signing connection ids. `None`: a random one at start.
    pub secret: Option<String>,
    /// The previous secret, still accepted during a rotation.
    pub previous_secret: Option<String>,
    /// Allowed `Origin`s of WebSocket handshakes (`scheme://host[:port]`, or `*`); empty
    /// allows any. Handshakes without an `Origin` (non-browser clients) are allowed.
    pub allowed_origins: Vec<String>,
    /// Bearer tokens accepted by the control plane; empty: no authentication.
    pub control_tokens: Vec<String>,
    /// Allow a control plane on a non-loopback address without tokens.
    pub insecure_control: bool,
    /// TLS for the client plane (wss): certificate chain and private key (PEM files), reloaded
    /// on SIGHUP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// TLS for the control plane: certificate chain and private key (PEM files).
    pub grpc_tls: Option<(PathBuf, PathBuf)>,
    /// With TLS: CA (PEM) that client certificates must chain to (mutual TLS).
    pub grpc_client_ca: Option<PathBuf>,
    /// HTTP path of the WebSocket endpoint. Default: `/ws`.
    pub ws_path: String,
    /// Name of the cookie carrying the socket key. Default: `socket_key`.
    pub key_cookie: String,
    /// Cluster mode: the Redis every node shares (`redis://host:port[/db]`). `None`: a single
    /// node with an in-memory bus.
    pub redis: Option<String>,
    /// Prefix of every Redis key and channel of this deployment. Default: `channelgate`.
    pub redis_prefix: String,
    /// Base URL (`http://host:port[/prefix]`) of the application for `call-route`; `None`
    /// answers `call-route` with 501.
    pub upstream: Option<String>,
    /// Limits.
    pub limits: Limits,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field(
                "previous_secret",
                &self.previous_secret.as_ref().map(|_| "<set>"),
            )
            .field("allowed_origins", &self.allowed_origins)
            .field("control_tokens", &self.control_tokens.len())
            .field("insecure_control", &self.insecure_control)
            .field("tls", &self.tls)
            .field("grpc_tls", &self.grpc_tls)
            .field("grpc_client_ca", &self.grpc_client_ca)
            .field("ws_path", &self.ws_path)
            .field("key_cookie", &self.key_cookie)
            .field("redis", &self.redis)
            .field("redis_prefix", &self.redis_prefix)
            .field("upstream", &self.upstream)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            grpc_listen: ([127, 0, 0, 1], 50051).into(),
            secret: None,
            previous_secret: None,
            allowed_origins: Vec::new(),
            control_tokens: Vec::new(),
            insecure_control: false,
            tls: None,
            grpc_tls: None,
            grpc_client_ca: None,
            ws_path: "/ws".into(),
            key_cookie: "socket_key".into(),
            redis: None,
            redis_prefix: "channelgate".into(),
            upstream: None,
            limits: Limits::default(),
        }
    }
}

/// The settings of `channelgate serve`, from flags, environment or file. Every field is
/// optional here; defaults are applied by [`Settings::into_config`].
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TOML file with any of these settings (keys as the flag names without `--`).
    #[arg(long, env = "CHANNELGATE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Client plane address: WebSocket endpoint, /healthz, /readyz. Port 0 picks a free port.
    /// [default: 127.0.0.1:8080]
    #[arg(long, env = "CHANNELGATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Control plane (gRPC) address. Port 0 picks a free port. [default: 127.0.0.1:50051]
    #[arg(long, env = "CHANNELGATE_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,

    /// Deployment secret that signs connection ids (at least 16 bytes). Without one, a single
    /// node generates a random secret at start, and ids die with the process.
    #[arg(
        long,
        env = "CHANNELGATE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,

    /// Previous deployment secret, still accepted while rotating to a new one.
    #[arg(
        long,
        env = "CHANNELGATE_PREVIOUS_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub previous_secret: Option<String>,

    /// Comma-separated Origins allowed to open WebSockets (e.g. https://app.example.com);
    /// `*` allows any. [default: any]
    #[arg(
        long,
        env = "CHANNELGATE_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Comma-separated bearer tokens the control plane accepts (several for rotation).
    /// [default: none, no authentication]
    #[arg(
        long,
        env = "CHANNELGATE_CONTROL_TOKEN",
        value_name = "TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub control_token: Option<Vec<String>>,

    /// Allow the control plane on a non-loopback address without --control-token (anyone who
    /// can reach it could mint credentials and push). [default: false]
    #[arg(long, env = "CHANNELGATE_INSECURE_CONTROL", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_control: Option<bool>,

    /// TLS certificate chain (PEM) of the client plane (wss); with --tls-key. Reloaded on
    /// SIGHUP without dropping live sockets.
    #[arg(
        long,
        env = "CHANNELGATE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of the client plane; with --tls-cert.
    #[arg(
        long,
        env = "CHANNELGATE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// TLS certificate chain (PEM) of the control plane; with --grpc-tls-key.
    #[arg(
        long,
        env = "CHANNELGATE_GRPC_TLS_CERT",
        value_name = "FILE",
        requires = "grpc_tls_key"
    )]
    pub grpc_tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of the control plane; with --grpc-tls-cert.
    #[arg(
        long,
        env = "CHANNELGATE_GRPC_TLS_KEY",
        value_name = "FILE",
        requires = "grpc_tls_cert"
    )]
    pub grpc_tls_key: Option<PathBuf>,

    /// CA (PEM) that control-plane client certificates must chain to (mutual TLS; needs
    /// --grpc-tls-cert).
    #[arg(long, env = "CHANNELGATE_GRPC_CLIENT_CA", value_name = "FILE")]
    pub grpc_client_ca: Option<PathBuf>,

    /// HTTP path of the WebSocket endpoint. [default: /ws]
    #[arg(long, env = "CHANNELGATE_WS_PATH", value_name = "PATH")]
    pub ws_path: Option<String>,

    /// Name of the cookie carrying the socket key. [default: socket_key]
    #[arg(long, env = "CHANNELGATE_KEY_COOKIE", value_name = "NAME")]
    pub key_cookie: Option<String>,

    /// Cluster mode: the Redis every node shares (redis://host:port[/db]); requires --secret.
    /// [default: none, a single node]
    #[arg(long, env = "CHANNELGATE_REDIS", value_name = "URL")]
    pub redis: Option<String>,

    /// Prefix of this deployment's Redis keys and channels. [default: channelgate]
    #[arg(long, env = "CHANNELGATE_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// Base URL of the application for `call-route` (http://host:port); without one,
    /// `call-route` answers 501.
    #[arg(long, env = "CHANNELGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Longest a call-route upstream request may take (then 504). [default: 10s]
    #[arg(long, env = "CHANNELGATE_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    pub upstream_timeout: Option<HumanDuration>,

    /// Longest a Handle stream may take to reply (then 504). [default: 10s]
    #[arg(long, env = "CHANNELGATE_HANDLER_TIMEOUT", value_name = "DURATION")]
    pub handler_timeout: Option<HumanDuration>,

    /// Client messages handled at once per socket (call-route, Handle); beyond, 429.
    /// [default: 16]
    #[arg(long, env = "CHANNELGATE_MAX_INFLIGHT", value_name = "N")]
    pub max_inflight: Option<usize>,

    /// Client messages per second per socket; over it 429 replies, and a burst's worth of
    /// refusals in a row closes the socket with 1008. 0: unlimited. [default: 50]
    #[arg(long, env = "CHANNELGATE_MESSAGE_RATE", value_name = "N")]
    pub message_rate: Option<u32>,

    /// Most live sockets from one client address; further handshakes get 429. 0: no limit.
    /// [default: 0]
    #[arg(long, env = "CHANNELGATE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// WebSocket handshakes per second from one client address (burst: twice that); over it
    /// 429. 0: no limit. [default: 0]
    #[arg(long, env = "CHANNELGATE_HANDSHAKE_RATE_PER_IP", value_name = "N")]
    pub handshake_rate_per_ip: Option<u32>,

    /// Client messages a socket may send at once before the rate applies. [default: 100]
    #[arg(long, env = "CHANNELGATE_MESSAGE_BURST", value_name = "N")]
    pub message_burst: Option<u32>,

    /// Largest client message, in bytes (suffixes KiB, MiB); larger closes with 1008.
    /// [default: 64KiB]
    #[arg(long, env = "CHANNELGATE_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<ByteSize>,

    /// Outbound queue per socket, in bytes; overflow closes the socket with 4100.
    /// [default: 1MiB]
    #[arg(long, env = "CHANNELGATE_OUTBOUND_QUEUE", value_name = "BYTES")]
    pub outbound_queue: Option<ByteSize>,

    /// Largest JSON payload of a Push or Send, in bytes. [default: 256KiB]
    #[arg(long, env = "CHANNELGATE_MAX_PUSH_SIZE", value_name = "BYTES")]
    pub max_push_size: Option<ByteSize>,

    /// Interval of server pings (e.g. 25s). [default: 25s]
    #[arg(long, env = "CHANNELGATE_PING_INTERVAL", value_name = "DURATION")]
    pub ping_interval: Option<HumanDuration>,

    /// Close a socket that sends nothing for this long. [default: 60s]
    #[arg(long, env = "CHANNELGATE_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<HumanDuration>,

    /// Time allowed for the HTTP upgrade. [default: 10s]
    #[arg(long, env = "CHANNELGATE_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<HumanDuration>,

    /// Most live WebSockets on this node; further handshakes get 503. [default: 100000]
    #[arg(long, env = "CHANNELGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Time to live of issued credentials. [default: 5m]
    #[arg(long, env = "CHANNELGATE_CREDENTIAL_TTL", value_name = "DURATION")]
    pub credential_ttl: Option<HumanDuration>,

    /// Longest credential TTL a caller may ask for. [default: 24h]
    #[arg(long, env = "CHANNELGATE_MAX_CREDENTIAL_TTL", value_name = "DURATION")]
    pub max_credential_ttl: Option<HumanDuration>,

    /// After an unclean drop, credentials may reconnect within this period and keep their
    /// subscriptions; 0s makes every close final. [default: 30s]
    #[arg(long, env = "CHANNELGATE_RECONNECT_GRACE", value_name = "DURATION")]
    pub reconnect_grace: Option<HumanDuration>,

    /// Time a draining node waits for sockets and tasks to finish. [default: 10s]
    #[arg(long, env = "CHANNELGATE_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings (this names an unknown key).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

macro_rules! merge_fields {
    ($self:ident, $other:ident; $($field:ident),* $(,)?) => {
        Settings { config: $self.config.or($other.config), $($field: $self.$field.or($other.$field)),* }
    };
}

impl Settings {
    /// Reads the TOML file named by `--config`, if any.
    pub fn load_file(&self) -> Result<Settings, ConfigError> {
        let Some(path) = &self.config else {
            return Ok(Settings::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source: Box::new(source),
        })
    }

    /// Parses TOML settings.
    pub fn parse_toml(text: &str) -> Result<Settings, toml::de::Error> {
        toml::from_str(text)
    }

    /// `self`'s values where set, else `other`'s.
    pub fn merge(self, other: Settings) -> Settings {
        merge_fields!(self, other; listen, grpc_listen, secret, previous_secret, allowed_origins,
            control_token, insecure_control, tls_cert, tls_key, grpc_tls_cert, grpc_tls_key, grpc_client_ca, ws_path, key_cookie, redis, redis_prefix, upstream, upstream_timeout, handler_timeout,
            max_inflight, message_rate, message_burst, max_connections_per_ip, handshake_rate_per_ip,
            max_message_size, outbound_queue, max_push_size,
            ping_interval, idle_timeout, handshake_timeout, max_connections, credential_ttl,
            max_credential_ttl, reconnect_grace, shutdown_grace)
    }

    /// Applies defaults and checks the result.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let l = d.limits;
        let dur = |v: Option<HumanDuration>, default| v.map_or(default, |v| v.0);
        let size = |v: Option<ByteSize>, default| v.map_or(default, |v| v.0);
        let limits = Limits {
            max_message_bytes: size(self.max_message_size, l.max_message_bytes),
            outbound_queue_bytes: size(self.outbound_queue, l.outbound_queue_bytes),
            max_push_bytes: size(self.max_push_size, l.max_push_bytes),
            ping_interval: dur(self.ping_interval, l.ping_interval),
            idle_timeout: dur(self.idle_timeout, l.idle_timeout),
            handshake_timeout: dur(self.handshake_timeout, l.handshake_timeout),
            max_connections: self.max_connections.unwrap_or(l.max_connections),
            credential_ttl: dur(self.credential_ttl, l.credential_ttl),
            max_credential_ttl: dur(self.max_credential_ttl, l.max_credential_ttl),
            reconnect_grace: dur(self.reconnect_grace, l.reconnect_grace),
            shutdown_grace: dur(self.shutdown_grace, l.shutdown_grace),
            upstream_timeout: dur(self.upstream_timeout, l.upstream_timeout),
            handler_timeout: dur(self.handler_timeout, l.handler_timeout),
            max_inflight: self.max_inflight.unwrap_or(l.max_inflight),
            message_rate: self.message_rate.unwrap_or(l.message_rate),
            message_burst: self.message_burst.unwrap_or(l.message_burst),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(l.max_connections_per_ip),
            handshake_rate_per_ip: self
                .handshake_rate_per_ip
                .unwrap_or(l.handshake_rate_per_ip),
        };
        let config = Config {
            listen: self.listen.unwrap_or(d.listen),
            grpc_listen: self.grpc_listen.unwrap_or(d.grpc_listen),
            secret: self.secret,
            previous_secret: self.previous_secret,
            allowed_origins: self.allowed_origins.unwrap_or_default(),
            control_tokens: self.control_token.unwrap_or_default(),
            insecure_control: self.insecure_control.unwrap_or(false),
            tls: self.tls_cert.zip(self.tls_key),
            grpc_tls: self.grpc_tls_cert.zip(self.grpc_tls_key),
            grpc_client_ca: self.grpc_client_ca,
            ws_path: self.ws_path.unwrap_or(d.ws_path),
            key_cookie: self.key_cookie.unwrap_or(d.key_cookie),
            redis: self.redis,
            redis_prefix: self.redis_prefix.unwrap_or(d.redis_prefix),
            upstream: self.upstream,
            limits,
        };
        config.check()?;
        Ok(config)
    }
}

impl Config {
    /// Checks values that no type rules out.
    pub fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_push_bytes + 512 > l.outbound_queue_bytes {
            return invalid("outbound-queue must exceed max-push-size by at least 512 bytes");
        }
        if l.max_message_bytes == 0 || l.max_connections == 0 || l.max_inflight == 0 {
            return invalid("max-message-size, max-connections and max-inflight must be positive");
        }
        if l.ping_interval.is_zero() || l.ping_interval >= l.idle_timeout {
            return invalid("ping-interval must be positive and shorter than idle-timeout");
        }
        if l.credential_ttl.is_zero() || l.credential_ttl > l.max_credential_ttl {
            return invalid("credential-ttl must be positive and at most max-credential-ttl");
        }
        if !self.ws_path.starts_with('/') {
            return invalid("ws-path must start with /");
        }
        if self.redis.is_some() && self.secret.is_none() {
            return invalid("cluster mode (--redis) requires --secret, shared by every node");
        }
        if self.grpc_client_ca.is_some() && self.grpc_tls.is_none() {
            return invalid("grpc-client-ca needs grpc-tls-cert and grpc-tls-key");
        }
        if self.control_tokens.is_empty()
            && self.grpc_client_ca.is_none()
            && !self.grpc_listen.ip().is_loopback()
            && !self.insecure_control
        {
            return invalid(
                "the control plane listens beyond loopback without --control-token or \
                 --grpc-client-ca; set one, or --insecure-control if something else guards it",
            );
        }
        if self.control_tokens.iter().any(|t| t.is_empty()) {
            return invalid("control tokens must not be empty");
        }
        Ok(())
    }
}

/// A duration written like `25s`, `500ms`, `5m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(Self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size in bytes written like `65536`, `64KiB`, `1MiB` (also `KB`/`MB`, taken as binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: usize = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 65536, 64KiB or 1MiB"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => return Err(format!("unknown size unit {other:?}")),
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Settings::default().into_config().unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("100".parse::<ByteSize>().unwrap().0, 100);
        assert!("1 parsec".parse::<ByteSize>().is_err());
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn flags_override_file() {
        let file = Settings::parse_toml(
            "listen = \"0.0.0.0:9000\"\nreconnect-grace = \"5s\"\noutbound-queue = \"2MiB\"\n",
        )
        .unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Settings::default()
        };
        let c = flags.merge(file).into_config().unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.limits.reconnect_grace, Duration::from_secs(5));
        assert_eq!(c.limits.outbound_queue_bytes, 2 << 20);
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../examples/channelgate.toml");
        let settings = Settings::parse_toml(text).unwrap();
        let config = settings.into_config().unwrap();
        assert_eq!(config.allowed_origins, ["https://app.example.com"]);
        assert_eq!(config.limits.message_rate, 50);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Settings::parse_toml("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn an_open_control_plane_needs_a_token_or_an_explicit_waiver() {
        let open = |extra: fn(&mut Settings)| {
            let mut s = Settings {
                grpc_listen: Some("0.0.0.0:50051".parse().unwrap()),
                ..Settings::default()
            };
            extra(&mut s);
            s.into_config()
        };
        assert!(open(|_| {}).is_err());
        assert!(open(|s| s.control_token = Some(vec!["t".into()])).is_ok());
        assert!(open(|s| s.insecure_control = Some(true)).is_ok());
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let s = Settings {
            max_push_size: Some(ByteSize(2 << 20)),
            ..Settings::default()
        };
        assert!(s.into_config().is_err());
    }
}
