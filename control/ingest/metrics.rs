//! The consumers' metrics, labelled by consumer, in the node's registry (`GET /metrics`).

use std::sync::Arc;

use edge::Gateway;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts,
};

/// Every consumer's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    applied: IntCounterVec,
    failed: IntCounterVec,
    pending: IntGaugeVec,
    oldest: GaugeVec,
    batch: HistogramVec,
    connected: IntGaugeVec,
    partitions: IntGaugeVec,
    stranded: IntGaugeVec,
}

/// One consumer's handles on [`Metrics`].
#[derive(Debug, Clone)]
pub(crate) struct Counts {
    failed: IntCounterVec,
    name: String,
    /// Commands applied (rows done, messages acked).
    pub(crate) applied: IntCounter,
    /// Commands pending at the source (rows in the table, messages not yet acked).
    pub(crate) pending: IntGauge,
    /// Age of the oldest pending command, in seconds.
    pub(crate) oldest: Gauge,
    /// Whether the source is reachable now (1) or not (0).
    pub(crate) connected: IntGauge,
    /// Outbox partitions this node holds (JetStream: 1 while it holds the lease).
    pub(crate) partitions: IntGauge,
    /// Outbox rows whose partition is not below `partitions`: no node reads them.
    pub(crate) stranded: IntGauge,
    batch: prometheus::Histogram,
}

impl Metrics {
    /// Creates the metrics and adds them to `gateway`'s registry.
    pub(crate) fn register(gateway: &Gateway) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered();
        let i = &metrics.0;
        gateway.register_metrics(Box::new(i.applied.clone()))?;
        gateway.register_metrics(Box::new(i.failed.clone()))?;
        gateway.register_metrics(Box::new(i.pending.clone()))?;
        gateway.register_metrics(Box::new(i.oldest.clone()))?;
        gateway.register_metrics(Box::new(i.batch.clone()))?;
        gateway.register_metrics(Box::new(i.connected.clone()))?;
        gateway.register_metrics(Box::new(i.partitions.clone()))?;
        gateway.register_metrics(Box::new(i.stranded.clone()))?;
        Ok(metrics)
    }

    /// The metrics, in no registry.
    pub(crate) fn unregistered() -> Self {
        let opts = |name: &str, help: &str| Opts::new(name, help);
        let ints = |name: &str, help: &str| {
            IntGaugeVec::new(opts(name, help), &["consumer"]).expect("valid metric")
        };
        Self(Arc::new(Inner {
            applied: IntCounterVec::new(
                opts(
                    "channelgate_consumer_applied_total",
                    "Commands a consumer applied (outbox rows done, JetStream messages acked).",
                ),
                &["consumer"],
            )
            .expect("valid metric"),
            failed: IntCounterVec::new(
                opts(
                    "channelgate_consumer_failed_total",
                    "Commands that failed, by reason: `transient` (retried) or why one can never \
                     apply (moved aside).",
                ),
                &["consumer", "reason"],
            )
            .expect("valid metric"),
            pending: ints(
                "channelgate_consumer_pending",
                "Commands waiting at the source: outbox rows, or JetStream messages not yet acked.",
            ),
            oldest: GaugeVec::new(
                opts(
                    "channelgate_consumer_oldest_pending_seconds",
                    "Age of the oldest outbox row waiting (PostgreSQL consumers).",
                ),
                &["consumer"],
            )
            .expect("valid metric"),
            batch: HistogramVec::new(
                HistogramOpts::new(
                    "channelgate_consumer_batch_size",
                    "Commands per batch a consumer read.",
                )
                .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0]),
                &["consumer"],
            )
            .expect("valid metric"),
            connected: ints(
                "channelgate_consumer_connected",
                "Whether a consumer reaches its source now (1) or not (0).",
            ),
            stranded: ints(
                "channelgate_consumer_stranded_rows",
                "Outbox rows whose partition is not below the consumer's `partitions`: no node reads them.",
            ),
            partitions: ints(
                "channelgate_consumer_partitions_held",
                "Outbox partitions this node holds; for JetStream, 1 while it holds the lease.",
            ),
        }))
    }

    /// The handles of the consumer `name`.
    pub(crate) fn of(&self, name: &str) -> Counts {
        let i = &self.0;
        Counts {
            failed: i.failed.clone(),
            name: name.to_owned(),
            applied: i.applied.with_label_values(&[name]),
            pending: i.pending.with_label_values(&[name]),
            oldest: i.oldest.with_label_values(&[name]),
            connected: i.connected.with_label_values(&[name]),
            partitions: i.partitions.with_label_values(&[name]),
            stranded: i.stranded.with_label_values(&[name]),
            batch: i.batch.with_label_values(&[name]),
        }
    }
}

impl Counts {
    /// Counts a failure by its reason.
    pub(crate) fn failed(&self, reason: &str) {
        self.failed.with_label_values(&[&self.name, reason]).inc();
    }

    /// Records a batch's size.
    pub(crate) fn batch(&self, size: usize) {
        self.batch.observe(size as f64);
    }
}
