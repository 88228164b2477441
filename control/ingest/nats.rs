//! The NATS JetStream consumer: a durable pull consumer on a stream (and a filter subject),
//! created with the stream when absent if the configuration says `create = true`.
//!
//! A message's `Channelgate-Method` header names the method and its body is the method's JSON
//! (as an outbox row's payload). The consumer takes what is there (up to `batch`, without
//! waiting) or, when nothing is, waits for the next message; it applies a batch in order, one
//! message at a time, and acks each after the gateway accepted it. In cluster mode a push's
//! idempotency key is the message's `Nats-Msg-Id` header, or `<stream>:<stream's creation
//! time>:<sequence>`, so a message delivered again after a node's crash applies once; a single
//! node keeps no records and acks a delivery of a sequence it already applied. A transient failure (Redis unavailable)
//! is retried in place with back-off while the batch's messages get progress acks: a nak would
//! let newer messages overtake it (measured: the stall test saw 8 before 4). A message that can
//! never apply is terminated (`+TERM`), logged and counted. A node that stops naks what it had
//! not applied, for another node to take at once.
//!
//! One node at a time (`exclusive`, the default): a lease in a KV bucket decides which node
//! consumes ([`Lease`]); a node that takes over waits out `ack-wait` when the dead holder left
//! deliveries in flight, so they come again before newer messages.
//!
//! Recovery: the client reconnects by itself; a pull or an info call that fails (the consumer
//! or the stream was deleted, NATS restarted) makes the consumer look its consumer up again,
//! and create it again when `create = true`, starting after the last message it applied (from
//! the start when the stream itself is new).

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    AckKind,
};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use edge::Gateway;

use super::{
    command::{Command, Failure},
    metrics::Counts,
    Backoff, Metrics,
};

/// The header that names a message's method.
pub(crate) const METHOD_HEADER: &str = "Channelgate-Method";

/// Longest wait for a connection or a JetStream API call.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// A NATS consumer's settings, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    url: String,
    stream: String,
    subject: Option<String>,
    durable: String,
    create: bool,
    batch: usize,
    ack_wait: Duration,
    poll: Duration,
    max_backoff: Duration,
    /// `exclusive` (the default): one node at a time consumes, holding a lease this long.
    lease: Option<Duration>,
}

/// The keys of a `[[consumers]]` table of kind `nats`, besides the common ones.
pub(crate) const KEYS: &[&str] = &[
    "url",
    "url-env",
    "stream",
    "subject",
    "durable",
    "create",
    "ack-wait",
    "exclusive",
    "lease-ttl",
];

impl Settings {
    /// Checks a `nats` table's settings (`common` checked already).
    pub(crate) fn from_raw(
        raw: super::Raw,
        common: super::Common,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let url = match (raw.url, raw.url_env) {
            (None, None) => "nats://127.0.0.1:4222".to_owned(),
            (url, var) => super::from_env_or("url", url, var, env)?,
        };
        let stream = raw.stream.ok_or("`stream` is required")?;
        let subject = raw.subject;
        let durable = raw.durable.unwrap_or_else(|| "channelgate".to_owned());
        let create = raw.create.unwrap_or(false);
        let ack_wait = super::or(raw.ack_wait, Duration::from_secs(30));
        let poll = super::or(raw.poll_interval, Duration::from_secs(1));
        let lease = match (raw.exclusive.unwrap_or(true), raw.lease_ttl) {
            (true, ttl) => Some(super::or(ttl, Duration::from_secs(10))),
            (false, None) => None,
            (false, Some(_)) => return Err("`lease-ttl` needs `exclusive`".into()),
        };
        let super::Common { batch, max_backoff } = common;
        let name = |what: &str, n: &str| {
            if n.is_empty()
                || n.len() > 200
                || n.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
                })
            {
                Err(format!(
                    "`{what}` {n:?}: a NATS name, without spaces, `.`, `*`, `>`, `/`"
                ))
            } else {
                Ok(())
            }
        };
        name("stream", &stream)?;
        if stream.len() > 64 {
            // It is part of a push's idempotency key (at most 128 bytes).
            return Err(format!("`stream` {stream:?}: at most 64 characters"));
        }
        name("durable", &durable)?;
        if let Some(subject) = &subject {
            if subject.is_empty() || subject.chars().any(char::is_whitespace) {
                return Err(format!(
                    "`subject` {subject:?}: a NATS subject, without spaces"
                ));
            }
        }
        if create && subject.is_none() {
            return Err("`create = true` needs `subject` (the stream's subjects)".into());
        }
        if ack_wait < Duration::from_secs(1) {
            return Err("`ack-wait` must be at least 1s".into());
        }
        if poll < Duration::from_millis(100) {
            return Err("`poll-interval` must be at least 100ms for NATS".into());
        }
        if lease.is_some_and(|ttl| ttl < Duration::from_secs(1)) {
            return Err("`lease-ttl` must be at least 1s".into());
        }
        Ok(Self {
            url,
            stream,
            subject,
            durable,
            create,
            batch,
            ack_wait,
            poll,
            max_backoff,
            lease,
        })
    }
}

/// This node's hold on a consumer (`exclusive`): the key `holder` of the KV bucket
/// `channelgate_lease_<stream>_<durable>`, whose entries age out after the lease's time. The
/// first node to create the key holds it and renews it (a compare-and-set on its revision)
/// every third of that time; when it stops renewing (it died, or lost NATS), the key ages out
/// and another node creates it.
#[derive(Debug)]
struct Lease {
    store: async_nats::jetstream::kv::Store,
    revision: u64,
    renewed: tokio::time::Instant,
}

/// The lease's key in its bucket.
const LEASE_KEY: &str = "holder";

/// The lease bucket's name for `stream` and `durable` (letters, digits, `_` and `-` only).
fn lease_bucket(stream: &str, durable: &str) -> String {
    format!("channelgate_lease_{stream}_{durable}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A JetStream consumer of one node.
#[derive(Debug)]
pub(crate) struct Consumer {
    name: String,
    settings: Settings,
    gateway: Gateway,
    counts: Counts,
    /// The stream's creation time and the last sequence applied: where a consumer created again
    /// starts, and (one node) which deliveries are of messages it already applied.
    resume: Option<(i128, u64)>,
    /// Whether pushes carry idempotency keys (cluster mode: nodes share a durable consumer and
    /// see each other's records in Redis).
    keyed: bool,
    /// This node's id in the lease's value.
    node: String,
    /// The lease, while this node holds it.
    lease: Option<Lease>,
}

impl Consumer {
    pub(crate) fn new(
        name: String,
        settings: Settings,
        gateway: Gateway,
        metrics: Metrics,
    ) -> Self {
        Self {
            counts: metrics.of(&name),
            keyed: gateway.is_clustered(),
            node: format!("{:016x}", rand::random::<u64>()),
            lease: None,
            name,
            settings,
            gateway,
            resume: None,
        }
    }

    /// Connects, then consumes until `stop`, finding (or creating) its consumer again after
    /// every failure.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let client = loop {
            let (connected, name) = (self.counts.connected.clone(), self.name.clone());
            let connect = async_nats::ConnectOptions::new()
                .name(format!("channelgate {}", self.name))
                // The client reconnects by itself; the metric and the log follow it.
                .event_callback(move |event| {
                    let (connected, name) = (connected.clone(), name.clone());
                    async move {
                        match event {
                            async_nats::Event::Disconnected => {
                                connected.set(0);
                                tracing::warn!(consumer = %name, "JetStream: disconnected from NATS; reconnecting");
                            }
                            async_nats::Event::Connected => {
                                tracing::info!(consumer = %name, "JetStream: connected to NATS");
                            }
                            other => tracing::debug!(consumer = %name, event = %other, "JetStream: NATS event"),
                        }
                    }
                })
                .connection_timeout(CALL_DEADLINE)
                .connect(self.settings.url.as_str());
            match tokio::time::timeout(CALL_DEADLINE, connect).await {
                Ok(Ok(client)) => break client,
                Ok(Err(err)) => self.unreachable(&err.to_string()),
                Err(_) => self.unreachable("no answer"),
            }
            if !backoff.wait(&stop).await {
                return;
            }
        };
        let js = jetstream::new(client.clone());
        while !stop.is_cancelled() {
            if client.connection_state() != State::Connected {
                // Calls would wait out their deadline; the client is reconnecting.
                self.counts.connected.set(0);
                if !backoff.wait(&stop).await {
                    break;
                }
                continue;
            }
            match self.consumer(&js).await {
                Ok(consumer) => {
                    self.counts.connected.set(1);
                    backoff.reset();
                    match self.take_lease(&js, &consumer, &stop).await {
                        Ok(true) => {
                            let failure =
                                self.consume(&client, &consumer, &stop, &mut backoff).await;
                            if stop.is_cancelled() {
                                break;
                            }
                            self.unreachable(&failure);
                        }
                        Ok(false) => break,
                        Err(err) => self.unreachable(&err),
                    }
                }
                Err(err) => self.unreachable(&err),
            }
            if !backoff.wait(&stop).await {
                break;
            }
        }
        if let Some(lease) = self.lease.take() {
            // Let another node take over now rather than when the lease ages out.
            let gone = lease
                .store
                .delete_expect_revision(LEASE_KEY, Some(lease.revision));
            let _ = tokio::time::timeout(CALL_DEADLINE, gone).await;
            self.counts.partitions.set(0);
        }
        tracing::info!(consumer = %self.name, "consumer stopped");
    }

    /// With `exclusive`, waits until this node holds the consumer's lease (true), or `stop`
    /// (false). A node that takes over waits out `ack-wait` when the consumer has deliveries
    /// in flight (the previous holder's), so they are delivered again before newer messages.
    async fn take_lease(
        &mut self,
        js: &jetstream::Context,
        consumer: &PullConsumer,
        stop: &CancellationToken,
    ) -> Result<bool, String> {
        let Some(ttl) = self.settings.lease else {
            return Ok(true);
        };
        if self.lease.is_some() {
            return Ok(true);
        }
        let bucket = lease_bucket(&self.settings.stream, &self.settings.durable);
        // The bucket's stream, made as the KV API would (its own `create_key_value` first asks
        // for the account's limits, whose answer it misreads from nats-server 2.9).
        let config = jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        };
        let lookup = async {
            js.get_or_create_stream(config)
                .await
                .map_err(|e| e.to_string())?;
            js.get_key_value(bucket).await.map_err(|e| e.to_string())
        };
        let store = tokio::time::timeout(CALL_DEADLINE, lookup)
            .await
            .map_err(|_| format!("the lease bucket: no answer within {CALL_DEADLINE:?}"))?
            .map_err(|e| format!("the lease bucket: {e}"))?;
        let mut waiting = false;
        loop {
            let created = tokio::time::timeout(
                CALL_DEADLINE,
                store.create(LEASE_KEY, self.node.clone().into()),
            )
            .await
            .map_err(|_| format!("the lease: no answer within {CALL_DEADLINE:?}"))?;
            let revision = match created {
                Ok(revision) => Some(revision),
                Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                    // Ours still, from before a reconnect?
                    match store.entry(LEASE_KEY).await {
                        Ok(Some(entry)) if entry.value == self.node.as_bytes() => {
                            Some(entry.revision)
                        }
                        Ok(_) => None,
                        Err(e) => return Err(format!("the lease: {e}")),
                    }
                }
                Err(e) => return Err(format!("the lease: {e}")),
            };
            if let Some(revision) = revision {
                self.lease = Some(Lease {
                    store,
                    revision,
                    renewed: tokio::time::Instant::now(),
                });
                self.counts.partitions.set(1);
                tracing::info!(consumer = %self.name, "JetStream: this node consumes (it holds the lease)");
                let info = tokio::time::timeout(CALL_DEADLINE, consumer.get_info())
                    .await
                    .map_err(|_| format!("consumer info: no answer within {CALL_DEADLINE:?}"))?
                    .map_err(|e| format!("consumer info: {e}"))?;
                if info.num_ack_pending > 0 {
                    tracing::info!(
                        consumer = %self.name, in_flight = info.num_ack_pending,
                        "JetStream: waiting out ack-wait for the previous holder's deliveries"
                    );
                    let wait = self.settings.ack_wait;
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(false),
                        _ = self.hold_lease_for(wait) => {}
                    }
                }
                return Ok(true);
            }
            if !waiting {
                tracing::info!(consumer = %self.name, "JetStream: another node consumes; standing by");
                waiting = true;
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep((ttl / 4).min(Duration::from_secs(1))) => {}
            }
        }
    }

    /// Keeps the lease renewed for `wait`.
    async fn hold_lease_for(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            if self.keep_lease().await.is_err() {
                return;
            }
            let step = tokio::time::Instant::now() + Duration::from_millis(500);
            tokio::time::sleep_until(until.min(step)).await;
        }
    }

    /// Renews the lease when a third of its time has passed; an error when it is lost (another
    /// node may consume now).
    async fn keep_lease(&mut self) -> Result<(), String> {
        let (Some(ttl), Some(lease)) = (self.settings.lease, self.lease.as_mut()) else {
            return Ok(());
        };
        if lease.renewed.elapsed() < ttl / 3 {
            return Ok(());
        }
        let renew = lease
            .store
            .update(LEASE_KEY, self.node.clone().into(), lease.revision);
        match tokio::time::timeout(CALL_DEADLINE.min(ttl / 3), renew).await {
            Ok(Ok(revision)) => {
                lease.revision = revision;
                lease.renewed = tokio::time::Instant::now();
                Ok(())
            }
            failed => {
                self.lease = None;
                self.counts.partitions.set(0);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".into(),
                };
                Err(format!("lost the lease: {why}"))
            }
        }
    }

    fn unreachable(&self, why: &str) {
        self.counts.connected.set(0);
        tracing::warn!(consumer = %self.name, error = %why, "JetStream: consumer unavailable; retrying");
    }

    /// Looks the durable consumer up; when `create`, makes the stream and the consumer first
    /// if they are missing.
    async fn consumer(&mut self, js: &jetstream::Context) -> Result<PullConsumer, String> {
        let s = &self.settings;
        let within =
            |what: &'static str| move |_| format!("{what}: no answer within {CALL_DEADLINE:?}");
        let mut stream = if s.create {
            let config = jetstream::stream::Config {
                name: s.stream.clone(),
                subjects: s.subject.iter().cloned().collect(),
                ..Default::default()
            };
            tokio::time::timeout(CALL_DEADLINE, js.get_or_create_stream(config))
                .await
                .map_err(within("the stream"))?
                .map_err(|e| format!("the stream {:?}: {e}", s.stream))?
        } else {
            tokio::time::timeout(CALL_DEADLINE, js.get_stream(&s.stream))
                .await
                .map_err(within("the stream"))?
                .map_err(|e| format!("the stream {:?}: {e}", s.stream))?
        };
        let created = stream
            .info()
            .await
            .map_err(|e| format!("the stream {:?}: {e}", s.stream))?
            .created
            .unix_timestamp_nanos();
        let lookup = if s.create {
            // Start after the last message applied, unless the stream itself is new.
            let deliver_policy = match self.resume {
                Some((at, last)) if at == created => DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                },
                _ => DeliverPolicy::All,
            };
            let config = pull::Config {
                durable_name: Some(s.durable.clone()),
                filter_subject: s.subject.clone().unwrap_or_default(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: s.ack_wait,
                deliver_policy,
                ..Default::default()
            };
            tokio::time::timeout(
                CALL_DEADLINE,
                stream.get_or_create_consumer(&s.durable, config),
            )
            .await
            .map_err(within("the consumer"))?
            .map_err(|e| format!("the consumer {:?}: {e}", s.durable))?
        } else {
            tokio::time::timeout(CALL_DEADLINE, stream.get_consumer(&s.durable))
                .await
                .map_err(within("the consumer"))?
                .map_err(|e| format!("the consumer {:?}: {e}", s.durable))?
        };
        let consumer: PullConsumer = lookup;
        if self.resume.is_some_and(|(at, _)| at != created) {
            tracing::warn!(consumer = %self.name, stream = %s.stream, "JetStream: the stream is new; consuming it from its start");
        }
        self.resume = Some((
            created,
            self.resume
                .filter(|(at, _)| *at == created)
                .map_or(0, |(_, l)| l),
        ));
        tracing::info!(consumer = %self.name, stream = %s.stream, durable = %s.durable, "JetStream: consuming");
        Ok(consumer)
    }

    /// Pulls and applies batches until a call fails (returned) or `stop`: what the consumer has
    /// now (up to `batch`, without waiting), or, when it has nothing, the next message as soon
    /// as it comes (up to `poll-interval`). A batch is taken whole before it is applied, so no
    /// message waits in the client while another is being applied.
    async fn consume(
        &mut self,
        client: &async_nats::Client,
        consumer: &PullConsumer,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> String {
        let batch = self.settings.batch;
        loop {
            if client.connection_state() != State::Connected {
                return "disconnected from NATS".into();
            }
            if let Err(lost) = self.keep_lease().await {
                return lost;
            }
            let mut messages = match self.pull(consumer, batch, false, stop).await {
                Ok(messages) => messages,
                Err(failed) => return failed,
            };
            if messages.is_empty() {
                messages = match self.pull(consumer, 1, true, stop).await {
                    Ok(messages) => messages,
                    Err(failed) => return failed,
                };
            }
            if stop.is_cancelled() {
                self.give_back(&messages).await;
                return String::new();
            }
            if messages.is_empty() {
                // Idle: the consumer's state, which also finds a consumer deleted under us
                // (a pull from a missing consumer just ends empty).
                match tokio::time::timeout(CALL_DEADLINE, consumer.get_info()).await {
                    Ok(Ok(info)) => {
                        self.counts
                            .pending
                            .set((info.num_pending as usize + info.num_ack_pending) as i64);
                        self.counts.oldest.set(0.0);
                    }
                    Ok(Err(err)) => return format!("consumer info: {err}"),
                    Err(_) => return format!("consumer info: no answer within {CALL_DEADLINE:?}"),
                }
                continue;
            }
            self.counts.batch(messages.len());
            for i in 0..messages.len() {
                if !self
                    .apply(&messages[i], &messages[i + 1..], backoff, stop)
                    .await
                {
                    self.give_back(&messages[i..]).await;
                    if stop.is_cancelled() {
                        return String::new();
                    }
                    return "lost the lease while retrying".into();
                }
            }
        }
    }

    /// One pull of up to `max` messages: waiting up to `poll-interval` for the first when
    /// `wait`, else only what the consumer has now.
    async fn pull(
        &self,
        consumer: &PullConsumer,
        max: usize,
        wait: bool,
        stop: &CancellationToken,
    ) -> Result<Vec<jetstream::Message>, String> {
        let poll = self.settings.poll;
        let pull = async {
            if wait {
                consumer
                    .batch()
                    .max_messages(max)
                    .expires(poll)
                    .messages()
                    .await
            } else {
                consumer
                    .fetch()
                    .max_messages(max)
                    .expires(poll)
                    .messages()
                    .await
            }
        };
        let mut batch = tokio::select! {
            _ = stop.cancelled() => return Ok(Vec::new()),
            pulled = tokio::time::timeout(CALL_DEADLINE, pull) => match pulled {
                Ok(Ok(batch)) => batch,
                Ok(Err(err)) => return Err(format!("pull: {err}")),
                Err(_) => return Err(format!("pull: no answer within {CALL_DEADLINE:?}")),
            },
        };
        // The server ends a pull at its expiry with a status message; when that message does
        // not come (seen with nats-server 2.9), the client would wait 5 s more. The server sends
        // nothing for a pull past its expiry, so the pull is let go a little after it.
        let ends = tokio::time::Instant::now() + poll + Duration::from_millis(250);
        let mut messages = Vec::new();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = tokio::time::timeout_at(ends, batch.next()) => next,
            };
            match next {
                Ok(None) => break,
                Ok(Some(Ok(message))) => messages.push(message),
                Ok(Some(Err(err))) if messages.is_empty() => return Err(format!("pull: {err}")),
                Ok(Some(Err(err))) => {
                    // Apply what came; the next pull reports the failure again if it lasts.
                    tracing::debug!(consumer = %self.name, %err, "JetStream: a pull ended early");
                    break;
                }
                Err(_) => {
                    tracing::debug!(consumer = %self.name, "JetStream: the pull's end did not come");
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// Naks `messages` without delay (the node stops): another node may take them at once.
    async fn give_back(&self, messages: &[jetstream::Message]) {
        for message in messages {
            if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(consumer = %self.name, %err, "JetStream: nak failed; redelivered after ack-wait");
            }
        }
    }

    /// Applies `message` and acks it (terminates it when it can never apply). A transient
    /// failure is retried in place with back-off, not naked: a nak lets newer messages overtake
    /// it. While it retries, `message` and the `rest` of its batch get progress acks, so they
    /// are not delivered again meanwhile, and the lease is renewed. False when the node stops
    /// or loses the lease first.
    async fn apply(
        &mut self,
        message: &jetstream::Message,
        rest: &[jetstream::Message],
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> bool {
        let mut progressed = tokio::time::Instant::now();
        loop {
            let failure = match self.try_apply(message).await {
                Ok(kind) => {
                    if let Err(err) = message.ack_with(kind).await {
                        // Delivered again after `ack-wait`; a push's idempotency key makes it
                        // apply once.
                        tracing::debug!(consumer = %self.name, %err, "JetStream: ack failed");
                    }
                    backoff.reset();
                    return true;
                }
                Err(failure) => failure,
            };
            self.counts.failed(failure.reason());
            tracing::warn!(consumer = %self.name, error = %failure, "JetStream: the gateway cannot apply messages now; retrying");
            if !backoff.wait(stop).await || self.keep_lease().await.is_err() {
                return false;
            }
            if progressed.elapsed() > self.settings.ack_wait / 3 {
                for held in std::iter::once(message).chain(rest) {
                    let _ = held.ack_with(AckKind::Progress).await;
                }
                progressed = tokio::time::Instant::now();
            }
        }
    }

    /// Applies `message`: how to acknowledge it (`+ACK`, or `+TERM` when it can never apply),
    /// or the transient failure.
    async fn try_apply(&mut self, message: &jetstream::Message) -> Result<AckKind, Failure> {
        let (stream, sequence, pending, published) = match message.info() {
            Ok(info) => (
                info.stream,
                info.stream_sequence,
                info.pending,
                info.published.unix_timestamp_nanos(),
            ),
            Err(err) => {
                tracing::warn!(consumer = %self.name, %err, "JetStream: a message without its metadata; terminated");
                self.counts.failed("invalid");
                return Ok(AckKind::Term);
            }
        };
        self.counts.pending.set(pending as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.counts
            .oldest
            .set((now - published).max(0) as f64 / 1e9);
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        // Set when the consumer was looked up, before any pull.
        let (created, last) = self.resume.unwrap_or((0, 0));
        if !self.keyed && sequence <= last {
            // Applied already (its ack was lost): one node applies in order, so this is enough.
            tracing::debug!(consumer = %self.name, sequence, "JetStream: delivered again; acked");
            return Ok(AckKind::Ack);
        }
        // A stream deleted and made again numbers its messages from 1 again: its creation time
        // keeps their keys apart from the old stream's within the idempotency window.
        let key = self.keyed.then(|| match header("Nats-Msg-Id") {
            Some(id) => std::borrow::Cow::Borrowed(id),
            None => std::borrow::Cow::Owned(format!("{stream}:{created}:{sequence}")),
        });
        let applied = match (header(METHOD_HEADER), std::str::from_utf8(&message.payload)) {
            (None, _) => Err(Failure::Poison {
                reason: "unknown_method",
                message: format!("no {METHOD_HEADER} header"),
            }),
            (_, Err(_)) => Err(Failure::Poison {
                reason: "bad_json",
                message: "the body is not UTF-8".into(),
            }),
            (Some(method), Ok(json)) => match Command::parse(method, json) {
                Ok(command) => command.apply(&self.gateway, key.as_deref()).await,
                Err(failure) => Err(failure),
            },
        };
        let kind = match applied {
            Ok(()) => {
                self.counts.applied.inc();
                AckKind::Ack
            }
            Err(failure @ Failure::Poison { .. }) => {
                self.counts.failed(failure.reason());
                tracing::warn!(
                    consumer = %self.name, %stream, sequence, error = %failure,
                    "JetStream: message can never apply; terminated"
                );
                AckKind::Term
            }
            Err(failure @ Failure::Transient(_)) => return Err(failure),
        };
        if let Some((_, last)) = &mut self.resume {
            *last = sequence;
        }
        Ok(kind)
    }
}
