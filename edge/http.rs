//! The client plane's plain HTTP: `/healthz`, `/readyz` (the node's readiness), `/metrics` and
//! the browser client at `/channelgate.js`, and the small answers every route uses. The
//! WebSocket path is the handshake's; the server routes between them.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::node::NodeState;

/// The body of every answer of the client plane.
/// A response body: whole (the plain answers, refusals) or an event stream ([`Events`]).
#[derive(Debug)]
pub(crate) enum Body {
    /// The whole body at once.
    Whole(Full<Bytes>),
    /// A Server-Sent Events stream, written as its task hands chunks over.
    Events(Events),
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Self::Whole(Full::new(bytes))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Whole(body) => std::pin::Pin::new(body).poll_frame(cx),
            Self::Events(events) => events
                .chunks
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(body) => body.is_end_stream(),
            Self::Events(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Whole(body) => body.size_hint(),
            Self::Events(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// The body of an event stream: what its task (`sse.rs`) writes, chunk by chunk; it ends
/// when the task drops its sender, and the task learns that the client went away when this is
/// dropped.
#[derive(Debug)]
pub(crate) struct Events {
    pub(crate) chunks: tokio::sync::mpsc::Receiver<Bytes>,
}

/// Answers a request that is not the WebSocket's: the probes, `/metrics`, the browser client;
/// anything else is 404.
pub(crate) fn plain(req: &Request<Incoming>, node: &NodeState) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, CLIENT_SCRIPT_PATH) => client_script(req.headers()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => metrics(node),
        (&Method::GET, "/readyz") => match node.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => {
                let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "");
                *response.body_mut() = Body::from(Bytes::from(format!("not ready: {reason}\n")));
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
        let mut response = Response::new(Body::from(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        Response::new(Body::from(Bytes::from_static(CLIENT_SCRIPT.as_bytes())))
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

fn metrics(node: &NodeState) -> Response<Body> {
    let metrics = node.registry.metrics();
    let stats = node.registry.stats(false, &[]);
    metrics.connections.set(stats.connections as i64);
    metrics.channels.set(stats.channels as i64);
    metrics.sessions.set(stats.sessions as i64);
    let pending = node
        .config
        .limits
        .max_pending_handshakes
        .saturating_sub(node.handshake_permits.available_permits());
    metrics
        .pending_handshakes
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    metrics
        .history_bytes
        .set(i64::try_from(node.registry.history_bytes()).unwrap_or(i64::MAX));
    metrics
        .bus_ready
        .set(i64::from(node.readiness.check_redis().is_ok()));
    let mut response = Response::new(Body::from(Bytes::from(metrics.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(Bytes::from_static(body.as_bytes())));
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
