//! The pub/sub side of the Redis bus: one connection per node, subscribed to this node's
//! command topic and to the channels its sockets and listeners use (following the registry's
//! interest); what arrives (pushes, and presence changes: [`presence`](super::presence)) is
//! decoded here, and a message that does not decode is counted
//! (`channelgate_bus_malformed_total`) and dropped, never trusted. Pushes go to the registry's
//! sequencer ([`Registry::offer`](crate::registry::Registry::offer)), which delivers them in
//! offset order; after a reconnection, every channel is caught up from Redis.

use crate::clock::now_ms;
use crate::error::Unavailable;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{
    link::{Arrival, Incoming, Sink},
    Command, ForwardEvent, RedisBus, BACKOFF_MAX, BACKOFF_MIN, COMMAND_TIMEOUT, LIVE_TTL,
};
use crate::readiness::Cause;
use crate::{
    domain::User,
    domain::{valid_epoch, Channel, Epoch, Json},
    error::{Close, Error},
    handoff::HandlerReply,
    protocol::Frame,
    registry::LiveSession,
};

impl RedisBus {
    /// Subscribes this node to `channels` in Redis (those it is not subscribed to yet), and
    /// waits for Redis to confirm; an error when Redis cannot be reached.
    pub(super) async fn ensure_subscribed(&self, channels: &[Channel]) -> Result<(), Error> {
        self.ready()?;
        self.within(self.subscribe_now(channels)).await
    }

    async fn subscribe_now(&self, channels: &[Channel]) -> Result<(), Error> {
        let mut pubsub = self.pubsub.lock().await;
        let missing: Vec<Channel> = channels
            .iter()
            .filter(|c| !pubsub.subscribed.contains(*c))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let Some(sink) = pubsub.sink.as_mut() else {
            // Redis is down; the reconnection re-subscribes everything in use.
            return Err(Unavailable::Reconnecting.into());
        };
        let topics: Vec<String> = missing.iter().map(|c| self.keys.channel_topic(c)).collect();
        match self.sink_subscribe(sink, &topics).await {
            Ok(()) => {
                pubsub.subscribed.extend(missing);
                Ok(())
            }
            Err(err) => {
                tracing::warn!(%err, "Redis SUBSCRIBE failed");
                Err(Unavailable::redis(err).into())
            }
        }
    }

    /// Follows local interest: subscribes to channels that gained their first local user and
    /// unsubscribes from channels that lost their last.
    pub(super) async fn reconcile(self: Arc<Self>, halt: CancellationToken) {
        loop {
            let changed = tokio::select! {
                changed = self.registry.changed_channels() => changed,
                _ = halt.cancelled() => return,
            };
            let mut pubsub = self.pubsub.lock().await;
            let (mut add, mut remove) = (Vec::new(), Vec::new());
            for channel in changed {
                let wanted = self.registry.has_interest(&channel);
                let have = pubsub.subscribed.contains(&channel);
                if wanted && !have {
                    add.push(channel);
                } else if !wanted && have {
                    remove.push(channel);
                } else if wanted {
                    // Its state may be new (left and came back): read where it stands.
                    self.registry.want_catch_up(&channel);
                }
            }
            let Some(sink) = pubsub.sink.as_mut() else {
                continue;
            };
            // A Redis that stalls does not hold this task (or the pub/sub lock) past the
            // deadline; what was not done is redone when the connection comes back.
            if !add.is_empty() {
                let topics: Vec<String> = add.iter().map(|c| self.keys.channel_topic(c)).collect();
                let subscribed =
                    tokio::time::timeout(COMMAND_TIMEOUT, self.sink_subscribe(sink, &topics)).await;
                if matches!(subscribed, Ok(Ok(()))) {
                    // Subscribed: now the channel's position read from Redis is one the
                    // stream continues.
                    for channel in &add {
                        self.registry.want_catch_up(channel);
                    }
                    pubsub.subscribed.extend(add);
                }
            }
            if !remove.is_empty() {
                let topics: Vec<String> =
                    remove.iter().map(|c| self.keys.channel_topic(c)).collect();
                // Out of the set first: an unsubscription that arrives is then known as ours
                // (a shard that drops one by itself is re-subscribed).
                for channel in &remove {
                    pubsub.subscribed.remove(channel);
                }
                let Some(sink) = pubsub.sink.as_mut() else {
                    continue;
                };
                let unsubscribed =
                    tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&topics)).await;
                if !matches!(unsubscribed, Ok(Ok(()))) {
                    // Still subscribed in Redis: pushes keep coming and are offered to a
                    // registry with no interest (dropped there); the next reconnection fixes it.
                    tracing::debug!("Redis UNSUBSCRIBE failed");
                }
            }
        }
    }

    /// Keeps a pub/sub connection: connects with back-off, subscribes to this node's topic and
    /// every channel in use, and handles what arrives until the connection drops.
    pub(super) async fn supervise(self: Arc<Self>, halt: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = tokio::select! {
                connected = tokio::time::timeout(COMMAND_TIMEOUT * 2, self.connect_pubsub()) => {
                    connected.unwrap_or_else(|_| {
                        Err(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                    })
                }
                _ = halt.cancelled() => return,
            };
            match connected {
                Ok(mut stream) => {
                    if let Err(err) = self.restore_live().await {
                        tracing::warn!(%err, retry_in = ?backoff, "Redis unreachable");
                        let reason = Unavailable::redis(err);
                        self.readiness.set(Cause::Connecting, reason);
                        self.pubsub.lock().await.sink = None;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = halt.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    backoff = BACKOFF_MIN;
                    self.readiness.clear(Cause::Connecting);
                    tracing::info!("connected to Redis");
                    // Whatever was pushed while the stream was down is read from Redis.
                    let subscribed: Vec<Channel> = self
                        .pubsub
                        .lock()
                        .await
                        .subscribed
                        .iter()
                        .cloned()
                        .collect();
                    for channel in self.registry.resync(&subscribed) {
                        self.registry.want_catch_up(&channel);
                    }
                    loop {
                        let arrival = tokio::select! {
                            arrival = stream.next() => arrival,
                            // The cluster's topology changed: a connection of its own again.
                            _ = self.failover.reset_requested() => None,
                            _ = halt.cancelled() => return,
                        };
                        match arrival {
                            Some(Arrival::Message(message)) => self.on_message(&message).await,
                            Some(Arrival::Subscribed(topic)) => self.confirmed(&topic),
                            Some(Arrival::Dropped(topic)) => self.dropped(topic).await,
                            Some(Arrival::Disconnected) => {
                                tracing::warn!("a Redis shard's pub/sub connection dropped; re-subscribing when it is back");
                            }
                            None => break,
                        }
                    }
                    tracing::warn!("{}", Unavailable::Reconnecting);
                    self.readiness
                        .set(Cause::Connecting, Unavailable::Reconnecting);
                    let mut pubsub = self.pubsub.lock().await;
                    pubsub.sink = None;
                    pubsub.subscribed.clear();
                }
                Err(err) => {
                    tracing::warn!(%err, retry_in = ?backoff, "Redis unreachable");
                    self.readiness
                        .set(Cause::Connecting, Unavailable::redis(err));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = halt.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Renews this node's heartbeat and records its live sockets in Redis where Redis has lost
    /// them (a restart without persistence), with their presence: each restored connection
    /// joins its presence channels again (a join event each).
    async fn restore_live(&self) -> Result<(), redis::RedisError> {
        let mut batch = self.batch(&[]);
        self.stamp_heartbeat(&mut batch, now_ms());
        self.run_quiet(batch).await?;
        let mut conn = self.link();
        let mut restored = 0;
        for live in self.registry.live_sessions() {
            let LiveSession {
                digest,
                connection_id,
                expires_at_ms,
                channels,
                user,
            } = live;
            let mut invocation = self.scripts.restore.prepare_invoke();
            let (name, info) = User::texts(user.as_ref());
            if let Some(user) = &user {
                self.scripts
                    .user
                    .key(self.keys.user(&user.name))
                    .arg(digest.to_string())
                    .arg(LIVE_TTL.as_millis() as u64)
                    .invoke_async::<i64>(&mut conn)
                    .await?;
            }
            invocation
                .key(self.keys.session(&digest))
                .key(self.keys.subscriptions(&digest))
                .key(self.keys.node_live(self.digest_part(&digest), &self.node))
                .arg(&self.node)
                .arg(expires_at_ms)
                .arg(LIVE_TTL.as_millis() as u64)
                .arg(name)
                .arg(info)
                .arg(digest.to_string());
            for channel in &channels {
                invocation.arg(channel.as_str());
            }
            let fresh = invocation.invoke_async::<i64>(&mut conn).await?;
            if fresh == 1 {
                // Redis lost it, presence included: the connection is present again.
                let channels = channels.iter().map(|c| c.as_str());
                self.presence_change(true, &digest, channels, &connection_id, name, info)
                    .await;
            }
            restored += fresh;
        }
        if restored > 0 {
            tracing::info!(sockets = restored, "restored live sockets' state in Redis");
        }
        Ok(())
    }

    /// Subscribes `sink` to `topics`; on a cluster, first notes that their confirmations are
    /// this call's (see `confirming`).
    async fn sink_subscribe(&self, sink: &mut Sink, topics: &[String]) -> redis::RedisResult<()> {
        if matches!(sink, Sink::Cluster(_)) {
            self.failover.expect(topics);
        }
        let result = sink.subscribe(topics).await;
        if result.is_err() {
            self.failover.forget(topics);
        }
        result
    }

    /// A shard confirmed a subscription to `topic`: after this node's call, or the client's
    /// re-subscription (its connection to the shard dropped: a failover, or slots moved).
    /// Either way, what was pushed before is read from Redis; after a re-subscription, the
    /// channel is rebased first, since a promoted replica may lack the last pushes.
    fn confirmed(&self, topic: &str) {
        let ours = self.failover.confirmed(topic);
        let Some(channel) = self
            .keys
            .channel_of_topic(topic)
            .and_then(|c| Channel::new(c).ok())
        else {
            return;
        };
        if !ours {
            tracing::info!(%channel, "re-subscribed after a shard's connection dropped; rebasing");
            self.failover.rebase_later([channel.clone()]);
            self.registry.resync(std::slice::from_ref(&channel));
        }
        self.registry.want_catch_up(&channel);
    }

    /// The topics every node listens to: its own commands, and the outboxes' wake-up calls.
    fn own_topics(&self) -> Vec<String> {
        let outboxes = (0..self.keys.partitions()).map(|p| self.keys.outbox(p));
        std::iter::once(self.keys.node_topic(&self.node))
            .chain(outboxes)
            .collect()
    }

    /// A subscription a shard dropped by itself (its slot moved to another shard): taken again
    /// (the client finds the slot's new owner) unless this node no longer wants it.
    async fn dropped(&self, topic: String) {
        let mut pubsub = self.pubsub.lock().await;
        let wanted = match self.keys.channel_of_topic(&topic) {
            Some(channel) => Channel::new(channel)
                .map(|c| pubsub.subscribed.contains(&c))
                .unwrap_or(false),
            None => self.own_topics().contains(&topic),
        };
        if !wanted {
            return;
        }
        tracing::info!(%topic, "a Redis shard dropped a subscription; subscribing again");
        if let Some(sink) = pubsub.sink.as_mut() {
            let again =
                tokio::time::timeout(COMMAND_TIMEOUT, self.sink_subscribe(sink, &[topic])).await;
            if !matches!(again, Ok(Ok(()))) {
                tracing::warn!("could not subscribe again; the next reconnection does");
            }
        }
    }

    async fn connect_pubsub(&self) -> Result<Incoming, redis::RedisError> {
        let (mut sink, stream) = tokio::time::timeout(COMMAND_TIMEOUT, self.endpoint.pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        let mut state = self.pubsub.lock().await;
        self.sink_subscribe(&mut sink, &self.own_topics()).await?;
        let interest = self.registry.interest();
        for chunk in interest.chunks(1000) {
            let topics: Vec<String> = chunk.iter().map(|c| self.keys.channel_topic(c)).collect();
            self.sink_subscribe(&mut sink, &topics).await?;
        }
        state.subscribed = interest.into_iter().collect();
        state.sink = Some(sink);
        Ok(stream)
    }

    async fn on_message(&self, message: &redis::Msg) {
        let topic = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if let Some(p) = self.keys.outbox_of_topic(topic) {
            self.wake_outbox(p);
        } else if let Some(channel) = self.keys.channel_of_topic(topic) {
            if payload.first() == Some(&b'!') {
                match (
                    Channel::new(channel),
                    super::presence::decode_presence(payload),
                ) {
                    (Ok(channel), Ok(event)) => self.registry.presence_event(&channel, &event),
                    (_, Err(why)) => {
                        self.registry.metrics().bus_malformed.inc();
                        tracing::warn!(%channel, why, "malformed presence change from Redis dropped");
                    }
                    (Err(_), Ok(_)) => {
                        self.registry.metrics().bus_malformed.inc();
                        tracing::warn!(%channel, "presence change for a bad channel name dropped");
                    }
                }
                return;
            }
            match decode_push(channel, payload) {
                Ok(push) => {
                    self.registry.offer(
                        &push.channel,
                        &push.epoch,
                        push.offset,
                        push.payload,
                        true,
                    );
                }
                Err(why) => {
                    self.registry.metrics().bus_malformed.inc();
                    tracing::warn!(%channel, why, "malformed push from Redis dropped");
                }
            }
        } else if topic == self.keys.node_topic(&self.node) {
            match serde_json::from_slice::<Command>(payload) {
                Ok(command) => self.on_command(command).await,
                Err(err) => {
                    self.registry.metrics().bus_malformed.inc();
                    tracing::warn!(%err, "malformed node command dropped");
                }
            }
        }
    }

    async fn on_command(&self, command: Command) {
        match command {
            Command::Subscribe {
                from,
                rid,
                digest,
                channels,
                add,
            } => {
                let channels: Vec<Channel> = channels
                    .iter()
                    .filter_map(|c| Channel::new(c).ok())
                    .collect();
                if let Ok(digest) = digest.parse() {
                    self.apply_subscribe(&digest, &channels, add).await;
                }
                let _ = self.command(&from, &Command::Ack { rid }).await;
            }
            Command::Send { digest, frame } => {
                if let Ok(digest) = digest.parse() {
                    let _ = self.registry.send_frame(&digest, &Frame::from(frame));
                }
            }
            Command::Disconnect {
                digest,
                code,
                reason,
            } => {
                if let Ok(digest) = digest.parse() {
                    let _ = self
                        .registry
                        .disconnect(&digest, Close::Application { code, reason });
                }
            }
            Command::Ack { rid } => self.requests.ack(rid),
            Command::Reply {
                rid,
                status,
                headers,
                body,
            } => {
                let body = body.and_then(|b| Json::parse(&b).ok());
                let reply = HandlerReply {
                    delivery_id: 0,
                    status,
                    headers,
                    body,
                };
                self.requests.answer(rid, ForwardEvent::Reply(reply));
            }
            Command::Unhandled { rid } => self.requests.answer(rid, ForwardEvent::Unhandled),
        }
    }
}

/// A push as published by a push script: `{epoch} {offset}\n{payload}`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Published<'a> {
    pub(super) channel: Channel,
    pub(super) epoch: Epoch,
    pub(super) offset: u64,
    /// The JSON text, as the accepting node checked it.
    pub(super) payload: &'a str,
}

/// Decodes a published push; `Err` (why) for anything that is not well-formed, so a bad
/// message can never reach a socket or panic the pub/sub task.
pub(super) fn decode_push<'a>(
    channel: &str,
    message: &'a [u8],
) -> Result<Published<'a>, &'static str> {
    let newline = message
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let (header, payload) = (&message[..newline], &message[newline + 1..]);
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let (epoch, offset) = header.split_once(' ').ok_or("header without ' '")?;
    if !valid_epoch(epoch) {
        return Err("bad epoch");
    }
    let offset: u64 = offset.parse().map_err(|_| "bad offset")?;
    if offset == 0 {
        return Err("offset 0");
    }
    let channel = Channel::new(channel).map_err(|_| "bad channel name")?;
    let payload = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8")?;
    if payload.trim().is_empty() {
        return Err("empty payload");
    }
    Ok(Published {
        channel,
        epoch: epoch.into(),
        offset,
        payload,
    })
}

/// Any bytes on a channel's topic: a push that decodes is well-formed, the rest is refused
/// without a panic; a published push decodes back exactly.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_relayed_push(input: &[u8]) {
    if let Ok(push) = decode_push("c", input) {
        assert!(push.offset > 0 && crate::domain::valid_epoch(&push.epoch));
        assert!(!push.payload.trim().is_empty());
    }
}

/// A node command that does not decode is refused without a panic.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_node_command(input: &[u8]) {
    let _ = serde_json::from_slice::<Command>(input);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_pushes_decode_and_bad_ones_are_refused_without_panicking() {
        let push = decode_push("c", "e1f2 17\n{\"a\":\"é\"}".as_bytes()).unwrap();
        assert_eq!(
            (&*push.epoch, push.offset, push.payload),
            ("e1f2", 17, "{\"a\":\"é\"}")
        );
        let bad: &[&[u8]] = &[
            b"",
            b"no newline",
            b"e1 x\n{}",
            b"e1\n{}",
            b"e1 0\n{}",
            b"e 1 2\n{}",
            b"e\"1 2\n{}",
            b"e1 2\n",
            b"e1 2\n\xff\xfe",
            b"\xff 1\n{}",
            b"e1 99999999999999999999999\n1",
        ];
        for message in bad {
            assert!(decode_push("c", message).is_err(), "{message:?}");
        }
        assert!(decode_push("bad channel", b"e 1\n1").is_err());
    }

    #[test]
    fn fuzz_messages_relayed_over_redis() {
        use proptest::prelude::*;
        crate::fuzz::replay("relayed_push", check_relayed_push);
        crate::fuzz::replay("node_command", check_node_command);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        runner
            .run(&any::<Vec<u8>>(), |input| {
                check_relayed_push(&input);
                check_node_command(&input);
                Ok(())
            })
            .unwrap();
        let published = ("[0-9a-zA-Z_-]{1,64}", 1..u64::MAX, "[ -~]{1,40}");
        runner
            .run(&published, |(epoch, offset, payload)| {
                let message = format!("{epoch} {offset}\n{payload}");
                match decode_push("c", message.as_bytes()) {
                    Ok(push) => {
                        prop_assert_eq!(
                            (&*push.epoch, push.offset, push.payload),
                            (epoch.as_str(), offset, payload.as_str())
                        )
                    }
                    Err(why) => prop_assert!(payload.trim().is_empty(), "{}", why),
                }
                Ok(())
            })
            .unwrap();
    }
}
