//! Ingest: ways in for applications that publish from where their data lives, beside the gRPC
//! service. Each `[[consumers]]` table of the configuration file names a source: a PostgreSQL
//! transactional outbox ([`postgres`]) or a NATS JetStream stream ([`nats`]). A consumer reads
//! commands (a method and its JSON), applies them through the node's [`Gateway`] like any
//! Control call, and marks them done only after the gateway accepted them, so a crash in
//! between applies them again; in cluster mode a push's idempotency key (the row's id or the
//! message's id by default) makes that second application a no-op on every node.
//!
//! This module owns what the sources share: the configuration ([`Spec`], checked before the
//! node binds), the commands ([`command`]), and the metrics ([`Metrics`]). The client libraries
//! (tokio-postgres, async-nats) are used here and nowhere else; the edge knows neither.

pub(crate) mod command;
mod metrics;
mod nats;
mod postgres;

use std::time::Duration;

use edge::{config::HumanDuration, Gateway};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};

pub use nats::Settings as NatsSettings;
pub use postgres::{schema as outbox_schema, Settings as PostgresSettings};

pub(crate) use metrics::Metrics;

/// One `[[consumers]]` table, checked.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The consumer's name: its metrics' `consumer` label and its logs' field.
    pub name: String,
    /// What it reads.
    pub source: Source,
}

/// Where a consumer reads its commands.
#[derive(Debug, Clone)]
pub enum Source {
    /// A PostgreSQL outbox table.
    Postgres(Box<PostgresSettings>),
    /// A NATS JetStream stream, through a durable pull consumer.
    Nats(NatsSettings),
}

/// A `[[consumers]]` table as written: the fields of every kind, each kind's read by its
/// module (`postgres::Settings::from_raw`, `nats::Settings::from_raw`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Raw {
    kind: String,
    name: Option<String>,
    // postgres (postgres::KEYS)
    pub(crate) dsn: Option<String>,
    pub(crate) dsn_env: Option<String>,
    pub(crate) ca_file: Option<std::path::PathBuf>,
    pub(crate) table: Option<String>,
    pub(crate) partitions: Option<u32>,
    pub(crate) rebalance_interval: Option<HumanDuration>,
    // nats (nats::KEYS)
    pub(crate) url: Option<String>,
    pub(crate) url_env: Option<String>,
    pub(crate) stream: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) durable: Option<String>,
    pub(crate) create: Option<bool>,
    pub(crate) ack_wait: Option<HumanDuration>,
    pub(crate) exclusive: Option<bool>,
    pub(crate) lease_ttl: Option<HumanDuration>,
    // every kind (COMMON_KEYS)
    pub(crate) poll_interval: Option<HumanDuration>,
    batch: Option<usize>,
    max_backoff: Option<HumanDuration>,
}

/// The keys every kind takes.
const COMMON_KEYS: &[&str] = &["kind", "name", "batch", "max-backoff", "poll-interval"];

/// What every kind's settings share, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Common {
    /// Commands read at once.
    pub(crate) batch: usize,
    /// The longest wait between retries.
    pub(crate) max_backoff: Duration,
}

/// A duration setting's value, or its default.
pub(crate) fn or(value: Option<HumanDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

/// The value of `value`, or of the environment variable named by `env` (credentials stay out
/// of the file that way).
pub(crate) fn from_env_or(
    what: &str,
    value: Option<String>,
    env: Option<String>,
    read: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    match (value, env) {
        (Some(_), Some(_)) => Err(format!("give `{what}` or `{what}-env`, not both")),
        (Some(v), None) => Ok(v),
        (None, Some(var)) => {
            read(&var).ok_or_else(|| format!("`{what}-env`: the variable {var} is not set"))
        }
        (None, None) => Err(format!("`{what}` (or `{what}-env`) is required")),
    }
}

impl Spec {
    /// Checks the `index`th `[[consumers]]` table; `env` reads environment variables.
    fn parse(
        index: usize,
        table: &toml::Table,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let raw: Raw = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_owned())?;
        let name = raw
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{index}", raw.kind));
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            // Part of a push's idempotency key and of the metrics' labels.
            return Err(format!(
                "`name` {name:?}: 1 to 64 letters, digits, `_`, `-` or `.`"
            ));
        }
        let batch = raw.batch.unwrap_or(500);
        if !(1..=10_000).contains(&batch) {
            return Err("`batch` must be 1 to 10000".into());
        }
        let max_backoff = or(raw.max_backoff, Duration::from_secs(5));
        if max_backoff < Duration::from_millis(10) {
            return Err("`max-backoff` must be at least 10ms".into());
        }
        let common = Common { batch, max_backoff };
        let own = match raw.kind.as_str() {
            "postgres" => postgres::KEYS,
            "nats" => nats::KEYS,
            other => {
                return Err(format!(
                    "unknown kind {other:?}: `postgres` or `nats` (the file's [[consumers]])"
                ))
            }
        };
        if let Some(key) = table
            .keys()
            .find(|key| !COMMON_KEYS.contains(&key.as_str()) && !own.contains(&key.as_str()))
        {
            return Err(format!("`{key}` is not a setting of kind {:?}", raw.kind));
        }
        let source = if raw.kind == "postgres" {
            Source::Postgres(Box::new(PostgresSettings::from_raw(raw, common, env)?))
        } else {
            Source::Nats(NatsSettings::from_raw(raw, common, env)?)
        };
        Ok(Self { name, source })
    }
}

/// Checks every `[[consumers]]` table of `config`, reading credentials named by `*-env` keys
/// from the environment; `channelgate serve` and [`crate::run`] call it before anything binds.
pub fn specs(config: &Config) -> Result<Vec<Spec>, ConfigError> {
    specs_with_env(config, &|var| std::env::var(var).ok())
}

fn specs_with_env(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Spec>, ConfigError> {
    let specs = config
        .consumers
        .0
        .iter()
        .enumerate()
        .map(|(i, table)| {
            Spec::parse(i, table, env)
                .map_err(|e| ConfigError::Invalid(format!("[[consumers]] number {}: {e}", i + 1)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            return Err(ConfigError::Invalid(format!(
                "[[consumers]]: two consumers are named {:?}",
                spec.name
            )));
        }
    }
    Ok(specs)
}

/// Starts every consumer on the node's task tracker; they stop taking new commands when `stop`
/// is cancelled (the node's drain waits for them to finish the batch in hand).
pub(crate) fn start(gateway: &Gateway, specs: Vec<Spec>, stop: &CancellationToken) {
    if specs.is_empty() {
        return;
    }
    let metrics = match Metrics::register(gateway) {
        Ok(metrics) => metrics,
        Err(err) => {
            // Only a second registration fails, which `run` never makes.
            tracing::error!(%err, "registering the consumers' metrics failed");
            Metrics::unregistered()
        }
    };
    for spec in specs {
        let (gateway, metrics, stop) = (gateway.clone(), metrics.clone(), stop.clone());
        tracing::info!(consumer = %spec.name, "starting consumer");
        match spec.source {
            Source::Postgres(settings) => {
                let consumer =
                    postgres::Consumer::new(spec.name, *settings, gateway.clone(), metrics);
                gateway.spawn(consumer.run(stop));
            }
            Source::Nats(settings) => {
                let consumer = nats::Consumer::new(spec.name, settings, gateway.clone(), metrics);
                gateway.spawn(consumer.run(stop));
            }
        }
    }
}

/// Doubling waits between retries, from 50 ms up to a ceiling; [`Backoff::reset`] after a
/// success.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST.min(max),
            max,
        }
    }

    /// The wait before the next retry (and doubles the one after).
    fn step(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }

    /// Waits the next step, or until `stop`; false when stopped.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let wait = self.step();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Spec>, String> {
        let settings = edge::config::Settings::parse_toml(text)?;
        let config = settings.into_config().map_err(|e| e.to_string())?;
        specs_with_env(&config, &|var| {
            (var == "OUTBOX_DSN").then(|| "host=db user=app".to_owned())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn consumers_are_read_from_the_file_with_defaults_and_credentials_from_the_environment() {
        let specs = parse(
            "[[consumers]]\nkind = \"postgres\"\ndsn-env = \"OUTBOX_DSN\"\npartitions = 4\n\
             [[consumers]]\nkind = \"nats\"\nname = \"events\"\nstream = \"EVENTS\"\nsubject = \"events.>\"\ncreate = true\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "postgres-0");
        let Source::Postgres(pg) = &specs[0].source else {
            panic!("postgres")
        };
        assert_eq!(pg.dsn(), "host=db user=app");
        assert_eq!(pg.table(), "channelgate_outbox");
        assert_eq!(pg.partitions(), 4);
        assert_eq!(specs[1].name, "events");
        assert!(matches!(specs[1].source, Source::Nats(_)));
    }

    #[test]
    fn bad_consumer_tables_are_refused_with_what_is_wrong() {
        let long_stream = format!(
            "[[consumers]]\nkind = \"nats\"\nstream = \"{}\"",
            "S".repeat(65)
        );
        for (bad, says) in [
            ("[[consumers]]\nkind = \"kafka\"", "unknown kind"),
            ("[[consumers]]\nkind = \"postgres\"", "`dsn`"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn-env = \"NOPE\"", "NOPE is not set"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\ndsn-env = \"OUTBOX_DSN\"", "not both"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\ntable = \"a;drop\"", "table"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\npartitions = 0", "partitions"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\nstream = \"S\"", "`stream` is not"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\nbatch = 0", "batch"),
            (
                "[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\nca-file = \"/etc/hostname\"",
                "needs sslmode=require",
            ),
            (
                "[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db sslmode=require\"\nca-file = \"/nonexistent.pem\"",
                "/nonexistent.pem",
            ),
            (
                "[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db sslmode=require\"\nca-file = \"/etc/hostname\"",
                "no certificate",
            ),
            ("[[consumers]]\nkind = \"nats\"", "`stream` is required"),
            ("[[consumers]]\nkind = \"nats\"\nstream = \"a.b\"", "stream"),
            (&long_stream, "at most 64"),
            (
                "[[consumers]]\nkind = \"nats\"\nstream = \"S\"\nexclusive = false\nlease-ttl = \"5s\"",
                "needs `exclusive`",
            ),
            ("[[consumers]]\nkind = \"nats\"\nstream = \"S\"\nlease-ttl = \"10ms\"", "lease-ttl"),
            ("[[consumers]]\nkind = \"postgres\"\ndsn = \"host=db\"\nexclusive = true", "`exclusive` is not"),
            ("[[consumers]]\nkind = \"nats\"\nstream = \"S\"\nname = \"my events\"", "`name`"),
            ("[[consumers]]\nkind = \"nats\"\nstream = \"S\"\nfoo = 1", "unknown field"),
            (
                "[[consumers]]\nkind = \"nats\"\nstream = \"S\"\n[[consumers]]\nkind = \"nats\"\nname = \"nats-0\"\nstream = \"T\"",
                "two consumers",
            ),
            ("consumers = 1", "[[consumers]]"),
        ] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(300));
        let waits: Vec<_> = (0..5).map(|_| b.step().as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 300, 300]);
        b.reset();
        assert_eq!(b.step().as_millis(), 50);
    }
}
