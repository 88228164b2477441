//! The WebSocket upgrade, where the credentials are checked before any WebSocket exists.
//!
//! The upgrade is accepted only when: it is a well-formed WebSocket request (else 400); the
//! `Origin`, when present and an allow-list is configured, is on it (else 403); the connection id
//! and key are present (else 400), the id is signed by this deployment and commits to the key
//! (else 403), and the id is not expired, live or ended (else 403); the node has room (else 503).
//! A refusal is a plain-text HTTP response and no upgrade. Keys never appear in logs.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::Instrument;

use tokio::sync::OwnedSemaphorePermit;

use crate::{
    bus::AttachError,
    conn::{self, Wire},
    credentials::{Digest, Verified},
    handlers::Socket,
    http::{close, text, Body},
    node::{Counts, IpSlot, NodeState},
    protocol::Recover,
    registry::{AttachRefusal, Conn, Ending},
    ws::deflate,
};

/// The WebSocket endpoint: counts the handshake by its outcome. On the spare lane (`spare`:
/// every handshake permit was taken) it is refused with 503.
pub(crate) async fn websocket<S>(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let metrics = node.registry.metrics();
    if spare {
        metrics.handshake("pending_full", WEBSOCKET);
        return UpgradeRefusal::Unavailable.response();
    }
    return match upgrade::<S>(req, peer, node).await {
        Ok(response) => {
            metrics.handshake("accepted", WEBSOCKET);
            response
        }
        Err(refusal) => {
            metrics.handshake(refusal.label(), WEBSOCKET);
            refusal.response()
        }
    };
}

/// The WebSocket path over HTTP/2: a WebSocket needs HTTP/1.1 (no RFC 8441 here), which a
/// browser opens beside the HTTP/2 connection.
pub(crate) fn not_over_h2(node: &NodeState) -> Response<Body> {
    node.registry
        .metrics()
        .handshake(UpgradeRefusal::NotUpgrade.label(), WEBSOCKET);
    UpgradeRefusal::NotUpgrade.response()
}

/// The `transport` label of the WebSocket's handshakes.
const WEBSOCKET: &str = "websocket";

/// Why an upgrade was refused; decides the status and the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeRefusal {
    /// 400: not a WebSocket upgrade.
    NotUpgrade,
    /// 405: an event stream is opened with `GET`.
    NotGet,
    /// 400: `socket_connection_id` missing.
    MissingId,
    /// 400: no socket key in cookie, query or header.
    MissingKey,
    /// 403: Origin not allowed.
    Origin,
    /// 403: forged, unsigned or malformed id, or a key that is not the id's.
    Credentials,
    /// 403: id expired before first use.
    Expired,
    /// 403: id live on another socket.
    InUse,
    /// 403: id already used (clean close, disconnect, grace over).
    Used,
    /// 403: id not recorded where the gateway keeps its state (issued before it lost it).
    Unknown,
    /// 400: a `recover` parameter that does not parse.
    BadRecover(&'static str),
    /// 503: node full or draining.
    Unavailable,
    /// 429: the client's address holds `max_connections_per_ip` sockets.
    TooManyFromIp,
    /// 429: the client's address is over `handshake_rate_per_ip`.
    HandshakeRate,
}

impl UpgradeRefusal {
    /// The `result` label of the handshake counter.
    pub(crate) fn label(self) -> &'static str {
        match self {
            UpgradeRefusal::NotUpgrade => "not_upgrade",
            UpgradeRefusal::NotGet => "not_get",
            UpgradeRefusal::MissingId => "missing_id",
            UpgradeRefusal::MissingKey => "missing_key",
            UpgradeRefusal::Origin => "origin",
            UpgradeRefusal::Credentials => "invalid_credentials",
            UpgradeRefusal::Expired => "expired",
            UpgradeRefusal::InUse => "in_use",
            UpgradeRefusal::Used => "used",
            UpgradeRefusal::Unknown => "unknown",
            UpgradeRefusal::BadRecover(_) => "bad_recover",
            UpgradeRefusal::Unavailable => "unavailable",
            UpgradeRefusal::TooManyFromIp => "too_many_from_ip",
            UpgradeRefusal::HandshakeRate => "handshake_rate",
        }
    }

    /// Whether the same request may succeed soon: the id is live on a socket that may be gone
    /// already (a cut the node has not seen yet, a node that died), or the node or the
    /// client's address has no room now.
    pub(crate) fn is_transient(self) -> bool {
        matches!(
            self,
            Self::InUse | Self::Unavailable | Self::TooManyFromIp | Self::HandshakeRate
        )
    }

    pub(crate) fn response(self) -> Response<Body> {
        use UpgradeRefusal::*;
        let (status, body) = match self {
            NotUpgrade => (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade (GET, Upgrade: websocket, Sec-WebSocket-Version: 13)\n"),
            NotGet => (StatusCode::METHOD_NOT_ALLOWED, "an event stream is opened with GET\n"),
            MissingId => (StatusCode::BAD_REQUEST, "missing socket_connection_id query parameter\n"),
            MissingKey => (StatusCode::BAD_REQUEST, "missing socket key (cookie, socket_key query parameter or X-Socket-Key header)\n"),
            Origin => (StatusCode::FORBIDDEN, "origin not allowed\n"),
            Credentials => (StatusCode::FORBIDDEN, "invalid credentials\n"),
            Expired => (StatusCode::FORBIDDEN, "credentials expired\n"),
            InUse => (StatusCode::FORBIDDEN, "connection id already in use\n"),
            Used => (StatusCode::FORBIDDEN, "connection id already used\n"),
            Unknown => (StatusCode::FORBIDDEN, "connection id unknown: issued before the gateway lost its state; get new credentials\n"),
            BadRecover(why) => {
                let mut response = text(StatusCode::BAD_REQUEST, "");
                *response.body_mut() = Body::from(Bytes::from(format!("{why}\n")));
                return close(response);
            }
            Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "no capacity, try another node\n"),
            TooManyFromIp => (StatusCode::TOO_MANY_REQUESTS, "too many connections from this address\n"),
            HandshakeRate => (StatusCode::TOO_MANY_REQUESTS, "too many handshakes from this address; retry later\n"),
        };
        let mut response = close(text(status, body));
        if self == NotUpgrade {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

async fn upgrade<S>(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
) -> Result<Response<Body>, UpgradeRefusal>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if !node.handshake_allowed(peer.ip()) {
        tracing::debug!(%peer, "handshake refused: handshake rate per address");
        return Err(UpgradeRefusal::HandshakeRate);
    }
    let headers = req.headers();
    // RFC 6455 4.1: the opening handshake is an HTTP/1.1 (or later) GET.
    if req.version() < http::Version::HTTP_11 {
        tracing::debug!(%peer, version = ?req.version(), "handshake refused: WebSocket needs HTTP/1.1");
        return Err(UpgradeRefusal::NotUpgrade);
    }
    let accept_key =
        websocket_accept_key(req.method(), headers).ok_or(UpgradeRefusal::NotUpgrade)?;
    let mut presented = Presented::read(&req, peer, node)?;
    let verified = presented.verify(peer, node)?;
    let recover = presented.recover.take();
    let wire = Wire {
        deflate: node.config.limits.compression
            && deflate::accepts(
                headers
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            ),
        deltas: presented.deltas,
    };
    let Admitted {
        conn,
        socket,
        slots,
    } = admit(node, peer, &verified, presented, recover.as_ref()).await?;

    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_node = node.clone();
    // Two tasks: this one waits for hyper to hand the stream over and ends; the socket's own
    // task, spawned then, holds the socket's future and its slots only, so what every live
    // socket keeps is no larger than it must be (nothing of the upgrade's state).
    let task = async move {
        let node = task_node;
        match on_upgrade.await {
            Ok(upgraded) => {
                // With debug logging, every line of this socket carries its (public) connection
                // id. A debug span costs nothing per socket at the default info level; the
                // socket's own info and warn lines name the id themselves.
                let span = tracing::debug_span!("conn", connection_id = %socket.connection_id);
                // Take the stream back out of hyper's boxed wrapper: no allocation and no
                // dynamic dispatch per read and write for the socket's lifetime.
                match upgraded.downcast::<TokioIo<S>>() {
                    Ok(parts) => {
                        let io = parts.io.into_inner();
                        // `read_buf` is a slice of hyper's whole read buffer: holding it for
                        // the socket's lifetime would keep kilobytes per socket alive (`run`
                        // copies what it holds).
                        let run =
                            conn::run(io, &parts.read_buf, wire, conn, socket, node.clone(), slots);
                        drop(parts.read_buf);
                        spawn_socket(&node, run, span);
                    }
                    Err(upgraded) => {
                        let io = TokioIo::new(upgraded);
                        let run = conn::run(io, &[], wire, conn, socket, node.clone(), slots);
                        spawn_socket(&node, run, span);
                    }
                }
            }
            Err(err) => {
                tracing::debug!(%peer, %err, "upgrade did not complete");
                node.bus.detach(&conn, Ending::Resumable, None);
                drop(slots);
            }
        }
    };
    node.tracker.spawn(task);

    let mut response = Response::new(Body::from(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key).expect("base64 is a valid header value"),
    );
    if wire.deflate {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(deflate::RESPONSE),
        );
    }
    Ok(response)
}

/// Spawns a socket's task, in its debug span only when that span is enabled: a span held by
/// every idle socket's task is 40 bytes more of it (and tokio sizes tasks in steps of 128).
fn spawn_socket<F>(node: &NodeState, run: F, span: tracing::Span)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if span.is_disabled() {
        node.tracker.spawn(run);
    } else {
        node.tracker.spawn(run.instrument(span));
    }
}

/// What a client presents to open a socket (a WebSocket or an event stream): its connection
/// id, its key (cookie, query or `X-Socket-Key`) and what it saw (`recover`).
pub(crate) struct Presented {
    pub(crate) connection_id: String,
    socket_key: String,
    pub(crate) recover: Option<Recover>,
    /// The client takes pushes on delta channels as deltas (`delta=1`).
    pub(crate) deltas: bool,
    /// The request's `Cookie` header, for the handlers (`call-route` forwards it).
    cookies: Option<HeaderValue>,
    /// The request's `Origin`, when it sent one (it passed the allow-list).
    pub(crate) origin: Option<HeaderValue>,
}

impl Presented {
    /// Checks the `Origin` against the allow-list and reads the credentials.
    pub(crate) fn read<B>(
        req: &Request<B>,
        peer: SocketAddr,
        node: &NodeState,
    ) -> Result<Self, UpgradeRefusal> {
        let headers = req.headers();
        if !origin_allowed(headers, &node.config.allowed_origins) {
            tracing::debug!(%peer, origin = ?headers.get(header::ORIGIN), "handshake refused: origin");
            return Err(UpgradeRefusal::Origin);
        }
        let Query {
            connection_id,
            key: query_key,
            recover,
            delta,
        } = parse_query(req.uri().query());
        let connection_id = connection_id.ok_or(UpgradeRefusal::MissingId)?;
        let recover = recover
            .map(|text| Recover::parse(&text))
            .transpose()
            .map_err(UpgradeRefusal::BadRecover)?;
        let socket_key = cookie(headers, &node.config.key_cookie)
            .or(query_key)
            .or_else(|| {
                headers
                    .get("x-socket-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .ok_or(UpgradeRefusal::MissingKey)?;
        Ok(Self {
            connection_id,
            socket_key,
            recover,
            deltas: matches!(delta.as_deref(), Some("1" | "true")),
            cookies: headers.get(header::COOKIE).cloned(),
            origin: headers.get(header::ORIGIN).cloned(),
        })
    }

    /// The identity of a socket (or a POSTing client) with these credentials, at `peer`.
    pub(crate) fn socket(self, digest: Digest, peer: SocketAddr) -> Arc<Socket> {
        Arc::new(Socket::new(
            self.connection_id.into_boxed_str(),
            digest,
            peer,
            self.cookies,
        ))
    }

    /// Checks the id's signature and that the key is the id's.
    pub(crate) fn verify(
        &self,
        peer: SocketAddr,
        node: &NodeState,
    ) -> Result<Verified, UpgradeRefusal> {
        node.registry
            .verify(&self.connection_id, &self.socket_key)
            .map_err(|err| {
                let connection_id = &self.connection_id;
                tracing::debug!(%peer, %connection_id, %err, "handshake refused");
                UpgradeRefusal::Credentials
            })
    }
}

/// A socket's places under the node's limit and its address's: held for its life.
pub(crate) type Slots = (OwnedSemaphorePermit, IpSlot);

/// A client the node admitted: its socket bound in the registry (and, in cluster mode, in
/// Redis), holding its place under the node's and its address's limits for its life.
pub(crate) struct Admitted {
    pub(crate) conn: Arc<Conn>,
    /// Its identity, for the handlers.
    pub(crate) socket: Arc<Socket>,
    /// Released when the socket ends.
    pub(crate) slots: Slots,
}

/// Binds a socket to `verified` credentials, unless the node drains, is full, or the client's
/// address holds as many sockets as it may.
pub(crate) async fn admit(
    node: &Arc<NodeState>,
    peer: SocketAddr,
    verified: &Verified,
    presented: Presented,
    recover: Option<&Recover>,
) -> Result<Admitted, UpgradeRefusal> {
    let connection_id = presented.connection_id;
    if node.shutdown.is_cancelled() {
        return Err(UpgradeRefusal::Unavailable);
    }
    let permit = node.ws_permits.clone().try_acquire_owned().map_err(|_| {
        tracing::warn!(%peer, "handshake refused: max-connections reached");
        UpgradeRefusal::Unavailable
    })?;
    let limit = node.config.limits.max_connections_per_ip;
    let ip_slot = IpSlot::take(node, peer.ip(), limit, Counts::Connections).ok_or_else(|| {
        tracing::debug!(%peer, "handshake refused: max-connections-per-ip reached");
        UpgradeRefusal::TooManyFromIp
    })?;
    let conn = node
        .bus
        .attach(verified, &connection_id, recover)
        .await
        .map_err(|err| {
            tracing::debug!(%peer, %connection_id, %err, "handshake refused");
            match err {
                AttachError::Refused(AttachRefusal::Expired) => UpgradeRefusal::Expired,
                AttachError::Refused(AttachRefusal::AlreadyLive) => UpgradeRefusal::InUse,
                AttachError::Refused(AttachRefusal::Ended) => UpgradeRefusal::Used,
                AttachError::Refused(AttachRefusal::Unknown) => UpgradeRefusal::Unknown,
                AttachError::Unavailable(_) => UpgradeRefusal::Unavailable,
            }
        })?;
    let socket = Presented {
        connection_id,
        ..presented
    }
    .socket(conn.digest(), peer);
    Ok(Admitted {
        conn,
        socket,
        slots: (permit, ip_slot),
    })
}

/// The `Sec-WebSocket-Accept` value when the request is a valid WebSocket upgrade.
fn websocket_accept_key(method: &Method, headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let ok = method == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    ok.then(|| derive_accept_key(key.as_bytes()))
}

pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return true;
    }
    match headers.get(header::ORIGIN) {
        // Browsers always send Origin on WebSocket handshakes; a client without one is not a
        // browser, so it cannot be a cross-site hijack.
        None => true,
        Some(origin) => origin.to_str().is_ok_and(|origin| {
            allowed
                .iter()
                .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
        }),
    }
}

/// What the handshake reads from the query string.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    /// `socket_connection_id`.
    connection_id: Option<String>,
    /// `socket_key` (non-browser clients).
    key: Option<String>,
    /// `recover`: what the client last saw per channel (JSON), and that it wants positions.
    recover: Option<String>,
    /// `delta`: `1` (or `true`) when the client applies deltas.
    delta: Option<String>,
}

/// `socket_connection_id`, `socket_key` and `recover` from the query string (the first of each).
fn parse_query(query: Option<&str>) -> Query {
    let mut out = Query::default();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match &*name {
            "socket_connection_id" => &mut out.connection_id,
            "socket_key" => &mut out.key,
            "recover" => &mut out.recover,
            "delta" => &mut out.delta,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    out.connection_id = out.connection_id.filter(|v| !v.is_empty());
    out.key = out.key.filter(|v| !v.is_empty());
    out
}

/// The value of cookie `name`, from any `Cookie` header.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// The handshake's query never panics the parser; what it finds is what the query holds,
/// and a `recover` it finds never panics `Recover::parse`.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_query(input: &[u8]) {
    let Ok(query) = std::str::from_utf8(input) else {
        return;
    };
    let q = parse_query(Some(query));
    for found in [&q.connection_id, &q.key].into_iter().flatten() {
        assert!(!found.is_empty());
    }
    if let Some(recover) = &q.recover {
        let _ = crate::protocol::Recover::parse(recover);
    }
}

/// Headers as `name: value` lines (those that are not valid headers are skipped): the
/// upgrade check, the Origin check and the cookie reader never panic, and a cookie found is
/// one a `Cookie` header holds.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_headers(input: &[u8]) {
    let mut map = HeaderMap::new();
    for line in input.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    for method in [Method::GET, Method::POST] {
        let _ = websocket_accept_key(&method, &map);
    }
    let _ = origin_allowed(&map, &["https://app.example.com".to_owned()]);
    let _ = origin_allowed(&map, &[]);
    if let Some(key) = cookie(&map, "socket_key") {
        assert!(!key.is_empty());
        let all: Vec<u8> = map
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().to_vec())
            .collect();
        assert!(
            all.windows(key.len()).any(|w| w == key.as_bytes()),
            "{key:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert_eq!(
            websocket_accept_key(&Method::GET, &headers(&good)).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert!(websocket_accept_key(&Method::POST, &headers(&good)).is_none());
        for skip in 0..good.len() {
            let partial: Vec<_> = good
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            assert!(websocket_accept_key(&Method::GET, &headers(&partial)).is_none());
        }
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(
            &headers(&[("origin", "https://app.example.com")]),
            &allowed
        ));
        assert!(origin_allowed(
            &headers(&[("origin", "HTTPS://APP.example.com")]),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://evil.example")]),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://app.example.com.evil")]),
            &allowed
        ));
        assert!(origin_allowed(&headers(&[]), &allowed));
        assert!(origin_allowed(&headers(&[("origin", "https://x")]), &[]));
    }

    #[test]
    fn credentials_are_found_in_query_and_cookie() {
        let q = parse_query(Some(
            "a=1&socket_connection_id=abc&socket_key=k%2B1&recover=%7B%7D",
        ));
        assert_eq!(
            (
                q.connection_id.as_deref(),
                q.key.as_deref(),
                q.recover.as_deref()
            ),
            (Some("abc"), Some("k+1"), Some("{}"))
        );
        assert_eq!(parse_query(Some("socket_connection_id=")), Query::default());
        let h = headers(&[
            ("cookie", "session=s1; socket_key=\"xyz\""),
            ("cookie", "b=2"),
        ]);
        assert_eq!(cookie(&h, "socket_key").as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn fuzz_handshake_queries() {
        use proptest::prelude::*;
        crate::fuzz::replay("handshake_query", check_query);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let pairs = proptest::collection::vec(
            (
                prop_oneof![
                    Just("socket_connection_id".to_owned()),
                    Just("socket_key".to_owned()),
                    Just("recover".to_owned()),
                    "[ -~]{0,8}",
                ],
                "[ -~]{0,40}",
            ),
            0..6,
        )
        .prop_map(|pairs| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &pairs {
                query.append_pair(k, v);
            }
            query.finish()
        });
        let inputs = prop_oneof![any::<String>(), pairs];
        runner
            .run(&inputs, |query| {
                check_query(query.as_bytes());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn fuzz_headers() {
        use proptest::prelude::*;
        crate::fuzz::replay("headers", check_headers);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let lines = proptest::collection::vec(
            (
                prop_oneof![
                    Just("cookie"),
                    Just("origin"),
                    Just("connection"),
                    Just("upgrade"),
                    Just("sec-websocket-version"),
                    Just("sec-websocket-key"),
                ],
                "[ -~]{0,40}",
            ),
            0..8,
        )
        .prop_map(|lines| {
            lines
                .iter()
                .map(|(n, v)| format!("{n}: {v}"))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        });
        let inputs = prop_oneof![any::<Vec<u8>>(), lines];
        runner
            .run(&inputs, |input| {
                check_headers(&input);
                Ok(())
            })
            .unwrap();
    }
}
