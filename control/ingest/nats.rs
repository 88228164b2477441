//! The NATS JetStream consumer: a durable pull consumer on a stream (and a filter subject),
//! created with the stream when absent if the configuration says `create = true`.
//!
//! A message's `Channelgate-Method` header names the method and its body is the method's JSON
//! (as an outbox row's payload). Messages are applied in the order fetched, one at a time, and
//! acked after the gateway accepted them; a push's idempotency key is the message's
//! `Nats-Msg-Id` header, or `<stream>:<stream's creation time>:<sequence>`, so a message redelivered after a crash
//! applies once. A transient failure naks the message and the rest of its batch with a delay
//! (back-off); a message that can never apply is terminated (`+TERM`), logged and counted.
//!
//! Recovery: the client reconnects by itself; a fetch or an info call that fails (the consumer
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
}

impl Settings {
    /// Checks a consumer's settings.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        url: String,
        stream: String,
        subject: Option<String>,
        durable: String,
        create: bool,
        batch: usize,
        ack_wait: Duration,
        poll: Duration,
        max_backoff: Duration,
    ) -> Result<Self, String> {
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
        })
    }
}

/// A JetStream consumer of one node.
#[derive(Debug)]
pub(crate) struct Consumer {
    name: String,
    settings: Settings,
    gateway: Gateway,
    counts: Counts,
    /// The stream's creation time and the last sequence applied: where a consumer created again
    /// starts.
    resume: Option<(i128, u64)>,
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
                    let failure = self.consume(&client, &consumer, &stop, &mut backoff).await;
                    if stop.is_cancelled() {
                        break;
                    }
                    self.unreachable(&failure);
                }
                Err(err) => self.unreachable(&err),
            }
            if !backoff.wait(&stop).await {
                break;
            }
        }
        tracing::info!(consumer = %self.name, "consumer stopped");
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

    /// Fetches and applies batches until a call fails (returned) or `stop`.
    async fn consume(
        &mut self,
        client: &async_nats::Client,
        consumer: &PullConsumer,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> String {
        let s = self.settings.clone();
        loop {
            if client.connection_state() != State::Connected {
                return "disconnected from NATS".into();
            }
            let fetch = consumer
                .fetch()
                .max_messages(s.batch)
                .expires(s.poll)
                .messages();
            let mut batch = tokio::select! {
                _ = stop.cancelled() => return String::new(),
                fetched = tokio::time::timeout(CALL_DEADLINE, fetch) => match fetched {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(err)) => return format!("fetch: {err}"),
                    Err(_) => return format!("fetch: no answer within {CALL_DEADLINE:?}"),
                },
            };
            let mut messages = Vec::new();
            let mut failed = None;
            while let Some(message) = batch.next().await {
                match message {
                    Ok(message) => messages.push(message),
                    Err(err) => {
                        failed = Some(format!("fetch: {err}"));
                        break;
                    }
                }
            }
            if messages.is_empty() {
                if let Some(failed) = failed {
                    return failed;
                }
                // Idle: the consumer's state, which also finds a consumer deleted under us
                // (a fetch from a missing consumer just ends empty).
                match tokio::time::timeout(CALL_DEADLINE, consumer.get_info()).await {
                    Ok(Ok(info)) => {
                        tracing::debug!(consumer = %self.name, pending = info.num_pending, ack_pending = info.num_ack_pending, delivered = info.delivered.stream_sequence, "JetStream: idle");
                        self.counts
                            .pending
                            .set((info.num_pending as usize + info.num_ack_pending) as i64);
                    }
                    Ok(Err(err)) => return format!("consumer info: {err}"),
                    Err(_) => return format!("consumer info: no answer within {CALL_DEADLINE:?}"),
                }
                continue;
            }
            self.counts.batch(messages.len());
            if let Some(failure) = self.apply(&messages).await {
                tracing::warn!(consumer = %self.name, error = %failure, "JetStream: the gateway cannot apply messages now; retrying");
                if !backoff.wait(stop).await {
                    return String::new();
                }
            } else {
                backoff.reset();
            }
            if let Some(failed) = failed {
                return failed;
            }
        }
    }

    /// Applies `messages` in order; on a transient failure naks it and the rest and returns it.
    async fn apply(&mut self, messages: &[jetstream::Message]) -> Option<Failure> {
        for (i, message) in messages.iter().enumerate() {
            let (stream, sequence) = match message.info() {
                Ok(info) => (info.stream.to_owned(), info.stream_sequence),
                Err(err) => {
                    tracing::warn!(consumer = %self.name, %err, "JetStream: a message without its metadata; skipped");
                    self.counts.failed("invalid");
                    continue;
                }
            };
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            // A stream deleted and made again numbers its messages from 1 again: its creation
            // time keeps their keys apart from the old stream's within the idempotency window.
            let created = self.resume.map_or(0, |(at, _)| at);
            let key =
                header("Nats-Msg-Id").unwrap_or_else(|| format!("{stream}:{created}:{sequence}"));
            let applied = match (header(METHOD_HEADER), std::str::from_utf8(&message.payload)) {
                (None, _) => Err(Failure::Poison {
                    reason: "unknown_method",
                    message: format!("no {METHOD_HEADER} header"),
                }),
                (_, Err(_)) => Err(Failure::Poison {
                    reason: "bad_json",
                    message: "the body is not UTF-8".into(),
                }),
                (Some(method), Ok(json)) => match Command::parse(&method, json) {
                    Ok(command) => command.apply(&self.gateway, &key).await,
                    Err(failure) => Err(failure),
                },
            };
            let kind = match applied {
                Ok(()) => {
                    self.counts.applied.inc();
                    if let Some((_, last)) = &mut self.resume {
                        *last = sequence;
                    }
                    AckKind::Ack
                }
                Err(failure @ Failure::Poison { .. }) => {
                    self.counts.failed(failure.reason());
                    tracing::warn!(
                        consumer = %self.name, %stream, sequence, error = %failure,
                        "JetStream: message can never apply; terminated"
                    );
                    if let Some((_, last)) = &mut self.resume {
                        *last = sequence;
                    }
                    AckKind::Term
                }
                Err(failure @ Failure::Transient(_)) => {
                    self.counts.failed(failure.reason());
                    let delay = Some(self.settings.max_backoff.min(Duration::from_secs(1)));
                    for later in &messages[i..] {
                        if let Err(err) = later.ack_with(AckKind::Nak(delay)).await {
                            tracing::debug!(consumer = %self.name, %err, "JetStream: nak failed; redelivered after ack-wait");
                        }
                    }
                    return Some(failure);
                }
            };
            if let Err(err) = message.ack_with(kind).await {
                // Redelivered after `ack-wait`; the idempotency key makes a push apply once.
                tracing::debug!(consumer = %self.name, %err, "JetStream: ack failed");
            }
        }
        None
    }
}
