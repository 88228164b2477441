//! One WebSocket's task: a reader and a writer over the two halves of the socket, joined in
//! one task, plus the closing handshake.
//!
//! * The writer drains the socket's [`Outbox`](crate::fanout::Outbox) a whole batch at a time:
//!   every queued frame is fed, then one flush, so frames that piled up go out in one write.
//!   It also sends the pings the node's heartbeat asks for, and on drain turns the shutdown
//!   signal into a 1001 close after the queued frames.
//! * The reader answers client messages (replies go through the same outbox, so they are
//!   bounded like pushes) and stamps the socket's last-seen time: any frame, pongs included, is
//!   life. The heartbeat ([`Registry::heartbeat`](crate::registry::Registry::heartbeat)) closes
//!   sockets silent past the idle timeout, so a socket's task holds no timer.
//! * A write to a peer that stopped reading is abandoned as soon as its outbox overflows
//!   ([`Close::TooSlow`]), or [`CLOSE_TIMEOUT`] after any other close.
//!
//! Whatever ends the socket, the registry hears of it exactly once ([`Registry::detach`]),
//! before the closing handshake, so the id is free to resume at once after an unclean end.

use std::{
    collections::VecDeque,
    future::{poll_fn, Future},
    io,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{sleep, timeout, Instant},
};

use crate::{
    error::Close,
    fanout::{Deltas, Next},
    handlers::{Outcome, Request, Socket},
    limit::{MessageLimit, Take},
    node::NodeState,
    protocol::{parse_inbound, Frame, Reply},
    registry::{Conn, EndReason, Ended, Ending},
    ws::{deflate, Message, ReadError, Reader, Writer},
};

/// What a socket agreed at its handshake about the frames it gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Wire {
    /// permessage-deflate was negotiated.
    pub(crate) deflate: bool,
    /// The client asked for deltas (`delta=1`) on channels whose namespace allows them.
    pub(crate) deltas: bool,
}

/// A writer keeps its batch buffer between writes up to this many frames of capacity.
const BATCH_KEEP: usize = 64;

/// How long the closing handshake, or a write in progress when the socket is closed, may take.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a socket's loops (or an event stream's) ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client sent a close frame, with this code (1005 when it gave none) and reason. Its
    /// credentials are spent, unless the code was in 4200-4299 ("I will reconnect now"): then
    /// they stay resumable within the grace period.
    PeerClosed { code: u16, reason: String },
    /// The transport failed or the peer vanished without a close frame.
    Lost(Option<io::Error>),
    /// We close, for this reason.
    Closing(Close),
}

impl End {
    fn from_error(err: ReadError) -> Self {
        match err {
            ReadError::TooLarge => Self::Closing(Close::Policy("message too large")),
            ReadError::NotUtf8 => Self::Closing(Close::InvalidPayload),
            ReadError::Protocol(why) => {
                tracing::debug!(why, "WebSocket protocol error");
                Self::Closing(Close::Protocol)
            }
            ReadError::Ended => Self::Lost(None),
            ReadError::Io(err) => Self::Lost(Some(err)),
        }
    }

    fn ending(&self) -> Ending {
        match self {
            Self::PeerClosed { code, .. } if Close::is_client_reconnect(*code) => Ending::Resumable,
            Self::PeerClosed { .. } => Ending::Final,
            Self::Lost(_) => Ending::Resumable,
            Self::Closing(close) if close.allows_resume() => Ending::Resumable,
            Self::Closing(_) => Ending::Final,
        }
    }
}

/// Runs a socket over the upgraded stream `io` until it ends, then tells the registry and
/// closes it. `pre_read` is whatever the client sent after its upgrade request that the HTTP
/// server already read (usually nothing; copied, so the caller's buffer is not kept); `hold`
/// (the socket's admission slots) is dropped when the socket ends.
pub(crate) fn run<S, H>(
    io: S,
    pre_read: &[u8],
    wire: Wire,
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    node: Arc<NodeState>,
    hold: H,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Send,
{
    run_split(
        Mutex::new(io),
        pre_read.into(),
        wire,
        conn,
        socket,
        node,
        hold,
    )
}

/// One side of a socket's stream, for its reader or its writer. Both run in the socket's one
/// task and never poll at the same time, so the lock is never contended; the stream lives in
/// the socket's future instead of behind `tokio::io::split`'s `Arc` (a 64-byte allocation per
/// socket).
pub(crate) struct Half<'io, S>(&'io Mutex<S>);

impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_shutdown(cx)
    }
}

/// The socket's future. A plain function returning an `async move` block, not an `async fn`:
/// an `async fn` keeps its arguments twice in its future (as passed, and as the body's own
/// bindings; rust-lang/rust#62958), about 200 bytes here, in every live socket's task.
#[allow(clippy::manual_async_fn)]
fn run_split<S, H>(
    io: Mutex<S>,
    pre_read: Box<[u8]>,
    wire: Wire,
    conn: Arc<Conn>,
    socket: Arc<Socket>,
    node: Arc<NodeState>,
    hold: H,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Everything the block captures keeps its place in the future for the socket's life
    // (moved out or not): the stream is captured as the one copy the halves borrow, and the
    // pre-read bytes as a boxed slice (16 bytes, nothing allocated when empty, freed once
    // copied into the reader's buffer).
    async move {
        let limits = &node.config.limits;
        let buffered = BytesMut::from(&pre_read[..]);
        drop(pre_read);
        let mut reader = Reader::new(Half(&io), buffered, limits.max_message_size, wire.deflate);
        let mut writer = Writer::new(Half(&io), wire.deflate.then_some(limits.compress_min_size));
        let mut deltas = Deltas::new(wire.deltas);
        let (conn, node) = (&conn, &node);
        tracing::debug!(connection_id = %socket.connection_id, peer = %socket.peer, "socket open");
        if node.handlers.wants_lifecycle() {
            let user = node.registry.user_of(&conn.digest());
            node.handlers
                .connected(&socket, conn.resumed(), user.as_ref().map(|u| &*u.name));
        }
        let end = tokio::select! {
            end = write_loop(&mut writer, &mut deltas, conn, node) => end,
            end = read_loop(&mut reader, conn, &socket, node) => end,
        };
        // The ending runs once per socket: boxed, its state does not sit in every live
        // socket's task (the steady state above is what an idle socket holds).
        Box::pin(finish(end, writer, deltas, reader, conn, &socket, node)).await;
        drop(hold);
    }
}

/// After the loops: tells the registry and the handlers, then the closing handshake.
async fn finish<R, W>(
    end: End,
    mut writer: Writer<W>,
    mut deltas: Deltas,
    mut reader: Reader<R>,
    conn: &Conn,
    socket: &Socket,
    node: &NodeState,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    report_end(&end, conn, socket, node);
    match &end {
        End::Closing(close) => {
            // Every close the gateway decides is a peer's doing or the node's drain: debug.
            tracing::debug!(connection_id = %socket.connection_id, code = close.code(), reason = close.reason(), "closing socket");
            let _ = timeout(CLOSE_TIMEOUT, async {
                // What was queued before the close goes out first (replies to the messages
                // accepted before a flood, say); the outbox is closed, so the writer stops
                // once it is empty, and a peer that does not read is given up on.
                if !matches!(
                    write_loop(&mut writer, &mut deltas, conn, node).await,
                    End::Closing(_)
                ) {
                    return;
                }
                writer.close(Some((close.code(), close.reason())));
                if writer.flush().await.is_ok() {
                    // Wait for the client's close frame (or its end of the stream).
                    while !matches!(reader.next().await, Ok(Message::Close(_)) | Err(_)) {}
                }
            })
            .await;
        }
        End::PeerClosed { code, .. } => {
            // Answers the client's close frame with its code (none when it gave none).
            writer.close((*code != CODE_NONE).then_some((*code, "")));
            let _ = timeout(CLOSE_TIMEOUT, async {
                writer.flush().await?;
                writer.shutdown().await
            })
            .await;
            tracing::debug!(connection_id = %socket.connection_id, "socket closed by client");
        }
        End::Lost(err) => {
            tracing::debug!(connection_id = %socket.connection_id, err = ?err, "socket lost");
        }
    }
}

/// RFC 6455 7.1.5: the code of a close frame that had none.
const CODE_NONE: u16 = 1005;

/// Tells the registry, the bus and the handlers how a socket (or an event stream) ended, once,
/// and closes its outbox so nothing queues behind the end.
pub(crate) fn report_end(end: &End, conn: &Conn, socket: &Socket, node: &NodeState) {
    let code = match end {
        End::PeerClosed { .. } => "peer".to_owned(),
        End::Lost(_) => "lost".to_owned(),
        End::Closing(close) => close.code().to_string(),
    };
    node.registry
        .metrics()
        .closes
        .with_label_values(&[&code])
        .inc();
    // The one final `$disconnect`, when this end is final; a resumable end is told when the
    // grace runs out without a resume (the registry's or the cluster's doing, see `ends`).
    let reason = match (end, end.ending()) {
        (End::PeerClosed { .. }, Ending::Final) => Some(EndReason::ClientClosed),
        (End::Closing(_), Ending::Final) => Some(EndReason::Application),
        (_, Ending::Resumable) if node.config.limits.reconnect_grace.is_zero() => {
            Some(EndReason::Dropped)
        }
        _ => None,
    };
    let ended = reason.map(|reason| Ended {
        connection_id: socket.connection_id.clone(),
        digest: conn.digest(),
        user: node.registry.user_of(&conn.digest()).map(|u| u.name),
        reason,
        close: match end {
            End::Closing(close) => Some((close.code(), close.reason().to_owned())),
            End::PeerClosed { code, reason } => Some((*code, reason.clone())),
            End::Lost(_) => None,
        },
    });
    // Recorded with its end, so in cluster mode the script that ends the credentials tells
    // the `$disconnect` itself.
    node.bus.detach(conn, end.ending(), ended.as_ref());
    if let Some(ended) = ended {
        node.registry.ended(ended);
    }
    // Frames can no longer reach this socket; make sure nothing queues behind the close.
    conn.outbox.close(match end {
        End::Closing(close) => close.clone(),
        _ => Close::GoingAway,
    });
}

// Not an `async fn` on purpose (see `run_split`): its arguments would be kept twice.
#[allow(clippy::manual_async_fn)]
fn write_loop<'a, W>(
    writer: &'a mut Writer<W>,
    deltas: &'a mut Deltas,
    conn: &'a Conn,
    node: &'a NodeState,
) -> impl Future<Output = End> + 'a
where
    W: AsyncWrite + Unpin,
{
    async move {
        // On a drain, queued frames still go out first; then the outbox yields the close.
        node.close_if_draining(conn);
        let mut batch = VecDeque::new();
        loop {
            match conn.outbox.next_into(&mut batch).await {
                Next::Write { ping, pong, bytes } => {
                    // Settled when the write is done, failed, or dropped with this task.
                    let _settle = conn.outbox.settle_on_drop(bytes);
                    writer.control(ping, pong);
                    let before = writer.written;
                    // Boxed: inline, the write's state would sit in every idle socket's
                    // task (128 bytes more of it); one allocation per batch written is
                    // nothing beside the write call itself.
                    let written = Box::pin(write(writer, deltas, conn, node, &mut batch)).await;
                    node.registry
                        .metrics()
                        .wire_bytes
                        .inc_by(writer.written - before);
                    if batch.capacity() > BATCH_KEEP {
                        // A burst is over: do not hold its buffer for the socket's lifetime.
                        batch = VecDeque::new();
                    }
                    if let Err(end) = written {
                        return end;
                    }
                }
                Next::Close(close) => return End::Closing(close),
            }
        }
    }
}

/// Writes every frame of `frames` (leaving it empty), each as this socket takes it (a delta,
/// compressed), after the control frames queued, and flushes them in one write,
/// unless the socket is closed meanwhile: at once when it was closed as too slow (its peer is
/// not reading), else after [`CLOSE_TIMEOUT`]. One function for pings and frames, so the
/// socket's task holds one write state, not two.
async fn write<W>(
    writer: &mut Writer<W>,
    deltas: &mut Deltas,
    conn: &Conn,
    node: &NodeState,
    frames: &mut VecDeque<Frame>,
) -> Result<(), End>
where
    W: AsyncWrite + Unpin,
{
    let metrics = node.registry.metrics();
    let compress = |text: &[u8]| {
        metrics.compressions.inc();
        deflate::compress(text)
    };
    let io = async {
        loop {
            if writer.is_full() {
                writer.flush().await?;
            }
            let Some(frame) = frames.pop_front() else {
                break;
            };
            let frame = deltas.choose(frame, &metrics.delta_frames);
            writer.text(frame.as_bytes(), |min| frame.deflated(min, compress));
        }
        writer.flush().await
    };
    tokio::pin!(io);
    // Usually the kernel takes the whole write at once: one poll, nothing else set up.
    if let Poll::Ready(result) = poll_fn(|cx| Poll::Ready(io.as_mut().poll(cx))).await {
        return result.map_err(|err| End::Lost(Some(err)));
    }
    // The peer is not reading fast enough. Boxed: this state is rare, and inline it would sit
    // in every idle socket's task.
    let abandon = Box::pin(async {
        let close = conn.outbox.closed().await;
        if close != Close::TooSlow {
            sleep(CLOSE_TIMEOUT).await;
        }
        close
    });
    tokio::select! {
        biased;
        result = io => result.map_err(|err| End::Lost(Some(err))),
        close = abandon => Err(End::Closing(close)),
    }
}

// Not an `async fn` on purpose (see `run_split`): its arguments would be kept twice.
#[allow(clippy::manual_async_fn)]
fn read_loop<'a, R>(
    reader: &'a mut Reader<R>,
    conn: &'a Arc<Conn>,
    socket: &'a Arc<Socket>,
    node: &'a Arc<NodeState>,
) -> impl Future<Output = End> + 'a
where
    R: AsyncRead + Unpin,
{
    async move {
        let limits = &node.config.limits;
        let mut limit = MessageLimit::new(limits.message_rate, limits.message_burst);
        loop {
            // No timer here: the node's heartbeat closes sockets that stay silent (`Conn::touch`).
            let message = reader.next().await;
            let now = Instant::now();
            conn.touch();
            let is_message = matches!(message, Ok(Message::Text(_) | Message::Binary));
            if is_message {
                node.registry.metrics().messages_in.inc();
                match limit.take(now) {
                    Take::Allowed => {}
                    Take::Refused => {
                        let text = match &message {
                            Ok(Message::Text(text)) => text.as_str(),
                            _ => "",
                        };
                        queue_reply(conn, &rate_limited(text), node);
                        continue;
                    }
                    Take::Abusive => {
                        return End::Closing(Close::Policy("message rate limit exceeded"))
                    }
                }
            }
            let reply = match message {
                Err(err) => return End::from_error(err),
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame.unwrap_or((CODE_NONE, String::new()));
                    return End::PeerClosed { code, reason };
                }
                Ok(Message::Text(text)) => answer(Frame::from(text), conn, socket, node),
                Ok(Message::Binary) => Some(Reply::text(
                    None,
                    400,
                    "binary frames are not supported: send JSON text",
                )),
                Ok(Message::Ping(payload)) => {
                    conn.outbox.pong(payload);
                    None
                }
                Ok(Message::Pong) => None,
            };
            if let Some(reply) = reply {
                queue_reply(conn, &reply, node);
            }
        }
    }
}

/// Queues a reply to a client message (counted by status).
fn queue_reply(conn: &Conn, reply: &Reply, node: &NodeState) {
    let metrics = node.registry.metrics();
    metrics
        .replies
        .with_label_values(&[reply.status.to_string().as_str()])
        .inc();
    let frame = reply.encode();
    metrics.bytes_out.inc_by(frame.len() as u64);
    conn.outbox
        .push(&frame, node.registry.limits().outbound_queue);
}

/// Routes one client text message to its handler. Returns the reply to queue now, if any; a
/// handler that answers later runs as a tracked task that queues its own reply.
fn answer(
    text: Frame,
    conn: &Arc<Conn>,
    socket: &Arc<Socket>,
    node: &Arc<NodeState>,
) -> Option<Reply> {
    match dispatch(text, socket, node) {
        Answer::Now(reply) => Some(reply),
        Answer::Later(future) => {
            let (conn, task_node) = (conn.clone(), node.clone());
            node.tracker.spawn(async move {
                if let Some(reply) = future.await {
                    queue_reply(&conn, &reply, &task_node);
                }
            });
            None
        }
    }
}

/// The reply to a message over its socket's rate (with its id, when it can be read).
pub(crate) fn rate_limited(message: &str) -> Reply {
    let id = parse_inbound(message)
        .ok()
        .and_then(|m| m.id.map(|id| id.to_owned()));
    Reply::text(id, 429, "rate limited: slow down")
}

/// What a client message gets: a reply at once, or one to wait for (counted in the socket's
/// messages in flight until it resolves).
pub(crate) enum Answer {
    /// The reply.
    Now(Reply),
    /// The reply when it comes (`None`: the handler sends none).
    Later(std::pin::Pin<Box<dyn Future<Output = Option<Reply>> + Send>>),
}

/// Parses a client message of `socket` and hands it to its handler, within the socket's limit
/// of messages in flight; the same for every transport.
pub(crate) fn dispatch(text: Frame, socket: &Arc<Socket>, node: &NodeState) -> Answer {
    let request = match parse_inbound(&text) {
        Ok(message) => Request {
            action: message.action.into(),
            id: message.id.map(|id| id.to_owned()),
            text: text.clone(),
            socket: socket.clone(),
        },
        Err(bad) => return Answer::Now(bad.reply()),
    };
    let max = node.config.limits.max_inflight;
    if socket.inflight.load(Ordering::Relaxed) >= max {
        return Answer::Now(request.reply(429, "too many messages in flight"));
    }
    match node.handlers.dispatch(request) {
        Outcome::Reply(reply) => Answer::Now(reply),
        Outcome::Pending(future) => {
            socket.inflight.fetch_add(1, Ordering::Relaxed);
            let socket = socket.clone();
            Answer::Later(Box::pin(async move {
                // Given back when the reply comes, or when its waiter goes away.
                let _inflight = Inflight(&socket);
                future.await
            }))
        }
    }
}

/// One message in flight of a socket, until dropped.
struct Inflight<'a>(&'a Socket);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle socket's task holds, in bytes: printed (`cargo test future_sizes --
    /// --nocapture`) and kept from growing unnoticed.
    #[tokio::test]
    async fn future_sizes() {
        use crate::{
            bus::memory::Memory, config::Config, credentials::Secrets, handlers::streams::Remote,
            registry::Registry,
        };
        let config = Config::default();
        let registry = Registry::new(
            Secrets::new(b"size test secret 0123456789abcdef", None).unwrap(),
            config.limits.clone(),
            Arc::default(),
        );
        let creds = registry.issue(None, None).unwrap();
        let verified = registry
            .verify(&creds.connection_id, &creds.socket_key)
            .unwrap();
        let conn = registry.attach(&verified, "id", None).unwrap();
        let node = Arc::new(
            NodeState::new(
                Arc::new(Memory::new(registry)),
                Remote::new(Duration::from_secs(1), None),
                config,
                Default::default(),
                Default::default(),
                Default::default(),
                Default::default(),
            )
            .unwrap(),
        );
        let io = Mutex::new(tokio::io::duplex(64).0);
        let mut reader = Reader::new(Half(&io), BytesMut::new(), 1024, false);
        let mut writer = Writer::new(Half(&io), None);
        let mut deltas = Deltas::new(false);
        let socket = Arc::new(Socket::new(
            creds.connection_id.clone().into_boxed_str(),
            conn.digest(),
            "127.0.0.1:1".parse().unwrap(),
            None,
        ));
        let write = std::mem::size_of_val(&write_loop(&mut writer, &mut deltas, &conn, &node));
        let read = std::mem::size_of_val(&read_loop(&mut reader, &conn, &socket, &node));
        drop((reader, writer));
        // What the node runs: a TCP stream (the stream lives in the socket's future).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_client, io) = (client.unwrap(), accepted.unwrap().0);
        let tracker = tokio_util::task::TaskTracker::new();
        let task = tracker.track_future(run(io, &[], Wire::default(), conn, socket, node, ()));
        let run = std::mem::size_of_val(&task);
        println!(
            "future sizes: write_loop {write} B, read_loop {read} B, run {run} B, End {} B",
            std::mem::size_of::<End>()
        );
        println!(
            "Sleep {} B, Interval {} B, Reader {} B, Writer {} B",
            std::mem::size_of::<tokio::time::Sleep>(),
            std::mem::size_of::<tokio::time::Interval>(),
            std::mem::size_of::<Reader<Half<'_, tokio::net::TcpStream>>>(),
            std::mem::size_of::<Writer<Half<'_, tokio::net::TcpStream>>>()
        );
        println!(
            "Span {} B, Notified {} B, WaitForCancellationFuture {} B, Option<HeaderValue> {} B",
            std::mem::size_of::<tracing::Span>(),
            std::mem::size_of::<tokio::sync::futures::Notified<'_>>(),
            std::mem::size_of::<tokio_util::sync::WaitForCancellationFuture<'_>>(),
            std::mem::size_of::<Option<http::HeaderValue>>(),
        );
        // The socket's task as spawned (tracked) also holds its admission slots; tokio sizes a
        // task as its future plus 104 bytes, in steps of 128: at most 664 bytes keeps every
        // idle socket's task at 768 (S4, BENCHMARKS.md).
        let spawned = run + std::mem::size_of::<crate::handshake::Slots>();
        println!("spawned socket future {spawned} B");
        assert!(
            spawned <= 664,
            "the socket's task future grew to {spawned} B"
        );
    }
}
