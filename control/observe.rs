//! A tower layer counting control-plane requests by method and gRPC status, and bounding
//! the time of unary calls from their arrival (streams such as `PushStream` may run for as long
//! as the client keeps them open, so a server-wide timeout would cut a long-lived publisher
//! off). The clock starts when the call reaches the layer, before the services below are
//! asked whether they are ready, so no wait escapes it.
//!
//! The status is read from the response head: unary errors are sent "trailers-only", with
//! `grpc-status` in the head; a head without it is a call that went on to stream or succeed,
//! counted as `0` (OK). Methods outside the served services count as `other`, so a client
//! cannot grow the label set.

use std::{
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use edge::Gateway;

/// Counts requests into `channelgate_control_requests_total`.
#[derive(Debug, Clone)]
pub(crate) struct ObserveLayer {
    gateway: Gateway,
    timeout: Duration,
}

impl ObserveLayer {
    /// A layer counting into the node's metrics, ending unary calls after `timeout`.
    pub(crate) fn new(gateway: Gateway, timeout: Duration) -> Self {
        Self { gateway, timeout }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            gateway: self.gateway.clone(),
            timeout: self.timeout,
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    gateway: Gateway,
    timeout: Duration,
}

/// Calls that stream from the client: no time limit (a server-wide timeout would end them).
const CLIENT_STREAMS: &[&str] = &[
    "/channelgate.v1.Control/PushStream",
    "/channelgate.v1.Control/Handle",
];

const SERVICES: &[&str] = &[
    "/channelgate.v1.Control/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
];

impl<S, B> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    /// Always ready: the inner services' readiness is awaited inside the call, on its clock.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if SERVICES.iter().any(|s| path.starts_with(s)) {
            path.to_owned()
        } else {
            "other".to_owned()
        };
        let gateway = self.gateway.clone();
        let limit = (!CLIENT_STREAMS.contains(&path)).then_some(self.timeout);
        // The clone that was made ready is the one that serves (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = async move {
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(request).await
        };
        Box::pin(async move { timed_and_counted(&gateway, &method, limit, future).await })
    }
}

/// Runs a call under its time limit (none for client streams) and counts it by `method` and
/// the gRPC status of its response head; the one place both the tonic path and the unary fast
/// path ([`fast`](crate::fast)) time and count their calls.
pub(crate) async fn timed_and_counted<E>(
    gateway: &Gateway,
    method: &str,
    limit: Option<Duration>,
    call: impl Future<Output = Result<http::Response<tonic::body::Body>, E>>,
) -> Result<http::Response<tonic::body::Body>, E> {
    let result = match limit {
        None => call.await,
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                "the call took longer than {limit:?}"
            ))
            .into_http()),
        },
    };
    let code = match &result {
        Ok(response) => response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0"),
        Err(_) => "transport",
    };
    gateway.count_control_call(method, code);
    result
}
