//! A typed Rust client of the control plane: connect (plain, TLS or mutual TLS, with or
//! without a bearer token), then call the gateway with Rust types instead of `pb` messages.
//! The CLI, the chat example and the tests use it; any Rust service may.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use channelgate::client::Client;
//!
//! let client = Client::builder("http://127.0.0.1:50051").token("token-a").connect().await?;
//! let creds = client.issue(None, &["room:lobby"]).await?;
//! // hand creds.connection_id to the page and creds.socket_key to its cookie, then:
//! client.push(&["room:lobby"], r#"{"text":"hello"}"#).await?;
//! # Ok(()) }
//! ```
//!
//! Every call returns the gateway's `tonic::Status` on refusal (see the README's Control plane
//! table for the codes). Calls are cheap to make concurrently: the client is a handle over one
//! HTTP/2 connection, and clones share it.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Request, Status, Streaming,
};

use crate::pb::{self, control_client::ControlClient, handle_request::Kind};

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL does not parse.
    #[error("invalid server URL {url:?}: {source}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The token cannot be sent as a header value.
    #[error("the bearer token is not a valid header value")]
    BadToken,
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be configured, or the connection failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The client's HTTP/2 connection window, in bytes: h2 lets half of it be small unread DATA
/// frames' overhead before it gives the connection up.
const CONNECTION_WINDOW: u32 = 8 << 20;
/// The client's HTTP/2 window per call, in bytes.
const STREAM_WINDOW: u32 = 1 << 20;
/// Interval of the client's HTTP/2 pings, and how long one may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The generated client, with the bearer token on every call.
pub type Raw = ControlClient<InterceptedService<Channel, Bearer>>;

/// How to reach a node's control plane. Made by [`Client::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    url: String,
    token: Option<String>,
    tls_ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    timeout: Option<Duration>,
}

impl Builder {
    /// Sends `authorization: Bearer <token>` on every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sends the token when there is one.
    pub fn token_opt(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Verifies the server with this CA (PEM file); use an `https://` URL.
    pub fn tls_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(ca.into());
        self
    }

    /// Presents this client certificate and key (PEM files), for mutual TLS.
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Fails every call that takes longer than `timeout` (none by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        // HTTP/2 settings said here rather than left to defaults: fixed windows (no adaptive
        // window) large enough that h2's budget for small DATA frames (half the connection
        // window) holds thousands of unread replies; keepalive pings so a dead node is noticed
        // in seconds, not at the next call's timeout.
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|source| ClientError::BadUrl {
                url: self.url.clone(),
                source,
            })?
            .http2_adaptive_window(false)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_stream_window_size(STREAM_WINDOW)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if self.tls_ca.is_some() || self.identity.is_some() {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| ClientError::Read {
                    path: path.clone(),
                    source,
                })
            };
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Connect {
                    url: self.url.clone(),
                    source,
                })?;
        }
        Ok(endpoint)
    }

    fn bearer(&self) -> Result<Bearer, ClientError> {
        self.token
            .as_ref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::BadToken)
            })
            .transpose()
            .map(Bearer)
    }

    /// Connects now (fails if the node does not answer).
    pub async fn connect(self) -> Result<Client, ClientError> {
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        Ok(Client::from_channel(channel, self.bearer()?))
    }

    /// Connects on the first call (and reconnects after a failure): for services that start
    /// before the gateway does.
    pub fn connect_lazy(self) -> Result<Client, ClientError> {
        let channel = self.endpoint()?.connect_lazy();
        Ok(Client::from_channel(channel, self.bearer()?))
    }
}

/// Credentials minted by `IssueConnection`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Public: the page gets it.
    pub connection_id: String,
    /// Secret: the browser gets it in an `HttpOnly` cookie, never in page JavaScript.
    pub socket_key: String,
    /// How the application addresses the socket; never sent to the browser.
    pub digest: String,
    /// The first use must come before this (Unix time, milliseconds).
    pub expires_at_unix_ms: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("connection_id", &self.connection_id)
            .field("socket_key", &"<secret>")
            .field("digest", &self.digest)
            .field("expires_at_unix_ms", &self.expires_at_unix_ms)
            .finish()
    }
}

impl From<pb::IssueConnectionResponse> for Credentials {
    fn from(r: pb::IssueConnectionResponse) -> Self {
        Self {
            connection_id: r.connection_id,
            socket_key: r.socket_key,
            digest: r.digest,
            expires_at_unix_ms: r.expires_at_unix_ms,
        }
    }
}

/// A client of one node's control plane. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    raw: Raw,
}

fn strings(items: &[impl AsRef<str>]) -> Vec<String> {
    items.iter().map(|s| s.as_ref().to_owned()).collect()
}

impl Client {
    /// How to reach the control plane at `url` (e.g. `http://127.0.0.1:50051`).
    pub fn builder(url: impl Into<String>) -> Builder {
        Builder {
            url: url.into(),
            token: None,
            tls_ca: None,
            identity: None,
            timeout: None,
        }
    }

    /// Connects to `url` without a token or TLS.
    pub async fn connect(url: impl Into<String>) -> Result<Self, ClientError> {
        Self::builder(url).connect().await
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel, bearer: Bearer) -> Self {
        Self {
            raw: ControlClient::with_interceptor(channel, bearer),
        }
    }

    /// The generated client, for calls this one does not wrap.
    pub fn raw(&self) -> Raw {
        self.raw.clone()
    }

    /// `IssueConnection`: mints credentials valid for `ttl` (the node's default when `None`)
    /// and subscribes them to `channels` in the same call.
    pub async fn issue(
        &self,
        ttl: Option<Duration>,
        channels: &[impl AsRef<str>],
    ) -> Result<Credentials, Status> {
        self.issue_for(ttl, channels, "", "").await
    }

    /// `IssueConnection` for `user` (with `info`, JSON text or empty): `send_user` and
    /// `disconnect_user` reach every connection issued this way.
    pub async fn issue_for(
        &self,
        ttl: Option<Duration>,
        channels: &[impl AsRef<str>],
        user: &str,
        info: &str,
    ) -> Result<Credentials, Status> {
        let request = pb::IssueConnectionRequest {
            ttl_ms: ttl.map_or(0, |t| t.as_millis().max(1) as u64),
            channels: strings(channels),
            user: user.to_owned(),
            info_json: info.to_owned(),
        };
        Ok(self
            .raw()
            .issue_connection(request)
            .await?
            .into_inner()
            .into())
    }

    /// `Subscribe`: returns whether the socket is live.
    pub async fn subscribe(
        &self,
        digest: &str,
        channels: &[impl AsRef<str>],
    ) -> Result<bool, Status> {
        let request = pb::SubscribeRequest {
            digest: digest.to_owned(),
            channels: strings(channels),
        };
        Ok(self.raw().subscribe(request).await?.into_inner().live)
    }

    /// `Unsubscribe`: returns whether the socket is live.
    pub async fn unsubscribe(
        &self,
        digest: &str,
        channels: &[impl AsRef<str>],
    ) -> Result<bool, Status> {
        let request = pb::UnsubscribeRequest {
            digest: digest.to_owned(),
            channels: strings(channels),
        };
        Ok(self.raw().unsubscribe(request).await?.into_inner().live)
    }

    /// `Push`: returns the sockets the push was queued to on the node that took it.
    pub async fn push(&self, channels: &[impl AsRef<str>], json: &str) -> Result<u64, Status> {
        Ok(self.push_keyed(channels, json, None).await?.queued)
    }

    /// `Push` with an optional idempotency key (a retry with the same key within the window is
    /// taken once); returns the sockets queued to and each channel's new position.
    pub async fn push_keyed(
        &self,
        channels: &[impl AsRef<str>],
        json: &str,
        idempotency_key: Option<&str>,
    ) -> Result<pb::PushResponse, Status> {
        let request = pb::PushRequest {
            channels: strings(channels),
            json: json.to_owned(),
            idempotency_key: idempotency_key.unwrap_or_default().to_owned(),
        };
        Ok(self.raw().push(request).await?.into_inner())
    }

    /// `PushStream`: many pushes over one call; returns `(pushes, queued)`.
    pub async fn push_stream(
        &self,
        pushes: impl futures_util::Stream<Item = pb::PushRequest> + Send + 'static,
    ) -> Result<(u64, u64), Status> {
        let r = self.raw().push_stream(pushes).await?.into_inner();
        Ok((r.pushes, r.queued))
    }

    /// `History`: up to `limit` pushes of `channel` after `since` (`(epoch, offset)`; an empty
    /// epoch checks none), or before it when `reverse`, and the channel's position.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<(&str, u64)>,
        limit: u32,
        reverse: bool,
    ) -> Result<pb::HistoryResponse, Status> {
        let request = pb::HistoryRequest {
            channel: channel.to_owned(),
            since: since.map(|(epoch, offset)| pb::Position {
                epoch: epoch.to_owned(),
                offset,
            }),
            limit,
            reverse,
        };
        Ok(self.raw().history(request).await?.into_inner())
    }

    /// `Send`: to one socket, framed as a push on `channel`; returns whether it was queued.
    pub async fn send(&self, digest: &str, channel: &str, json: &str) -> Result<bool, Status> {
        let request = pb::SendRequest {
            digest: digest.to_owned(),
            channel: channel.to_owned(),
            json: json.to_owned(),
            user: String::new(),
        };
        Ok(self.raw().send(request).await?.into_inner().queued)
    }

    /// `Send` to every live socket of `user`, on every node; returns how many it reached.
    pub async fn send_user(&self, user: &str, channel: &str, json: &str) -> Result<u64, Status> {
        let request = pb::SendRequest {
            digest: String::new(),
            channel: channel.to_owned(),
            json: json.to_owned(),
            user: user.to_owned(),
        };
        Ok(self.raw().send(request).await?.into_inner().connections)
    }

    /// `Disconnect`: closes the socket with `code` (4000-4099; 0 means 4000) and ends its
    /// credentials; returns whether a socket was live.
    pub async fn disconnect(&self, digest: &str, code: u32, reason: &str) -> Result<bool, Status> {
        let request = pb::DisconnectRequest {
            digest: digest.to_owned(),
            code,
            reason: reason.to_owned(),
            user: String::new(),
        };
        Ok(self.raw().disconnect(request).await?.into_inner().closed)
    }

    /// `Disconnect` of `user`: ends every set of its credentials, on every node, and closes
    /// its live sockets; returns how many were live.
    pub async fn disconnect_user(
        &self,
        user: &str,
        code: u32,
        reason: &str,
    ) -> Result<u64, Status> {
        let request = pb::DisconnectRequest {
            digest: String::new(),
            code,
            reason: reason.to_owned(),
            user: user.to_owned(),
        };
        Ok(self
            .raw()
            .disconnect(request)
            .await?
            .into_inner()
            .connections)
    }

    /// `Presence`: the connections present in `channel`, on every node.
    pub async fn presence(&self, channel: &str) -> Result<Vec<pb::PresenceMember>, Status> {
        let request = pb::PresenceRequest {
            channel: channel.to_owned(),
        };
        Ok(self.raw().presence(request).await?.into_inner().members)
    }

    /// `PresenceStats`: `(connections, users)` present in `channel`.
    pub async fn presence_stats(&self, channel: &str) -> Result<(u64, u64), Status> {
        let request = pb::PresenceRequest {
            channel: channel.to_owned(),
        };
        let r = self.raw().presence_stats(request).await?.into_inner();
        Ok((r.connections, r.users))
    }

    /// `Stats`: the node's counts; per channel when `per_channel` (only `channels`, when not
    /// empty).
    pub async fn stats(
        &self,
        per_channel: bool,
        channels: &[impl AsRef<str>],
    ) -> Result<pb::StatsResponse, Status> {
        let request = pb::StatsRequest {
            per_channel,
            channels: strings(channels),
        };
        Ok(self.raw().stats(request).await?.into_inner())
    }

    /// `Listen`: every push to `channels`, as it happens.
    pub async fn listen(
        &self,
        channels: &[impl AsRef<str>],
    ) -> Result<Streaming<pb::ListenEvent>, Status> {
        self.listen_from(channels, HashMap::new()).await
    }

    /// `Listen` that first replays each channel in `since` from that position (channel →
    /// `(epoch, offset)`), then streams live, with no gap and no duplicate between them; an
    /// event with `gap` set says history did not reach back.
    pub async fn listen_from(
        &self,
        channels: &[impl AsRef<str>],
        since: HashMap<String, (String, u64)>,
    ) -> Result<Streaming<pb::ListenEvent>, Status> {
        let request = pb::ListenRequest {
            channels: strings(channels),
            since: since
                .into_iter()
                .map(|(channel, (epoch, offset))| (channel, pb::Position { epoch, offset }))
                .collect(),
            ..Default::default()
        };
        Ok(self.raw().listen(request).await?.into_inner())
    }

    /// `Listen` with the channels' presence events too: joins and leaves as `events` says
    /// (every connection's, or each user's first and last), and occupancy changes when
    /// `occupancy`. They come between pushes, with `presence` set.
    pub async fn listen_presence(
        &self,
        channels: &[impl AsRef<str>],
        events: pb::PresenceEvents,
        occupancy: bool,
    ) -> Result<Streaming<pb::ListenEvent>, Status> {
        let request = pb::ListenRequest {
            channels: strings(channels),
            presence_events: events.into(),
            occupancy,
            ..Default::default()
        };
        Ok(self.raw().listen(request).await?.into_inner())
    }

    /// `Handle`: joins `group` as a stream handling `actions` (and lifecycle events when
    /// `lifecycle`: `$connect`, `$disconnect`, `$occupied`, `$vacated`).
    pub async fn handle(
        &self,
        group: &str,
        actions: &[impl AsRef<str>],
        lifecycle: bool,
    ) -> Result<Handler, Status> {
        let (tx, rx) = mpsc::channel(HANDLE_BUFFER);
        let register = pb::HandleRequest {
            kind: Some(Kind::Register(pb::Register {
                group: group.to_owned(),
                actions: strings(actions),
                lifecycle_events: lifecycle,
            })),
        };
        tx.try_send(register)
            .map_err(|_| Status::internal("the Handle stream's buffer is empty at start"))?;
        let messages = self
            .raw()
            .handle(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Handler {
            messages,
            replies: Replier { tx },
        })
    }
}

/// Replies a `Handle` stream may have on their way before [`Replier::reply`] waits.
const HANDLE_BUFFER: usize = 256;

/// A joined `Handle` stream: the client messages for its actions, and a [`Replier`].
#[derive(Debug)]
pub struct Handler {
    messages: Streaming<pb::ClientMessage>,
    replies: Replier,
}

impl Handler {
    /// The next client message; `None` when the gateway ended the stream.
    pub async fn next(&mut self) -> Result<Option<pb::ClientMessage>, Status> {
        self.messages.message().await
    }

    /// Where replies go (cheap to clone, so other tasks can answer).
    pub fn replier(&self) -> Replier {
        self.replies.clone()
    }

    /// Answers `delivery_id` with `status` and a JSON body (`""` for null).
    pub async fn reply(
        &self,
        delivery_id: u64,
        status: u32,
        body_json: &str,
    ) -> Result<(), Status> {
        self.replies.reply(delivery_id, status, body_json).await
    }
}

/// Sends replies on a `Handle` stream.
#[derive(Debug, Clone)]
pub struct Replier {
    tx: mpsc::Sender<pb::HandleRequest>,
}

impl Replier {
    /// Answers `delivery_id` with `status` and a JSON body (`""` for null).
    pub async fn reply(
        &self,
        delivery_id: u64,
        status: u32,
        body_json: &str,
    ) -> Result<(), Status> {
        self.reply_with(delivery_id, status, HashMap::new(), body_json)
            .await
    }

    /// Answers with headers too.
    pub async fn reply_with(
        &self,
        delivery_id: u64,
        status: u32,
        headers: HashMap<String, String>,
        body_json: &str,
    ) -> Result<(), Status> {
        let reply = pb::HandleRequest {
            kind: Some(Kind::Reply(pb::Reply {
                delivery_id,
                status,
                headers,
                body_json: body_json.to_owned(),
            })),
        };
        self.tx
            .send(reply)
            .await
            .map_err(|_| Status::cancelled("the Handle stream has ended"))
    }
}
