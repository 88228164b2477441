//! channelgate's edge: the WebSocket side of the gateway.
//!
//! Edge nodes terminate WebSockets whose credentials (a signed connection id and a secret
//! socket key) are checked at the handshake, keep channels and subscriptions by digest, and
//! fan pushes out to sockets. This crate knows no gRPC: the control plane (the root crate,
//! `control/`) drives a node through [`Gateway`] only, and the compiler keeps it so (this
//! crate has no tonic or prost to name it with).
//!
//! # Layout
//! * [`Node`]: starts a node's client plane and its tasks, and drains it; [`Gateway`]
//!   ([`gateway`]): the narrow door the control plane uses.
//! * the client plane: `server` (accept loop, and each connection's HTTP service), `http`
//!   (the plain HTTP routes: the probes, `/metrics`, the browser client), `handshake` (the
//!   upgrade, where credentials are checked, and permessage-deflate agreed), `conn` (one
//!   socket's reader, writer and closing handshake), `ws` (the WebSocket framing: client frames
//!   read and inflated within the limit, the node's frames written, compressed once per frame), `node` (`NodeState`: what their tasks share), `proxy` (who the client is behind trusted
//!   proxies: the PROXY protocol, `X-Forwarded-For`, `Forwarded`), `readiness` (one answer for
//!   `/readyz`, gRPC health and the bus), `sse` (Server-Sent Events: streams, their ids, POSTed
//!   messages);
//! * [`handlers`]: client messages by action: `ping`, `call-route`, `Handle` streams;
//!   [`handoff`]: the types `Handle` messages cross nodes in, shared with the bus;
//! * [`credentials`]: minting and checking ids, keys and digests (pure);
//! * [`registry`]: sessions, channels and their subscribers, listeners, cluster hooks;
//! * [`fanout`]: the bounded per-socket outbound queue that pushes never wait on;
//! * [`bus`]: how state and pushes cross nodes (in-process, or Redis in cluster mode);
//! * [`protocol`]: the client wire format (pushes, replies, client messages), and the frame
//!   shared by a push's sockets with its compressed form and delta; [`fossil`]: Fossil deltas;
//! * [`metrics`], [`limit`] (token buckets), [`tls`] (wss, reloaded on SIGHUP), [`config`],
//!   [`error`] (a call's `Error`, `StartError`, `NotReady`), `clock` (every clock read through
//!   tokio's time, so tests pause it), [`shutdown`].
//!
//! # Entry point
//! [`Node::start`] takes the bound client listener and a [`config::Config`]; the root crate's
//! `run` starts the control plane beside it and calls [`Node::drain`] on shutdown.

// The door: what the control plane (or an embedding program) may use.
pub mod config;
pub mod domain;
pub mod error;
pub mod fossil;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod gateway;
pub mod ws;

// Everything behind it is the crate's own.
mod bus;
mod clock;
mod conn;
mod credentials;
mod fanout;
mod handlers;
mod handoff;
mod handshake;
mod http;
#[cfg(test)]
mod layering;
mod limit;
mod metrics;
mod node;
mod protocol;
mod proxy;
mod readiness;
mod registry;
mod server;
mod shutdown;
mod sse;
mod tls;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::{memory::Memory, redis::RedisBus, Bus},
    config::Config,
    credentials::Secrets,
    error::StartError,
    handlers::streams::Remote,
    metrics::Metrics,
    node::NodeState,
    readiness::Readiness,
    registry::Registry,
};
pub use crate::{gateway::Gateway, shutdown::Signals};

/// Each ping interval is cut into this many beats; each beat pings one slice of the sockets.
const HEARTBEAT_SLICES: u64 = 8;
/// How often expired sessions are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Channels (expired history, unused positions) are swept every this many session sweeps.
const CHANNEL_SWEEP_EVERY: u64 = 5;

/// Runs `tick` every `period` (late ticks are delayed, not bunched) until `stop`.
async fn every(period: Duration, stop: CancellationToken, mut tick: impl FnMut()) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => tick(),
            _ = stop.cancelled() => break,
        }
    }
}

/// Hands each message of `rx` to `handle` until the channel closes or `stop`.
async fn each_until<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
    stop: CancellationToken,
    mut handle: impl FnMut(T),
) {
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(message) => handle(message),
                None => break,
            },
            _ = stop.cancelled() => break,
        }
    }
}

/// A running node's client plane. Dropping it does not stop the node: call [`Node::drain`].
#[derive(Debug)]
pub struct Node {
    node: Arc<NodeState>,
}

impl Node {
    /// Starts a node on `client`: the accept loop, the bus (in-process, or Redis with
    /// `config.redis`), the sweeper and the heartbeat. Must be called within a Tokio runtime.
    pub fn start(client: TcpListener, config: Config) -> Result<Self, StartError> {
        let secret = match &config.secret {
            Some(secret) => secret.clone(),
            None => {
                tracing::warn!(
                    "no --secret given: generated a random deployment secret; connection ids \
                     die with this process (set --secret for restarts and clusters)"
                );
                Secrets::generate_secret()
            }
        };
        let secrets = Secrets::new(
            secret.as_bytes(),
            config.previous_secret.as_deref().map(str::as_bytes),
        )?;
        // Cancelled when the node starts draining.
        let shutdown = CancellationToken::new();
        // Cancelled when the sockets are gone: cluster tasks stop then (not before, so sockets
        // that close during the drain are still recorded in Redis), and so does the listener.
        let halt = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limits = &config.limits;
        // What `/readyz`, gRPC health and the bus read; the bus and the drain set its causes.
        let readiness = Arc::new(Readiness::default());
        // The node's metrics: the registry, the bus and the control plane count into them.
        let metrics = Arc::new(Metrics::new());
        let (remote, bus): (Remote, Arc<dyn Bus>) = match &config.redis {
            None => (
                Remote::new(limits.handler_timeout, None),
                Arc::new(Memory::new(Registry::new(secrets, limits.clone(), metrics))),
            ),
            Some(url) => {
                if config.secret.is_none() {
                    return Err(StartError::ClusterNeedsSecret);
                }
                let (local, cluster, inbound) = handoff::link();
                let remote = Remote::new(limits.handler_timeout, Some(local));
                let registry = Registry::clustered(secrets, limits.clone(), metrics);
                let bus = RedisBus::start(
                    url,
                    &config.redis_prefix,
                    registry,
                    cluster,
                    limits,
                    readiness.clone(),
                    halt.clone(),
                    &tracker,
                )?;
                // Messages other nodes forward go to the streams here, until the node halts.
                let remote_here = remote.clone();
                tracker.spawn(each_until(inbound, halt.clone(), move |message| {
                    remote_here.deliver_forwarded(message)
                }));
                (remote, bus)
            }
        };
        let client_addr = client.local_addr().map_err(|source| StartError::Io {
            context: "reading the client listener's address",
            source,
        })?;
        tracing::info!(addr = %client_addr, "client plane listening (WebSocket at {}, /healthz, /readyz)", config.ws_path);
        let node = Arc::new(NodeState::new(
            bus, remote, config, readiness, shutdown, halt, tracker,
        )?);
        let tracker = &node.tracker;
        #[cfg(unix)]
        if node.tls.is_some() {
            use tokio::signal::unix::{signal, SignalKind};
            // Installed before serving, so a SIGHUP never finds the default action (exit).
            let mut hup = signal(SignalKind::hangup()).map_err(|source| StartError::Io {
                context: "listening for SIGHUP (TLS reload)",
                source,
            })?;
            let (node, halt) = (node.clone(), node.halt.clone());
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = hup.recv() => {
                            if let Some(tls) = &node.tls {
                                tls.reload();
                            }
                        }
                        _ = halt.cancelled() => break,
                    }
                }
            });
        }

        // Final ends decided away from sockets' tasks (a grace that ran out, a node lost)
        // become `$disconnect` events, and occupancy changes `$occupied` / `$vacated`, until
        // the node halts.
        if let Some(events) = node.registry.take_lifecycle() {
            let here = node.clone();
            tracker.spawn(each_until(events, node.halt.clone(), move |event| {
                here.handlers.lifecycle(&event)
            }));
        }
        tracker.spawn(server::serve(client, node.clone()));
        tracker.spawn({
            let node = node.clone();
            let mut tick = 0u64;
            every(SWEEP_INTERVAL, node.shutdown.clone(), move || {
                node.registry.sweep();
                node.sweep_handshake_buckets();
                node.sweep_posters();
                // Channels are many and rarely expire: swept less often than sessions.
                if tick.is_multiple_of(CHANNEL_SWEEP_EVERY) {
                    node.registry.sweep_channels();
                }
                tick += 1;
            })
        });
        // The heartbeat: pings every socket once per ping interval, in slices so they do not
        // go out in one burst, and closes sockets silent past the idle timeout. One task for
        // the node instead of two timers in every socket.
        tracker.spawn({
            let registry = node.registry.clone();
            let limits = &node.config.limits;
            let idle = limits.idle_timeout;
            let mut slice = 0;
            every(
                limits.ping_interval / HEARTBEAT_SLICES as u32,
                node.halt.clone(),
                move || {
                    registry.heartbeat(slice, HEARTBEAT_SLICES, idle);
                    slice = (slice + 1) % HEARTBEAT_SLICES;
                },
            )
        });
        Ok(Self { node })
    }

    /// The door the control plane drives this node through.
    pub fn gateway(&self) -> Gateway {
        Gateway::new(self.node.clone())
    }

    /// Drains the node: upgrades get 503 and `/readyz` says not ready, every socket gets its
    /// queued frames and then a 1001 close; once the sockets are gone (or `grace` ran out)
    /// the node halts (listener, cluster tasks, [`Gateway::halted`] streams) and every task
    /// is waited for, up to what is left of `grace`.
    pub async fn drain(self, grace: Duration) {
        let node = self.node;
        let deadline = tokio::time::Instant::now() + grace;
        node.readiness.set_draining();
        node.shutdown.cancel();
        // Every live socket writes what it has queued, then closes with 1001.
        node.registry.close_live(crate::error::Close::GoingAway);
        if tokio::time::timeout_at(deadline, node.sockets_gone())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "shutdown grace ran out with sockets still open");
        }
        tracing::debug!("sockets drained; halting");
        node.halt.cancel();
        let tracker = node.tracker.clone();
        // The tasks hold the node's state; let go of ours so it is freed with them.
        drop(node);
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                tasks = tracker.len(),
                "shutdown grace ran out; abandoning tasks"
            );
        }
    }
}
