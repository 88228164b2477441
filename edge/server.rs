//! The client plane's accept loop.
//!
//! A permit for a pre-upgrade connection is taken before `accept()`, so a storm of half-open
//! handshakes cannot grow without bound; the WebSocket itself takes a second permit (from
//! `max_connections`) at the upgrade, where a full node answers 503.

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{handshake, node::Edge};

/// Accepts client-plane connections until the node halts. While it drains, it still answers
/// `/healthz` and `/readyz` (not ready) and refuses upgrades with 503.
pub(crate) async fn serve(listener: TcpListener, edge: Arc<Edge>) {
    loop {
        let permit = tokio::select! {
            permit = edge.handshake_permits.clone().acquire_owned() => {
                permit.expect("the handshake semaphore is never closed")
            }
            _ = edge.halt.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = edge.halt.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Pushes are small and latency matters more than packet count.
                let _ = stream.set_nodelay(true);
                match &edge.tls {
                    None => {
                        edge.tracker.spawn(handshake::serve_http(
                            stream,
                            peer,
                            edge.clone(),
                            permit,
                        ));
                    }
                    Some(tls) => {
                        let (acceptor, edge) = (tls.acceptor(), edge.clone());
                        edge.tracker.clone().spawn(async move {
                            let timeout = edge.config.limits.handshake_timeout;
                            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    handshake::serve_http(stream, peer, edge, permit).await
                                }
                                Ok(Err(err)) => {
                                    tracing::debug!(%peer, %err, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(err) => {
                // Out of file descriptors or a transient network error: back off briefly
                // instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = edge.halt.cancelled() => break,
                }
            }
        }
    }
    tracing::debug!("client plane stopped accepting");
}
