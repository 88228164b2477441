//! [`Edge`]: what every task of a node's client plane shares (configuration, the bus and the
//! registry behind it, the handlers, permits and per-address limits, the shutdown tokens).
//!
//! It is the crate's own: the control plane reaches the node through
//! [`Gateway`](crate::gateway::Gateway) only.

use std::{net::IpAddr, sync::Arc};

use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    config::Config,
    error::Error,
    handlers::{call_route::CallRoute, remote::Remote, Handlers},
    limit::TokenBucket,
    registry::Registry,
    tls::Tls,
};

/// Most connections between `accept()` and the WebSocket upgrade (or the end of a plain
/// HTTP exchange such as `/healthz`).
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 4096;

/// Read buffer of a WebSocket, in bytes: small, because most sockets receive little.
const READ_BUFFER_BYTES: usize = 256;
/// Frames queued for a socket are gathered up to this many bytes before a write.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// What every connection task of a node shares.
#[derive(Debug)]
pub(crate) struct Edge {
    /// The registry of digests, channels and live sockets on this node.
    pub(crate) registry: Registry,
    /// The gateway's operations across nodes (or on this one).
    pub(crate) bus: Arc<dyn Bus>,
    /// The node's configuration.
    pub(crate) config: Config,
    /// What answers client messages, by action.
    pub(crate) handlers: Handlers,
    /// WebSocket limits derived from the configuration.
    pub(crate) ws_config: WebSocketConfig,
    /// Cancelled when the node starts draining: sockets close with 1001, upgrades get 503,
    /// `/readyz` says not ready. The listener keeps answering meanwhile.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled once the sockets are gone (or the drain grace ran out): the listener and any
    /// plain HTTP connections stop.
    pub(crate) halt: CancellationToken,
    /// Every task the edge spawns, so the drain can wait for them.
    pub(crate) tracker: TaskTracker,
    /// One permit per live WebSocket (`max_connections`); released when the socket's task ends,
    /// so the drain knows when every socket is gone.
    pub(crate) ws_permits: Arc<Semaphore>,
    /// One permit per connection still in its HTTP phase (see [`MAX_PENDING_HANDSHAKES`]).
    pub(crate) handshake_permits: Arc<Semaphore>,
    /// Handshake rate per client address (only with `handshake_rate_per_ip`); idle entries
    /// are swept.
    pub(crate) handshake_buckets: DashMap<IpAddr, TokenBucket>,
    /// TLS for the client plane (wss), when configured.
    pub(crate) tls: Option<Tls>,
    /// Live sockets per client address (only with `max_connections_per_ip`).
    pub(crate) per_ip: DashMap<IpAddr, usize>,
}

impl Edge {
    /// Whether `ip` may start another handshake now.
    pub(crate) fn handshake_allowed(&self, ip: IpAddr) -> bool {
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
    pub(crate) fn sweep_handshake_buckets(&self) {
        let idle = std::time::Duration::from_secs(60);
        self.handshake_buckets
            .retain(|_, bucket| bucket.last_used().elapsed() < idle);
    }

    /// Waits until no WebSocket is live.
    pub(crate) async fn sockets_gone(&self) {
        let all = u32::try_from(self.config.limits.max_connections).unwrap_or(u32::MAX);
        // Holding every permit means no socket holds one; release them at once.
        let _all = self.ws_permits.acquire_many(all).await;
    }

    /// Shared state for a node.
    pub(crate) fn new(
        bus: Arc<dyn Bus>,
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
        )
        .map_err(|err| Error::BadUpstream(err.to_string()))?;
        let handlers = Handlers::new(call_route, remote, bus.registry().metrics());
        let tls = match config.tls() {
            Some((cert, key)) => Some(Tls::load(cert, key)?),
            None => None,
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(WRITE_BUFFER_BYTES)
            .max_message_size(Some(limits.max_message_size))
            .max_frame_size(Some(limits.max_message_size));
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
