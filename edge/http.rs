//! The client plane's HTTP side: one connection's HTTP service and its routes, `/healthz`,
//! `/readyz` (the node's readiness), `/metrics` and the browser client at `/channelgate.js`; the
//! WebSocket path goes to [`handshake`](crate::handshake).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::{
    handshake,
    node::{Edge, Pending},
};

/// The body of every answer of the client plane.
pub(crate) type Body = Full<Bytes>;

/// Serves one client-plane TCP connection: plain HTTP requests, or one WebSocket upgrade.
/// `from` is the address the connection comes from (the peer, or the client a trusted proxy's
/// PROXY header named); each request's client is found from it ([`Edge::client`]).
pub(crate) async fn serve_http<S>(stream: S, from: SocketAddr, edge: Arc<Edge>, pending: Pending)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = from;
    let io = TokioIo::new(stream);
    let spare = pending.spare();
    let service = service_fn(|req: Request<Incoming>| {
        let edge = edge.clone();
        let client = edge.client(from, req.headers());
        async move { Ok::<_, Infallible>(route::<S>(req, client, &edge, spare).await) }
    });
    let header_timeout = if spare {
        crate::node::SPARE_HEADER_TIMEOUT.min(edge.config.limits.handshake_timeout)
    } else {
        edge.config.limits.handshake_timeout
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
        _ = edge.halt.cancelled() => {}
    }
    drop(pending);
}

/// `S` is the connection's stream type, so an upgraded socket gets it back unwrapped. On the
/// spare lane (`spare`: every handshake permit was taken) upgrades get 503. `peer` is the
/// request's client, as trusted proxies name it.
async fn route<S>(
    req: Request<Incoming>,
    peer: SocketAddr,
    edge: &Arc<Edge>,
    spare: bool,
) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let path = req.uri().path();
    if path == edge.config.ws_path {
        return handshake::websocket::<S>(req, peer, edge, spare).await;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, CLIENT_SCRIPT_PATH) => client_script(req.headers()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => metrics(edge),
        (&Method::GET, "/readyz") => match edge.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => {
                let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "");
                *response.body_mut() = Full::new(Bytes::from(format!("not ready: {reason}\n")));
                response
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Where the edge serves the browser client.
pub(crate) const CLIENT_SCRIPT_PATH: &str = "/channelgate.js";

/// The browser client (`clients/js/channelgate.js`), built into the binary so it always matches
/// the node's protocol.
pub(crate) const CLIENT_SCRIPT: &str = include_str!("../clients/js/channelgate.js");

/// The client with revalidation: a strong ETag from its content, a short `max-age` so a new node
/// version reaches pages soon, `304` when the page already has it. Any origin may load it (it is
/// public code; ES modules from another origin need CORS).
fn client_script(headers: &HeaderMap) -> Response<Body> {
    static ETAG: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(CLIENT_SCRIPT.as_bytes());
        HeaderValue::from_str(&format!("\"{}\"", hex::encode(&hash[..12])))
            .unwrap_or_else(|_| HeaderValue::from_static("\"channelgate\""))
    });
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| tag.trim() == ETAG.to_str().unwrap_or_default() || tag.trim() == "*");
    let mut response = if fresh {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        Response::new(Full::new(Bytes::from_static(CLIENT_SCRIPT.as_bytes())))
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
        (
            header::CACHE_CONTROL,
            "public, max-age=300, must-revalidate",
        ),
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(header::ETAG, ETAG.clone());
    response
}

fn metrics(edge: &Edge) -> Response<Body> {
    let metrics = edge.registry.metrics();
    let stats = edge.registry.stats(false, &[]);
    metrics.connections.set(stats.connections as i64);
    metrics.channels.set(stats.channels as i64);
    metrics.sessions.set(stats.sessions as i64);
    let pending = edge
        .config
        .limits
        .max_pending_handshakes
        .saturating_sub(edge.handshake_permits.available_permits());
    metrics
        .pending_handshakes
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    metrics
        .history_bytes
        .set(i64::try_from(edge.registry.history_bytes()).unwrap_or(i64::MAX));
    metrics
        .bus_ready
        .set(i64::from(edge.readiness.check_redis().is_ok()));
    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Marks a refusal's connection to close after the answer.
pub(crate) fn close(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
