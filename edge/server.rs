//! The client plane's accept loop, and [`Edge`], the state every connection task shares.
//!
//! A permit for a pre-upgrade connection is taken before `accept()`, so a storm of half-open
//! handshakes cannot grow without bound; the WebSocket itself takes a second permit (from
//! `max_connections`) at the upgrade, where a full node answers 503.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    config::Config,
    error::Error,
    handlers::{call_route::CallRoute, remote::Remote, Handlers},
    handshake,
    limit::TokenBucket,
    registry::Registry,
    tls::Tls,
};

/// Most connections between `accept()` and the WebSocket upgrade (or the end of a plain
/// HTTP exchange such as `/healthz`).
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

/// Read buffer of a WebSocket, in bytes: small, because most sockets receive little.
const READ_BUFFER_BYTES: usize = 256;
/// Frames queued for a socket are gathered up to this many bytes before a write.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// What every connection task of a node shares.
#[derive(Debug)]
pub struct Edge {
    /// The registry of digests, channels and live sockets on this node.
    pub registry: Registry,
    /// The gateway's operations across nodes (or on this one).
    pub bus: Bus,
    /// The node's configuration.
    pub config: Config,
    /// What answers client messages, by action.
    pub handlers: Handlers,
    /// WebSocket limits derived from the configuration.
    pub ws_config: WebSocketConfig,
    /// Cancelled when the node starts draining: sockets close with 1001, upgrades get 503,
    /// `/readyz` says not ready. The listener keeps answering meanwhile.
    pub shutdown: CancellationToken,
    /// Cancelled once the sockets are gone (or the drain grace ran out): the listener and any
    /// plain HTTP connections stop.
    pub halt: CancellationToken,
    /// Every task the edge spawns, so the drain can wait for them.
    pub tracker: TaskTracker,
    /// One permit per live WebSocket (`max_connections`); released when the socket's task ends,
    /// so the drain knows when every socket is gone.
    pub ws_permits: Arc<Semaphore>,
    /// One permit per connection still in its HTTP phase (see [`MAX_PENDING_HANDSHAKES`]).
    pub handshake_permits: Arc<Semaphore>,
    /// Handshake rate per client address (only with `handshake_rate_per_ip`); idle entries
    /// are swept.
    pub handshake_buckets: dashmap::DashMap<std::net::IpAddr, TokenBucket>,
    /// TLS for the client plane (wss), when configured.
    pub tls: Option<Tls>,
    /// Live sockets per client address (only with `max_connections_per_ip`).
    pub per_ip: dashmap::DashMap<std::net::IpAddr, usize>,
}

impl Edge {
    /// Whether `ip` may start another handshake now.
    pub fn handshake_allowed(&self, ip: std::net::IpAddr) -> bool {
        let rate = self.config.limits.handshake_rate_per_ip;
        if rate == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        self.handshake_buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, rate.saturating_mul(2), now))
            .take(now)
    }

    /// Forgets handshake buckets idle for a minute (they would be full again anyway).
    pub fn sweep_handshake_buckets(&self) {
        let idle = std::time::Duration::from_secs(60);
        self.handshake_buckets
            .retain(|_, bucket| bucket.last_used().elapsed() < idle);
    }

    /// Waits until no WebSocket is live.
    pub async fn sockets_gone(&self) {
        let all = u32::try_from(self.config.limits.max_connections).unwrap_or(u32::MAX);
        // Holding every permit means no socket holds one; release them at once.
        let _all = self.ws_permits.acquire_many(all).await;
    }

    /// Shared state for a node.
    pub fn new(
        bus: Bus,
        remote: Remote,
        config: Config,
        shutdown: CancellationToken,
        halt: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Self, Error> {
        let limits = &config.limits;
        let call_route = CallRoute::new(
            config.upstream.as_deref(),
            limits.upstream_timeout,
            &config.key_cookie,
        )?;
        let handlers = Handlers::new(call_route, remote);
        let tls = match &config.tls {
            Some((cert, key)) => Some(Tls::load(cert.clone(), key.clone())?),
            None => None,
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_message_size(Some(limits.max_message_bytes))
            .max_frame_size(Some(limits.max_message_bytes));
        Ok(Self {
            registry: bus.registry().clone(),
            bus,
            handlers,
            ws_permits: Arc::new(Semaphore::new(limits.max_connections)),
            handshake_permits: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            per_ip: dashmap::DashMap::new(),
            handshake_buckets: dashmap::DashMap::new(),
            tls,
            config,
            ws_config,
            shutdown,
            halt,
            tracker,
        })
    }
}

/// Accepts client-plane connections until the node halts. While it drains, it still answers
/// `/healthz` and `/readyz` (not ready) and refuses upgrades with 503.
pub async fn serve(listener: TcpListener, edge: Arc<Edge>) {
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
