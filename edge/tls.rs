//! TLS for the client plane (wss): the certificate and key files, loaded at start and again on
//! every SIGHUP, without touching live sockets (each keeps the session it negotiated).
//!
//! A reload that fails (a missing file, a key that does not match) keeps the current
//! certificate and logs why.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::error::StartError;

/// The client plane's TLS settings, reloadable.
#[derive(Debug)]
pub(crate) struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The configuration new connections get; replaced whole on reload.
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads `cert` (PEM chain) and `key` (PEM private key).
    pub(crate) fn load(cert: PathBuf, key: PathBuf) -> Result<Self, StartError> {
        let config = Self::read(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: RwLock::new(config),
        })
    }

    fn read(cert: &PathBuf, key: &PathBuf) -> Result<Arc<ServerConfig>, StartError> {
        fn io<E: std::error::Error + Send + Sync + 'static>(
            what: &'static str,
            path: &Path,
            err: E,
        ) -> StartError {
            StartError::Tls {
                what,
                path: path.to_owned(),
                source: Arc::new(err),
            }
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| io("certificate", cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io("certificate", cert, e))?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| io("key", key, e))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
                .map_err(|e| io("certificate and key", cert, e))?;
        // HTTP/2 for event streams and POSTs (a browser's six HTTP/1.1 connections per origin
        // would cap it at six streams); WebSockets upgrade over HTTP/1.1, which browsers open
        // beside it.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the files; on failure keeps the current configuration.
    pub(crate) fn reload(&self) {
        match Self::read(&self.cert, &self.key) {
            Ok(config) => {
                *self.current.write() = config;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(err) => tracing::warn!(%err, "TLS reload failed; keeping the current certificate"),
        }
    }

    /// An acceptor with the current configuration.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }
}
