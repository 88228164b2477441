//! Presence in cluster mode: per channel whose namespace keeps presence, the hash
//! `P:ch:{C}:pr` (digest → `{"cid","user","info","since"}`) and the user counts
//! `P:ch:{C}:pu` (user → connections), changed by one script per channel
//! ([`scripts::PRESENCE`](super::scripts::PRESENCE)), so the counts follow the entries. A
//! connection joins at its first socket (any node) and leaves when its credentials end for good
//! (the call or reaper that ends them), so a resume on another node changes nothing, and a dead
//! node's connections leave when the reaper ends them (its lease plus the grace).

use super::RedisBus;
use crate::{
    credentials::Digest,
    error::Error,
    protocol::Channel,
    registry::{now_ms, Present, User},
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
        let mut pipe = redis::pipe();
        // Loaded with the pipeline, so a Redis that lost its script cache never fails it.
        pipe.load_script(&self.scripts.presence).ignore();
        let mut n = 0;
        let entry = join.then(|| {
            serde_json::json!({
                "cid": connection_id,
                "user": user,
                "info": info,
                "since": now_ms(),
            })
            .to_string()
        });
        for channel in channels {
            if !self.limits.presence(channel) {
                continue;
            }
            let mut invocation = self.scripts.presence.prepare_invoke();
            invocation
                .key(self.channel_key(channel, "pr"))
                .key(self.channel_key(channel, "pu"))
                .arg(if join { "join" } else { "leave" })
                .arg(digest.to_string())
                .arg(entry.as_deref().unwrap_or(""))
                .arg(user);
            pipe.invoke_script(&invocation);
            n += 1;
        }
        if n == 0 {
            return;
        }
        let result = self.within(self.run_pipeline(pipe, n)).await;
        let failed = match result {
            Ok(answers) => answers.into_iter().find_map(Result::err),
            Err(err) => Some(err),
        };
        if let Some(err) = failed {
            tracing::warn!(%err, join, "presence not updated in Redis");
        }
    }

    /// The connections present in `channel`.
    pub(super) async fn read_presence(&self, channel: &Channel) -> Result<Vec<Present>, Error> {
        let mut conn = self.conn.clone();
        let entries: Vec<(String, String)> = self
            .within(async {
                redis::cmd("HGETALL")
                    .arg(self.channel_key(channel, "pr"))
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
        let mut conn = self.conn.clone();
        self.within(async {
            redis::pipe()
                .cmd("HLEN")
                .arg(self.channel_key(channel, "pr"))
                .cmd("HLEN")
                .arg(self.channel_key(channel, "pu"))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.unavailable(&e))
        })
        .await
    }
}
