//! The client plane's accept loop.
//!
//! Every connection is accepted at once and admitted ([`Pending::admit`]) from its first byte
//! on: one of its address's `max-pending-per-ip` slots (beyond them it is closed at once, so one
//! address cannot hold the node's pending handshakes), and one of the node's
//! `max-pending-handshakes` permits; when those are all taken, one of a few spare permits whose
//! connections may only ask for `/healthz`, `/readyz` and `/metrics` (upgrades get 503), so
//! probes are answered during a storm of stalled handshakes. The WebSocket itself takes a
//! permit of `max_connections` at the upgrade, where a full node answers 503.

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    handshake,
    node::{Edge, Pending},
};

/// Accepts client-plane connections until the node halts. While it drains, it still answers
/// `/healthz` and `/readyz` (not ready) and refuses upgrades with 503.
pub(crate) async fn serve(listener: TcpListener, edge: Arc<Edge>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = edge.halt.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = match Pending::admit(&edge, peer.ip()) {
                    Ok(pending) => pending,
                    Err(why) => {
                        edge.registry
                            .metrics()
                            .refused_connections
                            .with_label_values(&[why])
                            .inc();
                        tracing::debug!(%peer, why, "connection refused at accept");
                        continue;
                    }
                };
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
                            let timeout = if permit.spare() {
                                crate::node::SPARE_HEADER_TIMEOUT
                            } else {
                                edge.config.limits.handshake_timeout
                            };
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
