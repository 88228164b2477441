//! The control plane's settings: read from the node's [`Config`] (where they are declared with
//! every other setting, for one `--help`, one file and one README table) and checked here, the
//! only place that reads them. [`Settings::from_config`] runs before anything binds.

use std::{path::PathBuf, time::Duration};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{
    config::{Config, ConfigError},
    error::RunError,
};

/// What the control plane's server runs with.
#[derive(Debug)]
pub(crate) struct Settings {
    /// Bearer tokens the Control service accepts (none: no authentication).
    pub(crate) tokens: Vec<String>,
    /// Server identity, and a client CA for mutual TLS.
    pub(crate) tls: Option<ServerTlsConfig>,
    /// `grpc-max-streams`: concurrent streams per connection.
    pub(crate) max_streams: u32,
    /// `grpc-max-connections`.
    pub(crate) max_connections: usize,
    /// `grpc-call-timeout`: a unary call's time from its arrival.
    pub(crate) call_timeout: Duration,
    /// `grpc-keepalive`; zero: no pings.
    pub(crate) keepalive: Duration,
}

impl Settings {
    /// Checks the control plane's settings and reads its certificate files.
    pub(crate) fn from_config(config: &Config) -> Result<Self, RunError> {
        check(config)?;
        Ok(Self {
            tokens: config.control_token.clone().unwrap_or_default(),
            tls: tls_config(config)?,
            max_streams: config.grpc_max_streams,
            max_connections: config.grpc_max_connections,
            call_timeout: config.grpc_call_timeout,
            keepalive: config.grpc_keepalive,
        })
    }
}

/// Checks the control plane's values that no type rules out; `channelgate serve` calls it
/// before binding, [`crate::run`] again.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
    if config.grpc_tls_cert.is_some() != config.grpc_tls_key.is_some() {
        return invalid("a TLS certificate needs its key, and a key its certificate");
    }
    if config.grpc_client_ca.is_some() && grpc_tls(config).is_none() {
        return invalid("grpc-client-ca needs grpc-tls-cert and grpc-tls-key");
    }
    if config.control_token.as_ref().is_none_or(Vec::is_empty)
        && config.grpc_client_ca.is_none()
        && !config.grpc_listen.ip().is_loopback()
        && !config.insecure_control
    {
        return invalid(
            "the control plane listens beyond loopback without --control-token or \
             --grpc-client-ca; set one, or --insecure-control if something else guards it",
        );
    }
    if config.grpc_max_streams == 0 || config.grpc_max_connections == 0 {
        return invalid("grpc-max-streams and grpc-max-connections must be positive");
    }
    if config.grpc_call_timeout.is_zero() {
        return invalid("grpc-call-timeout must be positive");
    }
    if config.control_token.iter().flatten().any(|t| t.is_empty()) {
        return invalid("control tokens must not be empty");
    }
    Ok(())
}

/// The control plane's certificate and key, when both are set.
fn grpc_tls(config: &Config) -> Option<(PathBuf, PathBuf)> {
    config
        .grpc_tls_cert
        .clone()
        .zip(config.grpc_tls_key.clone())
}

/// The control plane's TLS settings: a server identity, and a client CA for mutual TLS.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, RunError> {
    let Some((cert, key)) = grpc_tls(config) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| RunError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&cert)?, read(&key)?));
    if let Some(ca) = &config.grpc_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings as Flags;

    fn config(extra: fn(&mut Flags)) -> Result<(), ConfigError> {
        let mut s = Flags {
            grpc_listen: Some("0.0.0.0:50051".parse().unwrap()),
            ..Flags::default()
        };
        extra(&mut s);
        check(&s.into_config()?)
    }

    #[test]
    fn an_open_control_plane_needs_a_token_or_an_explicit_waiver() {
        assert!(config(|_| {}).is_err());
        assert!(config(|s| s.control_token = Some(vec!["t".into()])).is_ok());
        assert!(config(|s| s.insecure_control = Some(true)).is_ok());
    }

    #[test]
    fn control_values_out_of_range_are_refused() {
        assert!(config(|s| s.control_token = Some(vec![String::new()])).is_err());
        assert!(config(|s| {
            s.control_token = Some(vec!["t".into()]);
            s.grpc_max_streams = Some(0);
        })
        .is_err());
        assert!(config(|s| {
            s.control_token = Some(vec!["t".into()]);
            s.grpc_call_timeout = Some(Duration::ZERO);
        })
        .is_err());
        assert!(config(|s| {
            s.control_token = Some(vec!["t".into()]);
            s.grpc_client_ca = Some("ca.pem".into());
        })
        .is_err());
    }
}
