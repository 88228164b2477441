//! Server-Sent Events: the client plane for clients that cannot hold a WebSocket (proxies that
//! strip `Upgrade`, firewalls that cut long WebSockets, `curl`, a plain `EventSource`).
//!
//! `GET <sse-path>?socket_connection_id=ID` with the key as for the WebSocket (cookie, query or
//! `X-Socket-Key`) answers `text/event-stream`: every frame a WebSocket would get (pushes,
//! `Send`s, join and leave, `connected`, position and gap frames, replies) is one event whose
//! `data` is the same JSON. To the registry the stream is a socket: the same credentials
//! (single use, grace, resume on any node), subscriptions by digest, presence, lifecycle
//! events, limits, Origin check and slow-consumer policy. The node's heartbeat becomes a
//! comment (`:`) every ping interval, so proxies see traffic on an idle stream.
//!
//! # Resume from `Last-Event-ID`
//! A stream always gets positions (as a WebSocket that sent `recover`). Each event that moves a
//! channel's position carries an `id` from which any node rebuilds the position of every
//! channel the stream had delivered up to that event: `<n>` names the stream's anchor `n`, the
//! positions of all its channels, which the node saved with the credentials' state (in Redis in
//! cluster mode) before using it; `.<i>-<a>` entries say that the channel at index `i` of the
//! anchor (in name order) advanced by `a` pushes since. When an event cannot be said that way
//! (a channel joins, an epoch changes) or the id would hold more than [`MAX_ENTRIES`] entries,
//! the node saves the positions as anchor `n + 1` first. So an id is at most about
//! `MAX_ENTRIES * 8` bytes whatever the number of channels, and a save happens at most once
//! every [`MAX_ENTRIES`] events that move a channel.
//!
//! A browser's `EventSource` reconnects on its own with the last id it saw in `Last-Event-ID`;
//! the node reads the anchor it names from the digest's own state (a foreign or forged id can
//! name nothing else) and resumes every channel from there, as the `recover` parameter would:
//! missed pushes in order, or `recovered:false` where history does not reach back. An id it
//! cannot resume from (forged, unparseable, or older than the last four anchors) gets
//! `recovered:false` on every channel of its `connected` event: a gap said, never a silent one.
//! After a page refresh, new credentials carry the `recover` parameter as for the WebSocket.
//!
//! # Transport
//! A stream's task writes its events to hyper's response body ([`Out::Body`]: HTTP/2, TLS, or
//! a connection that served other requests first), or, when a plain connection's first request
//! opens it, straight to the connection ([`lean`]), so hyper's per-connection buffers do not
//! live as long as the stream. `POST` on the same path carries client messages ([`message`]),
//! `OPTIONS` their CORS preflights ([`preflight`]); refusals that may pass are a `200` stream
//! holding only a `retry` time, which a plain `EventSource` follows.

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

use crate::{
    conn::{self, End},
    credentials::Digest,
    domain::{valid_epoch, Channel, Position},
    error::Close,
    fanout::Next,
    handlers::Socket,
    handshake::{admit, origin_allowed, Admitted, Presented, Slots, UpgradeRefusal},
    http::{Body, Events},
    limit::{MessageLimit, Take},
    node::{Admission, EventStream, NodeState, Poster},
    protocol::{Frame, Recover},
    registry::Conn,
};

/// Entries an id holds before the node saves a new anchor.
pub(crate) const MAX_ENTRIES: usize = 16;

/// Longest `Last-Event-ID` read, in bytes; a longer one is ignored.
const MAX_ID_LEN: usize = 1024;

/// Chunks handed to the response body and not yet written: a client that reads slower than
/// the stream produces fills its outbox, and the slow-consumer policy closes it.
const CHUNKS: usize = 2;

/// How long EventSource waits before it reconnects (the `retry` field), in milliseconds.
const RETRY_MS: u32 = 1000;

/// The event-stream endpoint: counts the request with the handshakes, by outcome.
pub(crate) async fn stream(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
) -> Response<Body> {
    let handshakes = &node.registry.metrics().handshakes;
    if spare {
        handshakes.with_label_values(&["pending_full", "sse"]).inc();
        return UpgradeRefusal::Unavailable.response();
    }
    // For a "come back later": a cross-origin EventSource reads no answer without it.
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .filter(|_| origin_allowed(req.headers(), &node.config.allowed_origins))
        .cloned();
    match open(req, peer, node).await {
        Ok(response) => {
            handshakes.with_label_values(&["accepted", "sse"]).inc();
            response
        }
        Err(refusal) => {
            handshakes
                .with_label_values(&[refusal.label(), "sse"])
                .inc();
            if refusal.is_transient() {
                // EventSource gives up for good on any status but 200: "later" is said as an
                // empty stream with a retry time, so a plain EventSource comes back (with its
                // Last-Event-ID) instead of failing.
                return retry_later(refusal, origin);
            }
            refusal.response()
        }
    }
}

/// Longest request head the lean path reads.
const MAX_HEAD: usize = 16 << 10;

/// Whether a plain HTTP/1.1 connection's first request is `GET <sse-path>`: then [`lean`]
/// serves it without hyper, whose buffers (16 KiB per connection) would otherwise live as long
/// as the stream. Waits for the first bytes until `deadline`; `None` when nothing came.
pub(crate) async fn opens_with_a_stream(
    stream: &tokio::net::TcpStream,
    node: &NodeState,
    deadline: tokio::time::Instant,
) -> Option<bool> {
    let want = format!("GET {}", node.config.sse_path);
    let mut start = [0u8; 256];
    let n = match tokio::time::timeout_at(deadline, stream.peek(&mut start)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    let start = &start[..n];
    Some(
        start.len() > want.len()
            && start.starts_with(want.as_bytes())
            && matches!(start[want.len()], b'?' | b' '),
    )
}

/// Serves a connection whose first request opens a stream, without hyper: reads the head,
/// checks it as [`stream`] does, and on success writes the response head and a close-delimited
/// body (the stream ends with the connection) from the stream's own task. The connection's
/// HTTP-phase admission (`pending`) is given back once the stream is open.
pub(crate) async fn lean(
    mut stream: tokio::net::TcpStream,
    from: SocketAddr,
    node: Arc<NodeState>,
    pending: Admission,
    deadline: tokio::time::Instant,
) {
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > MAX_HEAD {
            let _ = write_response(
                &mut stream,
                crate::http::text(
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                ),
            )
            .await;
            return;
        }
    };
    let Some(req) = parse_head(&buf[..head_len]) else {
        let _ = write_response(
            &mut stream,
            crate::http::text(http::StatusCode::BAD_REQUEST, "malformed request\n"),
        )
        .await;
        return;
    };
    drop(buf);
    let peer = node.client(from, req.headers());
    let handshakes = &node.registry.metrics().handshakes;
    if pending.spare() {
        // Every handshake permit is taken: as on hyper's path, streams get 503.
        handshakes.with_label_values(&["pending_full", "sse"]).inc();
        let _ = write_response(&mut stream, UpgradeRefusal::Unavailable.response()).await;
        return;
    }
    match accept(&req, peer, &node).await {
        Ok(accepted) => {
            handshakes.with_label_values(&["accepted", "sse"]).inc();
            drop(pending);
            let mut head = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
            for (name, value) in head_fields(accepted.origin.clone()) {
                head.put_slice(name.as_str().as_bytes());
                head.put_slice(b": ");
                head.put_slice(value.as_bytes());
                head.put_slice(b"\r\n");
            }
            head.put_slice(b"\r\n");
            accepted.spawn(&node, Out::Socket(stream), Some(head.freeze()));
        }
        Err(refusal) => {
            handshakes
                .with_label_values(&[refusal.label(), "sse"])
                .inc();
            let origin = req
                .headers()
                .get(header::ORIGIN)
                .filter(|_| origin_allowed(req.headers(), &node.config.allowed_origins))
                .cloned();
            let response = if refusal.is_transient() {
                retry_later(refusal, origin)
            } else {
                refusal.response()
            };
            let _ = write_response(&mut stream, response).await;
        }
    }
}

/// A request head as `http` types, or `None` when it does not parse.
fn parse_head(head: &[u8]) -> Option<Request<()>> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    if !matches!(parsed.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut req = Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .body(())
        .ok()?;
    for field in parsed.headers.iter() {
        let name = header::HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        req.headers_mut().append(name, value);
    }
    Some(req)
}

/// Writes a whole response (a refusal) and closes.
async fn write_response(
    stream: &mut tokio::net::TcpStream,
    response: Response<Body>,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = match body {
        Body::Whole(body) => body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
        Body::Events(_) => Bytes::new(),
    };
    let mut out = BytesMut::new();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    let _ = write!(
        out,
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    out.put_slice(&body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// A `200` event stream that only says when to come back, then ends.
fn retry_later(refusal: UpgradeRefusal, origin: Option<HeaderValue>) -> Response<Body> {
    let mut out = BytesMut::new();
    let _ = write!(out, "retry: {RETRY_MS}\n: not now: {}\n\n", refusal.label());
    let mut response = Response::new(Body::from(out.freeze()));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    allow_origin(&mut response, origin);
    response
}

async fn open(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
) -> Result<Response<Body>, UpgradeRefusal> {
    let accepted = accept(&req, peer, node).await?;
    let (chunks, body) = mpsc::channel(CHUNKS);
    let origin = accepted.origin.clone();
    accepted.spawn(node, Out::Body(chunks), None);
    let mut response = Response::new(Body::Events(Events { chunks: body }));
    for (name, value) in head_fields(origin) {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// The response header fields of an open stream.
fn head_fields(origin: Option<HeaderValue>) -> Vec<(header::HeaderName, HeaderValue)> {
    let mut fields = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        // A stream that ends (a drain, a close) takes its connection along: the client
        // reconnects anyway, and a drained node keeps no idle connection behind.
        (header::CONNECTION, HeaderValue::from_static("close")),
        // nginx buffers responses unless told not to.
        (
            header::HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        ),
    ];
    // Present only when allowed (the Origin check passed): credentialed cross-origin
    // EventSource (`withCredentials`) needs both.
    if let Some(origin) = origin {
        fields.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin));
        fields.push((
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ));
        fields.push((header::VARY, HeaderValue::from_static("Origin")));
    }
    fields
}

/// A stream the node admitted, before its task runs.
struct Accepted {
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    slots: Slots,
    anchor: u64,
    /// It presented a Last-Event-ID it cannot resume from.
    lost: bool,
    /// The request's `Origin`, which passed the allow-list.
    origin: Option<HeaderValue>,
}

impl Accepted {
    /// Runs the stream's task, writing to `out` (after `head`, when the task writes the
    /// response head itself), until it ends.
    fn spawn(self, node: &Arc<NodeState>, out: Out, head: Option<Bytes>) {
        let task_node = node.clone();
        let Self {
            conn,
            socket,
            slots,
            anchor,
            lost,
            ..
        } = self;
        node.tracker.spawn(async move {
            run(conn, socket, &task_node, out, (anchor, lost), head).await;
            drop(slots);
        });
    }
}

/// Checks a stream's request as a handshake is checked, resumes from its `Last-Event-ID` or
/// `recover`, and binds its socket.
async fn accept<B>(
    req: &Request<B>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
) -> Result<Accepted, UpgradeRefusal> {
    if !node.handshake_allowed(peer.ip()) {
        tracing::debug!(%peer, "event stream refused: handshake rate per address");
        return Err(UpgradeRefusal::HandshakeRate);
    }
    if req.method() != Method::GET {
        return Err(UpgradeRefusal::NotGet);
    }
    let presented = Presented::read(req, peer, node)?;
    let verified = presented.verify(peer, node)?;
    let last_id = req.headers().get("last-event-id");
    // Last-Event-ID is newer than any `recover` the page built its URL with. One this stream
    // cannot resume from (forged, or naming an anchor no longer kept) means the client saw
    // what the node cannot tell: every channel is then said `recovered:false`, never silence.
    let (recover, anchor, lost) = match last_id {
        Some(text) => {
            let id = text.to_str().ok().and_then(EventId::parse);
            let resumed = match &id {
                Some(id) => resume(node, &verified.digest, id).await,
                None => None,
            };
            match resumed {
                Some(recover) => (recover, id.map_or(0, |id| id.anchor), false),
                None => {
                    tracing::debug!(%peer, "Last-Event-ID names no kept anchor; every channel is a gap");
                    (Recover::default(), 0, true)
                }
            }
        }
        None => (presented.recover.unwrap_or_default(), 0, false),
    };
    let origin = req.headers().get(header::ORIGIN).cloned();
    let cookies = req.headers().get(header::COOKIE).cloned();
    let Admitted {
        connection_id,
        conn,
        slots,
    } = admit(
        node,
        peer,
        &verified,
        presented.connection_id,
        Some(&recover),
    )
    .await?;
    let socket = Arc::new(Socket::new(
        connection_id.into_boxed_str(),
        conn.digest(),
        peer,
        cookies,
    ));
    Ok(Accepted {
        conn,
        socket,
        slots,
        anchor,
        lost,
        origin,
    })
}

/// A client message POSTed to the event-stream path: the same message, credentials and limits
/// as on a WebSocket (counted with the stream's: rate, in flight, size), the reply in the
/// response body. When the stream lives on another node of the cluster, the message is handled
/// here all the same, with the client's limits counted on this node.
pub(crate) async fn message(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
) -> Response<Body> {
    match post(req, peer, node).await {
        Ok(response) | Err(response) => response,
    }
}

async fn post(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
) -> Result<Response<Body>, Response<Body>> {
    let refused = |refusal: UpgradeRefusal| refusal.response();
    let presented = Presented::read(&req, peer, node).map_err(refused)?;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        // Not a "simple" type: a browser asks (preflight) before sending one cross-site.
        return Err(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a client message is POSTed as application/json\n",
        ));
    }
    let verified = presented.verify(peer, node).map_err(refused)?;
    let digest = verified.digest;
    let here = node.event_streams.get(&digest).map(|s| s.value().clone());
    let target = match here {
        Some(stream) => Target::Here(stream),
        // The stream lives on another node (a balancer that does not route by connection id):
        // the message is handled here, counted against this node's limits for the client.
        None => match node.bus.is_live(&digest).await {
            Ok(true) => {
                let cookies = req.headers().get(header::COOKIE).cloned();
                let limits = &node.config.limits;
                let poster = node
                    .posters
                    .entry(digest)
                    .or_insert_with(|| {
                        Arc::new(Poster {
                            socket: Arc::new(Socket::new(
                                presented.connection_id.clone().into_boxed_str(),
                                digest,
                                peer,
                                cookies,
                            )),
                            limit: parking_lot::Mutex::new(MessageLimit::new(
                                limits.message_rate,
                                limits.message_burst,
                            )),
                            last_ms: Default::default(),
                        })
                    })
                    .clone();
                poster.last_ms.store(
                    crate::clock::monotonic_ms(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                Target::Elsewhere(poster)
            }
            Ok(false) => {
                return Err(plain(
                    StatusCode::CONFLICT,
                    "no live stream or socket for these credentials: open one first (GET)\n",
                ))
            }
            Err(err) => {
                tracing::debug!(%err, "a POSTed message's stream could not be found");
                return Err(UpgradeRefusal::Unavailable.response());
            }
        },
    };
    let (socket, limit) = match &target {
        Target::Here(stream) => (&stream.socket, &stream.limit),
        Target::Elsewhere(poster) => (&poster.socket, &poster.limit),
    };
    // Breaking a limit closes the stream, as on a WebSocket, when it is here to close.
    let close = |why: Close| {
        if let Target::Here(stream) = &target {
            stream.conn.outbox.close(why);
        }
    };
    let max = node.config.limits.max_message_size;
    let body = http_body_util::Limited::new(req.into_body(), max);
    let read = tokio::time::timeout(node.config.limits.handshake_timeout, body.collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            // As a WebSocket's oversized message does, this closes the stream.
            close(Close::Policy("message too large"));
            return Err(plain(StatusCode::PAYLOAD_TOO_LARGE, "message too large\n"));
        }
        _ => {
            return Err(plain(
                StatusCode::BAD_REQUEST,
                "the message did not arrive whole in time\n",
            ))
        }
    };
    let Ok(text) = Frame::try_from(bytes) else {
        close(Close::InvalidPayload);
        return Err(plain(
            StatusCode::BAD_REQUEST,
            "a client message is UTF-8 JSON\n",
        ));
    };
    if let Target::Here(stream) = &target {
        stream.conn.touch();
    }
    node.registry.metrics().messages_in.inc();
    let taken = limit.lock().take(tokio::time::Instant::now());
    let reply = match taken {
        Take::Allowed => match conn::dispatch(text, socket, node) {
            conn::Answer::Now(reply) => Some(reply),
            conn::Answer::Later(future) => future.await,
        },
        Take::Refused => {
            let id = crate::protocol::parse_inbound(&text)
                .ok()
                .and_then(|m| m.id.map(|id| id.to_owned()));
            Some(crate::protocol::Reply::text(
                id,
                429,
                "rate limited: slow down",
            ))
        }
        Take::Abusive => {
            close(Close::Policy("message rate limit exceeded"));
            return Err(plain(
                StatusCode::TOO_MANY_REQUESTS,
                "message rate limit exceeded\n",
            ));
        }
    };
    let mut response = match reply {
        Some(reply) => {
            let mut response = Response::new(Body::from(Bytes::from(reply.encode().to_string())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        None => {
            let mut response = Response::new(Body::from(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
    };
    allow_origin(&mut response, origin);
    Ok(response)
}

/// Where a POSTed message's client is counted.
enum Target {
    /// Its stream is on this node.
    Here(Arc<EventStream>),
    /// Its stream (or socket) is live on another node.
    Elsewhere(Arc<Poster>),
}

/// A CORS preflight: allowed origins may open streams and POST JSON with credentials (the
/// cookie, or `X-Socket-Key`); any other is refused.
pub(crate) fn preflight(req: &Request<Incoming>, node: &NodeState) -> Response<Body> {
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).cloned();
    // POST for messages; GET for a stream whose request carries a header that is not
    // safelisted (`Last-Event-ID` or `X-Socket-Key` from a script).
    let wants = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .is_some_and(|m| m == "POST" || m == "GET");
    if origin.is_none() || !wants || !origin_allowed(headers, &node.config.allowed_origins) {
        return plain(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    let mut response = Response::new(Body::from(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, x-socket-key, last-event-id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    allow_origin(&mut response, origin);
    response
}

/// `Access-Control-Allow-Origin` (and `-Credentials`) for a request whose `Origin` passed the
/// allow-list.
fn allow_origin(response: &mut Response<Body>, origin: Option<HeaderValue>) {
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    crate::http::text(status, body)
}

/// The positions a `Last-Event-ID` stands for, from the digest's own anchor; `None` when that
/// anchor is not kept (or the id does not fit it).
async fn resume(node: &NodeState, digest: &Digest, id: &EventId) -> Option<Recover> {
    let positions = match node.bus.load_anchor(digest, id.anchor).await {
        Ok(positions) => positions?,
        Err(err) => {
            tracing::debug!(%err, "anchor not read");
            return None;
        }
    };
    let Recover(mut map) = Recover::parse(&positions).ok()?;
    let mut order: Vec<Channel> = map.keys().cloned().collect();
    order.sort();
    for &(index, advance) in &id.entries {
        let position = map.get_mut(order.get(index)?)?;
        position.offset = position.offset.checked_add(advance)?;
    }
    Some(Recover(map))
}

/// A parsed `Last-Event-ID`: `<anchor>` then `.<index>-<advance>` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventId {
    anchor: u64,
    entries: Vec<(usize, u64)>,
}

impl EventId {
    /// Reads an id this node's kind wrote; `None` for anything else.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        if text.len() > MAX_ID_LEN {
            return None;
        }
        let mut parts = text.split('.');
        let anchor = parts.next()?.parse().ok()?;
        let mut entries = Vec::new();
        for part in parts {
            let (index, advance) = part.split_once('-')?;
            entries.push((index.parse().ok()?, advance.parse().ok()?));
            if entries.len() > 4 * MAX_ENTRIES {
                return None;
            }
        }
        Some(Self { anchor, entries })
    }
}

/// What the stream has delivered, per channel, and the id that says it. A push costs a lookup
/// of its channel's name as the frame spells it and an entry's update: no allocation.
struct Ids {
    /// The anchor the id names (0: none saved yet).
    anchor: u64,
    /// The anchor's positions, by channel name.
    base: Vec<(Channel, Position)>,
    /// Each base channel's index, by its name as frames spell it (a JSON string).
    spelled: HashMap<Box<[u8]>, usize>,
    /// `(index in base, pushes since the anchor)`, in the order channels first moved.
    entries: Vec<(usize, u64)>,
    /// Positions the id cannot say until the next anchor: channels the anchor lacks, and base
    /// channels in another epoch (their pushes update them here).
    pending: HashMap<Channel, Position>,
    /// The id moved since it was last written.
    moved: bool,
}

/// How a frame moves the stream's positions.
enum Moves<'a> {
    /// Not at all (a reply, a `Send`, join and leave).
    None,
    /// A push: its channel's name as the frame spells it (a JSON string), and its offset.
    Offset(&'a [u8], u64),
    /// The channels' positions, as the frame says them (`connected`, position and gap frames).
    Positions(Vec<(Channel, Position)>),
}

impl Ids {
    fn new(anchor: u64) -> Self {
        Self {
            anchor,
            base: Vec::new(),
            spelled: HashMap::new(),
            entries: Vec::new(),
            pending: HashMap::new(),
            moved: false,
        }
    }

    /// Takes `frame` into account; saves a new anchor when the id could not say the frame
    /// otherwise. On a failed save the id stays what it was: a resume from it replays this
    /// frame (a duplicate), never skips one.
    async fn frame(&mut self, frame: &str, digest: &Digest, node: &NodeState) {
        let reanchor = match moves(frame) {
            Moves::None => return,
            Moves::Offset(spelled, offset) => match self.spelled.get(spelled) {
                Some(&index) => {
                    let (channel, base) = &self.base[index];
                    match self.pending.get_mut(channel) {
                        // In another epoch than the anchor's: said by the next anchor.
                        Some(position) => position.offset = offset,
                        None if offset >= base.offset => {
                            let by = offset - base.offset;
                            match self.entries.iter_mut().find(|(i, _)| *i == index) {
                                Some(entry) => entry.1 = by,
                                None => self.entries.push((index, by)),
                            }
                            self.moved = true;
                            if self.entries.len() <= MAX_ENTRIES {
                                return;
                            }
                        }
                        None => {
                            let position = Position {
                                epoch: base.epoch.clone(),
                                offset,
                            };
                            self.pending.insert(channel.clone(), position);
                        }
                    }
                    true
                }
                None => {
                    let Some(channel) = serde_json::from_slice::<String>(spelled)
                        .ok()
                        .and_then(|name| Channel::new(&name).ok())
                    else {
                        return;
                    };
                    match self.pending.get_mut(&channel) {
                        Some(position) => position.offset = offset,
                        // A push of a channel the stream has no epoch for: nothing to say.
                        None => return,
                    }
                    true
                }
            },
            Moves::Positions(changes) => {
                let mut reanchor = false;
                for (channel, position) in changes {
                    let index = self.base.binary_search_by(|(c, _)| c.cmp(&channel)).ok();
                    match index {
                        Some(i)
                            if self.base[i].1.epoch == position.epoch
                                && position.offset >= self.base[i].1.offset
                                && !self.pending.contains_key(&channel) =>
                        {
                            let by = position.offset - self.base[i].1.offset;
                            match self.entries.iter_mut().find(|(e, _)| *e == i) {
                                Some(entry) => entry.1 = by,
                                None => self.entries.push((i, by)),
                            }
                            self.moved = true;
                        }
                        _ => {
                            self.pending.insert(channel, position);
                            reanchor = true;
                        }
                    }
                }
                reanchor || self.entries.len() > MAX_ENTRIES
            }
        };
        if reanchor {
            self.reanchor(digest, node).await;
        }
    }

    /// Every position the stream has delivered.
    fn positions(&self) -> Vec<(Channel, Position)> {
        let mut all = self.base.clone();
        for &(index, by) in &self.entries {
            all[index].1.offset += by;
        }
        for (channel, position) in &self.pending {
            match all.binary_search_by(|(c, _)| c.cmp(channel)) {
                Ok(i) => all[i].1 = position.clone(),
                Err(i) => all.insert(i, (channel.clone(), position.clone())),
            }
        }
        all
    }

    /// Saves every position as the next anchor and starts from it.
    async fn reanchor(&mut self, digest: &Digest, node: &NodeState) {
        let all = self.positions();
        let positions = Recover(all.iter().cloned().collect()).to_json();
        // An id's number is the client's to send: never overflow on it.
        let number = self.anchor.checked_add(1).unwrap_or(1);
        match node.bus.save_anchor(digest, number, &positions).await {
            Ok(()) => {
                self.anchor = number;
                self.spelled = all
                    .iter()
                    .enumerate()
                    .map(|(i, (channel, _))| (spell(channel), i))
                    .collect();
                self.base = all;
                self.pending.clear();
                self.entries.clear();
                self.moved = true;
            }
            Err(err) => {
                // The positions stay pending and the next save takes them along.
                tracing::debug!(%err, "event stream anchor not saved; its id stays behind");
            }
        }
    }

    /// Writes the `id` line before an event, when the id moved since the last one written.
    fn write_line(&mut self, out: &mut BytesMut) {
        if !self.moved || self.anchor == 0 {
            return;
        }
        self.moved = false;
        let _ = write!(out, "id: {}", self.anchor);
        for (index, advance) in &self.entries {
            let _ = write!(out, ".{index}-{advance}");
        }
        out.put_u8(b'\n');
    }
}

/// A channel's name as frames spell it: a JSON string.
fn spell(channel: &Channel) -> Box<[u8]> {
    serde_json::to_vec(channel.as_str())
        .unwrap_or_default()
        .into_boxed_slice()
}

/// Reads where a frame moves positions, from the frames' fixed shapes (`protocol`): pushes by
/// their head alone (the payload is not read), the rare position frames whole.
fn moves(frame: &str) -> Moves<'_> {
    #[derive(Deserialize)]
    struct Head {
        channel: String,
        epoch: Option<String>,
        offset: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Connected {
        connected: ConnectedChannels,
    }
    #[derive(Deserialize)]
    struct ConnectedChannels {
        channels: HashMap<String, At>,
    }
    #[derive(Deserialize)]
    struct At {
        epoch: String,
        offset: u64,
    }
    if frame.starts_with(r#"{"connected":"#) {
        let Ok(c) = serde_json::from_str::<Connected>(frame) else {
            return Moves::None;
        };
        return Moves::Positions(
            c.connected
                .channels
                .into_iter()
                .filter_map(|(name, at)| {
                    let channel = Channel::new(&name).ok()?;
                    Some((channel, position(&at.epoch, at.offset)?))
                })
                .collect(),
        );
    }
    let Some(rest) = frame.strip_prefix(r#"{"channel":"#) else {
        return Moves::None;
    };
    // The channel's JSON string: to its closing quote (a backslash escapes the next byte).
    let bytes = rest.as_bytes();
    let mut end = 1;
    while end < bytes.len() && bytes[end] != b'"' {
        end += if bytes[end] == b'\\' { 2 } else { 1 };
    }
    let Some(after) = rest.get(end + 1..) else {
        return Moves::None;
    };
    if let Some(digits) = after.strip_prefix(r#","offset":"#) {
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        return match digits[..len].parse() {
            Ok(offset) => Moves::Offset(&bytes[..=end], offset),
            Err(_) => Moves::None,
        };
    }
    if !(after.starts_with(r#","epoch":"#) || after.starts_with(r#","recovered":"#)) {
        return Moves::None;
    }
    match serde_json::from_str::<Head>(frame) {
        Ok(Head {
            channel,
            epoch: Some(epoch),
            offset: Some(offset),
        }) => match (Channel::new(&channel), position(&epoch, offset)) {
            (Ok(channel), Some(position)) => Moves::Positions(vec![(channel, position)]),
            _ => Moves::None,
        },
        _ => Moves::None,
    }
}

/// A `connected` frame with every channel said `recovered:false`: for a stream that came
/// back with an id it cannot resume from.
fn all_lost(frame: &Frame) -> Frame {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(frame.as_str()) else {
        return frame.clone();
    };
    if let Some(channels) = value["connected"]["channels"].as_object_mut() {
        for at in channels.values_mut() {
            at["recovered"] = serde_json::Value::Bool(false);
        }
    }
    Frame::from(value.to_string())
}

/// A position whose epoch is well formed.
fn position(epoch: &str, offset: u64) -> Option<Position> {
    valid_epoch(epoch).then(|| Position {
        epoch: epoch.into(),
        offset,
    })
}

/// Writes `frame` as one event, its `data` split at line breaks (a payload may hold them
/// outside its strings; the browser joins the lines with `\n`).
fn event(out: &mut BytesMut, frame: &Frame) {
    let text = frame.as_str();
    if !text.contains(['\n', '\r']) {
        out.put_slice(b"data: ");
        out.put_slice(text.as_bytes());
        out.put_slice(b"\n\n");
        return;
    }
    for line in text.split(['\n', '\r']) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// Runs a stream until it ends, then tells the registry as a socket's end would.
/// Where a stream's chunks go: hyper's response body, or the connection itself (a stream that
/// opened a connection, read without hyper: see [`lean`]).
pub(crate) enum Out {
    /// The response body's channel.
    Body(mpsc::Sender<Bytes>),
    /// The client's connection, after the response head.
    Socket(tokio::net::TcpStream),
}

impl Out {
    /// Hands `chunk` over; `false` when the client is gone.
    async fn send(&mut self, chunk: Bytes) -> bool {
        match self {
            Self::Body(chunks) => chunks.send(chunk).await.is_ok(),
            Self::Socket(stream) => stream.write_all(&chunk).await.is_ok(),
        }
    }

    /// Resolves when the client went away (a client sends nothing on a stream; whatever it
    /// sends is read and dropped).
    async fn gone(&mut self) {
        match self {
            Self::Body(chunks) => chunks.closed().await,
            Self::Socket(stream) => {
                let mut sink = [0u8; 64];
                while let Ok(1..) = stream.read(&mut sink).await {}
            }
        }
    }
}

async fn run(
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    node: &Arc<NodeState>,
    mut out: Out,
    anchor: (u64, bool),
    head: Option<Bytes>,
) {
    tracing::debug!(connection_id = %socket.connection_id, peer = %socket.peer, "event stream open");
    let limits = &node.config.limits;
    let entry = Arc::new(EventStream {
        conn: conn.clone(),
        socket: socket.clone(),
        limit: parking_lot::Mutex::new(MessageLimit::new(
            limits.message_rate,
            limits.message_burst,
        )),
    });
    node.event_streams.insert(conn.digest(), entry.clone());
    node.registry.metrics().event_streams.inc();
    if node.handlers.wants_lifecycle() {
        let user = node.registry.user_of(&conn.digest());
        node.handlers
            .connected(&socket, conn.resumed(), user.as_ref().map(|u| &*u.name));
    }
    let end = write_loop(&conn, node, &mut out, anchor, head).await;
    // Unless a resume on this node already replaced it.
    node.event_streams
        .remove_if(&conn.digest(), |_, live| Arc::ptr_eq(live, &entry));
    node.registry.metrics().event_streams.dec();
    conn::report_end(&end, &conn, &socket, node);
    if let End::Closing(close) = &end {
        // The reason, as an event a page may listen for; then the body ends.
        let mut close_event = BytesMut::new();
        let _ = write!(
            close_event,
            "event: close\ndata: {{\"code\":{},\"reason\":{}}}\n\n",
            close.code(),
            serde_json::Value::from(close.reason())
        );
        let _ = tokio::time::timeout(conn::CLOSE_TIMEOUT, out.send(close_event.freeze())).await;
    }
}

async fn write_loop(
    conn: &Conn,
    node: &NodeState,
    chunks: &mut Out,
    (anchor, mut lost): (u64, bool),
    head: Option<Bytes>,
) -> End {
    let digest = conn.digest();
    let mut ids = Ids::new(anchor);
    let mut batch = std::collections::VecDeque::new();
    let mut draining = false;
    let shutdown = node.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut out = BytesMut::new();
    if let Some(head) = head {
        out.put_slice(&head);
    }
    let _ = write!(out, "retry: {RETRY_MS}\n\n");
    loop {
        if !out.is_empty() {
            let chunk = out.split().freeze();
            tokio::select! {
                biased;
                sent = chunks.send(chunk) => {
                    if !sent {
                        return End::Lost(None);
                    }
                    conn.touch();
                }
                close = conn.outbox.closed() => return End::Closing(close),
            }
        }
        tokio::select! {
            next = conn.outbox.next_into(&mut batch) => match next {
                Next::Write { ping, bytes } => {
                    if ping {
                        out.put_slice(b":\n\n");
                    }
                    for mut frame in batch.drain(..) {
                        if lost && frame.as_str().starts_with(r#"{"connected":"#) {
                            frame = all_lost(&frame);
                            lost = false;
                        }
                        ids.frame(frame.as_str(), &digest, node).await;
                        ids.write_line(&mut out);
                        event(&mut out, &frame);
                    }
                    conn.outbox.settle(bytes);
                }
                Next::Close(close) => return End::Closing(close),
            },
            _ = &mut shutdown, if !draining => {
                draining = true;
                conn.outbox.close(Close::GoingAway);
            }
            () = chunks.gone() => return End::Lost(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(frame: &str) -> Option<(String, u64)> {
        match moves(frame) {
            Moves::Offset(spelled, o) => Some((serde_json::from_slice(spelled).unwrap(), o)),
            _ => None,
        }
    }

    #[test]
    fn pushes_are_read_by_their_head_and_other_frames_whole() {
        assert_eq!(
            offset(r#"{"channel":"a:b","offset":17,"payload":{"offset":1}}"#),
            Some(("a:b".into(), 17))
        );
        assert_eq!(
            offset(r#"{"channel":"q\"\\","offset":2,"payload":null}"#),
            Some(("q\"\\".into(), 2))
        );
        assert!(offset(r#"{"channel":"a","payload":1}"#).is_none());
        assert!(matches!(
            moves(r#"{"channel":"a","join":{"connection_id":"x","user":null,"info":null}}"#),
            Moves::None
        ));
        match moves(r#"{"channel":"c","recovered":false,"epoch":"e1","offset":7}"#) {
            Moves::Positions(p) => assert_eq!(p[0].1.offset, 7),
            _ => panic!("a gap frame moves its channel"),
        }
        match moves(
            r#"{"connected":{"resumed":false,"channels":{"a":{"epoch":"e1","offset":3},"b":{"epoch":"e2","offset":0}}}}"#,
        ) {
            Moves::Positions(p) => assert_eq!(p.len(), 2),
            _ => panic!("connected says every channel"),
        }
        assert!(matches!(moves(r#"{"id":1,"status":200}"#), Moves::None));
    }

    #[test]
    fn ids_parse_back_and_anything_else_is_ignored() {
        assert_eq!(
            EventId::parse("3.0-2.5-10"),
            Some(EventId {
                anchor: 3,
                entries: vec![(0, 2), (5, 10)]
            })
        );
        assert_eq!(
            EventId::parse("7"),
            Some(EventId {
                anchor: 7,
                entries: vec![]
            })
        );
        for bad in ["", "x", "1.", "1.2", "1.a-1", "1.1-", &"1".repeat(2000)] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn data_is_split_at_line_breaks() {
        let mut out = BytesMut::new();
        event(&mut out, &Frame::from("{\"a\":\n1}"));
        assert_eq!(&out[..], b"data: {\"a\":\ndata: 1}\n\n");
    }
}
