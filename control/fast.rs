//! Unary Control calls served straight from the HTTP/2 request: the bearer-token check, the
//! gRPC message read from the body, the [`ControlService`] method, the reply framed and padded
//! ([`pad`]), the call counted and timed, without tonic's per-call machinery (its router, the
//! interceptor wrapper, the streaming decoder and encoder, metadata conversion, and the boxed
//! futures of the layers below this one): about 7,900 instructions fewer per unary `Push`, 11%
//! of it (BENCHMARKS.md, "What each change bought").
//!
//! Same contract as the tonic path, which still serves everything this layer does not take:
//! the streaming methods, health and reflection, calls over HTTP/1.1, and requests in a
//! compression (`grpc-encoding` other than `identity`), for which tonic answers as it always
//! did. Status codes and messages follow tonic's for the same faults: `UNAUTHENTICATED` from
//! the token check, `INTERNAL` for a body that is not exactly one uncompressed message or does
//! not decode, `RESOURCE_EXHAUSTED` past 4 MiB (tonic's decoding limit), `DEADLINE_EXCEEDED`
//! after `--grpc-call-timeout`; every call is counted in `channelgate_control_requests_total`
//! by method and status, as the [`observe`](crate::observe) layer counts the others.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::{Request, Response, Status};
use tower::{Layer, Service};

use crate::{auth::BearerAuth, observe, pad, pb::control_server::Control, service::ControlService};
use edge::Gateway;

/// tonic's default limit on a decoded message, kept so both paths refuse the same requests.
const MAX_MESSAGE: usize = 4 << 20;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Serves the unary Control methods itself (see the module's documentation).
#[derive(Debug, Clone)]
pub(crate) struct FastLayer(Arc<Shared>);

/// What every call needs, shared (one reference count per call).
#[derive(Debug)]
struct Shared {
    service: ControlService,
    auth: BearerAuth,
    timeout: Duration,
}

impl FastLayer {
    /// A layer serving `gateway`'s unary calls, checking `auth`, ending calls after `timeout`.
    pub(crate) fn new(gateway: Gateway, auth: BearerAuth, timeout: Duration) -> Self {
        Self(Arc::new(Shared {
            service: ControlService::new(gateway),
            auth,
            timeout,
        }))
    }
}

impl<S> Layer<S> for FastLayer {
    type Service = Fast<S>;
    fn layer(&self, inner: S) -> Fast<S> {
        Fast {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// The service of [`FastLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Fast<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The unary methods this layer serves.
#[derive(Debug, Clone, Copy)]
enum Method {
    IssueConnection,
    Subscribe,
    Unsubscribe,
    Push,
    History,
    Send,
    Disconnect,
    Presence,
    PresenceStats,
    Stats,
}

/// Each method by its path (which is also its `channelgate_control_requests_total` label).
const METHODS: [(&str, Method); 10] = [
    (
        "/channelgate.v1.Control/IssueConnection",
        Method::IssueConnection,
    ),
    ("/channelgate.v1.Control/Subscribe", Method::Subscribe),
    ("/channelgate.v1.Control/Unsubscribe", Method::Unsubscribe),
    ("/channelgate.v1.Control/Push", Method::Push),
    ("/channelgate.v1.Control/History", Method::History),
    ("/channelgate.v1.Control/Send", Method::Send),
    ("/channelgate.v1.Control/Disconnect", Method::Disconnect),
    ("/channelgate.v1.Control/Presence", Method::Presence),
    (
        "/channelgate.v1.Control/PresenceStats",
        Method::PresenceStats,
    ),
    ("/channelgate.v1.Control/Stats", Method::Stats),
];

/// Whether this layer takes `request` (a unary Control method over HTTP/2, gRPC,
/// uncompressed): its method and path.
fn takes<B>(request: &http::Request<B>) -> Option<(Method, &'static str)> {
    if request.version() != http::Version::HTTP_2 || request.method() != http::Method::POST {
        return None;
    }
    let headers = request.headers();
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let identity = headers
        .get("grpc-encoding")
        .is_none_or(|v| v.as_bytes() == b"identity");
    if !(grpc && identity) {
        return None;
    }
    let path = request.uri().path();
    METHODS
        .iter()
        .find(|(known, _)| *known == path)
        .map(|&(known, method)| (method, known))
}

impl<S, B> Service<http::Request<B>> for Fast<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    /// Boxed on both paths: hyper moves a call's future into the stream's task and polls it
    /// there, and an `Either` would be as large as tonic's stack of futures even for the calls
    /// served here.
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some((method, path)) = takes(&request) else {
            return Box::pin(self.inner.call(request));
        };
        let shared = self.shared.clone();
        Box::pin(async move {
            let call = async {
                let response = serve(&shared, method, request).await;
                Ok(response.unwrap_or_else(Status::into_http))
            };
            let gateway = shared.service.gateway();
            observe::timed_and_counted(gateway, path, Some(shared.timeout), call).await
        })
    }
}

/// Serves one call: the token, the message, the method, the reply.
async fn serve<B>(
    layer: &Shared,
    method: Method,
    request: http::Request<B>,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    layer.auth.check(request.headers())?;
    let message = read_message(request.into_body()).await?;
    let s = &layer.service;
    match method {
        Method::IssueConnection => reply(s.issue_connection(decode(message)?).await?),
        Method::Subscribe => reply(s.subscribe(decode(message)?).await?),
        Method::Unsubscribe => reply(s.unsubscribe(decode(message)?).await?),
        Method::Push => reply(s.push(decode(message)?).await?),
        Method::History => reply(s.history(decode(message)?).await?),
        Method::Send => reply(s.send(decode(message)?).await?),
        Method::Disconnect => reply(s.disconnect(decode(message)?).await?),
        Method::Presence => reply(s.presence(decode(message)?).await?),
        Method::PresenceStats => reply(s.presence_stats(decode(message)?).await?),
        Method::Stats => reply(s.stats(decode(message)?).await?),
    }
}

/// The request's one gRPC message (without its prefix). The body usually arrives as one
/// DATA frame, which is taken as it is; more frames are gathered.
async fn read_message<B>(mut body: B) -> Result<Bytes, Status>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut data = Bytes::new();
    // Only when the body comes in more than one frame.
    let mut gathered: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("reading the request: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let held = gathered.as_ref().map_or(data.len(), BytesMut::len) + chunk.len();
        if held > MAX_MESSAGE + PREFIX {
            return Err(too_large(held - PREFIX));
        }
        match &mut gathered {
            Some(gathered) => gathered.put(chunk),
            None if data.is_empty() => data = chunk,
            None => {
                let mut both = BytesMut::from(&data[..]);
                both.put(chunk);
                gathered = Some(both);
            }
        }
    }
    let mut data = gathered.map_or(data, BytesMut::freeze);
    if data.len() < PREFIX {
        return Err(Status::internal("Missing request message."));
    }
    let compressed = data[0];
    let len = (&data[1..PREFIX]).get_u32() as usize;
    if compressed != 0 {
        return Err(Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ));
    }
    if len > MAX_MESSAGE {
        return Err(too_large(len));
    }
    if data.len() != PREFIX + len {
        return Err(Status::internal(
            "a unary call takes exactly one whole message",
        ));
    }
    data.advance(PREFIX);
    Ok(data)
}

fn too_large(len: usize) -> Status {
    Status::resource_exhausted(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {MAX_MESSAGE} bytes"
    ))
}

fn decode<T: prost::Message + Default>(message: Bytes) -> Result<Request<T>, Status> {
    T::decode(message)
        .map(Request::new)
        .map_err(|e| Status::internal(format!("failed to decode the request: {e}")))
}

/// A successful reply: the message framed and padded (one allocation), then `grpc-status: 0`.
fn reply<T: prost::Message>(
    response: Response<T>,
) -> Result<http::Response<tonic::body::Body>, Status> {
    let data = pad::frame(&response.into_inner())
        .map_err(|e| Status::internal(format!("encoding the reply: {e}")))?;
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Unary {
        data: Some(data),
        trailers: Some(trailers),
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// A unary reply's body: one DATA frame, then the trailers.
struct Unary {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Not exact: an exact hint would make hyper add a content-length, which gRPC replies
        // do not carry.
        let mut hint = SizeHint::new();
        hint.set_lower(self.data.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}
