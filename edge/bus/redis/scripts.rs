//! The Lua scripts that change a digest's state in Redis atomically, so two nodes never both
//! accept one id. Each is a file of its own in `scripts/` (Lua, so editors and linters read it
//! as Lua); its keys and arguments are documented on its constant here, and its replies are
//! parsed in `mod.rs`. The tests at the end run each against a real Redis.
//!
//! A script that ends credentials for good, or changes a channel's occupancy, also writes the
//! lifecycle event (`$disconnect`, `$occupied`, `$vacated`) to the outbox in the same step
//! ([`TELL`]), so the event exists exactly when the change does, whichever node dies next;
//! the [`outbox`](super::outbox) relays it to the `Handle` groups.

use redis::Script;

/// Shared by the scripts that tell lifecycle events: `tell(outbox, cid, digest, action, json)`
/// appends one event to the outbox stream (of the partition the script runs in) and wakes
/// the relays up (a message on the topic named like the stream); `ended(reason, user, code, close reason)` is the
/// `$disconnect` JSON (`{"reason","final":true,"user"}`, with `code` and `close_reason` when a
/// close ended it).
pub(super) const TELL: &str = include_str!("scripts/tell.lua");

/// KEYS: s. ARGV: exp, user ('' for none), info.
/// (The user's set is another partition's: [`USER`].)
pub(super) const ISSUE: &str = include_str!("scripts/issue.lua");

/// Adds a digest to its user's set, which lives at least `ttl` from now.
/// KEYS: the user's set. ARGV: digest, ttl (ms).
pub(super) const USER: &str = include_str!("scripts/user.lua");

/// KEYS: s, subs, nodes, ends, this node's live set. ARGV: now, node, exp, grace, lease,
/// live_ttl, connection id, digest.
/// Returns {'ok', 'fresh'|'resumed', user, info, channels...} (user and info '' when none) or {'expired'|'in_use'|'ended'|'unknown'}.
/// An id with no state here was issued before Redis lost its data (issuing records every id):
/// it is refused, so a Redis that comes back empty never reopens ended credentials.
pub(super) const ATTACH: &str = include_str!("scripts/attach.lua");

/// A socket's end. A resumable one waits in `ends` (scored by the grace's end) for a node's
/// reaper to end it, unless it resumes first.
/// A final end tells its `$disconnect` (the socket's node gave the reason and close).
/// KEYS: s, subs, ends, this node's live set, outbox. ARGV: node, now, resumable (0/1), grace,
/// digest, reason, close code ('' for none), close reason.
/// Returns {} or, for a final end, {user, channels...} (for presence).
pub(super) const DETACH: &str = include_str!("scripts/detach.lua");

/// KEYS: s, subs, nodes. ARGV: now, lease, add (1) or remove (0), channels...
/// Returns {'unknown'} or {'offline'|'live', node, connected, connection id, user, info,
/// channels...} (see `Held`): connected (1) when the credentials have had a socket and not
/// ended (for presence); the channels are those this call actually added or removed.
pub(super) const SUBSCRIBE: &str = include_str!("scripts/subscribe.lua");

/// Adds a connection to a channel's presence, or removes it, keeping the count per user, and
/// publishes the change on the channel's topic in the same step (so every node with the
/// channel hears each change once, in order): `!join <first of its user: 0|1> <digest>\n<entry>`,
/// `!leave <last of its user> <digest>\n<entry>`, and with occupancy `!occupied` (the first
/// member, unless one left within the vacate delay) or, after the last member left, an entry
/// in the vacating set (or `!vacated` at once for a delay of 0).
/// An occupancy change is told to the `Handle` groups too (`$occupied`, `$vacated`).
/// A leave with a node in ARGV[9] happens only while the digest is still live on that node
/// (a dead node's presence, unless its socket resumed elsewhere).
/// Each member's node is kept beside it (`pn`: digest → the node its socket is on), for that
/// condition.
/// KEYS: the channel's presence hash, its user counts, the vacating set, outbox, the members'
/// nodes. ARGV: 'join'|'leave', digest, entry (JSON), user ('' for none), topic, vacate delay
/// (ms; -1 without occupancy), now (ms), channel, node (a join: where the socket is; a leave:
/// '' for no condition). Returns
/// 'occupied' or 'vacated' when this call changed the occupancy, else ''.
pub(super) const PRESENCE: &str = include_str!("scripts/presence.lua");

/// Tells `vacated` once for a channel whose vacate delay passed with no member back.
/// KEYS: vacating, pr, outbox. ARGV: channel, now, topic. Returns 1 when this call told it.
pub(super) const VACATE: &str = include_str!("scripts/vacate.lua");

/// Where a digest's socket is; with `end`, ends its credentials (the application's
/// `Disconnect`), telling the final `$disconnect` when they had a socket.
/// KEYS: s, subs, nodes, ends, outbox. ARGV: now, lease, end (1: mark dead), digest, close
/// code, close reason.
/// Returns {'unknown'} or {'offline'|'live', node, ended offline, connection id, user, info,
/// channels...} (see `Held`): the flag is 1 when this call ended credentials that had a socket
/// but none live now (in their grace, or on a node that stopped heartbeating); the channels
/// (for presence) come when this call ended credentials that had a socket.
pub(super) const HOLDER: &str = include_str!("scripts/holder.lua");

/// Ends, once, credentials no socket will resume (the node whose call ends them tells it):
/// mode `grace`, those whose grace ran out (the index is `ends`); mode `lost`, those still live
/// on `node`, which stopped heartbeating (the index is that node's live set; the caller checked
/// that its lease and the grace passed). The digest leaves the index either way.
/// It tells the final `$disconnect` (`grace expired` or `node lost`).
/// KEYS: s, subs, index, outbox. ARGV: now, digest, mode, node.
/// Returns {} or {connection id, user, channels...}.
pub(super) const REAP: &str = include_str!("scripts/reap.lua");

/// Re-records a socket live on this node after Redis came back empty (a restart without
/// persistence); leaves existing state alone (the user's set is [`USER`]'s). KEYS: s, subs,
/// this node's live set. ARGV: node, exp, live_ttl, user ('' for none), info, digest,
/// channels...
pub(super) const RESTORE: &str = include_str!("scripts/restore.lua");

/// One push to one channel: gives it the channel's next offset (creating the channel's epoch
/// when Redis has none), keeps it in the channel's log (capped, with a time to live), publishes
/// it, and records its idempotency key, all at once; so every node sees one order, and a
/// retried push with the same key is taken once.
/// KEYS: meta, log, idempotency (the meta key again when there is no key).
/// ARGV: candidate epoch, payload, history size, history ttl (ms), position ttl (ms), topic,
/// now (ms), idempotency window (ms), has key (0/1).
/// Returns {epoch, offset, duplicate (0/1)}.
pub(super) const PUSH: &str = include_str!("scripts/push.lua");

/// A channel's position and some of its log, read at once (so they agree): the position only,
/// the pushes after an offset (oldest first), or before one (newest first; 0: from the newest).
/// Creates the channel's epoch when Redis has none, so a position read here is the one later
/// pushes continue.
/// KEYS: meta, log. ARGV: candidate epoch, position ttl (ms), mode ('pos'|'after'|'before'),
/// offset, count.
/// Returns {epoch, last offset, then offset, time (ms), payload for each push}.
pub(super) const READ: &str = include_str!("scripts/read.lua");

/// Starts a new epoch for a channel whose shard failed over (its new master may lack the
/// last pushes, whose offsets would then be given again): the sockets see a gap
/// (`recovered:false`) instead of pushes taken for ones they had. Only when the channel is
/// still in the epoch the caller knew, so one failover starts one epoch.
/// KEYS: meta, log. ARGV: known epoch, new epoch, position ttl (ms). Returns 1 when it did.
pub(super) const REBASE: &str = include_str!("scripts/rebase.lua");

/// An event stream's anchor (its positions), kept in the credentials' state, which it expires
/// with, in field `sse<number mod 4>` as `<number> <positions>`: the four newest.
/// KEYS: s. ARGV: number, positions (JSON). Returns 1, or 0 when the state is gone.
pub(super) const ANCHOR: &str = include_str!("scripts/anchor.lua");

/// The scripts, loaded once per node (redis-rs sends `EVALSHA`, and the source on `NOSCRIPT`).
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) issue: Script,
    pub(super) user: Script,
    pub(super) attach: Script,
    pub(super) detach: Script,
    pub(super) subscribe: Script,
    pub(super) holder: Script,
    pub(super) reap: Script,
    pub(super) presence: Script,
    pub(super) vacate: Script,
    pub(super) restore: Script,
    pub(super) push: Script,
    pub(super) read: Script,
    pub(super) rebase: Script,
    pub(super) anchor: Script,
}

impl Scripts {
    /// The scripts for one server (`PUBLISH`) or a cluster (`SPUBLISH`: a script's topic is
    /// on its keys' slot, so it reaches only the nodes subscribed on that shard).
    pub(super) fn new(cluster: bool) -> Self {
        let publish = if cluster { "SPUBLISH" } else { "PUBLISH" };
        let with_pub = |body: &str| Script::new(&format!("local PUB = '{publish}'\n{body}"));
        Self {
            issue: Script::new(ISSUE),
            user: Script::new(USER),
            attach: Script::new(ATTACH),
            detach: with_pub(&format!("{TELL}{DETACH}")),
            subscribe: Script::new(SUBSCRIBE),
            holder: with_pub(&format!("{TELL}{HOLDER}")),
            reap: with_pub(&format!("{TELL}{REAP}")),
            presence: with_pub(&format!("{TELL}{PRESENCE}")),
            vacate: with_pub(&format!("{TELL}{VACATE}")),
            restore: Script::new(RESTORE),
            push: with_pub(PUSH),
            read: Script::new(READ),
            rebase: Script::new(REBASE),
            anchor: Script::new(ANCHOR),
        }
    }
}

/// Each script against a real Redis (127.0.0.1:6379, which `.ci/run` and the integration tests'
/// setup start when nothing answers), on keys of a prefix of the test's own: the guarantees the
/// cluster's correctness rests on. That no script touches keys of two slots is held by every
/// cross-node integration test, which also runs on a Redis Cluster (a script that did would
/// fail there with `CROSSSLOT`).
#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use redis::aio::MultiplexedConnection;

    use super::*;

    /// A connection to the Redis on 127.0.0.1:6379, started (with no persistence) when nothing
    /// answers there, as the integration tests' setup does.
    async fn redis() -> MultiplexedConnection {
        let client = redis::Client::open("redis://127.0.0.1:6379").expect("a Redis URL");
        if let Ok(conn) = client.get_multiplexed_async_connection().await {
            return conn;
        }
        let started = std::process::Command::new("redis-server")
            .args([
                "--daemonize",
                "yes",
                "--port",
                "6379",
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .status();
        assert!(
            started.is_ok_and(|s| s.success()),
            "no Redis on 127.0.0.1:6379, and redis-server could not start one"
        );
        for _ in 0..100 {
            if let Ok(conn) = client.get_multiplexed_async_connection().await {
                return conn;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("redis-server started but does not answer on 127.0.0.1:6379");
    }

    /// Keys of one test: `cgunit:<name>:<pid>:<nanos>:{0}:<rest>` (one slot, as a partition's).
    fn keys(name: &str) -> impl Fn(&str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let prefix = format!("cgunit:{name}:{}:{nanos}:{{0}}", std::process::id());
        move |rest| format!("{prefix}:{rest}")
    }

    /// The tests' "now": real time (keys get real expiry times), read once.
    static NOW_MS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(crate::clock::now_ms);

    /// Deletes the test's keys.
    async fn clean(conn: &mut MultiplexedConnection, k: &dyn Fn(&str) -> String) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(k("*"))
            .query_async(conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(conn).await;
        }
    }

    async fn push(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
        key: Option<&str>,
        payload: &str,
    ) -> (String, u64, u8) {
        let scripts = Scripts::new(false);
        let idempotency = key.map_or_else(|| k("ch:c:m"), |key| k(&format!("ch:c:i:{key}")));
        scripts
            .push
            .key(k("ch:c:m"))
            .key(k("ch:c:l"))
            .key(idempotency)
            .arg("epoch1")
            .arg(payload)
            .arg(1000)
            .arg(60_000)
            .arg(60_000)
            .arg(k("ch:c"))
            .arg(*NOW_MS)
            .arg(60_000)
            .arg(if key.is_some() { "1" } else { "0" })
            .invoke_async(conn)
            .await
            .expect("PUSH runs")
    }

    /// Pushes from two connections at once (two nodes) get one order: every offset once, and
    /// the log holds them in that order. A retried push with its idempotency key is taken once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_gives_a_channel_one_order_whoever_pushes() {
        let k = keys("push");
        let node = |i: u32| {
            let k = &k;
            async move {
                let mut conn = redis().await;
                let mut offsets = Vec::new();
                for n in 0..200 {
                    let (epoch, offset, duplicate) =
                        push(&mut conn, k, None, &format!("{{\"node\":{i},\"n\":{n}}}")).await;
                    assert_eq!((epoch.as_str(), duplicate), ("epoch1", 0));
                    offsets.push(offset);
                }
                offsets
            }
        };
        let (a, b) = tokio::join!(node(1), node(2));
        let all: BTreeSet<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(
            all,
            (1..=400).collect::<BTreeSet<u64>>(),
            "every offset once"
        );
        assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
        let mut conn = redis().await;
        let ids: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(k("ch:c:l"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let logged: Vec<String> = ids.into_iter().map(|(id, _)| id).collect();
        let expected: Vec<String> = (1..=400).map(|o| format!("0-{o}")).collect();
        assert_eq!(logged, expected, "the log holds every push in offset order");

        let first = push(&mut conn, &k, Some("retry-me"), "1").await;
        let again = push(&mut conn, &k, Some("retry-me"), "1").await;
        assert_eq!((first.1, first.2), (401, 0));
        assert_eq!((again.1, again.2), (401, 1), "the retry is the first push");
        assert_eq!(push(&mut conn, &k, None, "2").await.1, 402);
        clean(&mut conn, &k).await;
    }

    async fn issue(conn: &mut MultiplexedConnection, k: &dyn Fn(&str) -> String, digest: &str) {
        let _: i64 = Scripts::new(false)
            .issue
            .key(k(&format!("s:{digest}")))
            .arg(*NOW_MS + 300_000)
            .arg("ursula")
            .arg("")
            .invoke_async(conn)
            .await
            .expect("ISSUE runs");
    }

    async fn heartbeat(conn: &mut MultiplexedConnection, k: &dyn Fn(&str) -> String, node: &str) {
        let _: i64 = redis::cmd("ZADD")
            .arg(k("nodes"))
            .arg(*NOW_MS)
            .arg(node)
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn attach(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
        digest: &str,
        node: &str,
        now: u64,
    ) -> Vec<String> {
        Scripts::new(false)
            .attach
            .key(k(&format!("s:{digest}")))
            .key(k(&format!("subs:{digest}")))
            .key(k("nodes"))
            .key(k("ends"))
            .key(k(&format!("nl:{node}")))
            .arg(now)
            .arg(node)
            .arg(*NOW_MS + 300_000)
            .arg(30_000)
            .arg(3_000)
            .arg(60_000)
            .arg(format!("cid-{digest}"))
            .arg(digest)
            .invoke_async(conn)
            .await
            .expect("ATTACH runs")
    }

    /// One socket per id: a second node's attach while the first heartbeats is refused; an id
    /// Redis never recorded is unknown (it was issued before Redis lost its data).
    #[tokio::test]
    async fn attach_admits_one_socket_per_id_and_no_unknown_one() {
        let k = keys("attach");
        let mut conn = redis().await;
        heartbeat(&mut conn, &k, "a").await;
        heartbeat(&mut conn, &k, "b").await;
        issue(&mut conn, &k, "d1").await;
        let first = attach(&mut conn, &k, "d1", "a", *NOW_MS).await;
        assert_eq!(first[..3], ["ok", "fresh", "ursula"]);
        assert_eq!(attach(&mut conn, &k, "d1", "b", *NOW_MS).await, ["in_use"]);
        assert_eq!(
            attach(&mut conn, &k, "never-issued", "b", *NOW_MS).await,
            ["unknown"]
        );
        clean(&mut conn, &k).await;
    }

    async fn detach(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
        digest: &str,
        resumable: bool,
    ) -> Vec<String> {
        Scripts::new(false)
            .detach
            .key(k(&format!("s:{digest}")))
            .key(k(&format!("subs:{digest}")))
            .key(k("ends"))
            .key(k("nl:a"))
            .key(k("out"))
            .arg("a")
            .arg(*NOW_MS)
            .arg(if resumable { "1" } else { "0" })
            .arg(30_000)
            .arg(digest)
            .arg("client closed")
            .arg("1000")
            .arg("bye")
            .invoke_async(conn)
            .await
            .expect("DETACH runs")
    }

    async fn reap(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
        digest: &str,
        now: u64,
    ) -> Vec<String> {
        Scripts::new(false)
            .reap
            .key(k(&format!("s:{digest}")))
            .key(k(&format!("subs:{digest}")))
            .key(k("ends"))
            .key(k("out"))
            .arg(now)
            .arg(digest)
            .arg("grace")
            .arg("a")
            .invoke_async(conn)
            .await
            .expect("REAP runs")
    }

    /// The outbox's events, in order: each one's fields by name.
    async fn outbox(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
    ) -> Vec<std::collections::HashMap<String, String>> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> =
            redis::cmd("XRANGE")
                .arg(k("out"))
                .arg("-")
                .arg("+")
                .query_async(conn)
                .await
                .unwrap();
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    /// The actions the outbox holds, in order.
    async fn actions(conn: &mut MultiplexedConnection, k: &dyn Fn(&str) -> String) -> Vec<String> {
        outbox(conn, k)
            .await
            .into_iter()
            .map(|mut fields| fields.remove("action").unwrap_or_default())
            .collect()
    }

    /// The outbox's `$disconnect` events: (connection id, JSON).
    async fn told(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
    ) -> Vec<(String, String)> {
        outbox(conn, k)
            .await
            .into_iter()
            .map(|mut fields| {
                let mut field = |name: &str| fields.remove(name).unwrap_or_default();
                assert_eq!(field("action"), "$disconnect");
                (field("cid"), field("json"))
            })
            .collect()
    }

    /// A final end is told once, by the script that decides it, in the same step: a clean close
    /// writes its `$disconnect` at once and nothing after it tells another; a drop tells
    /// nothing until the reaper ends it after the grace, once, however often it runs.
    #[tokio::test]
    async fn a_final_end_is_told_once_by_the_script_that_decides_it() {
        let k = keys("ends");
        let mut conn = redis().await;
        heartbeat(&mut conn, &k, "a").await;
        for d in ["closed", "dropped"] {
            issue(&mut conn, &k, d).await;
            assert_eq!(attach(&mut conn, &k, d, "a", *NOW_MS).await[0], "ok");
        }

        assert_eq!(detach(&mut conn, &k, "closed", false).await[0], "ursula");
        let events = told(&mut conn, &k).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, "cid-closed");
        let json: serde_json::Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reason":"client closed","final":true,"user":"ursula","code":1000,"close_reason":"bye"})
        );
        assert!(detach(&mut conn, &k, "closed", false).await.is_empty());
        assert!(reap(&mut conn, &k, "closed", *NOW_MS + 60_000)
            .await
            .is_empty());
        assert_eq!(told(&mut conn, &k).await.len(), 1, "told once");

        assert!(detach(&mut conn, &k, "dropped", true).await.is_empty());
        assert_eq!(told(&mut conn, &k).await.len(), 1, "a drop is not an end");
        assert!(
            reap(&mut conn, &k, "dropped", *NOW_MS + 1_000)
                .await
                .is_empty(),
            "within its grace"
        );
        assert_eq!(
            reap(&mut conn, &k, "dropped", *NOW_MS + 30_000).await[0],
            "cid-dropped"
        );
        assert!(reap(&mut conn, &k, "dropped", *NOW_MS + 31_000)
            .await
            .is_empty());
        let events = told(&mut conn, &k).await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events[1].1.contains("grace expired"), "{events:?}");
        // Ended credentials never attach again.
        assert_eq!(
            attach(&mut conn, &k, "dropped", "a", *NOW_MS + 31_000).await,
            ["ended"]
        );
        clean(&mut conn, &k).await;
    }

    /// An event stream's anchor is kept only with credentials' state (never creating a key
    /// that would not expire), in field `sse<n mod 4>`, and expires with that state.
    #[tokio::test]
    async fn an_anchor_is_kept_with_the_credentials_state_and_never_alone() {
        let k = keys("anchor");
        let mut conn = redis().await;
        let save = |n: u64, positions: &'static str| {
            let key = k("s:d");
            async move {
                Scripts::new(false)
                    .anchor
                    .key(key)
                    .arg(n)
                    .arg(positions)
                    .invoke_async::<i64>(&mut redis().await)
                    .await
                    .expect("ANCHOR runs")
            }
        };
        assert_eq!(save(1, "{}").await, 0, "no state, no anchor");
        let exists: i64 = redis::cmd("EXISTS")
            .arg(k("s:d"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "the script created nothing");
        issue(&mut conn, &k, "d").await;
        for n in 1..=5 {
            assert_eq!(save(n, r#"{"c":{"epoch":"e","offset":1}}"#).await, 1);
        }
        let field = |n: u64| {
            redis::cmd("HGET")
                .arg(k("s:d"))
                .arg(format!("sse{}", n % 4))
                .clone()
        };
        let fifth: String = field(5).query_async(&mut conn).await.unwrap();
        assert_eq!(
            fifth, r#"5 {"c":{"epoch":"e","offset":1}}"#,
            "5 took 1's field"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k("s:d"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "the state still expires: {ttl}");
        clean(&mut conn, &k).await;
    }

    /// SUBSCRIBE changes a digest's subscriptions only while its credentials are known and not
    /// ended, says exactly which channels it changed, says where the socket is (live only
    /// while its node's heartbeat is fresh), and the set expires with the credentials.
    #[tokio::test]
    async fn subscribe_changes_only_known_credentials_and_says_what_changed() {
        let k = keys("subscribe");
        let mut conn = redis().await;
        let subscribe =
            |digest: &'static str, add: bool, channels: &'static [&'static str], now: u64| {
                let (s, subs, nodes) = (
                    k(&format!("s:{digest}")),
                    k(&format!("subs:{digest}")),
                    k("nodes"),
                );
                async move {
                    let scripts = Scripts::new(false);
                    let mut invocation = scripts.subscribe.prepare_invoke();
                    invocation
                        .key(s)
                        .key(subs)
                        .key(nodes)
                        .arg(now)
                        .arg(3_000)
                        .arg(u8::from(add));
                    for channel in channels {
                        invocation.arg(*channel);
                    }
                    invocation
                        .invoke_async::<Vec<String>>(&mut redis().await)
                        .await
                        .expect("SUBSCRIBE runs")
                }
            };
        assert_eq!(
            subscribe("nobody", true, &["a"], *NOW_MS).await,
            ["unknown"]
        );
        let exists: i64 = redis::cmd("EXISTS")
            .arg(k("subs:nobody"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "no subscriptions for unknown credentials");

        issue(&mut conn, &k, "d").await;
        let offline = subscribe("d", true, &["a", "b"], *NOW_MS).await;
        assert_eq!(
            (offline[0].as_str(), &offline[6..]),
            ("offline", &["a".to_owned(), "b".to_owned()][..])
        );
        let again = subscribe("d", true, &["b", "c"], *NOW_MS).await;
        assert_eq!(&again[6..], ["c"], "only what changed");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k("subs:d"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "the set expires with the credentials: {ttl}");

        heartbeat(&mut conn, &k, "n1").await;
        assert_eq!(attach(&mut conn, &k, "d", "n1", *NOW_MS).await[0], "ok");
        let live = subscribe("d", false, &["a", "zz"], *NOW_MS).await;
        assert_eq!(
            (live[0].as_str(), live[1].as_str(), &live[6..]),
            ("live", "n1", &["a".to_owned()][..])
        );
        // A node whose heartbeat is older than the lease holds nothing.
        let stale = subscribe("d", true, &["a"], *NOW_MS + 10_000).await;
        assert_eq!(stale[0], "offline");
        clean(&mut conn, &k).await;
    }

    /// PRESENCE for `(kind, digest, node)` on `(channel, user, vacate delay)`; the channel's
    /// presence hash is `pr:<channel>`, the rest of the test's keys shared.
    async fn presence(
        conn: &mut MultiplexedConnection,
        k: &dyn Fn(&str) -> String,
        (kind, digest, node): (&str, &str, &str),
        (channel, user, delay): (&str, &str, i64),
    ) -> String {
        let scripts = Scripts::new(false);
        let mut invocation = scripts.presence.prepare_invoke();
        for key in [
            k(&format!("pr:{channel}")),
            k("pu"),
            k("vacating"),
            k("out"),
            k("pn"),
        ] {
            invocation.key(key);
        }
        invocation
            .arg(kind)
            .arg(digest)
            .arg(format!(r#"{{"cid":"x","user":"{user}","info":""}}"#))
            .arg(user)
            .arg(k("topic"))
            .arg(delay)
            .arg(*NOW_MS)
            .arg(channel)
            .arg(node)
            .invoke_async::<String>(conn)
            .await
            .expect("PRESENCE runs")
    }

    /// PRESENCE counts a user's connections (the first joins, the last leaves), tells
    /// occupancy once at each edge with its lifecycle event in the same step, and ignores a
    /// leave conditioned on a node that no longer holds the member.
    #[tokio::test]
    async fn presence_counts_users_and_tells_occupancy_once_at_each_edge() {
        let k = keys("presence");
        let mut conn = redis().await;
        let presence = |kind: &'static str, digest: &'static str, node: &'static str| {
            let k = &k;
            async move {
                presence(
                    &mut redis().await,
                    k,
                    (kind, digest, node),
                    ("room", "u", 0),
                )
                .await
            }
        };
        assert_eq!(presence("join", "d1", "n1").await, "occupied");
        assert_eq!(
            presence("join", "d1", "n1").await,
            "",
            "a member joins once"
        );
        assert_eq!(presence("join", "d2", "n2").await, "");
        let count: i64 = redis::cmd("HGET")
            .arg(k("pu"))
            .arg("u")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(count, 2, "two connections of one user");
        assert_eq!(actions(&mut conn, &k).await, ["$occupied"], "once");
        // A dead node's leave for a member whose socket is now on another node changes nothing.
        assert_eq!(presence("leave", "d2", "n1").await, "");
        assert_eq!(presence("leave", "d1", "n1").await, "");
        assert_eq!(presence("leave", "d2", "").await, "vacated");
        assert_eq!(presence("leave", "d2", "").await, "", "left once");
        let count: Option<i64> = redis::cmd("HGET")
            .arg(k("pu"))
            .arg("u")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            count, None,
            "the user's count is gone with its last connection"
        );
        assert_eq!(
            actions(&mut conn, &k).await,
            ["$occupied", "$vacated"],
            "once each"
        );
        clean(&mut conn, &k).await;
    }

    /// With a vacate delay, the last leave only schedules `vacated`: VACATE tells it once the
    /// delay passed (whichever node's sweeper runs first, once), and not at all when a member
    /// came back meanwhile.
    #[tokio::test]
    async fn vacated_is_told_once_after_the_delay_unless_a_member_came_back() {
        let k = keys("vacate");
        let mut conn = redis().await;
        let presence = |kind: &'static str, digest: &'static str, channel: &'static str| {
            let k = &k;
            async move {
                presence(
                    &mut redis().await,
                    k,
                    (kind, digest, ""),
                    (channel, "", 5_000),
                )
                .await
            }
        };
        let vacate = |channel: &'static str, now: u64| {
            let (vacating, pr, out, topic) = (
                k("vacating"),
                k(&format!("pr:{channel}")),
                k("out"),
                k("topic"),
            );
            async move {
                Scripts::new(false)
                    .vacate
                    .key(vacating)
                    .key(pr)
                    .key(out)
                    .arg(channel)
                    .arg(now)
                    .arg(topic)
                    .invoke_async::<i64>(&mut redis().await)
                    .await
                    .expect("VACATE runs")
            }
        };
        for channel in ["gone", "back"] {
            assert_eq!(presence("join", "d", channel).await, "occupied");
            assert_eq!(presence("leave", "d", channel).await, "", "only scheduled");
        }
        assert_eq!(vacate("gone", *NOW_MS + 4_000).await, 0, "within the delay");
        assert_eq!(
            presence("join", "e", "back").await,
            "",
            "came back: no new occupied"
        );
        assert_eq!(vacate("gone", *NOW_MS + 5_000).await, 1);
        assert_eq!(vacate("gone", *NOW_MS + 6_000).await, 0, "told once");
        assert_eq!(vacate("back", *NOW_MS + 6_000).await, 0, "a member is back");
        assert_eq!(
            actions(&mut conn, &k).await,
            ["$occupied", "$occupied", "$vacated"]
        );
        clean(&mut conn, &k).await;
    }

    /// HOLDER says where a digest's socket is; with an end, it ends the credentials for good and
    /// tells their `$disconnect` when they had a socket that is not live (a live one is told by
    /// its node, when the socket closes), and refuses them afterwards.
    #[tokio::test]
    async fn holder_finds_a_socket_and_an_end_is_told_once() {
        let k = keys("holder");
        let mut conn = redis().await;
        let holder = |digest: &'static str, end: bool, now: u64| {
            let keys = [
                k(&format!("s:{digest}")),
                k(&format!("subs:{digest}")),
                k("nodes"),
                k("ends"),
                k("out"),
            ];
            async move {
                let scripts = Scripts::new(false);
                let mut invocation = scripts.holder.prepare_invoke();
                for key in keys {
                    invocation.key(key);
                }
                invocation
                    .arg(now)
                    .arg(3_000)
                    .arg(u8::from(end))
                    .arg(digest)
                    .arg(if end { "4001" } else { "" })
                    .arg(if end { "bye" } else { "" })
                    .invoke_async::<Vec<String>>(&mut redis().await)
                    .await
                    .expect("HOLDER runs")
            }
        };
        assert_eq!(holder("nobody", false, *NOW_MS).await, ["unknown"]);
        heartbeat(&mut conn, &k, "a").await;
        for d in ["live", "dropped"] {
            issue(&mut conn, &k, d).await;
            assert_eq!(attach(&mut conn, &k, d, "a", *NOW_MS).await[0], "ok");
        }
        let live = holder("live", false, *NOW_MS).await;
        assert_eq!((live[0].as_str(), live[1].as_str()), ("live", "a"));
        assert!(detach(&mut conn, &k, "dropped", true).await.is_empty());
        let ended = holder("dropped", true, *NOW_MS).await;
        assert_eq!(
            (ended[0].as_str(), ended[2].as_str()),
            ("offline", "1"),
            "{ended:?}"
        );
        let events = told(&mut conn, &k).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].1.contains("4001"), "{events:?}");
        assert_eq!(
            holder("dropped", true, *NOW_MS).await,
            ["unknown"],
            "ended once"
        );
        assert_eq!(told(&mut conn, &k).await.len(), 1);
        clean(&mut conn, &k).await;
    }

    /// READ returns a channel's position and part of its log at once (so they agree): after an
    /// offset oldest first, before one newest first; on a channel Redis has no state for, it
    /// creates the epoch that later pushes continue.
    #[tokio::test]
    async fn read_returns_a_position_and_the_log_that_agrees_with_it() {
        let k = keys("read");
        let mut conn = redis().await;
        let read = |mode: &'static str, offset: u64, count: u64| {
            let (meta, log) = (k("ch:c:m"), k("ch:c:l"));
            async move {
                let values: Vec<redis::Value> = Scripts::new(false)
                    .read
                    .key(meta)
                    .key(log)
                    .arg("fresh1")
                    .arg(60_000)
                    .arg(mode)
                    .arg(offset)
                    .arg(count)
                    .invoke_async(&mut redis().await)
                    .await
                    .expect("READ runs");
                let epoch: String = redis::from_redis_value(values[0].clone()).unwrap();
                let last: u64 = redis::from_redis_value(values[1].clone()).unwrap();
                let offsets: Vec<u64> = values[2..]
                    .chunks(3)
                    .map(|e| redis::from_redis_value(e[0].clone()).unwrap())
                    .collect();
                (epoch, last, offsets)
            }
        };
        // No state yet: the read creates the epoch, and pushes continue it.
        assert_eq!(read("pos", 0, 0).await, ("fresh1".to_owned(), 0, vec![]));
        for n in 1..=5 {
            push(&mut conn, &k, None, &n.to_string()).await;
        }
        let (epoch, last, after) = read("after", 2, 10).await;
        assert_eq!((epoch.as_str(), last, after), ("fresh1", 5, vec![3, 4, 5]));
        assert_eq!(read("after", 0, 2).await.2, [1, 2], "a page from the start");
        assert_eq!(read("before", 0, 2).await.2, [5, 4], "newest first");
        assert_eq!(read("before", 4, 10).await.2, [3, 2, 1]);
        clean(&mut conn, &k).await;
    }
}
