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
//! missed pushes in order, or `recovered:false` where history does not reach back. An id whose
//! anchor is not kept (forged, or older than the last four) resumes from no position: the
//! `connected` event then says where each channel stands. After a page refresh, new
//! credentials carry the `recover` parameter as for the WebSocket.

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    conn::{self, End},
    credentials::Digest,
    domain::{valid_epoch, Channel, Position},
    error::Close,
    fanout::Next,
    handlers::Socket,
    handshake::{admit, origin_allowed, Admitted, Presented, UpgradeRefusal},
    http::{Body, Events},
    limit::{MessageLimit, Take},
    node::{EventStream, NodeState},
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
    if !node.handshake_allowed(peer.ip()) {
        tracing::debug!(%peer, "event stream refused: handshake rate per address");
        return Err(UpgradeRefusal::HandshakeRate);
    }
    if req.method() != Method::GET {
        return Err(UpgradeRefusal::NotGet);
    }
    let presented = Presented::read(&req, peer, node)?;
    let verified = presented.verify(peer, node)?;
    let last_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(EventId::parse);
    // Last-Event-ID is newer than any `recover` the page built its URL with.
    let (recover, number) = match last_id {
        Some(id) => match resume(node, &verified.digest, &id).await {
            Some(recover) => (recover, id.anchor),
            None => {
                tracing::debug!(%peer, anchor = id.anchor, "Last-Event-ID names no kept anchor; resuming from no position");
                (Recover::default(), id.anchor)
            }
        },
        None => (presented.recover.unwrap_or_default(), 0),
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
    let (chunks, body) = mpsc::channel(CHUNKS);
    let socket = Arc::new(Socket::new(
        connection_id.into_boxed_str(),
        conn.digest(),
        peer,
        cookies,
    ));
    let task_node = node.clone();
    node.tracker.spawn(async move {
        run(conn, socket, &task_node, chunks, number).await;
        drop(slots);
    });

    let mut response = Response::new(Body::Events(Events { chunks: body }));
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
    // Present only when allowed (the Origin check passed): credentialed cross-origin
    // EventSource (`withCredentials`) needs both.
    allow_origin(&mut response, origin);
    Ok(response)
}

/// A client message POSTed to the event-stream path: the same message, credentials and limits
/// as on a WebSocket (counted with the stream's: rate, in flight, size), the reply in the
/// response body. The stream must be live on this node.
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
    let Some(stream) = node
        .event_streams
        .get(&verified.digest)
        .map(|s| s.value().clone())
    else {
        return Err(plain(
            StatusCode::CONFLICT,
            "no event stream of these credentials on this node: open one first (GET), and route POSTs by socket_connection_id to the node that holds it\n",
        ));
    };
    let max = node.config.limits.max_message_size;
    let body = http_body_util::Limited::new(req.into_body(), max);
    let read = tokio::time::timeout(node.config.limits.handshake_timeout, body.collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            // As a WebSocket's oversized message does, this closes the stream.
            stream.conn.outbox.close(Close::Policy("message too large"));
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
        stream.conn.outbox.close(Close::InvalidPayload);
        return Err(plain(
            StatusCode::BAD_REQUEST,
            "a client message is UTF-8 JSON\n",
        ));
    };
    stream.conn.touch();
    node.registry.metrics().messages_in.inc();
    let taken = stream.limit.lock().take(tokio::time::Instant::now());
    let reply = match taken {
        Take::Allowed => match conn::dispatch(text, &stream.socket, node) {
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
            stream
                .conn
                .outbox
                .close(Close::Policy("message rate limit exceeded"));
            return Err(plain(
                StatusCode::TOO_MANY_REQUESTS,
                "message rate limit exceeded: the stream is closed\n",
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

/// What the stream has delivered, per channel, and the id that says it.
struct Ids {
    /// The anchor the id names (0: none saved yet).
    anchor: u64,
    /// The anchor's positions, by channel name.
    base: Vec<(Channel, Position)>,
    /// Positions now, where they differ from the anchor's or the anchor lacks the channel.
    now: HashMap<Channel, Position>,
    /// `(index in base, pushes since the anchor)`, in the order channels first moved.
    entries: Vec<(usize, u64)>,
    /// The id of the last event that moved a position.
    text: String,
    /// The id last written to the stream.
    written: String,
}

/// How a frame moves the stream's positions.
enum Moves {
    /// Not at all (a reply, a `Send`, join and leave).
    None,
    /// A push: the channel's offset.
    Offset(Channel, u64),
    /// The channels' positions, as the frame says them (`connected`, position and gap frames).
    Positions(Vec<(Channel, Position)>),
}

impl Ids {
    fn new(anchor: u64) -> Self {
        Self {
            anchor,
            base: Vec::new(),
            now: HashMap::new(),
            entries: Vec::new(),
            text: String::new(),
            written: String::new(),
        }
    }

    /// Takes `frame` into account; saves a new anchor when the id could not say the frame
    /// otherwise. On a failed save the id stays what it was: a resume from it replays this
    /// frame (a duplicate), never skips one.
    async fn frame(&mut self, frame: &str, digest: &Digest, node: &NodeState) {
        let saved_anchor = match moves(frame) {
            Moves::None => return,
            Moves::Offset(channel, offset) => {
                match self.index(&channel) {
                    Some(index) => {
                        let (epoch, base) = (&self.base[index].1.epoch, self.base[index].1.offset);
                        let same_epoch = self.now.get(&channel).is_none_or(|p| p.epoch == *epoch);
                        if same_epoch && offset >= base {
                            self.advance(index, offset - base);
                            if self.entries.len() <= MAX_ENTRIES {
                                self.text = self.say();
                                return;
                            }
                        } else if let Some(position) = self.now.get_mut(&channel) {
                            position.offset = offset;
                        }
                    }
                    None => match self.now.get_mut(&channel) {
                        // Joined since the anchor, whose save failed: the next one takes it.
                        Some(position) => position.offset = offset,
                        // A push of a channel the stream has no epoch for: nothing to say.
                        None => return,
                    },
                }
                true
            }
            Moves::Positions(changes) => {
                for (channel, position) in changes {
                    self.now.insert(channel, position);
                }
                true
            }
        };
        if saved_anchor {
            self.reanchor(digest, node).await;
        }
    }

    fn index(&self, channel: &Channel) -> Option<usize> {
        self.base.binary_search_by(|(c, _)| c.cmp(channel)).ok()
    }

    fn advance(&mut self, index: usize, by: u64) {
        match self.entries.iter_mut().find(|(i, _)| *i == index) {
            Some(entry) => entry.1 = by,
            None => self.entries.push((index, by)),
        }
        let channel = self.base[index].0.clone();
        let position = Position {
            epoch: self.base[index].1.epoch.clone(),
            offset: self.base[index].1.offset + by,
        };
        self.now.insert(channel, position);
    }

    /// The id now: the anchor, then its entries.
    fn say(&self) -> String {
        let mut text = self.anchor.to_string();
        for (index, advance) in &self.entries {
            let _ = write!(text, ".{index}-{advance}");
        }
        text
    }

    /// Saves every position as the next anchor and starts from it.
    async fn reanchor(&mut self, digest: &Digest, node: &NodeState) {
        let mut all: Vec<(Channel, Position)> = self.base.clone();
        for (channel, position) in &self.now {
            match all.binary_search_by(|(c, _)| c.cmp(channel)) {
                Ok(i) => all[i].1 = position.clone(),
                Err(i) => all.insert(i, (channel.clone(), position.clone())),
            }
        }
        let positions = Recover(all.iter().cloned().collect()).to_json();
        let number = self.anchor + 1;
        match node.bus.save_anchor(digest, number, &positions).await {
            Ok(()) => {
                self.anchor = number;
                self.base = all;
                self.now.clear();
                self.entries.clear();
                self.text = self.say();
            }
            Err(err) => {
                // The positions stay in `now` and the next save takes them along.
                tracing::debug!(%err, "event stream anchor not saved; its id stays behind");
            }
        }
    }

    /// The `id` line to write before the event, when the id moved since the last one written.
    fn line(&mut self) -> Option<&str> {
        if self.text == self.written || self.text.is_empty() {
            return None;
        }
        self.written.clone_from(&self.text);
        Some(&self.written)
    }
}

/// Reads where a frame moves positions, from the frames' fixed shapes (`protocol`): pushes by
/// their head alone (the payload is not read), the rare position frames whole.
fn moves(frame: &str) -> Moves {
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
        let name: Option<String> = serde_json::from_str(&rest[..=end]).ok();
        return match (
            name.and_then(|n| Channel::new(&n).ok()),
            digits[..len].parse(),
        ) {
            (Some(channel), Ok(offset)) => Moves::Offset(channel, offset),
            _ => Moves::None,
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

/// A position whose epoch is well formed.
fn position(epoch: &str, offset: u64) -> Option<Position> {
    valid_epoch(epoch).then(|| Position {
        epoch: epoch.into(),
        offset,
    })
}

/// Writes `frame` as one event, its `data` split at line breaks (a payload may hold them
/// outside its strings; the browser joins the lines with `\n`).
fn event(out: &mut BytesMut, id: Option<&str>, frame: &Frame) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    for line in frame.as_str().split(['\n', '\r']) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// Runs a stream until it ends, then tells the registry as a socket's end would.
async fn run(
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    node: &Arc<NodeState>,
    chunks: mpsc::Sender<Bytes>,
    anchor: u64,
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
    let end = write_loop(&conn, node, &chunks, anchor).await;
    // Unless a resume on this node already replaced it.
    node.event_streams
        .remove_if(&conn.digest(), |_, live| Arc::ptr_eq(live, &entry));
    node.registry.metrics().event_streams.dec();
    conn::report_end(&end, &conn, &socket, node);
    if let End::Closing(close) = &end {
        // The reason, as an event a page may listen for; then the body ends.
        let mut out = BytesMut::new();
        let _ = write!(
            out,
            "event: close\ndata: {{\"code\":{},\"reason\":{}}}\n\n",
            close.code(),
            serde_json::Value::from(close.reason())
        );
        let _ = tokio::time::timeout(conn::CLOSE_TIMEOUT, chunks.send(out.freeze())).await;
    }
}

async fn write_loop(
    conn: &Conn,
    node: &NodeState,
    chunks: &mpsc::Sender<Bytes>,
    anchor: u64,
) -> End {
    let digest = conn.digest();
    let mut ids = Ids::new(anchor);
    let mut batch = std::collections::VecDeque::new();
    let mut draining = false;
    let shutdown = node.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut out = BytesMut::new();
    let _ = write!(out, "retry: {RETRY_MS}\n\n");
    loop {
        if !out.is_empty() {
            let chunk = out.split().freeze();
            tokio::select! {
                biased;
                sent = chunks.send(chunk) => {
                    if sent.is_err() {
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
                    for frame in batch.drain(..) {
                        ids.frame(frame.as_str(), &digest, node).await;
                        event(&mut out, ids.line(), &frame);
                    }
                    conn.outbox.settle(bytes);
                }
                Next::Close(close) => return End::Closing(close),
            },
            _ = &mut shutdown, if !draining => {
                draining = true;
                conn.outbox.close(Close::GoingAway);
            }
            _ = chunks.closed() => return End::Lost(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(frame: &str) -> Option<(String, u64)> {
        match moves(frame) {
            Moves::Offset(c, o) => Some((c.to_string(), o)),
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
        event(&mut out, Some("1.0-1"), &Frame::from("{\"a\":\n1}"));
        assert_eq!(&out[..], b"id: 1.0-1\ndata: {\"a\":\ndata: 1}\n\n");
    }
}
