//! The client plane's accept loop, and each connection's HTTP service: the WebSocket path to
//! the handshake, everything else to the plain routes.
//!
//! Every connection is accepted at once and admitted ([`Admission::admit`]) from its first byte
//! on: one of its client address's `max-pending-per-ip` slots (beyond them it is closed at
//! once, so one address cannot hold the node's pending handshakes), and one of the node's
//! `max-pending-handshakes` permits; when those are all taken, one of a few spare permits whose
//! connections may only ask for `/healthz`, `/readyz` and `/metrics` (upgrades get 503), so
//! probes are answered during a storm of stalled handshakes. The WebSocket itself takes a
//! permit of `max_connections` at the upgrade, where a full node answers 503.
//!
//! Behind trusted proxies ([`proxy`](crate::proxy)) the client address is the one they name: a
//! trusted proxy's connection is counted per address once its PROXY header has named its
//! client (with `proxy-protocol`), or never at accept when proxies name clients per request in
//! a header (they take the request head from the client themselves; the per-address limits of
//! the upgrade then use the named client). A proxy's own address is never locked out by the
//! clients it carries.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use ::http::{Method, Request, Response};
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    handshake,
    http::{self, Body},
    node::{Admission, NodeState},
    proxy::{self, Preamble},
};

/// Accepts client-plane connections until the node halts. While it drains, it still answers
/// `/healthz` and `/readyz` (not ready) and refuses upgrades with 503.
pub(crate) async fn serve(listener: TcpListener, node: Arc<NodeState>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = node.halt.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let trusted = node
                    .proxies
                    .as_ref()
                    .is_some_and(|proxies| proxies.trusts(peer.ip()));
                let client = (!trusted).then(|| proxy::canonical(peer.ip()));
                let pending = match Admission::admit(&node, client) {
                    Ok(pending) => pending,
                    Err(why) => {
                        refused(&node, peer, why);
                        continue;
                    }
                };
                // Pushes are small and latency matters more than packet count.
                let _ = stream.set_nodelay(true);
                node.tracker
                    .spawn(connection(stream, peer, trusted, node.clone(), pending));
            }
            Err(err) => {
                // Out of file descriptors or a transient network error: back off briefly
                // instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = node.halt.cancelled() => break,
                }
            }
        }
    }
    tracing::debug!("client plane stopped accepting");
}

/// Counts and logs a connection closed before its HTTP phase.
fn refused(node: &NodeState, peer: SocketAddr, why: &'static str) {
    node.registry
        .metrics()
        .refused_connections
        .with_label_values(&[why])
        .inc();
    tracing::debug!(%peer, why, "connection refused at accept");
}

/// One accepted connection: its PROXY header when one is due, then TLS when configured, then
/// HTTP.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    trusted: bool,
    node: Arc<NodeState>,
    mut pending: Admission,
) {
    let timeout = if pending.spare() {
        crate::node::SPARE_HEADER_TIMEOUT.min(node.config.limits.handshake_timeout)
    } else {
        node.config.limits.handshake_timeout
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // The address the node sees the connection from: the peer, or the client its PROXY
    // header names.
    let mut from = peer;
    if node.proxies.as_ref().is_some_and(|p| p.expects_protocol()) {
        if trusted {
            match proxy::read_header(&mut stream, deadline).await {
                Ok(Preamble::Client(client)) => from = client,
                Ok(Preamble::Local) => {}
                Err(err) => {
                    tracing::debug!(%peer, %err, "trusted proxy's connection closed");
                    return refused(&node, peer, "proxy_header");
                }
            }
            if let Err(why) = pending.attribute(&node, proxy::canonical(from.ip())) {
                return refused(&node, from, why);
            }
        } else {
            // A PROXY header from a peer that is not a trusted proxy is a forgery. Nothing at
            // all within the handshake timeout ends the connection as HTTP would.
            let mut start = [0u8; 12];
            match tokio::time::timeout_at(deadline, stream.peek(&mut start)).await {
                Ok(Ok(n)) if proxy::looks_like_header(&start[..n]) => {
                    tracing::debug!(%peer, "PROXY header from a peer that is not a trusted proxy");
                    return refused(&node, peer, "proxy_untrusted");
                }
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return tracing::debug!(%peer, %err, "connection failed"),
                Err(_) => {
                    return tracing::debug!(%peer, "nothing sent within the handshake timeout")
                }
            }
        }
    }
    match &node.tls {
        None => match crate::sse::opens_with_a_stream(&stream, &node, deadline).await {
            // Nothing within the handshake timeout: gone, as hyper would have it.
            None => {}
            Some(true) => crate::sse::lean(stream, from, node, pending, deadline).await,
            Some(false) => serve_http(stream, from, node, pending).await,
        },
        Some(tls) => {
            let acceptor = tls.acceptor();
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    serve_h2(stream, from, node, pending).await
                }
                Ok(Ok(stream)) => serve_http(stream, from, node, pending).await,
                Ok(Err(err)) => tracing::debug!(peer = %from, %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %from, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves one client-plane TCP connection: plain HTTP requests, or one WebSocket upgrade.
/// `from` is the address the connection comes from (the peer, or the client a trusted proxy's
/// PROXY header named); each request's client is found from it ([`NodeState::client`]).
async fn serve_http<S>(stream: S, from: SocketAddr, node: Arc<NodeState>, pending: Admission)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = from;
    let io = TokioIo::new(stream);
    let spare = pending.spare();
    // An event stream, once open, gives the connection's place in the HTTP phase back, as an
    // upgrade does: it is a socket now, counted as one.
    let pending = Arc::new(parking_lot::Mutex::new(Some(pending)));
    let service = service_fn(|req: Request<Incoming>| {
        let (node, pending) = (node.clone(), pending.clone());
        let client = node.client(from, req.headers());
        async move { Ok::<_, Infallible>(route::<S>(req, client, &node, spare, &pending).await) }
    });
    let header_timeout = if spare {
        crate::node::SPARE_HEADER_TIMEOUT.min(node.config.limits.handshake_timeout)
    } else {
        node.config.limits.handshake_timeout
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::select! {
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(%peer, %err, "client-plane HTTP connection failed");
            }
        }
        _ = node.halt.cancelled() => {}
    }
    drop(pending);
}

/// Serves one HTTP/2 connection (TLS with ALPN `h2`): event streams, POSTed messages and the
/// plain routes, many at once; a WebSocket needs HTTP/1.1 (browsers open one beside it), so
/// its path answers 400 here. The connection holds its pending permit for its life.
async fn serve_h2<S>(stream: S, from: SocketAddr, node: Arc<NodeState>, pending: Admission)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let spare = pending.spare();
    let service = service_fn(|req: Request<Incoming>| {
        let node = node.clone();
        let client = node.client(from, req.headers());
        async move {
            let response = if req.uri().path() == node.config.ws_path {
                handshake::not_over_h2(&node)
            } else if req.uri().path() == node.config.sse_path {
                event_stream(req, client, &node, spare, None).await
            } else {
                http::plain(&req, &node)
            };
            Ok::<_, Infallible>(response)
        }
    });
    let limits = &node.config.limits;
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        // A quiet connection is pinged; one whose pings go unanswered is closed.
        .keep_alive_interval(Some(limits.ping_interval))
        .keep_alive_timeout(limits.idle_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = conn => {
            if let Err(err) = result {
                tracing::debug!(peer = %from, %err, "client-plane HTTP/2 connection failed");
            }
        }
        _ = node.halt.cancelled() => {}
    }
    drop(pending);
}

/// Concurrent streams on one client-plane HTTP/2 connection: event streams and messages of one
/// browser's tabs on one origin.
const H2_MAX_STREAMS: u32 = 100;

/// The event-stream path: a stream (`GET`), a message (`POST`) or a preflight (`OPTIONS`). An
/// HTTP/1.1 connection's admission (`pending`) is given back when its stream opens.
async fn event_stream(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
    pending: Option<&Pending>,
) -> Response<Body> {
    match *req.method() {
        Method::POST => crate::sse::message(req, peer, node).await,
        Method::OPTIONS => crate::sse::preflight(&req, node),
        _ => {
            let response = crate::sse::stream(req, peer, node, spare).await;
            // Only a stream that opened: a "come back later" is no socket.
            if matches!(response.body(), Body::Events(_)) {
                if let Some(pending) = pending {
                    drop(pending.lock().take());
                }
            }
            response
        }
    }
}

/// An HTTP/1.1 connection's admission, until an event stream on it opens.
type Pending = parking_lot::Mutex<Option<Admission>>;

/// `S` is the connection's stream type, so an upgraded socket gets it back unwrapped. On the
/// spare lane (`spare`: every handshake permit was taken) upgrades get 503. `peer` is the
/// request's client, as trusted proxies name it.
async fn route<S>(
    req: Request<Incoming>,
    peer: SocketAddr,
    node: &Arc<NodeState>,
    spare: bool,
    pending: &Pending,
) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Boxed, both: hyper keeps the storage of a connection's request future for the
    // connection's life, and an event stream's connection lives as long as the stream.
    if req.uri().path() == node.config.ws_path {
        return Box::pin(handshake::websocket::<S>(req, peer, node, spare)).await;
    }
    if req.uri().path() == node.config.sse_path {
        return Box::pin(event_stream(req, peer, node, spare, Some(pending))).await;
    }
    http::plain(&req, node)
}
