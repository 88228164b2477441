//! Presence in cluster mode: per channel whose namespace keeps presence, the hash
//! `P:{t}:ch:C:pr` (digest → `{"cid","user","info","since"}`) and the user counts
//! `P:{t}:ch:C:pu` (user → connections), changed by one script per channel
//! ([`scripts::PRESENCE`](super::scripts::PRESENCE)), so the counts follow the entries. A
//! connection joins at its first socket (any node) and leaves when its credentials end for good
//! (the call or reaper that ends them), so a resume on another node changes nothing, and a dead
//! node's connections leave when the reaper ends them (its lease plus the grace).
//!
//! The same script publishes each change on the channel's topic (`!join`, `!leave`,
//! `!occupied`, `!vacated`; see [`decode_presence`]), which every node subscribed to the channel
//! delivers to its sockets and `Listen` streams. A channel whose last member left waits in the
//! vacating set of its partition, `P:{t}:vacating` (channel → when `vacated` is due); the reaper tells it once.

use crate::clock::now_ms;
use std::time::Duration;

use super::keys::ChannelKey;
use super::{RedisBus, LEASE, NODES_TTL};

/// How long a node may go without a heartbeat before its connections leave presence (when its
/// lease plus the reconnect grace is longer): within this, plus a reaper pass, of its last
/// heartbeat.
pub(crate) const PRESENCE_LEASE: Duration = Duration::from_secs(8);
use crate::{
    credentials::Digest,
    domain::Channel,
    domain::User,
    error::Error,
    registry::{Change, PresenceEvent, Present},
};

impl RedisBus {
    /// Joins (`join`) or leaves `digest` to or from those of `channels` that keep presence.
    /// Best effort: a failure is logged (the entry is fixed by the connection's next change).
    pub(super) async fn presence_change<'a>(
        &self,
        join: bool,
        digest: &Digest,
        channels: impl IntoIterator<Item = &'a str>,
        connection_id: &str,
        user: &str,
        info: &str,
    ) {
        let node = if join { self.node.as_str() } else { "" };
        self.presence_script(join, digest, channels, (connection_id, user, info), node)
            .await;
    }

    /// [`presence_change`](Self::presence_change) for a socket on `node` (a subscription
    /// change made from any node).
    pub(super) async fn presence_at<'a>(
        &self,
        join: bool,
        digest: &Digest,
        channels: impl IntoIterator<Item = &'a str>,
        who: (&str, &str, &str),
        node: &str,
    ) {
        let node = if join { node } else { "" };
        self.presence_script(join, digest, channels, who, node)
            .await;
    }

    /// Takes `digest` (of `user`) out of its `channels`' presence if its socket is still live
    /// on the dead `node`: the check and the leave are one script per channel, so a resume on
    /// another node (which joins again) is never undone.
    pub(super) async fn presence_lost<'a>(
        &self,
        digest: &Digest,
        channels: impl IntoIterator<Item = &'a str>,
        user: &str,
        node: &str,
    ) {
        self.presence_script(false, digest, channels, ("", user, ""), node)
            .await;
    }

    async fn presence_script<'a>(
        &self,
        join: bool,
        digest: &Digest,
        channels: impl IntoIterator<Item = &'a str>,
        (connection_id, user, info): (&str, &str, &str),
        node: &str,
    ) {
        let mut batch = self.batch(&[&self.scripts.presence]);
        let entry = join.then(|| {
            serde_json::json!({
                "cid": connection_id,
                "user": user,
                "info": info,
                "since": now_ms(),
            })
            .to_string()
        });
        let now = now_ms();
        let mut kept = Vec::new();
        for channel in channels {
            let ns = self.limits.namespace(channel);
            if !ns.presence {
                continue;
            }
            let delay = ns.occupancy.map_or(-1, |d| d.as_millis() as i64);
            let p = self.keys.part(channel);
            let mut invocation = self.scripts.presence.prepare_invoke();
            invocation
                .key(self.keys.channel(channel, ChannelKey::Presence))
                .key(self.keys.channel(channel, ChannelKey::PresenceUsers))
                .key(self.keys.vacating(p))
                .key(self.keys.outbox(p))
                .key(self.keys.channel(channel, ChannelKey::PresenceNodes))
                .arg(if join { "join" } else { "leave" })
                .arg(digest.to_string())
                .arg(entry.as_deref().unwrap_or(""))
                .arg(user)
                .arg(self.keys.channel_topic(channel))
                .arg(delay)
                .arg(now)
                .arg(channel)
                .arg(node);
            batch.invoke(p, &invocation);
            kept.push(channel);
        }
        if batch.is_empty() {
            return;
        }
        let answers = match self.within(self.run_batch(batch)).await {
            Ok(answers) => answers,
            Err(err) => {
                tracing::warn!(%err, join, "presence not updated in Redis");
                return;
            }
        };
        // An occupancy change is told by the script itself (the outbox).
        for (channel, answer) in kept.into_iter().zip(answers) {
            if let Err(err) = answer {
                tracing::warn!(%err, join, %channel, "presence not updated in Redis");
            }
        }
    }

    /// Presence is a lease the nodes renew with their heartbeat: the connections live on a node
    /// silent for [`PRESENCE_LEASE`] leave presence (their credentials stay resumable for the
    /// grace; a resume elsewhere joins again). Once per silent node; a no-op when the grace is
    /// short enough that the reaper ends them first.
    pub(super) async fn drop_lost_presence(
        &self,
        conn: &mut super::Link,
        now: u64,
    ) -> Result<(), Error> {
        if LEASE + self.grace <= PRESENCE_LEASE {
            return Ok(());
        }
        let cutoff = now.saturating_sub(PRESENCE_LEASE.as_millis() as u64);
        let silent: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.nodes(0))
            .arg("-inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(0)
            .arg(16)
            .query_async(conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        for node in silent.into_iter().filter(|n| *n != self.node) {
            let gone: Option<f64> = redis::cmd("ZSCORE")
                .arg(self.keys.presence_gone())
                .arg(&node)
                .query_async(conn)
                .await
                .map_err(|e| self.unavailable(&e))?;
            if gone.is_some() {
                continue;
            }
            let mut digests: Vec<String> = Vec::new();
            for p in 0..self.keys.partitions() {
                let part: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(self.keys.node_live(p, &node))
                    .query_async(conn)
                    .await
                    .map_err(|e| self.unavailable(&e))?;
                digests.extend(part);
            }
            for text in &digests {
                let Ok(digest) = text.parse::<Digest>() else {
                    continue;
                };
                let (user, channels): (Option<String>, Vec<String>) = redis::pipe()
                    .cmd("HGET")
                    .arg(self.keys.session(&digest))
                    .arg("user")
                    .cmd("SMEMBERS")
                    .arg(self.keys.subscriptions(&digest))
                    .query_async(conn)
                    .await
                    .map_err(|e| self.unavailable(&e))?;
                let user = user.unwrap_or_default();
                self.presence_lost(&digest, channels.iter().map(String::as_str), &user, &node)
                    .await;
            }
            let _: i64 = redis::cmd("ZADD")
                .arg(self.keys.presence_gone())
                .arg(now)
                .arg(&node)
                .query_async(conn)
                .await
                .map_err(|e| self.unavailable(&e))?;
            let _: Result<i64, _> = redis::cmd("PEXPIRE")
                .arg(self.keys.presence_gone())
                .arg(NODES_TTL.as_millis() as u64)
                .query_async(conn)
                .await;
            tracing::info!(%node, connections = digests.len(), "a silent node's connections left presence");
        }
        Ok(())
    }

    /// After a heartbeat: a node whose connections were taken out of presence while it was
    /// silent (a stall, a partition) puts them back. Best effort, logged.
    pub(super) async fn presence_back(&self) {
        let mut conn = self.link();
        let was_gone: Result<i64, _> = redis::cmd("ZREM")
            .arg(self.keys.presence_gone())
            .arg(&self.node)
            .query_async(&mut conn)
            .await;
        if was_gone != Ok(1) {
            return;
        }
        tracing::warn!("this node was silent long enough to lose its presence; rejoining");
        // In the background: the heartbeat must not wait on thousands of sockets.
        self.spawn_short(|bus| async move {
            for live in bus.registry.live_sessions() {
                let (name, info) = User::texts(live.user.as_ref());
                let channels = live.channels.iter().map(|c| c.as_str());
                bus.presence_change(
                    true,
                    &live.digest,
                    channels,
                    &live.connection_id,
                    name,
                    info,
                )
                .await;
            }
        });
    }

    /// Tells `vacated` for the channels in the vacating set whose delay passed with no member
    /// back; one script per channel tells each once (the reaper runs it every pass).
    pub(super) async fn vacate_due(
        &self,
        conn: &mut super::Link,
        p: usize,
        due: &[String],
        now: u64,
    ) -> Result<(), Error> {
        for text in due {
            let _told: i64 = self
                .scripts
                .vacate
                .key(self.keys.vacating(p))
                .key(self.keys.channel(text, ChannelKey::Presence))
                .key(self.keys.outbox(p))
                .arg(text)
                .arg(now)
                .arg(self.keys.channel_topic(text))
                .invoke_async(conn)
                .await
                .map_err(|e| self.unavailable(&e))?;
        }
        Ok(())
    }

    /// The connections present in `channel`.
    pub(super) async fn read_presence(&self, channel: &Channel) -> Result<Vec<Present>, Error> {
        let mut conn = self.link();
        let entries: Vec<(String, String)> = self
            .within(async {
                redis::cmd("HGETALL")
                    .arg(self.keys.channel(channel, ChannelKey::Presence))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.unavailable(&e))
            })
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(digest, entry)| {
                let digest: Digest = digest.parse().ok()?;
                let v: serde_json::Value = serde_json::from_str(&entry).ok()?;
                let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                Some(Present {
                    digest,
                    connection_id: text("cid").into(),
                    user: User::from_texts(&text("user"), &text("info")),
                    since_ms: v["since"].as_u64().unwrap_or(0),
                })
            })
            .collect())
    }

    /// `(connections, users)` present in `channel`: two lengths.
    pub(super) async fn read_presence_stats(&self, channel: &Channel) -> Result<(u64, u64), Error> {
        let mut conn = self.link();
        self.within(async {
            redis::pipe()
                .cmd("HLEN")
                .arg(self.keys.channel(channel, ChannelKey::Presence))
                .cmd("HLEN")
                .arg(self.keys.channel(channel, ChannelKey::PresenceUsers))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.unavailable(&e))
        })
        .await
    }
}

/// Decodes a presence change published on a channel's topic by [`PRESENCE`] or [`VACATE`]
/// (`message` starts with `!`); `Err` (why) for anything not well-formed: the user and info are
/// checked again, as when issued, before they can reach a socket.
///
/// [`PRESENCE`]: super::scripts::PRESENCE
/// [`VACATE`]: super::scripts::VACATE
pub(super) fn decode_presence(message: &[u8]) -> Result<PresenceEvent, &'static str> {
    let message = std::str::from_utf8(message).map_err(|_| "not UTF-8")?;
    let message = message.strip_prefix('!').ok_or("no '!'")?;
    let (header, entry) = message.split_once('\n').unwrap_or((message, ""));
    let mut words = header.split(' ');
    let change = words
        .next()
        .and_then(Change::parse)
        .ok_or("unknown change")?;
    if matches!(change, Change::Occupied | Change::Vacated) {
        return match (words.next(), entry.is_empty()) {
            (None, true) => Ok(PresenceEvent::occupancy(change == Change::Occupied)),
            _ => Err("occupancy change with a body"),
        };
    }
    let of_user = match words.next() {
        Some("1") => true,
        Some("0") => false,
        _ => return Err("bad user flag"),
    };
    let digest: Digest = words
        .next()
        .and_then(|d| d.parse().ok())
        .ok_or("bad digest")?;
    if words.next().is_some() {
        return Err("trailing words");
    }
    let v: serde_json::Value = serde_json::from_str(entry).map_err(|_| "entry is not JSON")?;
    let text = |k: &str| v[k].as_str().ok_or("entry field is not a string");
    let (connection_id, name, info) = (text("cid")?, text("user")?, text("info")?);
    if connection_id.is_empty() || connection_id.len() > 256 {
        return Err("bad connection id");
    }
    let user = if name.is_empty() {
        None
    } else {
        Some(User::new(name, info).map_err(|_| "bad user or info")?)
    };
    Ok(PresenceEvent {
        change,
        member: Some(Present {
            digest,
            connection_id: connection_id.into(),
            user,
            since_ms: v["since"].as_u64().unwrap_or(0),
        }),
        of_user,
    })
}

/// Any bytes on a channel's topic that start like a presence change: decoded or refused
/// without a panic; a decoded `of_user` change names its member.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_relayed_presence(input: &[u8]) {
    if let Ok(event) = decode_presence(input) {
        assert!(event.member.is_some() || !event.of_user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_presence_changes_decode_and_bad_ones_are_refused() {
        let digest = Digest::compute("k", "c").to_string();
        let entry = r#"{"cid":"c1","user":"u","info":"{\"a\":1}","since":5}"#;
        let join = decode_presence(format!("!join 0 {digest}\n{entry}").as_bytes()).unwrap();
        assert_eq!((join.change, join.of_user), (Change::Join, false));
        let member = join.member.unwrap();
        assert_eq!(&*member.connection_id, "c1");
        assert_eq!(member.user.unwrap().info.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(
            decode_presence(b"!vacated").unwrap(),
            PresenceEvent::occupancy(false)
        );
        let anonymous = r#"{"cid":"c1","user":"","info":"","since":5}"#;
        let leave = decode_presence(format!("!leave 1 {digest}\n{anonymous}").as_bytes());
        assert!(leave.unwrap().member.unwrap().user.is_none());
        for bad in [
            "!".to_owned(),
            "!joined 1 x\n{}".to_owned(),
            "!occupied 1".to_owned(),
            "!vacated\n{}".to_owned(),
            format!("!join 2 {digest}\n{entry}"),
            format!("!join 1 nodigest\n{entry}"),
            format!("!join 1 {digest} extra\n{entry}"),
            format!("!join 1 {digest}\nnot json"),
            format!(
                "!join 1 {digest}\n{}",
                r#"{"cid":"c","user":"u","info":"not json"}"#
            ),
            format!("!join 1 {digest}\n{}", r#"{"cid":"","user":"","info":""}"#),
            format!(
                "!join 1 {digest}\n{}",
                r#"{"cid":"c","user":"a\u0001","info":""}"#
            ),
        ] {
            assert!(decode_presence(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn fuzz_presence_changes_relayed_over_redis() {
        use proptest::prelude::*;
        crate::fuzz::replay("relayed_presence", check_relayed_presence);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        runner
            .run(&any::<Vec<u8>>(), |input| {
                let mut message = b"!".to_vec();
                message.extend_from_slice(&input);
                check_relayed_presence(&message);
                check_relayed_presence(&input);
                Ok(())
            })
            .unwrap();
    }
}
