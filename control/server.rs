//! The control plane's server: gRPC service `channelgate.v1.Control`, plus the standard gRPC
//! health service ([`health`](crate::health), the node's readiness) and reflection (`v1` and `v1alpha`, for the many tools that still ask only
//! for the latter), on the control listener.
//!
//! Layers, outermost first: TLS (and client certificates, with `--grpc-client-ca`) on the
//! whole listener; request metrics and the unary time limit ([`observe`]); the per-connection
//! concurrency limit; the bearer-token check ([`auth`]) on the Control service only (health and
//! reflection stay open for probes and tools).

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
};

use tonic_health::pb::health_server::HealthServer;

use crate::{
    auth::BearerAuth, config::Config, error::Error, health::HealthService, observe, pb,
    service::ControlService,
};

/// Longest a unary control call may run (applied by [`observe`]; client streams have no limit).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests in flight on one HTTP/2 connection.
const CONCURRENCY_PER_CONNECTION: usize = 1024;

/// What the control plane's server needs of the node's configuration.
#[derive(Debug)]
pub(crate) struct Settings {
    /// Bearer tokens the Control service accepts (none: no authentication).
    tokens: Vec<String>,
    /// Server identity, and a client CA for mutual TLS.
    tls: Option<ServerTlsConfig>,
}

impl Settings {
    /// Reads the control plane's settings (and its certificate files) from `config`.
    pub(crate) fn from_config(config: &Config) -> Result<Self, Error> {
        Ok(Self {
            tokens: config.control_token.clone().unwrap_or_default(),
            tls: tls_config(config)?,
        })
    }
}

/// The control plane's TLS settings: a server identity, and a client CA for mutual TLS.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, Error> {
    let Some((cert, key)) = config.grpc_tls() else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| Error::Io {
            context: format!("reading {}", path.display()),
            source,
        })
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&cert)?, read(&key)?));
    if let Some(ca) = &config.grpc_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Serves the control plane on `listener` until the node halts.
pub(crate) async fn serve(
    listener: TcpListener,
    gateway: edge::Gateway,
    settings: Settings,
) -> Result<(), Error> {
    let health = HealthServer::new(HealthService::new(gateway.clone()));
    let reflection_error = |err| Error::Io {
        context: "building the reflection service".into(),
        source: std::io::Error::other(err),
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let control = InterceptedService::new(
        pb::control_server::ControlServer::new(ControlService::new(gateway.clone())),
        BearerAuth::new(&settings.tokens),
    );
    // Replies are small and latency matters more than packet count.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Server::builder();
    if let Some(tls) = settings.tls {
        server = server.tls_config(tls).map_err(|err| Error::Io {
            context: "configuring control-plane TLS".into(),
            source: std::io::Error::other(err),
        })?;
    }
    // Control calls keep working while sockets drain (an application may still push);
    // the server stops when the node halts.
    let halted = gateway.halted();
    // Outermost, so refused calls (UNAUTHENTICATED, timeouts) are counted too.
    let result = server
        .layer(observe::ObserveLayer::new(gateway.metrics()))
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, halted)
        .await;
    result.map_err(|err| Error::Io {
        context: "serving the control plane".into(),
        source: std::io::Error::other(err),
    })
}
