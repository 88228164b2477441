//! Configuration: every setting of a node, declared once.
//!
//! Each line of the [`settings!`] invocation below is one setting: its field, type, default,
//! environment variable, value name and help. From it come the field of [`Config`] (or
//! [`Limits`]) with its documentation, its default in `Config::default()`, the `--flag` and
//! environment variable of `channelgate serve` (clap), its key in the TOML file given with
//! `--config` (serde; unknown keys are an error that names the key), and its row in
//! [`SETTINGS`], from which the README's tables and `examples/channelgate.toml` are checked by a
//! test. The control plane's settings (`grpc-*`, `control-token`, `insecure-control`) are
//! declared in the same table, so a node has one `--help`, one file and one README table; they
//! are plain data here: the control plane (`control/settings.rs`) reads and checks them, the
//! edge never does.
//!
//! Precedence: flags, then `CHANNELGATE_*` environment variables, then the file, then the
//! defaults: the first that sets a value wins ([`Settings::merge`], [`Settings::into_config`]).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;

/// One setting, as documented: see [`SETTINGS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingDoc {
    /// The field (`ping_interval`); the TOML key and flag are its kebab-case ([`Self::key`]).
    pub field: &'static str,
    /// The environment variable (`CHANNELGATE_PING_INTERVAL`).
    pub env: &'static str,
    /// The default, as a user would write it (`25s`); `none` when unset by default.
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

impl SettingDoc {
    /// The TOML key (`ping-interval`).
    pub fn key(&self) -> String {
        self.field.replace('_', "-")
    }

    /// The flag (`--ping-interval`).
    pub fn flag(&self) -> String {
        format!("--{}", self.key())
    }
}

/// How a setting's value is written. Each kind has `parse` (one flag or environment value),
/// `value` (a whole value as written, for defaults) and `de` (a TOML value), so flags,
/// environment, file and defaults read alike.
pub mod kind {
    use serde::Deserialize;
    use std::time::Duration;

    use super::{ByteSize, HumanDuration};

    macro_rules! simple {
        ($($kind:ident: $ty:ty, $what:literal;)*) => {$(
            #[doc = $what]
            pub mod $kind {
                use super::*;
                /// Parses a flag or environment value.
                pub fn parse(s: &str) -> Result<$ty, String> {
                    s.parse().map_err(|e| format!("{e}"))
                }
                /// Parses a whole value as written.
                pub fn value(s: &str) -> Result<$ty, String> {
                    parse(s)
                }
                /// Reads a TOML value.
                pub fn de(v: toml::Value) -> Result<$ty, String> {
                    <$ty>::deserialize(v).map_err(|e| e.to_string())
                }
            }
        )*};
    }

    simple! {
        addr: std::net::SocketAddr, "Socket addresses: `127.0.0.1:8080`.";
        text: String, "Text.";
        path: std::path::PathBuf, "File paths.";
        count: usize, "Counts.";
        rate: u32, "Rates (per second) and bursts.";
        flag: bool, "Booleans: `true`, `false` (a bare flag means `true`).";
    }

    /// Durations: `500ms`, `25s`, `5m`, `1h 30m`.
    pub mod dur {
        use super::*;
        /// Parses a flag or environment value.
        pub fn parse(s: &str) -> Result<Duration, String> {
            s.parse::<HumanDuration>()
                .map(|d| d.0)
                .map_err(|e| e.to_string())
        }
        /// Parses a whole value as written.
        pub fn value(s: &str) -> Result<Duration, String> {
            parse(s)
        }
        /// Reads a TOML value.
        pub fn de(v: toml::Value) -> Result<Duration, String> {
            HumanDuration::deserialize(v)
                .map(|d| d.0)
                .map_err(|e| e.to_string())
        }
    }

    /// Sizes in bytes: `65536`, `64KiB`, `1MiB`.
    pub mod size {
        use super::*;
        /// Parses a flag or environment value.
        pub fn parse(s: &str) -> Result<usize, String> {
            s.parse::<ByteSize>().map(|b| b.0)
        }
        /// Parses a whole value as written.
        pub fn value(s: &str) -> Result<usize, String> {
            parse(s)
        }
        /// Reads a TOML value.
        pub fn de(v: toml::Value) -> Result<usize, String> {
            ByteSize::deserialize(v)
                .map(|b| b.0)
                .map_err(|e| e.to_string())
        }
    }

    /// Lists: comma-separated in flags and environment, arrays in TOML.
    pub mod list {
        use super::*;
        /// Parses one item of a flag or environment value (clap splits at commas).
        pub fn parse(s: &str) -> Result<String, String> {
            Ok(s.trim().to_owned())
        }
        /// Parses a whole comma-separated value.
        pub fn value(s: &str) -> Result<Vec<String>, String> {
            Ok(s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        /// Reads a TOML value: an array of strings (or one string).
        pub fn de(v: toml::Value) -> Result<Vec<String>, String> {
            match v {
                toml::Value::String(s) => value(&s),
                v => Vec::<String>::deserialize(v).map_err(|e| e.to_string()),
            }
        }
    }
}

/// Declares every setting once; see the module's documentation.
macro_rules! settings {
    (
        $(#[$config_meta:meta])* pub struct Config { $($c:tt)* }
        $(#[$limits_meta:meta])* pub struct Limits { $($l:tt)* }
    ) => {
        settings!(@structs [$(#[$config_meta])*] [$(#[$limits_meta])*] [] [] ; $($c)* ; $($l)*);
    };
    // Munches one row at a time, tagging each with the struct it belongs to.
    (@structs $cm:tt $lm:tt [$($cr:tt)*] [$($lr:tt)*] ;
        $(#[doc = $doc:literal])+
        $name:ident : $ty:ty = $default:tt [$kind:ident] $env:literal $value:literal $({$($arg:tt)*})? ;
        $($rest:tt)*
    ) => {
        settings!(@structs $cm $lm [$($cr)* ([$($doc)+] $name $ty, $default, $kind, $env, $value, [$($($arg)*)?])] [$($lr)*] ; $($rest)*);
    };
    (@structs $cm:tt $lm:tt [$($cr:tt)*] [$($lr:tt)*] ; ;
        $(#[doc = $doc:literal])+
        $name:ident : $ty:ty = $default:tt [$kind:ident] $env:literal $value:literal $({$($arg:tt)*})? ;
        $($rest:tt)*
    ) => {
        settings!(@structs $cm $lm [$($cr)*] [$($lr)* ([$($doc)+] $name $ty, $default, $kind, $env, $value, [$($($arg)*)?])] ; ; $($rest)*);
    };
    (@structs [$($cm:tt)*] [$($lm:tt)*]
        [$(([$($cdoc:literal)+] $cname:ident $cty:ty, $cdef:tt, $ckind:ident, $cenv:literal, $cvalue:literal, [$($carg:tt)*]))*]
        [$(([$($ldoc:literal)+] $lname:ident $lty:ty, $ldef:tt, $lkind:ident, $lenv:literal, $lvalue:literal, [$($larg:tt)*]))*]
        ; ;
    ) => {
        $($cm)*
        #[derive(Clone, PartialEq, Eq)]
        pub struct Config {
            $( $(#[doc = $cdoc])* #[doc = concat!("Default: ", settings!(@show $cdef), ".")]
               pub $cname: settings!(@ty $cdef $cty), )*
            /// Limits.
            pub limits: Limits,
            /// The file's `[[consumers]]` tables, kept as written: the composition root reads
            /// them (`channelgate::ingest`), the edge never does. Default: none.
            pub consumers: Consumers,
        }

        $($lm)*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Limits {
            $( $(#[doc = $ldoc])* #[doc = concat!("Default: ", settings!(@show $ldef), ".")]
               pub $lname: settings!(@ty $ldef $lty), )*
            /// Per-namespace overrides of the history settings (the file's `[namespaces.NAME]`
            /// tables; no flag or variable). Default: none.
            pub namespaces: Namespaces,
        }

        impl Default for Config {
            fn default() -> Self {
                Self {
                    $( $cname: settings!(@default $cname $ckind $cdef), )*
                    limits: Limits::default(),
                    consumers: Consumers::default(),
                }
            }
        }

        impl Default for Limits {
            fn default() -> Self {
                Self {
                    $( $lname: settings!(@default $lname $lkind $ldef), )*
                    namespaces: Namespaces::default(),
                }
            }
        }

        impl fmt::Debug for Config {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct("Config");
                $( d.field(stringify!($cname), &Redacted(stringify!($cname), &self.$cname)); )*
                d.field("limits", &self.limits)
                    .field("consumers", &self.consumers.0.len())
                    .finish()
            }
        }

        /// The settings of `channelgate serve`, from flags, environment or file. Every field
        /// is optional here; defaults are applied by [`Settings::into_config`].
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct Settings {
            /// TOML file with any of these settings (keys as the flag names without `--`).
            #[arg(long, env = "CHANNELGATE_CONFIG", value_name = "FILE")]
            pub config: Option<PathBuf>,
            /// The file's `[namespaces.NAME]` tables (file only).
            #[arg(skip)]
            pub namespaces: Option<Namespaces>,
            /// The file's `[[consumers]]` tables (file only).
            #[arg(skip)]
            pub consumers: Option<Consumers>,
            $( $(#[doc = $cdoc])*
               #[arg(long, env = $cenv, value_name = $cvalue, value_parser = kind::$ckind::parse,
                     help = concat!($($cdoc),*, " [default: ", settings!(@show $cdef), "]").trim_start(), $($carg)*)]
               pub $cname: Option<$cty>, )*
            $( $(#[doc = $ldoc])*
               #[arg(long, env = $lenv, value_name = $lvalue, value_parser = kind::$lkind::parse,
                     help = concat!($($ldoc),*, " [default: ", settings!(@show $ldef), "]").trim_start(), $($larg)*)]
               pub $lname: Option<$lty>, )*
        }

        impl Settings {
            /// Parses the settings of a TOML file: every key is a setting's flag without its
            /// `--`; an unknown key, or a value that does not parse, is an error that names it.
            pub fn parse_toml(text: &str) -> Result<Settings, String> {
                let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
                let mut settings = Settings::default();
                for (key, value) in table {
                    let field = key.replace('-', "_");
                    // Only kebab-case keys: `ping_interval` is as unknown as `lisen`.
                    let field = if key.contains('_') { String::new() } else { field };
                    let named = |e: String| format!("{key}: {e}");
                    if key == "namespaces" {
                        settings.namespaces = Some(Namespaces::from_toml(value).map_err(named)?);
                        continue;
                    }
                    if key == "consumers" {
                        settings.consumers = Some(Consumers::from_toml(value).map_err(named)?);
                        continue;
                    }
                    match field.as_str() {
                        $( stringify!($cname) => settings.$cname = Some(kind::$ckind::de(value).map_err(named)?), )*
                        $( stringify!($lname) => settings.$lname = Some(kind::$lkind::de(value).map_err(named)?), )*
                        _ => return Err(format!("unknown setting `{key}` (keys are the `serve` flags without `--`)")),
                    }
                }
                Ok(settings)
            }

            /// `self`'s values where set, else `other`'s.
            pub fn merge(self, other: Settings) -> Settings {
                Settings {
                    config: self.config.or(other.config),
                    namespaces: self.namespaces.or(other.namespaces),
                    consumers: self.consumers.or(other.consumers),
                    $( $cname: self.$cname.or(other.$cname), )*
                    $( $lname: self.$lname.or(other.$lname), )*
                }
            }

            /// Applies defaults and checks the result.
            pub fn into_config(self) -> Result<Config, ConfigError> {
                let mut config = Config::default();
                $( settings!(@apply config.$cname, self.$cname, $cdef); )*
                $( settings!(@apply config.limits.$lname, self.$lname, $ldef); )*
                if let Some(namespaces) = self.namespaces {
                    config.limits.namespaces = namespaces;
                }
                if let Some(consumers) = self.consumers {
                    config.consumers = consumers;
                }
                config.check()?;
                Ok(config)
            }
        }

        /// Every setting, in declaration order.
        pub const SETTINGS: &[SettingDoc] = &[
            $( SettingDoc {
                field: stringify!($cname),
                env: $cenv,
                default: settings!(@show $cdef),
                help: concat!($($cdoc, "\n"),*),
            }, )*
            $( SettingDoc {
                field: stringify!($lname),
                env: $lenv,
                default: settings!(@show $ldef),
                help: concat!($($ldoc, "\n"),*),
            }, )*
        ];
    };
    (@ty none $ty:ty) => { Option<$ty> };
    (@ty $default:literal $ty:ty) => { $ty };
    (@show none) => { "none" };
    (@show $default:literal) => { $default };
    (@default $name:ident $kind:ident none) => { None };
    (@default $name:ident $kind:ident $default:literal) => {
        match kind::$kind::value($default) {
            Ok(value) => value,
            Err(err) => panic!("the default of {} does not parse: {err}", stringify!($name)),
        }
    };
    (@apply $field:expr, $value:expr, none) => { if let Some(v) = $value { $field = Some(v) } };
    (@apply $field:expr, $value:expr, $default:literal) => { if let Some(v) = $value { $field = v } };
}

settings! {
    /// Everything a node runs with (both planes; the edge never reads the control plane's).
    pub struct Config {
        /// Client plane address: WebSocket endpoint, /healthz, /readyz, /metrics. Port 0 picks a
        /// free port.
        listen: SocketAddr = "127.0.0.1:8080" [addr] "CHANNELGATE_LISTEN" "ADDR";
        /// Control plane (gRPC) address. Port 0 picks a free port.
        grpc_listen: SocketAddr = "127.0.0.1:50051" [addr] "CHANNELGATE_GRPC_LISTEN" "ADDR";
        /// Deployment secret that signs connection ids (at least 16 bytes, the same on every
        /// node). Without one, a single node generates a random secret at start, and ids die
        /// with the process.
        secret: String = none [text] "CHANNELGATE_SECRET" "SECRET" {hide_env_values = true};
        /// Previous deployment secret, still accepted while rotating to a new one.
        previous_secret: String = none [text] "CHANNELGATE_PREVIOUS_SECRET" "SECRET" {hide_env_values = true};
        /// Comma-separated Origins allowed to open WebSockets (e.g. https://app.example.com);
        /// `*` allows any. Handshakes without an Origin (non-browser clients) are allowed.
        allowed_origins: Vec<String> = "*" [list] "CHANNELGATE_ALLOWED_ORIGINS" "ORIGINS" {value_delimiter = ','};
        /// Comma-separated bearer tokens the control plane accepts (several, for rotation);
        /// none: no authentication.
        control_token: Vec<String> = none [list] "CHANNELGATE_CONTROL_TOKEN" "TOKENS" {value_delimiter = ',', hide_env_values = true};
        /// Allow the control plane on a non-loopback address without control-token or
        /// grpc-client-ca (anyone who can reach it could mint credentials and push).
        insecure_control: bool = "false" [flag] "CHANNELGATE_INSECURE_CONTROL" "BOOL" {num_args = 0..=1, default_missing_value = "true"};
        /// TLS certificate chain (PEM) of the client plane (wss); with tls-key. Reloaded on
        /// SIGHUP without dropping live sockets.
        tls_cert: PathBuf = none [path] "CHANNELGATE_TLS_CERT" "FILE" {requires = "tls_key"};
        /// TLS private key (PEM) of the client plane; with tls-cert.
        tls_key: PathBuf = none [path] "CHANNELGATE_TLS_KEY" "FILE" {requires = "tls_cert"};
        /// TLS certificate chain (PEM) of the control plane; with grpc-tls-key.
        grpc_tls_cert: PathBuf = none [path] "CHANNELGATE_GRPC_TLS_CERT" "FILE" {requires = "grpc_tls_key"};
        /// TLS private key (PEM) of the control plane; with grpc-tls-cert.
        grpc_tls_key: PathBuf = none [path] "CHANNELGATE_GRPC_TLS_KEY" "FILE" {requires = "grpc_tls_cert"};
        /// CA (PEM) that control-plane client certificates must chain to (mutual TLS; needs
        /// grpc-tls-cert).
        grpc_client_ca: PathBuf = none [path] "CHANNELGATE_GRPC_CLIENT_CA" "FILE";
        /// Most calls in flight on one control-plane HTTP/2 connection, advertised to clients
        /// (SETTINGS_MAX_CONCURRENT_STREAMS); a stream past it is refused (RST_STREAM
        /// REFUSED_STREAM, which clients retry), and a connection that keeps opening them is
        /// closed. Clients queue the rest themselves.
        grpc_max_streams: u32 = "100" [rate] "CHANNELGATE_GRPC_MAX_STREAMS" "N";
        /// Most control-plane connections at once; one more is closed as soon as it is
        /// accepted.
        grpc_max_connections: usize = "1024" [count] "CHANNELGATE_GRPC_MAX_CONNECTIONS" "N";
        /// Longest a unary control call may take, from its arrival; then DEADLINE_EXCEEDED.
        /// Streams (PushStream, Listen, Handle) have no limit.
        grpc_call_timeout: Duration = "30s" [dur] "CHANNELGATE_GRPC_CALL_TIMEOUT" "DURATION";
        /// Interval of HTTP/2 pings on a control-plane connection that has been quiet that
        /// long; a connection whose ping goes unanswered for as long is closed (with TCP
        /// keepalive at the same interval underneath). 0s turns the pings off.
        grpc_keepalive: Duration = "30s" [dur] "CHANNELGATE_GRPC_KEEPALIVE" "DURATION";
        /// Comma-separated addresses and networks (127.0.0.1, 10.0.0.0/8) of the load
        /// balancers and proxies in front of the client plane. From them, the client's address
        /// is taken from the PROXY protocol (proxy-protocol) or client-address-header; from
        /// anyone else those are ignored. None: every peer is a client.
        trusted_proxies: Vec<String> = none [list] "CHANNELGATE_TRUSTED_PROXIES" "CIDRS" {value_delimiter = ','};
        /// Connections from trusted proxies start with a PROXY protocol header (v1 or v2), which
        /// names the client; one without it is closed, and a PROXY header from any other peer
        /// is refused. Needs trusted-proxies.
        proxy_protocol: bool = "false" [flag] "CHANNELGATE_PROXY_PROTOCOL" "BOOL" {num_args = 0..=1, default_missing_value = "true"};
        /// Header in which trusted proxies name the client: x-forwarded-for, forwarded (RFC
        /// 7239) or none. The client is its right-most address that is not a trusted proxy.
        client_address_header: String = "x-forwarded-for" [text] "CHANNELGATE_CLIENT_ADDRESS_HEADER" "HEADER";
        /// HTTP path of the WebSocket endpoint.
        ws_path: String = "/ws" [text] "CHANNELGATE_WS_PATH" "PATH";
        /// HTTP path of the Server-Sent Events endpoint: the same frames as the WebSocket, one
        /// event each, for clients that cannot hold a WebSocket.
        sse_path: String = "/sse" [text] "CHANNELGATE_SSE_PATH" "PATH";
        /// Name of the cookie carrying the socket key.
        key_cookie: String = "socket_key" [text] "CHANNELGATE_KEY_COOKIE" "NAME";
        /// Cluster mode: the Redis every node shares, one server (redis://host:port[/db]) or a
        /// Redis Cluster by seed nodes (redis-cluster://host:port,host:port); requires secret.
        /// None: a single node with an in-memory bus.
        redis: String = none [text] "CHANNELGATE_REDIS" "URL";
        /// Prefix of this deployment's Redis keys and channels.
        redis_prefix: String = "channelgate" [text] "CHANNELGATE_REDIS_PREFIX" "PREFIX";
        /// Base URL of the application for call-route (http://host:port[/prefix]); without one,
        /// call-route answers 501.
        upstream: String = none [text] "CHANNELGATE_UPSTREAM" "URL";
    }

    /// Limits, each with its unit and default.
    pub struct Limits {
        /// Largest client message, in bytes; larger closes the socket with 1008.
        max_message_size: usize = "64KiB" [size] "CHANNELGATE_MAX_MESSAGE_SIZE" "BYTES";
        /// permessage-deflate (RFC 7692) with WebSocket clients that offer it (every browser
        /// does): a frame is compressed once and the same bytes go to every socket that took
        /// it, and no socket keeps compression state. false: every frame goes uncompressed.
        compression: bool = "true" [flag] "CHANNELGATE_COMPRESSION" "BOOL" {num_args = 0..=1, default_missing_value = "true"};
        /// Frames shorter than this go uncompressed, even to sockets that took deflate.
        compress_min_size: usize = "128B" [size] "CHANNELGATE_COMPRESS_MIN_SIZE" "BYTES";
        /// Outbound queue per socket, in bytes; a push that would overflow it closes the socket
        /// with 4100 (too slow). A push never waits.
        outbound_queue: usize = "1MiB" [size] "CHANNELGATE_OUTBOUND_QUEUE" "BYTES";
        /// Largest JSON payload of a Push or Send, in bytes.
        max_push_size: usize = "256KiB" [size] "CHANNELGATE_MAX_PUSH_SIZE" "BYTES";
        /// Interval of server pings: one node-wide heartbeat pings each socket once per
        /// interval.
        ping_interval: Duration = "25s" [dur] "CHANNELGATE_PING_INTERVAL" "DURATION";
        /// A socket that sends nothing (not even a pong) for this long is closed with 4101;
        /// the heartbeat notices up to one ping interval later.
        idle_timeout: Duration = "60s" [dur] "CHANNELGATE_IDLE_TIMEOUT" "DURATION";
        /// Time a client has to complete the HTTP upgrade.
        handshake_timeout: Duration = "10s" [dur] "CHANNELGATE_HANDSHAKE_TIMEOUT" "DURATION";
        /// Most connections in their HTTP phase (accepted, not yet upgraded or done) on this
        /// node; past it, /healthz, /readyz and /metrics are still answered, upgrades get 503.
        max_pending_handshakes: usize = "4096" [count] "CHANNELGATE_MAX_PENDING_HANDSHAKES" "N";
        /// Most connections in their HTTP phase from one client address, counted from accept;
        /// more are closed at once. 0: no limit.
        max_pending_per_ip: usize = "64" [count] "CHANNELGATE_MAX_PENDING_PER_IP" "N";
        /// Most live WebSockets on this node; further handshakes get 503.
        max_connections: usize = "100000" [count] "CHANNELGATE_MAX_CONNECTIONS" "N";
        /// Time to live of issued credentials (their first use must come before).
        credential_ttl: Duration = "5m" [dur] "CHANNELGATE_CREDENTIAL_TTL" "DURATION";
        /// Longest credential TTL an IssueConnection call may ask for.
        max_credential_ttl: Duration = "24h" [dur] "CHANNELGATE_MAX_CREDENTIAL_TTL" "DURATION";
        /// After an unclean drop, the same credentials may reconnect within this period and
        /// find their subscriptions; 0s makes every close final.
        reconnect_grace: Duration = "30s" [dur] "CHANNELGATE_RECONNECT_GRACE" "DURATION";
        /// Time a draining node gives its sockets and tasks to finish.
        shutdown_grace: Duration = "10s" [dur] "CHANNELGATE_SHUTDOWN_GRACE" "DURATION";
        /// Longest a call-route upstream request may take; then 504.
        upstream_timeout: Duration = "10s" [dur] "CHANNELGATE_UPSTREAM_TIMEOUT" "DURATION";
        /// Longest a Handle stream may take to reply; then 504.
        handler_timeout: Duration = "10s" [dur] "CHANNELGATE_HANDLER_TIMEOUT" "DURATION";
        /// Client messages handled at once per socket (call-route, Handle); beyond it the
        /// client gets 429.
        max_inflight: usize = "16" [count] "CHANNELGATE_MAX_INFLIGHT" "N";
        /// Client messages per second per socket (token bucket); over it 429 replies, and
        /// message-burst refusals in a row close the socket with 1008. 0: unlimited.
        message_rate: u32 = "50" [rate] "CHANNELGATE_MESSAGE_RATE" "N";
        /// Client messages a socket may send at once before the rate applies.
        message_burst: u32 = "100" [rate] "CHANNELGATE_MESSAGE_BURST" "N";
        /// Most live sockets from one client address; further handshakes get 429. 0: no limit
        /// (clients behind one NAT share an address; set it to fit your users).
        max_connections_per_ip: usize = "0" [count] "CHANNELGATE_MAX_CONNECTIONS_PER_IP" "N";
        /// WebSocket handshakes per second from one client address (burst: twice that); over
        /// it 429. 0: no limit.
        handshake_rate_per_ip: u32 = "0" [rate] "CHANNELGATE_HANDSHAKE_RATE_PER_IP" "N";
        /// Pushes each channel keeps for recovery and History (per namespace in the file's
        /// [namespaces.NAME] tables). 0 keeps none; offsets still count.
        history_size: usize = "1000" [count] "CHANNELGATE_HISTORY_SIZE" "N";
        /// How long a channel keeps a push (per namespace in the file); 0s keeps none. The
        /// default covers the reconnect grace with room to spare.
        history_ttl: Duration = "2m" [dur] "CHANNELGATE_HISTORY_TTL" "DURATION";
        /// Most bytes of pushes one node keeps for all channels together; over it, a push
        /// evicts its own channel's oldest. Cluster mode keeps history in Redis, and this
        /// bounds the node's copy.
        history_memory: usize = "256MiB" [size] "CHANNELGATE_HISTORY_MEMORY" "BYTES";
        /// Most missed pushes one recovery replays per channel; more, and the client gets
        /// recovered:false and no replay.
        recovery_max: usize = "1000" [count] "CHANNELGATE_RECOVERY_MAX" "N";
        /// How long a channel's position (epoch and last offset) is kept after its last push
        /// or subscriber; a client that comes back later gets recovered:false.
        position_ttl: Duration = "1h" [dur] "CHANNELGATE_POSITION_TTL" "DURATION";
        /// A Push retried with the same idempotency key within this window is accepted once.
        idempotency_window: Duration = "5m" [dur] "CHANNELGATE_IDEMPOTENCY_WINDOW" "DURATION";
    }
}

/// Shows a setting's value in `Debug`, except secrets.
struct Redacted<'a, T>(&'static str, &'a T);

impl<T: fmt::Debug> fmt::Debug for Redacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            "secret" | "previous_secret" | "control_token" => f.write_str("<redacted>"),
            _ => self.1.fmt(f),
        }
    }
}

/// Per-namespace history settings: a channel's namespace is its name up to the first `:`
/// (`chat:room-1` is in `chat`; a name without `:` is in no namespace). In the file:
///
/// ```toml
/// [namespaces.chat]
/// history-size = 5000
/// history-ttl = "10m"
/// [namespaces.cursor]
/// history-size = 0
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces(pub std::collections::BTreeMap<String, NamespacePolicy>);

/// The file's `[[consumers]]` tables (ingest from a PostgreSQL outbox or NATS JetStream),
/// as written. Their meaning belongs to the composition root, which checks them before the
/// node binds (`channelgate::ingest`); the edge only carries them from the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Consumers(pub Vec<toml::Table>);

// TOML tables hold floats, so no derived `Eq`; a consumer's table compares by its values.
impl Eq for Consumers {}

impl Consumers {
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::Table(table) => Ok(table),
                    _ => Err("expected tables: [[consumers]]".to_owned()),
                })
                .collect::<Result<_, _>>()
                .map(Self),
            _ => Err("expected tables: [[consumers]]".to_owned()),
        }
    }
}

/// One namespace's overrides; what it leaves out comes from the node-wide settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// Overrides `history-size`.
    pub history_size: Option<usize>,
    /// Overrides `history-ttl`.
    pub history_ttl: Option<Duration>,
    /// Keeps presence (who is subscribed and connected) for the namespace's channels.
    pub presence: bool,
    /// Sends join and leave events to the sockets subscribed to the namespace's channels
    /// (`join-leave = "connection"` or `"user"`); needs `presence`.
    pub join_leave: JoinLeave,
    /// Tells `occupied` / `vacated` for the namespace's channels, `vacated` this long after the
    /// last member left (`occupancy = true`, `vacate-delay`); needs `presence`.
    pub occupancy: Option<Duration>,
    /// Sockets that ask for deltas (`delta=1` at the handshake) get a push on the namespace's
    /// channels as a Fossil delta against the channel's previous push, when they got that one
    /// (`delta = true`). The node keeps each such channel's last push.
    pub delta: bool,
}

/// Which presence changes become join and leave events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JoinLeave {
    /// None.
    #[default]
    Off,
    /// Every connection's join and leave.
    Connection,
    /// A user's first connection joins and its last leaves; a second tab is no event.
    /// Connections issued for no user count as users of their own.
    User,
}

/// The `vacated` delay when a namespace enables occupancy without `vacate-delay`.
pub const VACATE_DELAY: Duration = Duration::from_secs(5);

impl Namespaces {
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        let toml::Value::Table(table) = value else {
            return Err("expected tables: [namespaces.NAME]".into());
        };
        let mut out = std::collections::BTreeMap::new();
        for (name, value) in table {
            if name.is_empty() || name.contains(':') || !name.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "{name:?} is not a namespace name (printable ASCII, no ':')"
                ));
            }
            let toml::Value::Table(fields) = value else {
                return Err(format!("{name}: expected a table"));
            };
            let mut policy = NamespacePolicy::default();
            let (mut occupancy, mut delay) = (false, None);
            for (key, value) in fields {
                let named = |e: String| format!("{name}.{key}: {e}");
                match key.as_str() {
                    "history-size" => policy.history_size = Some(kind::count::de(value).map_err(named)?),
                    "history-ttl" => policy.history_ttl = Some(kind::dur::de(value).map_err(named)?),
                    "presence" => {
                        policy.presence = value
                            .as_bool()
                            .ok_or_else(|| named("expected true or false".into()))?;
                    }
                    "join-leave" => {
                        policy.join_leave = match value.as_str() {
                            Some("connection") => JoinLeave::Connection,
                            Some("user") => JoinLeave::User,
                            Some("off") => JoinLeave::Off,
                            _ => return Err(named("expected \"connection\", \"user\" or \"off\"".into())),
                        };
                    }
                    "occupancy" => {
                        occupancy = value
                            .as_bool()
                            .ok_or_else(|| named("expected true or false".into()))?;
                    }
                    "vacate-delay" => delay = Some(kind::dur::de(value).map_err(named)?),
                    "delta" => {
                        policy.delta = value
                            .as_bool()
                            .ok_or_else(|| named("expected true or false".into()))?;
                    }
                    _ => {
                        return Err(format!(
                            "{name}: unknown key `{key}` (a namespace takes history-size, history-ttl, presence, join-leave, occupancy, vacate-delay and delta)"
                        ))
                    }
                }
            }
            if !policy.presence && (policy.join_leave != JoinLeave::Off || occupancy) {
                return Err(format!(
                    "{name}: join-leave and occupancy come from presence: add `presence = true`"
                ));
            }
            if delay.is_some() && !occupancy {
                return Err(format!("{name}: vacate-delay needs `occupancy = true`"));
            }
            policy.occupancy = occupancy.then(|| delay.unwrap_or(VACATE_DELAY));
            out.insert(name, policy);
        }
        Ok(Self(out))
    }
}

impl Limits {
    /// `channel`'s namespace table, if it has one.
    pub fn namespace(&self, channel: &str) -> NamespacePolicy {
        channel
            .split_once(':')
            .and_then(|(ns, _)| self.namespaces.0.get(ns))
            .copied()
            .unwrap_or_default()
    }

    /// Whether `channel`'s namespace keeps presence (`presence = true` in its table).
    pub fn presence(&self, channel: &str) -> bool {
        self.namespace(channel).presence
    }

    /// The history policy of `channel`: its namespace's overrides, else the node's settings.
    pub fn history_policy(&self, channel: &str) -> HistoryPolicy {
        let over = self.namespace(channel);
        HistoryPolicy {
            size: over.history_size.unwrap_or(self.history_size),
            ttl: over.history_ttl.unwrap_or(self.history_ttl),
        }
    }
}

/// How many pushes a channel keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Pushes kept; 0 keeps none (offsets still count, so a gap is always noticed).
    pub size: usize,
    /// How long a push is kept.
    pub ttl: Duration,
}

impl HistoryPolicy {
    /// Whether this policy keeps anything.
    pub fn keeps(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }
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
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, naming the key.
        message: String,
    },
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
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
        Self::parse_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.clone(),
            message,
        })
    }
}

impl Config {
    /// The client plane's certificate and key, when both are set.
    pub fn tls(&self) -> Option<(PathBuf, PathBuf)> {
        self.tls_cert.clone().zip(self.tls_key.clone())
    }

    /// Checks the edge's values that no type rules out (the control plane checks its own:
    /// `channelgate::settings`).
    pub fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_push_size + 512 > l.outbound_queue {
            return invalid("outbound-queue must exceed max-push-size by at least 512 bytes");
        }
        if l.max_message_size == 0
            || l.max_connections == 0
            || l.max_inflight == 0
            || l.max_pending_handshakes == 0
        {
            return invalid(
                "max-message-size, max-connections, max-inflight and max-pending-handshakes \
                 must be positive",
            );
        }
        if l.ping_interval.is_zero() || l.ping_interval >= l.idle_timeout {
            return invalid("ping-interval must be positive and shorter than idle-timeout");
        }
        if l.credential_ttl.is_zero() || l.credential_ttl > l.max_credential_ttl {
            return invalid("credential-ttl must be positive and at most max-credential-ttl");
        }
        if !self.ws_path.starts_with('/') || !self.sse_path.starts_with('/') {
            return invalid("ws-path and sse-path must start with /");
        }
        if self.ws_path == self.sse_path {
            return invalid("ws-path and sse-path must differ");
        }
        if self.redis.is_some() && self.secret.is_none() {
            return invalid("cluster mode (--redis) requires --secret, shared by every node");
        }
        if let Some(trusted) = &self.trusted_proxies {
            crate::proxy::parse_trusted(trusted)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        crate::proxy::AddressHeader::parse(&self.client_address_header)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.proxy_protocol && self.trusted_proxies.as_ref().is_none_or(Vec::is_empty) {
            return invalid("proxy-protocol needs trusted-proxies: the proxies that send it");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("a TLS certificate needs its key, and a key its certificate");
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

/// Any configuration file: parsed and checked, or refused with a message, never a panic.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(settings) = Settings::parse_toml(text) {
        let _ = settings.into_config();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Settings::default().into_config().unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.limits.max_message_size, 65536);
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
        assert_eq!(c.limits.outbound_queue, 2 << 20);
    }

    #[test]
    fn the_example_file_parses_and_documents_the_defaults() {
        let text = include_str!("../examples/channelgate.toml");
        let config = Settings::parse_toml(text).unwrap().into_config().unwrap();
        assert_eq!(config, Config::default());
    }

    /// The README's Configuration table and the example file are written from [`SETTINGS`]:
    /// a setting missing from either, or a row that no longer says what the declaration says,
    /// fails here.
    #[test]
    fn every_setting_is_in_the_readme_and_the_example_file() {
        let readme = include_str!("../README.md");
        let example = include_str!("../examples/channelgate.toml");
        for s in SETTINGS {
            let default = match s.default {
                "none" => "none".to_owned(),
                d => format!("`{d}`"),
            };
            let help = s.help.lines().map(str::trim).collect::<Vec<_>>().join(" ");
            let row = format!("| `{}` | `{}` | {default} | {help} |", s.flag(), s.env);
            assert!(
                readme.lines().any(|line| line == row),
                "README.md's Configuration table lacks (or words differently) the row\n{row}"
            );
            let key = s.key();
            assert!(
                example.lines().any(|line| {
                    let line = line.trim_start_matches("# ");
                    line.starts_with(&format!("{key} = "))
                }),
                "examples/channelgate.toml lacks `{key}`"
            );
            assert_eq!(
                s.env,
                format!("CHANNELGATE_{}", s.field.to_ascii_uppercase()),
                "environment variables are named after their setting"
            );
        }
    }

    #[test]
    fn file_environment_and_flags_read_values_alike() {
        let file = Settings::parse_toml(
            "allowed-origins = \"https://a.example, https://b.example\"\n\
             control-token = [\"t1\", \"t2\"]\ninsecure-control = true\nmax-push-size = 1024\n",
        )
        .unwrap();
        assert_eq!(
            file.allowed_origins.as_deref(),
            Some(
                &[
                    "https://a.example".to_owned(),
                    "https://b.example".to_owned()
                ][..]
            )
        );
        assert_eq!(file.control_token.as_ref().map(Vec::len), Some(2));
        assert_eq!(file.insecure_control, Some(true));
        assert_eq!(file.max_push_size, Some(1024));
        for bad in [
            "max-push-size = \"lots\"",
            "ping-interval = 5",
            "ping_interval = \"5s\"",
            "listen = \"nowhere\"",
        ] {
            let err = Settings::parse_toml(bad).unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn namespaces_override_the_history_policy_of_their_channels() {
        let file = Settings::parse_toml(
            "history-size = 50\n[namespaces.chat]\nhistory-size = 5000\nhistory-ttl = \"10m\"\n\
             [namespaces.cursor]\nhistory-size = 0\n",
        )
        .unwrap();
        let limits = file.into_config().unwrap().limits;
        let policy = |c: &str| limits.history_policy(c);
        assert_eq!(policy("chat:room-1").size, 5000);
        assert_eq!(policy("chat:room-1").ttl, Duration::from_secs(600));
        assert_eq!(policy("cursor:x").size, 0);
        assert_eq!(
            policy("cursor:x").ttl,
            Duration::from_secs(120),
            "not overridden"
        );
        assert_eq!(policy("chat").size, 50, "no `:`, no namespace");
        assert_eq!(policy("other:x").size, 50);
        for bad in [
            "[namespaces.chat]\nhistory-size = \"lots\"",
            "[namespaces.chat]\nsize = 1",
            "namespaces = 1",
            "[namespaces.\"a:b\"]\nhistory-size = 1",
            "[namespaces.chat]\npresence = \"yes\"",
            "[namespaces.chat]\njoin-leave = \"user\"",
            "[namespaces.chat]\npresence = true\njoin-leave = \"tab\"",
            "[namespaces.chat]\noccupancy = true",
            "[namespaces.chat]\npresence = true\nvacate-delay = \"1s\"",
        ] {
            let err = Settings::parse_toml(bad).unwrap_err();
            assert!(err.contains("namespaces"), "{bad}: {err}");
        }
    }

    #[test]
    fn presence_is_kept_only_where_a_namespace_asks() {
        let file = Settings::parse_toml("[namespaces.chat]\npresence = true\n[namespaces.feed]\n")
            .unwrap();
        let limits = file.into_config().unwrap().limits;
        assert!(limits.presence("chat:room-1"));
        assert!(!limits.presence("feed:x"));
        assert!(!limits.presence("chat"), "no `:`, no namespace");
        assert!(!limits.presence("other:x"));
    }

    #[test]
    fn presence_events_are_configured_per_namespace() {
        let file = Settings::parse_toml(
            "[namespaces.chat]\npresence = true\njoin-leave = \"user\"\noccupancy = true\n\
             [namespaces.room]\npresence = true\noccupancy = true\nvacate-delay = \"0s\"\n\
             [namespaces.feed]\npresence = true\n",
        )
        .unwrap();
        let limits = file.into_config().unwrap().limits;
        let chat = limits.namespace("chat:1");
        assert_eq!(chat.join_leave, JoinLeave::User);
        assert_eq!(chat.occupancy, Some(VACATE_DELAY));
        assert_eq!(limits.namespace("room:1").occupancy, Some(Duration::ZERO));
        let feed = limits.namespace("feed:1");
        assert_eq!((feed.join_leave, feed.occupancy), (JoinLeave::Off, None));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Settings::parse_toml("lisen = \"x\"").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let s = Settings {
            max_push_size: Some(2 << 20),
            ..Settings::default()
        };
        assert!(s.into_config().is_err());
    }

    #[test]
    fn fuzz_configuration_files() {
        use proptest::prelude::*;
        crate::fuzz::replay("config", check_config);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let keys: Vec<String> = SETTINGS.iter().map(SettingDoc::key).collect();
        let value = prop_oneof![
            "-?[0-9]{1,22}",
            "\"[0-9]{0,8}(ns|ms|s|m|h|KiB|MiB|GiB|B)?\"",
            "\"[ -~]{0,16}\"",
            Just("true".to_owned()),
            Just("[\"a\", \"b\"]".to_owned()),
            Just("{}".to_owned()),
        ];
        let line = (prop::sample::select(keys), value).prop_map(|(k, v)| format!("{k} = {v}"));
        let namespace = ("[ -~]{0,8}", "[a-z-]{0,14}", "-?[0-9]{1,5}")
            .prop_map(|(ns, k, v)| format!("[namespaces.\"{ns}\"]\n{k} = {v}"));
        let file = (
            proptest::collection::vec(line, 0..6),
            proptest::option::of(namespace),
        )
            .prop_map(|(lines, ns)| format!("{}\n{}", lines.join("\n"), ns.unwrap_or_default()));
        runner
            .run(&prop_oneof![any::<String>(), file], |text| {
                check_config(text.as_bytes());
                Ok(())
            })
            .unwrap();
    }
}
