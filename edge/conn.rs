//! One WebSocket's task: a reader and a writer over the two halves of the socket, joined in
//! one task, plus the closing handshake.
//!
//! * The writer drains the socket's [`Outbox`](crate::fanout::Outbox) a whole batch at a time:
//!   every queued frame is fed, then one flush, so frames that piled up go out in one write.
//!   It also sends pings, and on drain turns the shutdown signal into a 1001 close after the
//!   queued frames.
//! * The reader answers client messages (replies go through the same outbox, so they are
//!   bounded like pushes) and enforces the idle timeout: any frame, pongs included, is life.
//! * A write to a peer that stopped reading is abandoned as soon as its outbox overflows
//!   ([`Close::TooSlow`]), or [`CLOSE_TIMEOUT`] after any other close.
//!
//! Whatever ends the socket, the registry hears of it exactly once ([`Registry::detach`]),
//! before the closing handshake, so the id is free to resume at once after an unclean end.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures_util::{
    stream::{SplitSink, SplitStream},
    SinkExt, StreamExt,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{interval_at, sleep, timeout, Instant, MissedTickBehavior},
};
use tokio_tungstenite::{
    tungstenite::{
        error::CapacityError,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Error as WsError, Message,
    },
    WebSocketStream,
};

use crate::{
    error::Close,
    fanout::Batch,
    handlers::{remote, Outcome, Request, Socket},
    limit::TokenBucket,
    protocol::{parse_inbound, Frame, Reply},
    registry::{Conn, Ending},
    server::Edge,
};

/// How long the closing handshake, or a write in progress when the socket is closed, may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the socket's loops ended.
#[derive(Debug)]
enum End {
    /// The client sent a close frame. Its credentials are spent, unless the code was in
    /// 4200-4299 ("I will reconnect now"): then they stay resumable within the grace period.
    PeerClosed { resume: bool },
    /// The transport failed or the peer vanished without a close frame.
    Lost(Option<WsError>),
    /// We close, for this reason.
    Closing(Close),
}

impl End {
    fn from_error(err: WsError) -> Self {
        match err {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                Self::Closing(Close::Policy("message too large"))
            }
            WsError::Utf8(_) => Self::Closing(Close::InvalidPayload),
            WsError::Protocol(_) => Self::Closing(Close::Protocol),
            WsError::ConnectionClosed | WsError::AlreadyClosed => Self::Lost(None),
            other => Self::Lost(Some(other)),
        }
    }

    fn ending(&self) -> Ending {
        match self {
            Self::PeerClosed { resume: true } => Ending::Resumable,
            Self::PeerClosed { resume: false } => Ending::Final,
            Self::Lost(_) => Ending::Resumable,
            Self::Closing(close) if close.allows_resume() => Ending::Resumable,
            Self::Closing(_) => Ending::Final,
        }
    }
}

/// Runs a socket until it ends, then tells the registry and closes it.
pub async fn run<S>(ws: WebSocketStream<S>, conn: Arc<Conn>, socket: Arc<Socket>, edge: &Arc<Edge>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = &conn;
    let (mut sink, mut stream) = ws.split();
    tracing::debug!(connection_id = %socket.connection_id, peer = %socket.peer, "socket open");
    edge.handlers
        .remote()
        .lifecycle(remote::CONNECT, &socket, "{}");
    let end = tokio::select! {
        end = write_loop(&mut sink, conn, edge) => end,
        end = read_loop(&mut stream, conn, &socket, edge) => end,
    };
    edge.bus.detach(conn, end.ending());
    let code = match &end {
        End::PeerClosed { .. } => "peer".to_owned(),
        End::Lost(_) => "lost".to_owned(),
        End::Closing(close) => close.code().to_string(),
    };
    edge.registry
        .metrics()
        .closes
        .with_label_values(&[&code])
        .inc();
    let detail = match &end {
        End::PeerClosed { .. } => r#"{"reason":"closed by client"}"#.to_owned(),
        End::Lost(_) => r#"{"reason":"connection lost"}"#.to_owned(),
        End::Closing(close) => {
            serde_json::json!({"code": close.code(), "reason": close.reason()}).to_string()
        }
    };
    edge.handlers
        .remote()
        .lifecycle(remote::DISCONNECT, &socket, &detail);
    // Frames can no longer reach this socket; make sure nothing queues behind the close.
    conn.outbox.close(match &end {
        End::Closing(close) => close.clone(),
        _ => Close::GoingAway,
    });
    match &end {
        End::Closing(close) => {
            let level_debug = close.is_expected();
            if level_debug {
                tracing::debug!(connection_id = %socket.connection_id, code = close.code(), reason = close.reason(), "closing socket");
            } else {
                tracing::warn!(connection_id = %socket.connection_id, code = close.code(), reason = close.reason(), "closing socket");
            }
            let frame = CloseFrame {
                code: CloseCode::from(close.code()),
                reason: close.reason().into(),
            };
            let _ = timeout(CLOSE_TIMEOUT, async {
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    // Wait for the client's close frame (or its end of the stream).
                    while let Some(Ok(_)) = stream.next().await {}
                }
            })
            .await;
        }
        End::PeerClosed { .. } => {
            // Sends the reply to the client's close frame that tungstenite queued.
            let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
            tracing::debug!(connection_id = %socket.connection_id, "socket closed by client");
        }
        End::Lost(err) => {
            tracing::debug!(connection_id = %socket.connection_id, err = ?err, "socket lost");
        }
    }
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = SplitStream<WebSocketStream<S>>;

async fn write_loop<S>(sink: &mut Sink<S>, conn: &Conn, edge: &Edge) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let period = edge.config.limits.ping_interval;
    let mut ping = interval_at(Instant::now() + period, period);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        tokio::select! {
            batch = conn.outbox.next() => match batch {
                Batch::Frames(frames) => {
                    if let Err(end) = write(sink, conn, frames.into_iter().map(Message::Text)).await {
                        return end;
                    }
                }
                Batch::Close(close) => return End::Closing(close),
            },
            _ = ping.tick() => {
                if let Err(end) = write(sink, conn, std::iter::once(Message::Ping(Default::default()))).await {
                    return end;
                }
            }
            _ = edge.shutdown.cancelled(), if !draining => {
                draining = true;
                // Queued frames still go out first; then the outbox yields the close.
                conn.outbox.close(Close::GoingAway);
            }
        }
    }
}

/// Feeds `messages` and flushes them in one write, unless the socket is closed meanwhile: at
/// once when it was closed as too slow (its peer is not reading), else after
/// [`CLOSE_TIMEOUT`].
async fn write<S>(
    sink: &mut Sink<S>,
    conn: &Conn,
    messages: impl Iterator<Item = Message>,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = async {
        for message in messages {
            sink.feed(message).await?;
        }
        sink.flush().await
    };
    let abandon = async {
        let close = conn.outbox.closed().await;
        if close != Close::TooSlow {
            sleep(CLOSE_TIMEOUT).await;
        }
        close
    };
    tokio::select! {
        result = io => result.map_err(End::from_error),
        close = abandon => Err(End::Closing(close)),
    }
}

async fn read_loop<S>(
    stream: &mut Stream<S>,
    conn: &Arc<Conn>,
    socket: &Arc<Socket>,
    edge: &Arc<Edge>,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let idle_timeout = edge.config.limits.idle_timeout;
    let idle = sleep(idle_timeout);
    tokio::pin!(idle);
    let limits = &edge.config.limits;
    let mut limit = MessageLimit::new(limits.message_rate, limits.message_burst);
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            _ = &mut idle => return End::Closing(Close::IdleTimeout),
        };
        let now = Instant::now();
        idle.as_mut().reset(now + idle_timeout);
        let is_message = matches!(message, Some(Ok(Message::Text(_) | Message::Binary(_))));
        if is_message {
            edge.registry.metrics().messages_in.inc();
            match limit.take(now.into_std()) {
                Take::Allowed => {}
                Take::Refused => {
                    let id = match &message {
                        Some(Ok(Message::Text(text))) => parse_inbound(text)
                            .ok()
                            .and_then(|m| m.id.map(|id| id.to_owned())),
                        _ => None,
                    };
                    queue_reply(conn, &Reply::text(id, 429, "rate limited: slow down"), edge);
                    continue;
                }
                Take::Abusive => return End::Closing(Close::Policy("message rate limit exceeded")),
            }
        }
        let reply = match message {
            None => return End::Lost(None),
            Some(Err(err)) => return End::from_error(err),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(0, |frame| u16::from(frame.code));
                return End::PeerClosed {
                    resume: Close::is_client_reconnect(code),
                };
            }
            Some(Ok(Message::Text(text))) => answer(text, conn, socket, edge),
            Some(Ok(Message::Binary(_))) => Some(Reply::text(
                None,
                400,
                "binary frames are not supported: send JSON text",
            )),
            Some(Ok(_)) => None,
        };
        if let Some(reply) = reply {
            queue_reply(conn, &reply, edge);
        }
    }
}

/// Queues a reply to a client message (counted by status).
fn queue_reply(conn: &Conn, reply: &Reply, edge: &Edge) {
    let metrics = edge.registry.metrics();
    metrics
        .replies
        .with_label_values(&[reply.status.to_string().as_str()])
        .inc();
    let frame = reply.encode();
    metrics.bytes_out.inc_by(frame.len() as u64);
    conn.outbox
        .push(&frame, edge.registry.limits().outbound_queue_bytes);
}

/// Routes one client text message to its handler. Returns the reply to queue now, if any; a
/// handler that answers later runs as a tracked task that queues its own reply.
fn answer(text: Frame, conn: &Arc<Conn>, socket: &Arc<Socket>, edge: &Arc<Edge>) -> Option<Reply> {
    let request = match parse_inbound(&text) {
        Ok(message) => Request {
            action: message.action.into(),
            id: message.id.map(|id| id.to_owned()),
            text: text.clone(),
            socket: socket.clone(),
        },
        Err(bad) => return Some(bad.reply()),
    };
    let max = edge.config.limits.max_inflight;
    if socket.inflight.load(Ordering::Relaxed) >= max {
        return Some(request.reply(429, "too many messages in flight"));
    }
    let call_route = &*request.action == crate::handlers::call_route::ACTION;
    match edge.handlers.dispatch(request) {
        Outcome::Reply(reply) => Some(reply),
        Outcome::NoReply => None,
        Outcome::Pending(future) => {
            socket.inflight.fetch_add(1, Ordering::Relaxed);
            let (conn, socket, task_edge) = (conn.clone(), socket.clone(), edge.clone());
            edge.tracker.spawn(async move {
                let started = Instant::now();
                let reply = future.await;
                socket.inflight.fetch_sub(1, Ordering::Relaxed);
                let metrics = task_edge.registry.metrics();
                let histogram = if call_route {
                    &metrics.call_route_seconds
                } else {
                    &metrics.handle_seconds
                };
                histogram.observe(started.elapsed().as_secs_f64());
                if let Some(reply) = reply {
                    queue_reply(&conn, &reply, &task_edge);
                }
            });
            None
        }
    }
}

/// The per-socket message limit: a token bucket, and a count of refusals in a row (a
/// burst's worth of them closes the socket).
#[derive(Debug)]
struct MessageLimit {
    bucket: TokenBucket,
    refused_in_a_row: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum Take {
    Allowed,
    Refused,
    Abusive,
}

impl MessageLimit {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate, burst, std::time::Instant::now()),
            refused_in_a_row: 0,
        }
    }

    fn take(&mut self, now: std::time::Instant) -> Take {
        if self.bucket.take(now) {
            self.refused_in_a_row = 0;
            return Take::Allowed;
        }
        self.refused_in_a_row += 1;
        if f64::from(self.refused_in_a_row) >= self.bucket.burst() {
            Take::Abusive
        } else {
            Take::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_a_row_close_an_abuser_and_a_token_resets_the_streak() {
        let mut limit = MessageLimit::new(10, 3);
        let start = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.take(start), Take::Allowed);
        }
        assert_eq!(limit.take(start), Take::Refused);
        assert_eq!(limit.take(start), Take::Refused);
        let later = start + Duration::from_millis(100);
        assert_eq!(limit.take(later), Take::Allowed);
        assert_eq!(limit.take(later), Take::Refused);
        assert_eq!(limit.take(later), Take::Refused);
        assert_eq!(limit.take(later), Take::Abusive);
    }
}
