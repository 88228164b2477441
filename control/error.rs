//! The node's errors: the edge's (re-exported: a call's [`Error`], start-up's [`StartError`],
//! readiness's [`NotReady`]) and what [`crate::run`] itself can meet, [`RunError`]: the edge
//! failing to start, or the control plane failing to bind, load its TLS files or serve.

use std::{net::SocketAddr, path::PathBuf};

pub use edge::error::*;

/// Why [`crate::run`] (or [`crate::Listeners::bind`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The edge (client plane, cluster bus) could not start.
    #[error(transparent)]
    Edge(#[from] StartError),
    /// A control-plane setting out of range.
    #[error(transparent)]
    Setting(#[from] edge::config::ConfigError),
    /// A listener could not be bound.
    #[error("binding the {plane} to {addr}: {source}")]
    Bind {
        /// `client plane` or `control plane`.
        plane: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A listener's own address could not be read.
    #[error("reading the control listener's address: {0}")]
    Address(#[source] std::io::Error),
    /// A control-plane TLS file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control plane's TLS settings were refused.
    #[error("configuring control-plane TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("building the reflection service: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The control plane's server failed.
    #[error("serving the control plane: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The control plane's task panicked or was cancelled.
    #[error("the control plane task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The control plane stopped while the node was not draining.
    #[error("the control plane stopped")]
    Stopped,
}
