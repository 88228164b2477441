//! The PostgreSQL transactional outbox consumer.
//!
//! An application writes a command as a row of the outbox table in the same transaction as its
//! own data ([`schema`] prints the table). Rows carry a partition (`0..partitions`); order is
//! kept within a partition. Each partition is held by one node at a time through a
//! session-level advisory lock (`pg_try_advisory_lock(class, partition)`, the class a hash of
//! the table's name) taken on the connection that reads and deletes the partition's rows: when
//! a node dies, its connections close, PostgreSQL releases the locks, and other nodes take the
//! partitions over at their next try (every `rebalance-interval`). Nodes spread the partitions
//! evenly: each counts the nodes consuming the same table (their connections'
//! `application_name` in `pg_stat_activity`) and holds at most its share, giving back the extra
//! ones between batches.
//!
//! A partition's worker reads a batch in id order, applies each row through the gateway, then
//! deletes the batch's rows in one transaction (and moves the poison ones to `<table>_dead` with
//! their error). Rows applied whose delete failed are remembered and deleted first when the
//! node holds the partition again. In cluster mode, where another node may take the partition
//! over after a crash between applying and deleting, a push carries an idempotency key
//! (`<consumer name>:<id>` unless the row gives one) whose record in Redis makes the second
//! application a no-op; a single node keeps no records for its pushes (it would fill its
//! table of them at sustained rates, and they would die with it anyway). A transient
//! failure (Redis unavailable) stops the batch where it is and retries with back-off.
//!
//! New rows are picked up through `LISTEN`: the table's trigger sends the partition to the
//! channel named like the table, at commit, and the node's listening connection wakes that
//! partition's worker. Every worker also polls (`poll-interval`), in case a notification was
//! missed (a reconnect, a row inserted with the trigger disabled).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{types::ToSql, AsyncMessage, Client, NoTls, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use edge::Gateway;

use super::{
    command::{Command, Failure},
    metrics::Counts,
    Backoff, Metrics,
};

/// The outbox table's name unless the consumer's table says otherwise.
pub(crate) const DEFAULT_TABLE: &str = "channelgate_outbox";

/// Longest wait for any one statement; past it the connection is dropped (its locks go with
/// it) and opened again.
const STATEMENT_DEADLINE: Duration = Duration::from_secs(10);

/// The backlog gauge counts rows up to this many (beyond, it says this many).
const PENDING_COUNT_CAP: i64 = 100_000;

/// Most partitions a table may have.
const MAX_PARTITIONS: u32 = 1024;

/// A PostgreSQL consumer's settings, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    config: tokio_postgres::Config,
    /// With `sslmode=require`: TLS, the server's certificate verified against `ca-file` or the
    /// system's roots (as libpq's `verify-full`).
    tls: Option<Arc<rustls::ClientConfig>>,
    dsn: String,
    table: String,
    partitions: u32,
    batch: usize,
    poll: Duration,
    rebalance: Duration,
    max_backoff: Duration,
}

/// The keys of a `[[consumers]]` table of kind `postgres`, besides the common ones.
pub(crate) const KEYS: &[&str] = &[
    "dsn",
    "dsn-env",
    "ca-file",
    "table",
    "partitions",
    "rebalance-interval",
];

impl Settings {
    /// Checks a `postgres` table's settings (`common` checked already).
    pub(crate) fn from_raw(
        raw: super::Raw,
        common: super::Common,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let dsn = super::from_env_or("dsn", raw.dsn, raw.dsn_env, env)?;
        let ca_file = raw.ca_file;
        let table = raw.table.unwrap_or_else(|| DEFAULT_TABLE.to_owned());
        let partitions = raw.partitions.unwrap_or(8);
        let poll = super::or(raw.poll_interval, Duration::from_secs(1));
        let rebalance = super::or(raw.rebalance_interval, Duration::from_secs(1));
        let super::Common { batch, max_backoff } = common;
        let config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| format!("`dsn` does not parse: {e}"))?;
        let tls = match (config.get_ssl_mode(), ca_file) {
            (tokio_postgres::config::SslMode::Require, ca) => Some(tls_config(ca.as_deref())?),
            (_, Some(_)) => return Err("`ca-file` needs sslmode=require in `dsn`".into()),
            (_, None) => None,
        };
        if !valid_table(&table) {
            return Err(format!(
                "`table` {table:?}: lower-case letters, digits and `_`, at most 50 of them, \
                 optionally after a schema and a dot; 63 in all"
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(format!("`partitions` must be 1 to {MAX_PARTITIONS}"));
        }
        if poll < Duration::from_millis(10) || rebalance < Duration::from_millis(10) {
            return Err("`poll-interval` and `rebalance-interval` must be at least 10ms".into());
        }
        Ok(Self {
            config,
            tls,
            dsn,
            table,
            partitions,
            batch,
            poll,
            rebalance,
            max_backoff,
        })
    }

    /// The connection string.
    pub fn dsn(&self) -> &str {
        &self.dsn
    }

    /// The outbox table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// How many partitions the table's rows are spread over.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }
}

/// The TLS client configuration for `sslmode=require`: trust `ca_file`'s certificates (PEM),
/// or the system's roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("`ca-file` {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "`ca-file` {}: no certificate in it",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "sslmode=require and no `ca-file`, but the system has no root \
                            certificates"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A table name the consumer can put in SQL unquoted: `name` or `schema.name`, each part
/// lower-case ASCII letters, digits and `_` (not first a digit), the name at most 50 bytes so
/// `<name>_dead` and the index's name stay within PostgreSQL's 63, and the whole at most 63.
fn valid_table(table: &str) -> bool {
    let part = |p: &str, max: usize| {
        !p.is_empty()
            && p.len() <= max
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    // The whole name is also the NOTIFY channel's, which PostgreSQL refuses past 63 bytes (and
    // then the application's INSERT would fail in the trigger).
    table.len() <= 63
        && match table.split_once('.') {
            Some((schema, name)) => part(schema, 63) && part(name, 50),
            None => part(table, 50),
        }
}

/// The SQL that creates the outbox table `table`, its dead-letter table and its trigger
/// (`channelgate outbox-schema`). The gateway never runs it: an application's database
/// changes with the application's migrations.
pub fn schema(table: &str) -> Result<String, String> {
    if !valid_table(table) {
        return Err(format!(
            "{table:?}: lower-case letters, digits and `_` (at most 50), optionally after a \
             schema and a dot"
        ));
    }
    let name = table.rsplit('.').next().unwrap_or(table);
    Ok(format!(
        "-- The channelgate outbox. Write a row in the same transaction as your data; a node
-- applies it after COMMIT (a rolled-back row never existed) and deletes it.
--   partition: 0 to the consumer's `partitions` - 1; rows of one partition apply in id order
--   method:    push, send, disconnect, subscribe or unsubscribe
--   payload:   the method's fields (README, \"Publishing from your database\")
CREATE TABLE IF NOT EXISTS {table} (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition  integer NOT NULL DEFAULT 0 CHECK (partition >= 0),
    method     text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {name}_partition_id ON {table} (partition, id);

-- Rows that can never apply (unknown method, bad channel, payload too large), with why.
CREATE TABLE IF NOT EXISTS {table}_dead (
    id         bigint PRIMARY KEY,
    partition  integer NOT NULL,
    method     text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    error      text NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Wakes the partition's node at COMMIT (NOTIFY is transactional); nodes also poll.
CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{table}', NEW.partition::text);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER {name}_notify AFTER INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION {table}_notify();
"
    ))
}

/// FNV-1a: a stable 32-bit hash of the table's name (the advisory locks' class, and the tag in
/// `application_name` that lets nodes of one table count each other).
fn fnv32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A PostgreSQL outbox consumer of one node.
#[derive(Debug, Clone)]
pub(crate) struct Consumer(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    name: String,
    settings: Settings,
    gateway: Gateway,
    counts: Counts,
    /// `channelgate <table tag> <node tag>`: every connection of this node's consumer.
    application_name: String,
    /// What `application_name`s of this table's consumers start with.
    peers_like: String,
    /// The advisory locks' class.
    lock_class: i32,
    /// Partitions this node holds now.
    held: AtomicUsize,
    /// Partitions this node may hold: its share of the table's.
    share: AtomicUsize,
    /// One per partition: new rows (a notification).
    wake: Vec<Notify>,
    /// Whether pushes carry idempotency keys: in cluster mode, where another node may apply a
    /// row again after this one died, and the records are in Redis for every node to see.
    keyed: bool,
    /// One per partition: rows this node applied whose delete it did not see commit (the
    /// connection failed). When it holds the partition again, it deletes them before reading:
    /// without keys (one node), this is what keeps them from applying twice.
    unconfirmed: Vec<parking_lot::Mutex<Vec<i64>>>,
}

/// How holding a partition ended.
enum Ended {
    /// The node stops.
    Stopped,
    /// The node holds more than its share and gave this partition back.
    Released,
    /// The connection failed.
    Lost(String),
}

impl Consumer {
    pub(crate) fn new(
        name: String,
        settings: Settings,
        gateway: Gateway,
        metrics: Metrics,
    ) -> Self {
        let tag = fnv32(&settings.table);
        let node = rand::random::<u32>();
        Self(Arc::new(Inner {
            counts: metrics.of(&name),
            name,
            application_name: format!("channelgate {tag:08x} {node:08x}"),
            peers_like: format!("channelgate {tag:08x} %"),
            lock_class: tag as i32,
            held: AtomicUsize::new(0),
            share: AtomicUsize::new(settings.partitions as usize),
            wake: (0..settings.partitions).map(|_| Notify::new()).collect(),
            keyed: gateway.is_clustered(),
            unconfirmed: (0..settings.partitions)
                .map(|_| parking_lot::Mutex::new(Vec::new()))
                .collect(),
            settings,
            gateway,
        }))
    }

    /// Runs the listening connection and one worker per partition until `stop`.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().listen(stop.clone()));
        for partition in 0..self.0.settings.partitions {
            tasks.spawn(self.clone().partition(partition, stop.clone()));
        }
        while tasks.join_next().await.is_some() {}
        tracing::info!(consumer = %self.0.name, "consumer stopped");
    }

    /// Opens a connection; its notifications (only the listening connection asks for any) go
    /// to the receiver, which ends when the connection does.
    async fn connect(&self) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), String> {
        let mut config = self.0.settings.config.clone();
        config
            .application_name(self.0.application_name.clone())
            .connect_timeout(STATEMENT_DEADLINE)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(STATEMENT_DEADLINE);
        let (tx, rx) = mpsc::unbounded_channel();
        let name = self.0.name.clone();
        let client = match &self.0.settings.tls {
            None => {
                let (client, connection) = deadline(config.connect(NoTls)).await?;
                tokio::spawn(drive(connection, tx, name));
                client
            }
            Some(tls) => {
                let tls = MakeRustlsConnect::new(rustls::ClientConfig::clone(tls));
                let (client, connection) = deadline(config.connect(tls)).await?;
                tokio::spawn(drive(connection, tx, name));
                client
            }
        };
        Ok((client, rx))
    }

    /// The listening connection: wakes partitions on notifications and, every
    /// `rebalance-interval`, counts the table's nodes (this node's share) and the backlog.
    async fn listen(self, stop: CancellationToken) {
        let s = &self.0.settings;
        let mut backoff = Backoff::new(s.max_backoff);
        loop {
            let failure = match self.connect().await {
                Ok((client, notifications)) => {
                    backoff.reset();
                    let failure = self.listening(&client, notifications, &stop).await;
                    if stop.is_cancelled() {
                        return;
                    }
                    failure
                }
                Err(err) => err,
            };
            self.0.counts.connected.set(0);
            tracing::warn!(consumer = %self.0.name, error = %failure, "outbox: PostgreSQL unreachable; retrying");
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }

    async fn listening(
        &self,
        client: &Client,
        mut notifications: mpsc::UnboundedReceiver<Notification>,
        stop: &CancellationToken,
    ) -> String {
        let s = &self.0.settings;
        if let Err(err) = deadline(client.batch_execute(&format!("LISTEN \"{}\"", s.table))).await {
            return err;
        }
        self.0.counts.connected.set(1);
        // Rows may have come while nobody listened.
        self.0.wake.iter().for_each(Notify::notify_one);
        let mut tick = tokio::time::interval(s.rebalance);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return String::new(),
                n = notifications.recv() => match n {
                    Some(n) => {
                        if let Some(wake) = n.payload().parse::<usize>().ok().and_then(|p| self.0.wake.get(p)) {
                            wake.notify_one();
                        }
                    }
                    None => return "the listening connection closed".into(),
                },
                _ = tick.tick() => {
                    if let Err(err) = self.survey(client).await {
                        return err;
                    }
                }
            }
        }
    }

    /// Counts the table's nodes (this one's share of the partitions) and its backlog.
    async fn survey(&self, client: &Client) -> Result<(), String> {
        let s = &self.0.settings;
        let row = deadline(client.query_one(
            // Advisory locks are per database, and so are the peers: nodes consuming a table
            // of the same name in another database of the server are not.
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE $1",
            &[&self.0.peers_like],
        ))
        .await?;
        let nodes = row.get::<_, i64>(0).max(1) as usize;
        let share = (s.partitions as usize).div_ceil(nodes);
        if self.0.share.swap(share, Ordering::Relaxed) != share {
            tracing::info!(consumer = %self.0.name, nodes, share, "outbox: partitions per node");
        }
        // Bounded work however long the backlog: the count stops at PENDING_COUNT_CAP rows, the
        // oldest row is the first by id (the primary key), and rows outside the partitions are
        // a range of the (partition, id) index.
        let row = deadline(client.query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT {PENDING_COUNT_CAP}) AS capped), \
                 COALESCE((SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 \
                           FROM {t} ORDER BY id LIMIT 1), 0), \
                 (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE partition >= $1 LIMIT {PENDING_COUNT_CAP}) AS outside)",
                t = s.table
            ),
            &[&(s.partitions as i32)],
        ))
        .await?;
        let (pending, oldest, outside) = (
            row.get::<_, i64>(0),
            row.get::<_, f64>(1),
            row.get::<_, i64>(2),
        );
        self.0.counts.pending.set(pending);
        self.0.counts.oldest.set(oldest);
        self.0.counts.stranded.set(outside);
        if outside > 0 {
            tracing::warn!(
                consumer = %self.0.name, rows = outside, partitions = s.partitions,
                "outbox: rows in partitions no node reads (partition must be below `partitions`)"
            );
        }
        Ok(())
    }

    /// One partition's worker: takes the partition's lock when this node is under its share
    /// and the lock is free, then applies its rows until it stops, gives it back, or loses the
    /// connection.
    async fn partition(self, partition: u32, stop: CancellationToken) {
        let s = &self.0.settings;
        let mut backoff = Backoff::new(s.max_backoff);
        while !stop.is_cancelled() {
            if self.0.held.load(Ordering::Relaxed) >= self.0.share.load(Ordering::Relaxed) {
                if !pause(s.rebalance, &stop).await {
                    return;
                }
                continue;
            }
            let taken = async {
                let (client, _) = self.connect().await?;
                let took = self.take(&client, partition, &stop).await?;
                Ok::<_, String>(took.then_some(client))
            };
            let mut client = match taken.await {
                Ok(Some(client)) => client,
                Ok(None) => continue,
                Err(err) => {
                    tracing::debug!(consumer = %self.0.name, partition, error = %err, "outbox: taking the partition failed");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            self.0.held.fetch_add(1, Ordering::Relaxed);
            self.0.counts.partitions.inc();
            tracing::info!(consumer = %self.0.name, partition, "outbox: holding partition");
            let ended = self.hold(&mut client, partition, &stop, &mut backoff).await;
            self.0.counts.partitions.dec();
            match ended {
                Ended::Stopped => {
                    self.0.held.fetch_sub(1, Ordering::Relaxed);
                    // Closing the connection releases the lock.
                    return;
                }
                Ended::Released => {
                    // `hold` already counted it out.
                    let _ = deadline(client.execute(
                        "SELECT pg_advisory_unlock($1, $2)",
                        &[&self.0.lock_class, &(partition as i32)],
                    ))
                    .await;
                    tracing::info!(consumer = %self.0.name, partition, "outbox: gave the partition back");
                }
                Ended::Lost(err) => {
                    self.0.held.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(consumer = %self.0.name, partition, error = %err, "outbox: lost the partition's connection; retrying");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// Tries the partition's lock on `client` until taken (true), the node is at its share
    /// (false), or `stop` (false).
    async fn take(
        &self,
        client: &Client,
        partition: u32,
        stop: &CancellationToken,
    ) -> Result<bool, String> {
        loop {
            if stop.is_cancelled()
                || self.0.held.load(Ordering::Relaxed) >= self.0.share.load(Ordering::Relaxed)
            {
                return Ok(false);
            }
            let row = deadline(client.query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&self.0.lock_class, &(partition as i32)],
            ))
            .await?;
            if row.get::<_, bool>(0) {
                return Ok(true);
            }
            if !pause(self.0.settings.rebalance, stop).await {
                return Ok(false);
            }
        }
    }

    /// Applies the partition's rows, batch after batch, while this node holds it.
    async fn hold(
        &self,
        client: &mut Client,
        partition: u32,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Ended {
        let s = &self.0.settings;
        let prepared = async {
            let select = client
                .prepare(&format!(
                    "SELECT id, method, payload::text FROM {} WHERE partition = $1 \
                     ORDER BY id LIMIT $2",
                    s.table
                ))
                .await?;
            let delete = client
                .prepare(&format!("DELETE FROM {} WHERE id = ANY($1)", s.table))
                .await?;
            Ok((select, delete))
        };
        let (select, delete) = match deadline(prepared).await {
            Ok(statements) => statements,
            Err(err) => return Ended::Lost(err),
        };
        let p = partition as i32;
        let limit = s.batch as i64;
        let unconfirmed = &self.0.unconfirmed[partition as usize];
        let applied_before = std::mem::take(&mut *unconfirmed.lock());
        if !applied_before.is_empty() {
            tracing::info!(
                consumer = %self.0.name, partition, rows = applied_before.len(),
                "outbox: deleting rows applied before the connection failed"
            );
            if let Err(err) = self.finish(client, &applied_before, &[]).await {
                *unconfirmed.lock() = applied_before;
                return Ended::Lost(err);
            }
        }
        // The next batch, when it was read along with the last one's delete.
        let mut read_ahead = None;
        loop {
            if stop.is_cancelled() {
                return Ended::Stopped;
            }
            let over = self
                .0
                .held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    (held > self.0.share.load(Ordering::Relaxed)).then(|| held - 1)
                });
            if over.is_ok() {
                return Ended::Released;
            }
            let rows = match read_ahead.take() {
                Some(rows) => rows,
                None => match deadline(client.query(&select, &[&p, &limit])).await {
                    Ok(rows) => rows,
                    Err(err) => return Ended::Lost(err),
                },
            };
            if rows.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return Ended::Stopped,
                    _ = self.0.wake[partition as usize].notified() => {}
                    _ = tokio::time::sleep(s.poll) => {}
                }
                continue;
            }
            self.0.counts.batch(rows.len());
            let mut done = Vec::with_capacity(rows.len());
            let mut dead = Vec::new();
            let mut transient = None;
            for row in &rows {
                let id: i64 = row.get(0);
                let method: &str = row.get(1);
                let payload: &str = row.get(2);
                // The consumer's name, not the table's: two services' outboxes of the same
                // table name, on other databases, feed one gateway without their ids colliding.
                let key = self.0.keyed.then(|| format!("{}:{id}", self.0.name));
                let applied = match Command::parse(method, payload) {
                    Ok(command) => command.apply(&self.0.gateway, key.as_deref()).await,
                    Err(failure) => Err(failure),
                };
                match applied {
                    Ok(()) => done.push(id),
                    Err(failure @ Failure::Poison { .. }) => {
                        self.0.counts.failed(failure.reason());
                        tracing::warn!(
                            consumer = %self.0.name, partition, id, method, error = %failure,
                            "outbox: row can never apply; moved to the dead-letter table"
                        );
                        dead.push((id, failure.to_string()));
                    }
                    Err(failure @ Failure::Transient(_)) => {
                        self.0.counts.failed(failure.reason());
                        transient = Some(failure);
                        break;
                    }
                }
            }
            if dead.is_empty() && transient.is_none() {
                // The common case: delete the batch and read the next in one round trip (the
                // two statements go down the connection together, and run in that order).
                let (ids, next): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) =
                    ([&done], [&p, &limit]);
                let both = async {
                    tokio::join!(client.execute(&delete, &ids), client.query(&select, &next))
                };
                match tokio::time::timeout(STATEMENT_DEADLINE, both).await {
                    Ok((Ok(_), Ok(next))) => read_ahead = Some(next),
                    Ok((Ok(_), Err(err))) => {
                        self.0.counts.applied.inc_by(done.len() as u64);
                        return Ended::Lost(error_text(&err));
                    }
                    Ok((Err(err), _)) => {
                        *unconfirmed.lock() = done;
                        return Ended::Lost(error_text(&err));
                    }
                    Err(_) => {
                        *unconfirmed.lock() = done;
                        return Ended::Lost(format!("no answer within {STATEMENT_DEADLINE:?}"));
                    }
                }
            } else if let Err(err) = self.finish(client, &done, &dead).await {
                *unconfirmed.lock() = done;
                return Ended::Lost(err);
            }
            self.0.counts.applied.inc_by(done.len() as u64);
            match transient {
                Some(failure) => {
                    tracing::warn!(
                        consumer = %self.0.name, partition, error = %failure,
                        "outbox: the gateway cannot apply rows now; retrying"
                    );
                    if !backoff.wait(stop).await {
                        return Ended::Stopped;
                    }
                }
                None => backoff.reset(),
            }
        }
    }

    /// Deletes the applied rows and moves the dead ones aside, in one transaction.
    async fn finish(
        &self,
        client: &mut Client,
        done: &[i64],
        dead: &[(i64, String)],
    ) -> Result<(), String> {
        if done.is_empty() && dead.is_empty() {
            return Ok(());
        }
        let table = &self.0.settings.table;
        let work = async {
            let tx = client.transaction().await?;
            for (id, error) in dead {
                tx.execute(
                    &format!(
                        "INSERT INTO {table}_dead (id, partition, method, payload, created_at, error) \
                         SELECT id, partition, method, payload, created_at, $2 FROM {table} WHERE id = $1 \
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    &[id, error],
                )
                .await?;
            }
            let ids: Vec<i64> = done
                .iter()
                .copied()
                .chain(dead.iter().map(|(id, _)| *id))
                .collect();
            tx.execute(&format!("DELETE FROM {table} WHERE id = ANY($1)"), &[&ids])
                .await?;
            tx.commit().await
        };
        deadline(work).await
    }
}

/// Runs a connection until it ends, passing its notifications on.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notifications: mpsc::UnboundedSender<Notification>,
    name: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                let _ = notifications.send(n);
            }
            Ok(AsyncMessage::Notice(notice)) => {
                tracing::debug!(consumer = %name, %notice, "PostgreSQL notice");
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(consumer = %name, %err, "PostgreSQL connection ended");
                break;
            }
        }
    }
}

/// Waits `wait`, or until `stop`; false when stopped.
async fn pause(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Runs a PostgreSQL call within [`STATEMENT_DEADLINE`].
async fn deadline<T>(
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(STATEMENT_DEADLINE, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(error_text(&err)),
        Err(_) => Err(format!("no answer within {STATEMENT_DEADLINE:?}")),
    }
}

/// A PostgreSQL error with its server message (tokio-postgres' `Display` says only "db error").
fn error_text(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["channelgate_outbox", "app.outbox", "_x1"] {
            assert!(valid_table(good), "{good}");
        }
        for bad in [
            "",
            "Outbox",
            "1x",
            "a;drop",
            "a.b.c",
            "a b",
            &"x".repeat(51),
            "a.",
            &format!("{}.{}", "s".repeat(20), "t".repeat(43)),
        ] {
            assert!(!valid_table(bad), "{bad}");
        }
        assert!(schema("a;drop").is_err());
        let sql = schema("app.outbox").unwrap();
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS app.outbox_dead"));
        assert!(sql.contains("outbox_partition_id ON app.outbox"));
    }
}
