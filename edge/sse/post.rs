//! Client messages POSTed beside a stream, and CORS preflights (see the parent module).

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::{
    conn,
    error::Close,
    handshake::{origin_allowed, Presented, UpgradeRefusal},
    http::{text, Body},
    limit::Take,
    node::{EventStream, Messenger, NodeState, Poster},
    protocol::Frame,
};

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
    let origin = presented.origin.clone();
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        // Not a "simple" type: a browser asks (preflight) before sending one cross-site.
        return Err(text(
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
                let poster = node
                    .posters
                    .entry(digest)
                    .or_insert_with(|| {
                        Arc::new(Poster {
                            messages: Messenger::new(
                                presented.socket(digest, peer),
                                &node.config.limits,
                            ),
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
                return Err(text(
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
    let Messenger { socket, limit } = match &target {
        Target::Here(stream) => &stream.messages,
        Target::Elsewhere(poster) => &poster.messages,
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
            return Err(text(StatusCode::PAYLOAD_TOO_LARGE, "message too large\n"));
        }
        _ => {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "the message did not arrive whole in time\n",
            ))
        }
    };
    let Ok(message) = Utf8Bytes::try_from(bytes).map(Frame::from) else {
        close(Close::InvalidPayload);
        return Err(text(
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
        Take::Allowed => match conn::dispatch(message, socket, node) {
            conn::Answer::Now(reply) => Some(reply),
            conn::Answer::Later(future) => future.await,
        },
        Take::Refused => Some(conn::rate_limited(&message)),
        Take::Abusive => {
            close(Close::Policy("message rate limit exceeded"));
            return Err(text(
                StatusCode::TOO_MANY_REQUESTS,
                "message rate limit exceeded\n",
            ));
        }
    };
    let mut response = match reply {
        Some(reply) => {
            let mut response =
                Response::new(Body::from(Bytes::from(reply.encode().text().clone())));
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
        return text(StatusCode::FORBIDDEN, "origin not allowed\n");
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
pub(super) fn allow_origin(response: &mut Response<Body>, origin: Option<HeaderValue>) {
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
