//! Prometheus metrics: one [`Metrics`] per node, shared through the registry, rendered as text
//! at `GET /metrics`. Counters are incremented where things happen (never on a per-subscriber
//! basis: the publish path adds its totals once per push); gauges are read at scrape time.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, TextEncoder,
};

/// Every metric of a node.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: prometheus::Registry,
    /// Pushes accepted, per channel (a push to two channels counts twice).
    pub pushes: IntCounter,
    /// Frames queued to sockets by pushes and sends.
    pub deliveries: IntCounter,
    /// Bytes of frames queued to sockets (pushes, sends and replies).
    pub bytes_out: IntCounter,
    /// Bytes WebSocket writers handed to the kernel: frame headers included, after
    /// permessage-deflate and deltas.
    pub wire_bytes: IntCounter,
    /// Frames written to sockets as deltas.
    pub delta_frames: IntCounter,
    /// Frames compressed with deflate: once per frame, whatever the number of its sockets.
    pub compressions: IntCounter,
    /// Sockets closed because their outbound queue was full.
    pub slow_closes: IntCounter,
    /// Frames dropped because their socket was already closing.
    pub dropped: IntCounter,
    /// Recoveries at connect and `Listen` start, by result (`recovered`, `gap`).
    pub recoveries: IntCounterVec,
    /// Pushes replayed to recovering sockets.
    pub replayed: IntCounter,
    /// Gaps signalled in live streams (pushes lost in the cluster bus, Redis that lost data).
    pub gaps: IntCounter,
    /// Bytes of pushes retained for recovery (set at scrape time).
    pub history_bytes: IntGauge,
    /// Messages from the cluster bus that did not decode (counted and dropped).
    pub bus_malformed: IntCounter,
    /// Final `$disconnect` events not told because the lifecycle queue was full.
    pub lifecycle_dropped: IntCounter,
    /// Final ends of credentials, by reason (`$disconnect` events decided on this node).
    pub ends: IntCounterVec,
    /// Sockets opened or refused, by result (`accepted`, or the refusal reason) and transport.
    pub handshakes: IntCounterVec,
    /// Live event streams.
    pub event_streams: IntGauge,
    /// Client-plane connections closed at accept, by reason (`pending_per_ip`, `pending_full`).
    pub refused_connections: IntCounterVec,
    /// Client messages received.
    pub messages_in: IntCounter,
    /// Replies to client messages, by status.
    pub replies: IntCounterVec,
    /// Sockets closed, by close code (`peer` when the client closed, `lost` without a close).
    pub closes: IntCounterVec,
    /// `call-route` upstream round trips.
    pub call_route_seconds: Histogram,
    /// `Handle` round trips (client message to reply).
    pub handle_seconds: Histogram,
    /// Live sockets (set at scrape time).
    pub connections: IntGauge,
    /// Connections in their HTTP phase holding a handshake permit (set at scrape time).
    pub pending_handshakes: IntGauge,
    /// Channels with a live subscriber (set at scrape time).
    pub channels: IntGauge,
    /// Credentials known to this node (set at scrape time).
    pub sessions: IntGauge,
    /// 1 when the bus (Redis in cluster mode) is usable (set at scrape time).
    pub bus_ready: IntGauge,
    /// Control-plane requests by method and gRPC status code.
    pub control_requests: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts a socket opened or refused: `result` is `accepted` or the refusal's label,
    /// `transport` `websocket` or `sse`.
    pub(crate) fn handshake(&self, result: &str, transport: &str) {
        self.handshakes
            .with_label_values(&[result, transport])
            .inc();
    }

    /// A fresh set of metrics.
    pub(crate) fn new() -> Self {
        let registry = prometheus::Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str| {
            let buckets = vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        Self {
            pushes: counter("channelgate_pushes_total", "Pushes accepted, per channel."),
            deliveries: counter(
                "channelgate_deliveries_total",
                "Frames queued to sockets by pushes and sends.",
            ),
            bytes_out: counter(
                "channelgate_bytes_out_total",
                "Bytes of frames queued to sockets (pushes, sends, replies).",
            ),
            wire_bytes: counter(
                "channelgate_wire_bytes_total",
                "Bytes WebSocket writers handed to the kernel (after deflate and deltas, frame headers included).",
            ),
            delta_frames: counter(
                "channelgate_delta_frames_total",
                "Pushes written to sockets as deltas (WebSocket and SSE).",
            ),
            compressions: counter(
                "channelgate_compressions_total",
                "Frames compressed with permessage-deflate (once per frame, shared by its sockets).",
            ),
            slow_closes: counter(
                "channelgate_slow_closes_total",
                "Sockets closed because their outbound queue was full.",
            ),
            dropped: counter(
                "channelgate_dropped_frames_total",
                "Frames dropped because their socket was closing.",
            ),
            recoveries: counter_vec(
                "channelgate_recoveries_total",
                "Recoveries of missed pushes at connect, by result.",
                "result",
            ),
            replayed: counter(
                "channelgate_replayed_total",
                "Pushes replayed to recovering sockets.",
            ),
            gaps: counter(
                "channelgate_gaps_total",
                "Gaps signalled in live streams (recovered:false).",
            ),
            history_bytes: gauge(
                "channelgate_history_bytes",
                "Bytes of pushes retained for recovery.",
            ),
            bus_malformed: counter(
                "channelgate_bus_malformed_total",
                "Messages from the cluster bus that did not decode, dropped.",
            ),
            lifecycle_dropped: counter(
                "channelgate_lifecycle_dropped_total",
                "Final $disconnect events not told: the node's lifecycle queue was full.",
            ),
            ends: counter_vec(
                "channelgate_ends_total",
                "Credentials that ended for good, by reason, as decided on this node.",
                "reason",
            ),
            handshakes: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "channelgate_handshakes_total",
                        "Sockets opened or refused, by result and transport (websocket, sse).",
                    ),
                    &["result", "transport"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            event_streams: gauge(
                "channelgate_event_streams",
                "Live Server-Sent Events streams (counted in channelgate_connections too).",
            ),
            refused_connections: counter_vec(
                "channelgate_refused_connections_total",
                "Client-plane connections closed at accept, by reason.",
                "reason",
            ),
            messages_in: counter("channelgate_messages_in_total", "Client messages received."),
            replies: counter_vec(
                "channelgate_replies_total",
                "Replies to client messages by status.",
                "status",
            ),
            closes: counter_vec(
                "channelgate_closes_total",
                "Sockets closed by close code.",
                "code",
            ),
            call_route_seconds: histogram(
                "channelgate_call_route_seconds",
                "call-route upstream round trips.",
            ),
            handle_seconds: histogram(
                "channelgate_handle_seconds",
                "Handle round trips, client message to reply.",
            ),
            connections: gauge("channelgate_connections", "Live sockets."),
            pending_handshakes: gauge(
                "channelgate_pending_handshakes",
                "Connections in their HTTP phase holding a handshake permit.",
            ),
            channels: gauge("channelgate_channels", "Channels with a live subscriber."),
            sessions: gauge("channelgate_sessions", "Credentials known to this node."),
            bus_ready: gauge(
                "channelgate_bus_ready",
                "1 when the bus (Redis in cluster mode) is usable.",
            ),
            control_requests: counter_vec2(
                &registry,
                "channelgate_control_requests_total",
                "Control-plane requests by method and gRPC status code.",
                &["method", "code"],
            ),
            registry,
        }
    }

    /// Adds `collector` to the node's metrics.
    pub(crate) fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

fn counter_vec2(
    registry: &prometheus::Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}
