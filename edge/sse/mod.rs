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
//! `MAX_ENTRIES * 10` bytes whatever the number of channels (161 at 1,024), and a save happens
//! at most once every [`MAX_ENTRIES`] + 1 events that move a channel (and when one joins or
//! changes epoch).
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

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

mod ids;
mod post;

use ids::{resume, Ids};
use post::allow_origin;
pub(crate) use post::{message, preflight};

use crate::{
    conn::{self, End},
    fanout::{Deltas, Next},
    handlers::Socket,
    handshake::{admit, origin_allowed, Admitted, Presented, Slots, UpgradeRefusal},
    http::{text, Body, Events},
    node::{Admission, EventStream, Messenger, NodeState},
    protocol::{Frame, Recover},
    registry::Conn,
};

/// Chunks handed to the response body and not yet written: a client that reads slower than
/// the stream produces fills its outbox, and the slow-consumer policy closes it.
const CHUNKS: usize = 2;

/// How long EventSource waits before it reconnects (the `retry` field), in milliseconds.
const RETRY_MS: u32 = 1000;

/// The `transport` label of the event streams' handshakes.
const SSE: &str = "sse";

/// The event-stream endpoint on hyper (HTTP/2, TLS, or a connection that served other requests
/// first): the stream's task writes to the response body.
pub(crate) async fn stream(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
) -> Response<Body> {
    match answer(&req, peer, node, spare).await {
        Ok(accepted) => {
            let (chunks, body) = mpsc::channel(CHUNKS);
            let response = stream_response(
                Body::Events(Events { chunks: body }),
                accepted.origin.clone(),
            );
            accepted.spawn(node, Out::Body(chunks), None);
            response
        }
        Err(response) => response,
    }
}

/// Checks a stream's request (on the spare lane: refused; else as [`accept`] does) and counts
/// it with the handshakes; a refusal comes as its response. EventSource gives up for good on
/// any status but 200, so a refusal that may pass is a stream that says when to come back
/// ([`retry_later`]): a plain EventSource then returns, with its Last-Event-ID.
async fn answer<B>(
    req: &Request<B>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
) -> Result<Accepted, Response<Body>> {
    let metrics = node.registry.metrics();
    if spare {
        metrics.handshake("pending_full", SSE);
        return Err(UpgradeRefusal::Unavailable.response());
    }
    match accept(req, peer, node).await {
        Ok(accepted) => {
            metrics.handshake("accepted", SSE);
            Ok(accepted)
        }
        Err(refusal) => {
            metrics.handshake(refusal.label(), SSE);
            if !refusal.is_transient() {
                return Err(refusal.response());
            }
            // A cross-origin EventSource reads no answer without its CORS headers.
            let origin = req
                .headers()
                .get(header::ORIGIN)
                .filter(|_| origin_allowed(req.headers(), &node.config.allowed_origins))
                .cloned();
            Err(retry_later(refusal, origin))
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
    let path = node.config.sse_path.as_bytes();
    let mut start = [0u8; 256];
    let n = match tokio::time::timeout_at(deadline, stream.peek(&mut start)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    let target = start[..n].strip_prefix(b"GET ".as_slice());
    Some(target.is_some_and(|target| {
        target.starts_with(path) && matches!(target.get(path.len()), Some(b'?' | b' '))
    }))
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
            let too_large = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            let _ = write_response(&mut stream, text(too_large, "request head too large\n")).await;
            return;
        }
    };
    let Some(req) = parse_head(&buf[..head_len]) else {
        let malformed = text(StatusCode::BAD_REQUEST, "malformed request\n");
        let _ = write_response(&mut stream, malformed).await;
        return;
    };
    drop(buf);
    let peer = node.client(from, req.headers());
    match answer(&req, peer, &node, pending.spare()).await {
        Ok(accepted) => {
            drop(pending);
            let response = stream_response(Body::from(Bytes::new()), accepted.origin.clone());
            let head = encode_head(&response, None).freeze();
            accepted.spawn(&node, Out::Socket(stream), Some(head));
        }
        Err(response) => {
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

/// `response`'s head as HTTP/1.1, ending with `connection: close` (and `content-length`, for
/// a whole body of `length` bytes).
fn encode_head(response: &Response<Body>, length: Option<usize>) -> BytesMut {
    let status = response.status();
    let mut out = BytesMut::new();
    let reason = status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16());
    for (name, value) in response.headers() {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if let Some(length) = length {
        let _ = write!(out, "content-length: {length}\r\n");
    }
    out.put_slice(b"connection: close\r\n\r\n");
    out
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
    let mut out = encode_head(
        &Response::from_parts(parts, Body::from(Bytes::new())),
        Some(body.len()),
    );
    out.put_slice(&body);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// An event stream's response around `body`: its header fields, and the CORS ones for an
/// allowed cross-origin request (credentialed EventSource needs both).
fn stream_response(body: Body, origin: Option<HeaderValue>) -> Response<Body> {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // A stream that ends (a drain, a close) takes its connection along: the client reconnects
    // anyway, and a drained node keeps no idle connection behind.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    // nginx buffers responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    allow_origin(&mut response, origin);
    response
}

/// A `200` event stream that only says when to come back, then ends.
fn retry_later(refusal: UpgradeRefusal, origin: Option<HeaderValue>) -> Response<Body> {
    let mut out = BytesMut::new();
    let _ = write!(out, "retry: {RETRY_MS}\n: not now: {}\n\n", refusal.label());
    stream_response(Body::from(out.freeze()), origin)
}

/// A stream the node admitted, before its task runs.
struct Accepted {
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    slots: Slots,
    anchor: u64,
    /// The client takes deltas (`delta=1`).
    deltas: bool,
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
            deltas,
            ..
        } = self;
        node.tracker.spawn(async move {
            run(conn, socket, &task_node, out, (anchor, deltas), head).await;
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
    let mut presented = Presented::read(req, peer, node)?;
    let verified = presented.verify(peer, node)?;
    // Last-Event-ID is newer than any `recover` the page built its URL with. One this stream
    // cannot resume from (unparseable, forged, or naming an anchor no longer kept) means the
    // client saw what the node cannot tell: every channel is then said `recovered:false`.
    let (recover, anchor) = match req.headers().get("last-event-id") {
        None => (presented.recover.take().unwrap_or_default(), 0),
        Some(last_id) => match resume(node, &verified.digest, last_id).await {
            Some(resumed) => resumed,
            None => {
                tracing::debug!(%peer, "Last-Event-ID names no kept anchor; every channel is a gap");
                (Recover::lost(), 0)
            }
        },
    };
    let origin = presented.origin.clone();
    let deltas = presented.deltas;
    let Admitted {
        conn,
        socket,
        slots,
    } = admit(node, peer, &verified, presented, Some(&recover)).await?;
    Ok(Accepted {
        conn,
        socket,
        slots,
        anchor,
        deltas,
        origin,
    })
}

/// Writes `frame` as one event, its `data` split at line breaks (a payload may hold them
/// outside its strings; the browser joins the lines with `\n`).
fn event(out: &mut BytesMut, frame: &Frame) {
    let text = frame.as_str();
    if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none() {
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
    (anchor, deltas): (u64, bool),
    head: Option<Bytes>,
) {
    tracing::debug!(connection_id = %socket.connection_id, peer = %socket.peer, "event stream open");
    let entry = Arc::new(EventStream {
        conn: conn.clone(),
        messages: Messenger::new(socket.clone(), &node.config.limits),
    });
    node.event_streams.insert(conn.digest(), entry.clone());
    node.registry.metrics().event_streams.inc();
    if node.handlers.wants_lifecycle() {
        let user = node.registry.user_of(&conn.digest());
        node.handlers
            .connected(&socket, conn.resumed(), user.as_ref().map(|u| &*u.name));
    }
    let end = write_loop(&conn, node, &mut out, (anchor, deltas), head).await;
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
    client: &mut Out,
    (anchor, deltas): (u64, bool),
    head: Option<Bytes>,
) -> End {
    let digest = conn.digest();
    let mut deltas = Deltas::new(deltas);
    let mut ids = Ids::new(anchor);
    let mut batch = std::collections::VecDeque::new();
    // On a drain, queued frames still go out first; then the outbox yields the close.
    node.close_if_draining(conn);
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
                sent = client.send(chunk) => {
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
                // A stream has no pongs to send (it gets no pings).
                Next::Write { ping, pong: _, bytes } => {
                    // Settled however this ends, an anchor's save included.
                    let _settle = conn.outbox.settle_on_drop(bytes);
                    if ping {
                        out.put_slice(b":\n\n");
                    }
                    for frame in batch.drain(..) {
                        let frame = deltas.choose(frame, &node.registry.metrics().delta_frames);
                        ids.frame(frame.as_str(), &digest, node).await;
                        ids.write_line(&mut out);
                        event(&mut out, &frame);
                    }
                }
                Next::Close(close) => return End::Closing(close),
            },
            () = client.gone() => return End::Lost(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_split_at_line_breaks() {
        let mut out = BytesMut::new();
        event(&mut out, &Frame::from("{\"a\":\n1}"));
        assert_eq!(&out[..], b"data: {\"a\":\ndata: 1}\n\n");
    }
}
