//! The control plane: gRPC service `channelgate.v1.Control`, plus the standard gRPC health
//! and reflection services, on the control listener.
//!
//! Layers, outermost first: TLS (and client certificates, with `--grpc-client-ca`) on the
//! whole listener; bearer-token check ([`auth`]) on the Control service only (health stays
//! open for probes); per-connection concurrency limit and request timeout on the server.
//! This module depends on the edge (the registry) and never the other way round.

mod auth;
mod convert;
mod handle;
mod observe;
mod service;
mod status;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
};

use crate::{error::Error, pb, server::Edge};

pub use auth::BearerAuth;
pub use service::ControlService;

/// Longest a unary control call may run (applied by [`observe`]; client streams have no limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests in flight on one HTTP/2 connection.
const CONCURRENCY_PER_CONNECTION: usize = 1024;

/// The control plane's TLS settings: a server identity, and a client CA for mutual TLS.
fn tls_config(config: &crate::config::Config) -> Result<Option<ServerTlsConfig>, Error> {
    let Some((cert, key)) = &config.grpc_tls else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.grpc_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Serves the control plane on `listener` until the edge drains.
pub async fn serve(listener: TcpListener, edge: Arc<Edge>) -> Result<(), Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            "channelgate.v1.Control",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| Error::Io {
            context: "building the reflection service".into(),
            source: std::io::Error::other(err),
        })?;
    let control = InterceptedService::new(
        pb::control_server::ControlServer::new(ControlService::new(
            edge.bus.clone(),
            edge.handlers.clone(),
            edge.halt.clone(),
            edge.tracker.clone(),
        )),
        BearerAuth::new(&edge.config.control_tokens),
    );
    // Control calls keep working while sockets drain (an application may still push);
    // the server stops when the edge halts.
    let halt = edge.halt.clone();
    // Replies are small and latency matters more than packet count.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Server::builder();
    if let Some(tls) = tls_config(&edge.config)? {
        server = server.tls_config(tls).map_err(|err| Error::Io {
            context: "configuring control-plane TLS".into(),
            source: std::io::Error::other(err),
        })?;
    }
    // Outermost, so refused calls (UNAUTHENTICATED, timeouts) are counted too.
    let result = server
        .layer(observe::ObserveLayer::new(edge.registry.metrics_arc()))
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, async move {
            halt.cancelled().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await;
    result.map_err(|err| Error::Io {
        context: "serving the control plane".into(),
        source: std::io::Error::other(err),
    })
}
