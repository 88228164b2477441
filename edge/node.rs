//! [`NodeState`]: what every task of a node's client plane shares (configuration, the bus and the
//! registry behind it, the handlers, permits and per-address limits, the shutdown tokens).
//!
//! It is the crate's own: the control plane reaches the node through the gateway only, which
//! wraps it (this module never names the gateway).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    config::Config,
    credentials::Digest,
    error::StartError,
    handlers::{call_route::CallRoute, streams::Remote, Handlers, Socket},
    limit::{MessageLimit, TokenBucket},
    proxy::{self, AddressHeader, Proxies},
    readiness::Readiness,
    registry::{Conn, Registry},
    tls::Tls,
};

/// Connections served when every handshake permit is taken: `/healthz`, `/readyz` and
/// `/metrics` are answered, upgrades get 503, and headers must come within [`SPARE_HEADER_TIMEOUT`].
pub(crate) const SPARE_PERMITS: usize = 64;
/// How long a connection of the spare lane may take to send its request head.
pub(crate) const SPARE_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What every connection task of a node shares.
#[derive(Debug)]
pub(crate) struct NodeState {
    /// The registry of digests, channels and live sockets on this node.
    pub(crate) registry: Registry,
    /// The gateway's operations across nodes (or on this one).
    pub(crate) bus: Arc<dyn Bus>,
    /// The node's configuration.
    pub(crate) config: Config,
    /// Whether the node takes traffic (`/readyz`, gRPC health); the drain and the bus set it.
    pub(crate) readiness: Arc<Readiness>,
    /// What answers client messages, by action.
    pub(crate) handlers: Handlers,
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
    /// One permit per connection still in its HTTP phase (`max_pending_handshakes`), taken at
    /// accept and given back when the upgrade is done or the connection ends.
    pub(crate) handshake_permits: Arc<Semaphore>,
    /// The spare lane, for probes while `handshake_permits` are all taken ([`SPARE_PERMITS`]).
    pub(crate) spare_permits: Arc<Semaphore>,
    /// Connections in their HTTP phase per client address (only with `max_pending_per_ip`).
    pub(crate) pending_per_ip: DashMap<IpAddr, usize>,
    /// Handshake rate per client address (only with `handshake_rate_per_ip`); idle entries
    /// are swept.
    pub(crate) handshake_buckets: DashMap<IpAddr, TokenBucket>,
    /// TLS for the client plane (wss), when configured.
    pub(crate) tls: Option<Tls>,
    /// Live sockets per client address (only with `max_connections_per_ip`).
    pub(crate) per_ip: DashMap<IpAddr, usize>,
    /// The trusted proxies in front of the client plane, when any: who the client is.
    pub(crate) proxies: Option<Proxies>,
    /// The event streams live on this node, by digest: where their clients' POSTed messages
    /// go.
    pub(crate) event_streams: DashMap<Digest, Arc<EventStream>>,
    /// Clients that POST here while their stream is on another node of the cluster: their
    /// identity and message limits on this node, forgotten when idle ([`POSTER_IDLE`]).
    pub(crate) posters: DashMap<Digest, Arc<Poster>>,
}

/// How long a [`Poster`] is kept after its last message.
pub(crate) const POSTER_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Who sends client messages outside a WebSocket: its identity (and its messages in flight),
/// and its message rate, kept as a WebSocket's reader keeps its own.
#[derive(Debug)]
pub(crate) struct Messenger {
    /// Its identity, for the handlers.
    pub(crate) socket: Arc<Socket>,
    /// Its message rate.
    pub(crate) limit: parking_lot::Mutex<MessageLimit>,
}

impl Messenger {
    /// `socket`'s messages, at the node's message rate.
    pub(crate) fn new(socket: Arc<Socket>, limits: &crate::config::Limits) -> Self {
        Self {
            socket,
            limit: parking_lot::Mutex::new(MessageLimit::new(
                limits.message_rate,
                limits.message_burst,
            )),
        }
    }
}

/// A client that POSTs here while its stream lives on another node.
#[derive(Debug)]
pub(crate) struct Poster {
    /// Its messages, counted on this node.
    pub(crate) messages: Messenger,
    /// When it last posted, in [`crate::clock::monotonic_ms`].
    pub(crate) last_ms: std::sync::atomic::AtomicU64,
}

/// A live event stream, found by its digest when its client POSTs a message.
#[derive(Debug)]
pub(crate) struct EventStream {
    /// Its socket in the registry.
    pub(crate) conn: Arc<Conn>,
    /// Its messages.
    pub(crate) messages: Messenger,
}

impl NodeState {
    /// At a writer's start (a socket's or a stream's): closes its outbox with 1001 when the
    /// node is draining. The drain closes every outbox live at the time (`Registry::close_live`);
    /// this catches one that became live after that sweep. No writer waits on the shutdown token
    /// instead: that would be a 72-byte waiter in every idle socket's task.
    pub(crate) fn close_if_draining(&self, conn: &Conn) {
        if self.shutdown.is_cancelled() {
            conn.outbox.close(crate::error::Close::GoingAway);
        }
    }

    /// Forgets the posters idle for longer than [`POSTER_IDLE`] (the sweeper's).
    pub(crate) fn sweep_posters(&self) {
        let now = crate::clock::monotonic_ms();
        let idle = POSTER_IDLE.as_millis() as u64;
        self.posters.retain(|_, poster| {
            now.saturating_sub(poster.last_ms.load(std::sync::atomic::Ordering::Relaxed)) < idle
                || poster
                    .messages
                    .socket
                    .inflight
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
        });
    }

    /// Whether `ip` may start another handshake now.
    pub(crate) fn handshake_allowed(&self, ip: IpAddr) -> bool {
        let rate = self.config.limits.handshake_rate_per_ip;
        if rate == 0 {
            return true;
        }
        let now = tokio::time::Instant::now();
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

    /// The client of a request that came from `from` (the peer, or the client a PROXY header
    /// named): as a trusted proxy names it in the request's headers, else `from`.
    pub(crate) fn client(&self, from: SocketAddr, headers: &http::HeaderMap) -> SocketAddr {
        let from = SocketAddr::new(proxy::canonical(from.ip()), from.port());
        match &self.proxies {
            Some(proxies) => proxies.client(from, headers),
            None => from,
        }
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
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        halt: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Self, StartError> {
        let limits = &config.limits;
        let call_route = CallRoute::new(
            config.upstream.as_deref(),
            limits.upstream_timeout,
            &config.key_cookie,
        )?;
        let handlers = Handlers::new(call_route, remote, bus.registry().metrics());
        let tls = match config.tls() {
            Some((cert, key)) => Some(Tls::load(cert, key)?),
            None => None,
        };
        let proxies = match &config.trusted_proxies {
            Some(trusted) if !trusted.is_empty() => Some(Proxies::new(
                proxy::parse_trusted(trusted)?,
                AddressHeader::parse(&config.client_address_header)?,
                config.proxy_protocol,
            )),
            _ => None,
        };
        Ok(Self {
            registry: bus.registry().clone(),
            bus,
            handlers,
            ws_permits: Arc::new(Semaphore::new(limits.max_connections)),
            handshake_permits: Arc::new(Semaphore::new(limits.max_pending_handshakes)),
            spare_permits: Arc::new(Semaphore::new(SPARE_PERMITS)),
            pending_per_ip: DashMap::new(),
            event_streams: DashMap::new(),
            posters: DashMap::new(),
            per_ip: dashmap::DashMap::new(),
            handshake_buckets: dashmap::DashMap::new(),
            tls,
            proxies,
            config,
            readiness,
            shutdown,
            halt,
            tracker,
        })
    }
}

/// Which per-address limit a slot counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counts {
    /// Live sockets and streams (`max-connections-per-ip`).
    Connections,
    /// Connections in their HTTP phase (`max-pending-per-ip`).
    Pending,
}

impl Counts {
    fn of(self, node: &NodeState) -> &DashMap<IpAddr, usize> {
        match self {
            Self::Connections => &node.per_ip,
            Self::Pending => &node.pending_per_ip,
        }
    }
}

/// One connection's share of a per-address limit (`max_connections_per_ip`, or
/// `max_pending_per_ip`); given back on drop. Small on purpose (32 bytes): every live socket's
/// task holds one.
pub(crate) struct IpSlot {
    node: Arc<NodeState>,
    ip: IpAddr,
    /// The counts this slot is taken from; `None` when the limit is off (nothing counted).
    counts: Option<Counts>,
}

impl IpSlot {
    /// Takes a slot for `ip` from `counts` (at most `max` per address; 0: no limit), or `None`
    /// when the address has them all.
    pub(crate) fn take(
        node: &Arc<NodeState>,
        ip: IpAddr,
        max: usize,
        counts: Counts,
    ) -> Option<Self> {
        if max == 0 {
            return Some(Self {
                node: node.clone(),
                ip,
                counts: None,
            });
        }
        let mut count = counts.of(node).entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Self {
            node: node.clone(),
            ip,
            counts: Some(counts),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(counts) = self.counts else {
            return;
        };
        let counts = counts.of(&self.node);
        if let Some(mut count) = counts.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
        }
        counts.remove_if(&self.ip, |_, count| *count == 0);
    }
}

/// A connection in its HTTP phase: its client address's share of `max_pending_per_ip` (once
/// that address is known) and a handshake permit (or, when those are all taken, a permit of
/// the spare lane). Dropped when the upgrade is done or the connection ends.
pub(crate) struct Admission {
    slot: Option<IpSlot>,
    _permit: OwnedSemaphorePermit,
    spare: bool,
}

impl Admission {
    /// Admits a connection just accepted, counted against its client address `ip` when known
    /// (`None`: a trusted proxy's connection whose client its PROXY header will name, or that
    /// names clients per request), or says why not (for the metric).
    pub(crate) fn admit(node: &Arc<NodeState>, ip: Option<IpAddr>) -> Result<Self, &'static str> {
        let slot = ip.map(|ip| Self::slot(node, ip)).transpose()?;
        let permit = match node.handshake_permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => (
                node.spare_permits
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "pending_full")?,
                true,
            ),
        };
        Ok(Self {
            slot,
            _permit: permit.0,
            spare: permit.1,
        })
    }

    /// Counts the connection against `ip`, its client's address now that it is known.
    pub(crate) fn attribute(
        &mut self,
        node: &Arc<NodeState>,
        ip: IpAddr,
    ) -> Result<(), &'static str> {
        self.slot = Some(Self::slot(node, ip)?);
        Ok(())
    }

    fn slot(node: &Arc<NodeState>, ip: IpAddr) -> Result<IpSlot, &'static str> {
        let max = node.config.limits.max_pending_per_ip;
        IpSlot::take(node, ip, max, Counts::Pending).ok_or("pending_per_ip")
    }

    /// Whether this connection is on the spare lane (probes only: upgrades get 503).
    pub(crate) fn spare(&self) -> bool {
        self.spare
    }
}
