//! The control plane's server: gRPC service `channelgate.v1.Control`, plus the standard gRPC
//! health service ([`health`](crate::health), the node's readiness) and reflection (`v1` and `v1alpha`, for the many tools that still ask only
//! for the latter), on the control listener.
//!
//! HTTP/2 limits: every connection advertises `grpc-max-streams` concurrent streams and
//! refuses streams past it (RST_STREAM REFUSED_STREAM; h2 closes a connection after 1,024
//! refusals or 20 streams reset before they were accepted, the rapid-reset bound); at most
//! `grpc-max-connections` connections at once ([`incoming`]); quiet connections are pinged
//! every `grpc-keepalive` and closed when a ping goes unanswered for as long. With no queue in front of
//! the services, a unary call is timed from its arrival ([`observe`]).
//!
//! Layers, outermost first: TLS (and client certificates, with `--grpc-client-ca`) on the
//! whole listener; the unary Control calls served whole ([`fast`]: token, message, method,
//! padded reply, counted and timed); for everything else, request metrics and the unary time
//! limit ([`observe`]), small DATA frames padded ([`pad`]), and the bearer-token check
//! ([`auth`]) on the Control service only (health and reflection stay open for probes and
//! tools).

use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Server},
};

use tonic_health::pb::health_server::HealthServer;

use crate::{
    auth::BearerAuth, error::RunError, fast, health::HealthService, incoming, observe, pad, pb,
    service::ControlService, settings::Settings,
};

/// Streams a client may reset before the server accepted them before its connection is
/// closed (`GOAWAY ENHANCE_YOUR_CALM`): h2's bound against rapid reset (CVE-2023-44487), said
/// here rather than left to a default.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset (refusals past the concurrent-stream limit, protocol errors)
/// on one connection before closing it.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves the control plane on `listener` until the node halts.
pub(crate) async fn serve(
    listener: TcpListener,
    gateway: edge::Gateway,
    settings: Settings,
) -> Result<(), RunError> {
    let health = HealthServer::new(HealthService::new(gateway.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(RunError::Reflection)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(RunError::Reflection)?;
    let auth = BearerAuth::new(&settings.tokens);
    let control = InterceptedService::new(
        pb::control_server::ControlServer::new(ControlService::new(gateway.clone())),
        auth.clone(),
    );
    let keepalive = (!settings.keepalive.is_zero()).then_some(settings.keepalive);
    // Replies are small and latency matters more than packet count.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(keepalive);
    let incoming = incoming::bounded(incoming, settings.max_connections, gateway.clone());
    let mut server = Server::builder()
        .max_concurrent_streams(settings.max_streams)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive);
    if let Some(tls) = settings.tls {
        server = server.tls_config(tls).map_err(RunError::Tls)?;
    }
    // Control calls keep working while sockets drain (an application may still push);
    // the server stops when the node halts.
    let halted = gateway.halted();
    // The fast path outermost: the unary Control calls stop there. Observe next, so refused
    // calls of the tonic path (UNAUTHENTICATED, timeouts) are counted too; the padding below
    // it changes bodies only.
    let result = server
        .layer(fast::FastLayer::new(
            gateway.clone(),
            auth,
            settings.call_timeout,
        ))
        .layer(observe::ObserveLayer::new(
            gateway.clone(),
            settings.call_timeout,
        ))
        .layer(pad::PadLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, halted)
        .await;
    result.map_err(RunError::Serve)
}
