//! The sessions room of the Redis bus: credentials by digest, across the cluster. Minting
//! them (and a user's set), subscriptions by digest, where a digest's socket is (`HOLDER`) and
//! the commands sent to the node that holds it (`Send`, `Disconnect`, subscription changes),
//! a socket's attach (`ATTACH`: one live socket per id, the catch-up of its channels) and its
//! end (`DETACH`, in the background). `impl Bus` in the parent module delegates here.

use super::*;

/// Where a digest's socket is.
enum Holder {
    Unknown,
    Offline,
    Live(String),
}

/// What the `HOLDER` and `SUBSCRIBE` scripts answer about a digest.
struct Held {
    holder: Holder,
    /// The node the credentials' socket is (or was last) on; '' when none.
    node: String,
    /// `HOLDER`: the call ended credentials whose socket is gone (the caller tells the end);
    /// `SUBSCRIBE`: the credentials are connected (present in their channels).
    flag: bool,
    connection_id: String,
    user: String,
    info: String,
    /// `HOLDER`: the channels of credentials it ended; `SUBSCRIBE`: the channels it changed.
    channels: Vec<String>,
}

impl Held {
    fn parse(reply: Vec<String>) -> Self {
        let mut reply = reply.into_iter();
        let kind = reply.next();
        let mut next = || reply.next().unwrap_or_default();
        let (node, flag, connection_id, user, info) = (next(), next(), next(), next(), next());
        Self {
            holder: match kind.as_deref() {
                Some("live") => Holder::Live(node.clone()),
                Some("offline") => Holder::Offline,
                _ => Holder::Unknown,
            },
            node,
            flag: flag == "1",
            connection_id,
            user,
            info,
            channels: reply.collect(),
        }
    }
}

impl RedisBus {
    /// Applies a subscription change to a socket on this node. New channels are subscribed to
    /// in Redis and brought up to date first, so the socket misses nothing and (when it asked
    /// for positions) hears where it starts.
    pub(super) async fn apply_subscribe(&self, digest: &Digest, channels: &[Channel], add: bool) {
        if add {
            if let Err(err) = self.follow(channels, None).await {
                tracing::debug!(%err, "channels not brought up to date before a subscribe; the catch-up task will");
            }
        }
        let applied = if add {
            self.registry.subscribe(digest, channels)
        } else {
            self.registry.unsubscribe(digest, channels)
        };
        if let Err(err) = applied {
            tracing::debug!(%err, "subscription change for a socket no longer here");
        }
    }

    /// Where `digest`'s socket is; with `end`, ends its credentials, and takes a connection
    /// that had a socket out of its channels' presence.
    /// Where `digest`'s socket is; with `end` (the application's close), ends its
    /// credentials, telling their `$disconnect` when they had a socket.
    async fn holder(&self, digest: &Digest, end: Option<&Close>) -> Result<Held, Error> {
        let mut conn = self.link();
        let p = self.digest_part(digest);
        let reply: Vec<String> = self
            .scripts
            .holder
            .key(self.keys.session(digest))
            .key(self.keys.subscriptions(digest))
            .key(self.keys.nodes(p))
            .key(self.keys.ends(p))
            .key(self.keys.outbox(p))
            .arg(now_ms())
            .arg(LEASE.as_millis() as u64)
            .arg(u8::from(end.is_some()))
            .arg(digest.to_string())
            .arg(end.map(|c| c.code().to_string()).unwrap_or_default())
            .arg(end.map_or("", |c| c.reason()))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        let held = Held::parse(reply);
        let channels = held.channels.iter().map(String::as_str);
        self.presence_change(false, digest, channels, "", &held.user, "")
            .await;
        Ok(held)
    }

    pub(super) async fn command(&self, node: &str, command: &Command) -> Result<(), Error> {
        let text = serde_json::to_string(command).expect("commands serialize");
        let mut conn = self.link();
        redis::cmd(self.publish_command())
            .arg(self.keys.node_topic(node))
            .arg(text)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(())
    }

    /// Mints credentials and records them as issued (for `user`, in the user's set too).
    pub(super) async fn issue(
        &self,
        ttl: Option<Duration>,
        user: Option<&User>,
    ) -> Result<Credentials, Error> {
        self.ready()?;
        let creds = self.registry.mint(ttl)?;
        let mut conn = self.link();
        let (name, info) = User::texts(user);
        // The user's set outlives its newest credentials' first-use deadline by a live
        // socket's TTL; live sockets renew it.
        let user_ttl = creds.expires_at_ms.saturating_sub(now_ms()) + LIVE_TTL.as_millis() as u64;
        // The user's set first: credentials are usable only once recorded, and by then
        // `DisconnectUser` finds them.
        if let Some(user) = user {
            self.scripts
                .user
                .key(self.keys.user(&user.name))
                .arg(creds.digest.to_string())
                .arg(user_ttl)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| self.unavailable(&e))?;
        }
        self.scripts
            .issue
            .key(self.keys.session(&creds.digest))
            .arg(creds.expires_at_ms)
            .arg(name)
            .arg(info)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        Ok(creds)
    }

    pub(super) async fn user_digests(&self, user: &str) -> Result<Vec<Digest>, Error> {
        self.ready()?;
        let mut conn = self.link();
        let members: Vec<String> = self
            .within(async {
                redis::cmd("SMEMBERS")
                    .arg(self.keys.user(user))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.unavailable(&e))
            })
            .await?;
        Ok(members.iter().filter_map(|d| d.parse().ok()).collect())
    }

    pub(super) async fn forget_user_digest(&self, user: &str, digest: &Digest) {
        let mut conn = self.link();
        let forgot = self
            .within(async {
                redis::cmd("SREM")
                    .arg(self.keys.user(user))
                    .arg(digest.to_string())
                    .query_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| self.unavailable(&e))
            })
            .await;
        if let Err(err) = forgot {
            tracing::debug!(%err, "an ended digest stays in its user's set until the set expires");
        }
    }

    /// Adds (or removes) `digest`'s subscriptions in Redis, and on the node holding its socket
    /// before returning. Returns whether a socket is live.
    pub(super) async fn subscribe(
        &self,
        digest: &Digest,
        channels: &[Channel],
        add: bool,
    ) -> Result<bool, Error> {
        self.ready()?;
        crate::registry::check_channel_count(channels)?;
        let mut conn = self.link();
        let mut invocation = self.scripts.subscribe.prepare_invoke();
        invocation
            .key(self.keys.session(digest))
            .key(self.keys.subscriptions(digest))
            .key(self.keys.nodes(self.digest_part(digest)))
            .arg(now_ms())
            .arg(LEASE.as_millis() as u64)
            .arg(u8::from(add));
        for channel in channels {
            invocation.arg(channel.as_str());
        }
        let reply: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(&e))?;
        let held = Held::parse(reply);
        if held.flag {
            // A connected digest joins or leaves the presence of what changed.
            let changed = held.channels.iter().map(String::as_str);
            let (id, user, info) = (&held.connection_id, &held.user, &held.info);
            self.presence_at(add, digest, changed, (id, user, info), &held.node)
                .await;
        }
        match held.holder {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => Ok(false),
            Holder::Live(node) if node == self.node => {
                self.apply_subscribe(digest, channels, add).await;
                Ok(true)
            }
            Holder::Live(node) => {
                let (rid, rx) = self.requests.expect_ack();
                let command = Command::Subscribe {
                    from: self.node.clone(),
                    rid,
                    digest: digest.to_string(),
                    channels: channels.iter().map(|c| c.to_string()).collect(),
                    add,
                };
                self.command(&node, &command).await?;
                if tokio::time::timeout(ACK_TIMEOUT, rx).await.is_err() {
                    self.requests.forget_ack(rid);
                    tracing::warn!(%node, "no acknowledgement of a subscription change; it applies when the socket reconnects");
                }
                Ok(true)
            }
        }
    }

    /// Sends to `digest`'s socket wherever it is. Returns whether one was live.
    pub(super) async fn send_to(&self, digest: &Digest, frame: Frame) -> Result<bool, Error> {
        self.ready()?;
        match self.holder(digest, None).await?.holder {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => Ok(false),
            Holder::Live(node) if node == self.node => Ok(self.registry.send_frame(digest, &frame)),
            Holder::Live(node) => {
                self.command(
                    &node,
                    &Command::Send {
                        digest: digest.to_string(),
                        frame: frame.to_string(),
                    },
                )
                .await?;
                Ok(true)
            }
        }
    }

    /// Ends `digest`'s credentials everywhere and closes its socket wherever it is.
    pub(super) async fn disconnect(&self, digest: &Digest, close: Close) -> Result<bool, Error> {
        self.ready()?;
        let held = self.holder(digest, Some(&close)).await?;
        match held.holder {
            Holder::Unknown => Err(Error::UnknownDigest),
            Holder::Offline => {
                if held.flag {
                    // Counted here; the script told it.
                    self.report_end(
                        *digest,
                        &held.connection_id,
                        &held.user,
                        EndReason::Application,
                    );
                }
                Ok(false)
            }
            Holder::Live(node) if node == self.node => {
                let _ = self.registry.disconnect(digest, close);
                Ok(true)
            }
            Holder::Live(node) => {
                let command = Command::Disconnect {
                    digest: digest.to_string(),
                    code: close.code(),
                    reason: close.reason().to_owned(),
                };
                self.command(&node, &command).await?;
                Ok(true)
            }
        }
    }

    /// Accepts a handshake's credentials cluster-wide and binds the socket here with the
    /// digest's subscriptions: this node subscribes to them in Redis and brings them up to date
    /// (reading what recovery needs beyond its own history) before the socket joins them.
    pub(super) async fn attach(
        &self,
        verified: &Verified,
        connection_id: &str,
        recover: Option<&Recover>,
    ) -> Result<Arc<Conn>, AttachError> {
        self.readiness
            .check_redis()
            .map_err(AttachError::Unavailable)?;
        let mut conn = self.link();
        let p = self.digest_part(&verified.digest);
        let reply: Vec<String> = self
            .scripts
            .attach
            .key(self.keys.session(&verified.digest))
            .key(self.keys.subscriptions(&verified.digest))
            .key(self.keys.nodes(p))
            .key(self.keys.ends(p))
            .key(self.keys.node_live(p, &self.node))
            .arg(now_ms())
            .arg(&self.node)
            .arg(verified.expires_at_ms)
            .arg(self.grace.as_millis() as u64)
            .arg(LEASE.as_millis() as u64)
            .arg(LIVE_TTL.as_millis() as u64)
            .arg(connection_id)
            .arg(verified.digest.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| AttachError::Unavailable(Unavailable::redis(e)))?;
        let mut reply = reply.into_iter();
        match reply.next().as_deref() {
            Some("ok") => {}
            Some("expired") => return Err(AttachRefusal::Expired.into()),
            Some("in_use") => return Err(AttachRefusal::AlreadyLive.into()),
            Some("unknown") => return Err(AttachRefusal::Unknown.into()),
            _ => return Err(AttachRefusal::Ended.into()),
        }
        let resumed = reply.next().as_deref() == Some("resumed");
        let (name, info) = (
            reply.next().unwrap_or_default(),
            reply.next().unwrap_or_default(),
        );
        let user = User::from_texts(&name, &info);
        let channels: Vec<Channel> = reply.filter_map(|c| Channel::new(&c).ok()).collect();
        // A first socket joins; so does a resume, which is a no-op (and no event) unless its
        // presence was taken away meanwhile (its node died and the presence lease ran out).
        {
            let (name, info) = (name.as_str(), info.as_str());
            self.presence_change(
                true,
                &verified.digest,
                channels.iter().map(Channel::as_str),
                connection_id,
                name,
                info,
            )
            .await;
        }
        // A lost client's channels are gaps: nothing to read for them.
        let since = recover.map(|r| &r.seen);
        let fetched = match self.follow(&channels, since).await {
            Ok(fetched) => fetched,
            Err(err) => {
                // Redis marked the id live here; give it back (resumable) before refusing.
                self.record_end(verified.digest, Ending::Resumable, EndReason::Dropped, None);
                return Err(match err {
                    Error::Unavailable(why) => why.into(),
                    other => Unavailable::redis(other).into(),
                });
            }
        };
        Ok(self.registry.attach_accepted(
            verified,
            connection_id,
            channels,
            user,
            recover,
            &fetched,
            resumed,
        ))
    }

    /// Records a socket's end in Redis (in the background: the socket is already gone here).
    pub(super) fn detach(&self, conn: &Conn, ending: Ending, ended: Option<&Ended>) {
        self.registry.detach(conn, ending);
        let (reason, close) = match ended {
            Some(e) => (e.reason, e.close.clone()),
            None => (EndReason::Dropped, None),
        };
        self.record_end(conn.digest(), ending, reason, close);
    }

    /// Records in Redis (in the background) that `digest`'s socket on this node ended; a final
    /// end is told there with `reason` and `close`.
    fn record_end(
        &self,
        digest: Digest,
        ending: Ending,
        reason: EndReason,
        close: Option<(u16, String)>,
    ) {
        // Runs during the drain too (the tracker is waited on after the sockets are gone), and
        // is bounded by the command timeout.
        self.spawn_short(move |bus| async move {
            let mut conn = bus.link();
            let p = bus.digest_part(&digest);
            let result = bus
                .scripts
                .detach
                .key(bus.keys.session(&digest))
                .key(bus.keys.subscriptions(&digest))
                .key(bus.keys.ends(p))
                .key(bus.keys.node_live(p, &bus.node))
                .key(bus.keys.outbox(p))
                .arg(&bus.node)
                .arg(now_ms())
                .arg(u8::from(ending == Ending::Resumable))
                .arg(bus.grace.as_millis() as u64)
                .arg(digest.to_string())
                .arg(reason.as_str())
                .arg(close.as_ref().map(|c| c.0.to_string()).unwrap_or_default())
                .arg(close.as_ref().map_or("", |c| c.1.as_str()))
                .invoke_async::<Vec<String>>(&mut conn)
                .await;
            match result {
                // A final end: the connection leaves its channels' presence.
                Ok(ended) => {
                    if let Some((user, channels)) = ended.split_first() {
                        let channels = channels.iter().map(String::as_str);
                        bus.presence_change(false, &digest, channels, "", user, "")
                            .await;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "could not record a socket's end in Redis; its id frees up when this node's heartbeat lapses");
                }
            }
        });
    }

    /// Keeps an event stream's anchor in the credentials' state (see [`scripts::ANCHOR`]).
    pub(super) async fn save_anchor(
        &self,
        digest: &Digest,
        number: u64,
        positions: &str,
    ) -> Result<(), Error> {
        self.ready()?;
        let mut conn = self.link();
        let kept: i64 = self
            .within(async {
                self.scripts
                    .anchor
                    .key(self.keys.session(digest))
                    .arg(number)
                    .arg(positions)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| self.unavailable(&e))
            })
            .await?;
        if kept == 1 {
            Ok(())
        } else {
            Err(Error::UnknownDigest)
        }
    }

    /// Anchor `number` of `digest`, when its field still holds that number.
    pub(super) async fn load_anchor(
        &self,
        digest: &Digest,
        number: u64,
    ) -> Result<Option<String>, Error> {
        self.ready()?;
        let mut conn = self.link();
        let field: Option<String> = self
            .within(async {
                redis::cmd("HGET")
                    .arg(self.keys.session(digest))
                    .arg(format!("sse{}", number % 4))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.unavailable(&e))
            })
            .await?;
        Ok(field.and_then(|field| {
            let (n, positions) = field.split_once(' ')?;
            (n.parse() == Ok(number)).then(|| positions.to_owned())
        }))
    }

    /// Whether `digest` has a socket live on a node whose heartbeat is fresh (`HOLDER`).
    pub(super) async fn is_live(&self, digest: &Digest) -> Result<bool, Error> {
        self.ready()?;
        let held = self.within(self.holder(digest, None)).await?;
        Ok(matches!(held.holder, Holder::Live(_)))
    }
}
