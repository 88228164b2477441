//! Reading channels' positions and logs from Redis ([`scripts::READ`](super::scripts::READ)):
//! following channels before a socket or listener joins them (subscribed, position known, what
//! recovery needs read), the catch-up task that brings channels the registry marked back in
//! step, and `History` pages.

use crate::clock::now_ms;
use crate::error::Unavailable;
use std::{collections::HashMap, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::keys::ChannelKey;
use super::{RedisBus, BACKOFF_MAX, BACKOFF_MIN};
use crate::{
    bus::{HistoryQuery, Page},
    domain::{new_epoch, valid_epoch, Channel, Position},
    error::Error,
    registry::Fetched,
};

/// Most pushes one catch-up read takes; a channel further behind is read again.
const CATCH_UP_BATCH: usize = 1000;
/// Channels read in one pipeline.
const READ_BATCH: usize = 256;

/// What to read of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// Its position only.
    Position,
    /// Its position and up to `count` pushes after `offset`, oldest first.
    After { offset: u64, count: usize },
    /// Its position and up to `count` pushes before `offset` (0: the newest), newest first.
    Before { offset: u64, count: usize },
}

impl RedisBus {
    /// Makes this node follow `channels` before a socket or listener joins them: their states
    /// exist here, this node is subscribed to them in Redis, and each one's position is known.
    /// For channels in `since` whose history here does not reach back to that position, it
    /// also reads the pushes after it; those reads are returned, for the registry's recovery.
    pub(super) async fn follow(
        &self,
        channels: &[Channel],
        since: Option<&HashMap<Channel, Position>>,
    ) -> Result<HashMap<Channel, Fetched>, Error> {
        self.registry.prepare(channels);
        self.ensure_subscribed(channels).await?;
        let max = self.limits.recovery_max;
        let mut asks = Vec::new();
        for channel in channels {
            let first = self.registry.catch_up_from(channel) == Some(None);
            let wanted = since
                .and_then(|s| s.get(channel))
                .filter(|position| !self.registry.covers(channel, position));
            let read = match wanted {
                Some(position) => Read::After {
                    offset: position.offset,
                    count: max + 1,
                },
                None if first => Read::Position,
                None => continue,
            };
            asks.push((channel.clone(), first, wanted.is_some(), read));
        }
        let mut fetched = HashMap::new();
        for chunk in asks.chunks(READ_BATCH) {
            let reads: Vec<(&Channel, Read)> = chunk.iter().map(|(c, _, _, r)| (c, *r)).collect();
            let results = self.read_many(&reads).await?;
            for ((channel, first, wanted, _), read) in chunk.iter().zip(results) {
                let read = read?;
                if *first {
                    self.registry.caught_up(channel, None, &read);
                }
                if *wanted {
                    fetched.insert(channel.clone(), read);
                }
            }
        }
        Ok(fetched)
    }

    /// Brings the channels the registry marks back in step with Redis, until the node halts. A
    /// read that fails marks its channels again after a back-off.
    pub(super) async fn catch_up(self: Arc<Self>, halt: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let channels = tokio::select! {
                channels = self.registry.behind_channels() => channels,
                _ = halt.cancelled() => return,
            };
            let mut failed = false;
            for chunk in channels.chunks(READ_BATCH) {
                if let Err(err) = self.rebase_due(chunk).await {
                    tracing::debug!(%err, "rebasing channels failed; retrying");
                    for channel in chunk {
                        self.registry.want_catch_up(channel);
                    }
                    failed = true;
                    continue;
                }
                let asks: Vec<(Channel, Option<u64>)> = chunk
                    .iter()
                    .filter_map(|c| {
                        self.registry
                            .catch_up_from(c)
                            .map(|after| (c.clone(), after))
                    })
                    .collect();
                let reads: Vec<(&Channel, Read)> = asks
                    .iter()
                    .map(|(c, after)| {
                        let read = match after {
                            None => Read::Position,
                            Some(offset) => Read::After {
                                offset: *offset,
                                count: CATCH_UP_BATCH,
                            },
                        };
                        (c, read)
                    })
                    .collect();
                match self.read_many(&reads).await {
                    Ok(results) => {
                        for ((channel, after), read) in asks.iter().zip(results) {
                            match read {
                                Ok(read) => self.registry.caught_up(channel, *after, &read),
                                Err(err) => {
                                    tracing::warn!(%channel, %err, "catching a channel up failed");
                                    failed = true;
                                    self.registry.want_catch_up(channel);
                                }
                            }
                        }
                    }
                    Err(err) => {
                        tracing::debug!(%err, channels = asks.len(), "catching channels up failed; retrying");
                        failed = true;
                        for (channel, _) in &asks {
                            self.registry.want_catch_up(channel);
                        }
                    }
                }
            }
            if failed {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = halt.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
            }
        }
    }

    /// A `History` page, read from Redis.
    pub(super) async fn read_history(
        &self,
        channel: &Channel,
        query: &HistoryQuery,
    ) -> Result<Page, Error> {
        let read = match (query.limit, query.reverse) {
            (0, _) => Read::Position,
            (count, false) => Read::After {
                offset: query.from.unwrap_or(0),
                count,
            },
            (count, true) => Read::Before {
                offset: query.from.unwrap_or(0),
                count,
            },
        };
        let fetched = self
            .read_many(&[(channel, read)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(Unavailable::answer("no read").into()))?;
        if query
            .epoch
            .as_deref()
            .is_some_and(|e| *e != *fetched.position.epoch)
        {
            return Err(Error::EpochChanged {
                position: fetched.position,
            });
        }
        let ttl = self.limits.history_policy(channel).ttl.as_millis() as u64;
        let now = now_ms();
        let page = fetched
            .entries
            .into_iter()
            .filter(|(_, at_ms, _)| at_ms.saturating_add(ttl) > now)
            .map(|(offset, _, payload)| (offset, payload.to_string()))
            .collect();
        Ok((fetched.position, page))
    }

    /// Starts a new epoch ([`scripts::REBASE`](super::scripts::REBASE)) for those of
    /// `channels` due for it (their shard's connection dropped), unless another node did.
    async fn rebase_due(&self, channels: &[Channel]) -> Result<(), Error> {
        let due: Vec<(Channel, Position)> = self
            .failover
            .take_due(channels)
            .into_iter()
            .filter_map(|c| Some((c.clone(), self.registry.position_of(c)?)))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let position_ttl = self.limits.position_ttl.as_millis() as u64;
        let mut batch = self.batch(&[&self.scripts.rebase]);
        for (channel, position) in &due {
            let mut invocation = self.scripts.rebase.prepare_invoke();
            invocation
                .key(self.keys.channel(channel, ChannelKey::Meta))
                .key(self.keys.channel(channel, ChannelKey::Log))
                .arg(&*position.epoch)
                .arg(&*new_epoch())
                .arg(position_ttl);
            batch.invoke(self.keys.part(channel), &invocation);
        }
        let answers = self.run_batch(batch).await;
        let answers = match answers {
            Ok(answers) => answers,
            Err(err) => {
                self.failover.rebase_later(due.into_iter().map(|(c, _)| c));
                return Err(err);
            }
        };
        for ((channel, _), answer) in due.into_iter().zip(answers) {
            match answer {
                Ok(redis::Value::Int(1)) => {
                    tracing::info!(%channel, "a new epoch after a failover");
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%channel, %err, "rebase failed; retrying");
                    self.failover.rebase_later([channel.clone()]);
                    self.registry.want_catch_up(&channel);
                }
            }
        }
        Ok(())
    }

    /// Runs one read script per channel, pipelined. The outer error is Redis being out of
    /// reach; an inner one, a channel whose answer did not make sense.
    pub(super) async fn read_many(
        &self,
        reads: &[(&Channel, Read)],
    ) -> Result<Vec<Result<Fetched, Error>>, Error> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let position_ttl = self.limits.position_ttl.as_millis() as u64;
        let mut batch = self.batch(&[&self.scripts.read]);
        for (channel, read) in reads {
            let (mode, offset, count) = match *read {
                Read::Position => ("pos", 0, 0),
                Read::After { offset, count } => ("after", offset, count),
                Read::Before { offset, count } => ("before", offset, count),
            };
            let mut invocation = self.scripts.read.prepare_invoke();
            invocation
                .key(self.keys.channel(channel, ChannelKey::Meta))
                .key(self.keys.channel(channel, ChannelKey::Log))
                .arg(&*new_epoch())
                .arg(position_ttl)
                .arg(mode)
                .arg(offset)
                .arg(count);
            batch.invoke(self.keys.part(channel), &invocation);
        }
        let answers = self.run_batch(batch).await?;
        Ok(reads
            .iter()
            .zip(answers)
            .map(|((_, read), answer)| parse_read(answer?, *read))
            .collect())
    }
}

/// Parses a read script's answer: `{epoch, last, (offset, time, payload)...}`.
fn parse_read(value: redis::Value, read: Read) -> Result<Fetched, Error> {
    let bad = |what: &'static str| Error::from(Unavailable::answer(what));
    let malformed = |e| Error::from(Unavailable::malformed("a read", e));
    let items: Vec<redis::Value> = redis::from_redis_value(value).map_err(malformed)?;
    let mut items = items.into_iter();
    let epoch: String = items
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(|| bad("a read without its epoch"))?;
    if !valid_epoch(&epoch) {
        return Err(bad("a malformed epoch"));
    }
    let last: u64 = items
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .ok_or_else(|| bad("a read without its offset"))?;
    let mut entries = Vec::new();
    while let Some(offset) = items.next() {
        let (Some(at), Some(payload)) = (items.next(), items.next()) else {
            return Err(bad("a truncated entry"));
        };
        let offset: u64 = redis::from_redis_value(offset).map_err(malformed)?;
        let at: u64 = redis::from_redis_value(at).map_err(malformed)?;
        let payload: String = redis::from_redis_value(payload).map_err(malformed)?;
        entries.push((offset, at, Arc::<str>::from(payload)));
    }
    let complete = match read {
        Read::After { count, .. } => {
            entries.len() < count || entries.last().is_some_and(|e| e.0 >= last)
        }
        _ => true,
    };
    Ok(Fetched {
        position: Position {
            epoch: epoch.into(),
            offset: last,
        },
        entries,
        complete,
    })
}

/// A read answer from Redis as lines: numbers become integers, the rest strings.
#[cfg(any(test, fuzzing))]
pub(crate) fn value(input: &[u8]) -> redis::Value {
    let items = String::from_utf8_lossy(input)
        .lines()
        .map(|line| match line.parse::<i64>() {
            Ok(n) => redis::Value::Int(n),
            Err(_) => redis::Value::BulkString(line.as_bytes().to_vec()),
        })
        .collect();
    redis::Value::Array(items)
}

/// Whatever Redis answers a read with, it is parsed or refused without a panic; what
/// parses has a valid epoch and whole entries.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_redis_read(input: &[u8]) {
    for read in [
        Read::Position,
        Read::After {
            offset: 0,
            count: 2,
        },
        Read::Before {
            offset: 0,
            count: 2,
        },
    ] {
        if let Ok(fetched) = parse_read(value(input), read) {
            assert!(crate::domain::valid_epoch(&fetched.position.epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_redis_reads() {
        use proptest::prelude::*;
        crate::fuzz::replay("redis_read", check_redis_read);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let lines = proptest::collection::vec(
            prop_oneof!["-?[0-9]{1,20}", "[ -~]{0,12}", Just("e1".to_owned())],
            0..12,
        )
        .prop_map(|lines| lines.join("\n").into_bytes());
        runner
            .run(&prop_oneof![any::<Vec<u8>>(), lines], |input| {
                check_redis_read(&input);
                Ok(())
            })
            .unwrap();
        // A well-formed answer reads back exactly.
        let fetched = parse_read(
            value(b"e1\n7\n6\n1000\n\"x\"\n7\n1001\n\"y\""),
            Read::After {
                offset: 5,
                count: 10,
            },
        )
        .unwrap();
        assert_eq!(fetched.position.offset, 7);
        assert_eq!(
            fetched.entries,
            vec![(6, 1000, Arc::from("\"x\"")), (7, 1001, Arc::from("\"y\""))]
        );
    }
}
