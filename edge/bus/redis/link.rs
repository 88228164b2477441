//! The connections to Redis, one server or a Redis Cluster behind one interface: the `--redis`
//! URL ([`Endpoint`]), a command connection ([`Link`], which routes each command to the shard
//! that owns its key and follows `MOVED`/`ASK` and failovers), pipelines split by partition
//! ([`Batch`]: a cluster pipeline must stay on one slot), and the pub/sub connection
//! ([`Sink`], [`Incoming`]): `SUBSCRIBE`/`PUBLISH` on one server, sharded
//! `SSUBSCRIBE`/`SPUBLISH` on a cluster, where one connection per shard carries every topic
//! the node uses and is re-subscribed on the new master after a failover or a slot move.

use std::time::Duration;

use futures_util::StreamExt;
use redis::{
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection, PubSubSink, PubSubStream},
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, PushKind, RedisError, RedisFuture, RedisResult, Script, ScriptInvocation, Value,
};
use tokio::sync::mpsc;

use super::keys::key_slot;

/// What `--redis` names: one server (`redis://`, `rediss://`, `unix://`), or a Redis Cluster
/// by a seed list (`redis-cluster://host:port,host:port`; `rediss-cluster://` for TLS).
///
/// A cluster's connections are bootstrapped from every node the node knows, not only from the
/// seeds it was given: the topology watcher tells it the cluster's current members
/// ([`Endpoint::learn`]), and each new connection (after a failover, a slot move, a dropped
/// pub/sub connection) starts from those first, then the seeds. The client library keeps the
/// nodes it was built with for its own reconnections, so a client built from one seed whose
/// master then died would try that dead address forever; a client is built anew (and seed
/// names resolved anew) for every connection instead.
#[derive(Debug, Clone)]
pub(super) enum Endpoint {
    One(redis::Client),
    Cluster {
        /// The seed nodes' `host:port`, as given.
        seeds: Vec<String>,
        /// The URL start (scheme and credentials) and end (database, options) of every node's
        /// address.
        base: String,
        tail: String,
        /// The cluster's members (`host:port`) at the last reading of its slot map, masters
        /// first; shared by every clone of the endpoint.
        members: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    },
}

impl Endpoint {
    pub(super) fn open(url: &str) -> RedisResult<Self> {
        let Some((scheme, rest)) = url
            .strip_prefix("redis-cluster://")
            .map(|r| ("redis", r))
            .or_else(|| url.strip_prefix("rediss-cluster://").map(|r| ("rediss", r)))
        else {
            return Ok(Self::One(redis::Client::open(url)?));
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let (hosts, tail) = match hosts.find(['/', '?']) {
            Some(i) => hosts.split_at(i),
            None => (hosts, ""),
        };
        let seeds: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if seeds.is_empty() {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a redis-cluster:// URL names at least one host:port",
            )));
        }
        let endpoint = Self::Cluster {
            seeds,
            base: format!("{scheme}://{auth}"),
            tail: tail.to_owned(),
            members: Default::default(),
        };
        // Checks the URLs now, so a bad one fails at start, not at the first connection.
        endpoint.cluster_client(false)?;
        Ok(endpoint)
    }

    /// The nodes to start from: the cluster's last known members, then the seeds (whose names
    /// are resolved again by each client built from them).
    pub(super) fn nodes(&self) -> Vec<String> {
        match self {
            Self::One(_) => Vec::new(),
            Self::Cluster { seeds, members, .. } => {
                let mut nodes = members.lock().clone();
                for seed in seeds {
                    if !nodes.contains(seed) {
                        nodes.push(seed.clone());
                    }
                }
                nodes
            }
        }
    }

    /// Records the cluster's current members (`host:port`, masters first), read from its slot
    /// map; connections made from now on start from them.
    pub(super) fn learn(&self, nodes: Vec<String>) {
        if let Self::Cluster { members, .. } = self {
            let mut unique = Vec::with_capacity(nodes.len());
            for node in nodes {
                if !unique.contains(&node) {
                    unique.push(node);
                }
            }
            *members.lock() = unique;
        }
    }

    /// A cluster client bootstrapped from [`Endpoint::nodes`] (RESP3 for sharded pub/sub).
    fn cluster_client(&self, resp3: bool) -> RedisResult<ClusterClient> {
        let Self::Cluster { base, tail, .. } = self else {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "not a Redis Cluster",
            )));
        };
        let urls: Vec<String> = self
            .nodes()
            .iter()
            .map(|node| format!("{base}{node}{tail}"))
            .collect();
        let builder = ClusterClientBuilder::new(urls)
            .connection_timeout(super::COMMAND_TIMEOUT)
            .response_timeout(super::COMMAND_TIMEOUT);
        if resp3 {
            builder.use_protocol(redis::ProtocolVersion::RESP3).build()
        } else {
            builder.build()
        }
    }

    pub(super) fn node_url(&self, addr: &str) -> String {
        match self {
            Self::One(_) => String::new(),
            Self::Cluster { base, tail, .. } => format!("{base}{addr}{tail}"),
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// The command connection: connects in the background and reconnects by itself.
    pub(super) fn commands(&self, timeout: Duration, backoff: Duration) -> RedisResult<Link> {
        match self {
            Self::One(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(backoff);
                Ok(Link::One(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?))
            }
            Self::Cluster { .. } => Ok(Link::Cluster(
                self.cluster_client(false)?
                    .get_pending_async_connection_with_config(
                        ClusterConfig::new()
                            .set_connection_timeout(timeout)
                            .set_response_timeout(timeout),
                    ),
            )),
        }
    }

    /// A connection whose commands may take up to `response` (blocking reads).
    pub(super) async fn blocking(
        &self,
        connect: Duration,
        response: Duration,
    ) -> RedisResult<Link> {
        match self {
            Self::One(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response));
                Ok(Link::Blocking(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Self::Cluster { .. } => Ok(Link::Cluster(
                self.cluster_client(false)?
                    .get_async_connection_with_config(
                        ClusterConfig::new()
                            .set_connection_timeout(connect)
                            .set_response_timeout(response),
                    )
                    .await?,
            )),
        }
    }

    /// A pub/sub connection, its sending half and what arrives on it.
    pub(super) async fn pubsub(&self) -> RedisResult<(Sink, Incoming)> {
        match self {
            Self::One(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((Sink::One(sink), Incoming::One(stream)))
            }
            Self::Cluster { .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let conn = self
                    .cluster_client(true)?
                    .get_async_connection_with_config(
                        ClusterConfig::new()
                            .set_connection_timeout(super::COMMAND_TIMEOUT)
                            .set_response_timeout(super::COMMAND_TIMEOUT)
                            .set_push_sender(tx),
                    )
                    .await?;
                Ok((Sink::Cluster(conn), Incoming::Cluster(rx)))
            }
        }
    }
}

/// A command connection.
#[derive(Clone)]
pub(super) enum Link {
    One(ConnectionManager),
    Blocking(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::One(_) => "Link::One",
            Self::Blocking(_) => "Link::Blocking",
            Self::Cluster(_) => "Link::Cluster",
        })
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(c) => c.req_packed_command(cmd),
            Self::Blocking(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::One(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Blocking(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(c) => c.get_db(),
            Self::Blocking(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Commands for several partitions, sent as one pipeline per partition (all at once): on one
/// server that is one pipeline; on a cluster each goes to its shard. Answers come back in the
/// order the answered commands were added.
pub(super) struct Batch<'a> {
    parts: Vec<Option<Part>>,
    loads: Vec<&'a Script>,
    answered: usize,
}

/// What a [`Batch`] got: one answer per answered command, and the first failure of a
/// partition's pipeline as a whole (its answered commands carry it too).
pub(super) struct Answers {
    pub(super) values: Vec<Result<Value, RedisError>>,
    pub(super) failed: Option<RedisError>,
}

/// One partition's pipeline, the indices of its answers, and whether it holds only script
/// runs (then it is safe to send again after a `NOSCRIPT`: none of them ran).
struct Part {
    pipe: Pipeline,
    indices: Vec<usize>,
    scripts_only: bool,
}

impl<'a> Batch<'a> {
    /// A batch over `partitions` whose script runs are of `loads`: a partition whose Redis
    /// answers `NOSCRIPT` (it restarted, or a replica took over, and lost its script cache)
    /// has them loaded and its pipeline sent again, so scripts are not loaded with every
    /// pipeline (which cost Redis a SHA1 of the script per pipeline).
    pub(super) fn new(partitions: usize, loads: &[&'a Script]) -> Self {
        Self {
            parts: (0..partitions).map(|_| None).collect(),
            loads: loads.to_vec(),
            answered: 0,
        }
    }

    fn part(&mut self, p: usize) -> &mut Part {
        self.parts[p].get_or_insert_with(|| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            Part {
                pipe,
                indices: Vec::new(),
                scripts_only: true,
            }
        })
    }

    /// The pipeline of partition `p`, for commands whose answers are ignored (`.ignore()`).
    pub(super) fn ignored(&mut self, p: usize) -> &mut Pipeline {
        let part = self.part(p);
        part.scripts_only = false;
        &mut part.pipe
    }

    /// Adds a script run to partition `p`; its answer comes back.
    pub(super) fn invoke(&mut self, p: usize, invocation: &ScriptInvocation<'_>) {
        let index = self.answered;
        self.answered += 1;
        let part = self.part(p);
        part.pipe.invoke_script(invocation);
        part.indices.push(index);
    }

    /// Adds a command to partition `p`; its answer comes back.
    pub(super) fn cmd(&mut self, p: usize, cmd: Cmd) {
        let index = self.answered;
        self.answered += 1;
        let part = self.part(p);
        part.scripts_only = false;
        part.pipe.add_command(cmd);
        part.indices.push(index);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.parts.iter().all(Option::is_none)
    }

    /// Runs every partition's pipeline, concurrently: on `link`, or, on a cluster whose masters
    /// are known (`shards`), the script runs of all partitions one master owns as one
    /// pipeline straight to it (a cluster pipeline must stay on one slot; one per master
    /// batches far better). A run the master answers with a redirection (the slot moved),
    /// `TRYAGAIN`, `CLUSTERDOWN` or `NOSCRIPT` did not run, and goes again through `link`,
    /// which follows redirections.
    pub(super) async fn run(self, link: &Link, shards: Option<&Shards>) -> Answers {
        let Batch {
            parts,
            loads,
            answered,
        } = self;
        let loads = &loads;
        let mut direct: Vec<Vec<Part>> = shards.map_or_else(Vec::new, |s| {
            (0..s.conns.len()).map(|_| Vec::new()).collect()
        });
        let mut via_link = Vec::new();
        for (p, part) in parts.into_iter().enumerate() {
            let Some(part) = part else { continue };
            match shards.and_then(|s| s.owner[p]) {
                Some(k) if part.scripts_only => direct[k].push(part),
                _ => via_link.push(part),
            }
        }
        let on_link = via_link.into_iter().map(|part| async move {
            let indices = part.indices.clone();
            vec![(run_part(link, part, loads).await, indices)]
        });
        // `direct` is empty unless `shards` is known.
        let conns = shards.map_or(&[][..], |s| &s.conns[..]);
        let on_shards = direct
            .into_iter()
            .zip(conns)
            .filter(|(parts, _)| !parts.is_empty())
            .map(|(parts, conn)| run_on_shard(conn.clone(), parts, link, loads));
        let (a, b) = futures_util::future::join(
            futures_util::future::join_all(on_link),
            futures_util::future::join_all(on_shards),
        )
        .await;
        let mut values: Vec<Option<Result<Value, RedisError>>> =
            (0..answered).map(|_| None).collect();
        let mut failed = None;
        for (got, indices) in a.into_iter().chain(b).flatten() {
            match got {
                Ok(got) => {
                    let mut got = got.into_iter();
                    for i in indices {
                        values[i] = Some(got.next().unwrap_or_else(|| {
                            Err(RedisError::from((
                                redis::ErrorKind::Client,
                                "Redis answered too few commands",
                            )))
                        }));
                    }
                }
                Err(err) => {
                    for i in indices {
                        values[i] = Some(Err(err.clone()));
                    }
                    failed.get_or_insert(err);
                }
            }
        }
        Answers {
            values: values
                .into_iter()
                .map(|v| {
                    v.unwrap_or_else(|| {
                        Err(RedisError::from((redis::ErrorKind::Client, "not sent")))
                    })
                })
                .collect(),
            failed,
        }
    }
}

type PartResult = (RedisResult<Vec<RedisResult<Value>>>, Vec<usize>);

/// One partition's pipeline on `link`; a part of script runs only that Redis answers
/// `NOSCRIPT` gets `loads` loaded and goes again (none of them ran).
async fn run_part(
    link: &Link,
    part: Part,
    loads: &[&Script],
) -> RedisResult<Vec<RedisResult<Value>>> {
    let mut conn = link.clone();
    let got: RedisResult<Vec<RedisResult<Value>>> = part.pipe.query_async(&mut conn).await;
    let no_script =
        |r: &RedisResult<Value>| r.as_ref().err().and_then(RedisError::code) == Some("NOSCRIPT");
    if part.scripts_only && !loads.is_empty() && got.as_ref().is_ok_and(|g| g.iter().any(no_script))
    {
        let mut again = redis::pipe();
        again.ignore_errors();
        for script in loads {
            again.load_script(script).ignore();
        }
        for cmd in part.pipe.cmd_iter() {
            again.add_command(cmd.clone());
        }
        return again.query_async(&mut conn).await;
    }
    got
}

/// The script runs of `parts` (all on one master) as one pipeline on `conn`; those it did not
/// run (see [`Batch::run`]) go again through `link`.
async fn run_on_shard(
    mut conn: MultiplexedConnection,
    parts: Vec<Part>,
    link: &Link,
    loads: &[&Script],
) -> Vec<PartResult> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for part in &parts {
        for cmd in part.pipe.cmd_iter() {
            pipe.add_command(cmd.clone());
        }
    }
    let got: RedisResult<Vec<RedisResult<Value>>> = pipe.query_async(&mut conn).await;
    let mut got = match got {
        // What ran is not known: as on `link`, the runs fail (a push is not retried).
        Err(err) => {
            return parts
                .into_iter()
                .map(|p| (Err(err.clone()), p.indices))
                .collect();
        }
        Ok(got) => got.into_iter(),
    };
    let not_run = |r: &RedisResult<Value>| {
        matches!(
            r.as_ref().err().and_then(RedisError::code),
            Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "NOSCRIPT")
        )
    };
    let mut results = Vec::with_capacity(parts.len());
    for part in parts {
        let mut answers: Vec<RedisResult<Value>> = got.by_ref().take(part.indices.len()).collect();
        let again: Vec<usize> = (0..answers.len())
            .filter(|i| not_run(&answers[*i]))
            .collect();
        if !again.is_empty() {
            let mut retry = redis::pipe();
            retry.ignore_errors();
            let cmds: Vec<&Cmd> = part.pipe.cmd_iter().collect();
            for &i in &again {
                retry.add_command(cmds[i].clone());
            }
            let retry = Part {
                pipe: retry,
                indices: Vec::new(),
                scripts_only: true,
            };
            match run_part(link, retry, loads).await {
                Ok(retried) => {
                    for (i, answer) in again.into_iter().zip(retried) {
                        answers[i] = answer;
                    }
                }
                Err(err) => {
                    for i in again {
                        answers[i] = Err(err.clone());
                    }
                }
            }
        }
        results.push((Ok(answers), part.indices));
    }
    results
}

/// Where a cluster's partitions are: a connection straight to each master, and the master of
/// each partition's slot (from the slot map the topology watcher reads).
pub(super) struct Shards {
    pub(super) conns: Vec<MultiplexedConnection>,
    pub(super) owner: Vec<Option<usize>>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shards({} masters)", self.conns.len())
    }
}

/// The sending half of the pub/sub connection.
pub(super) enum Sink {
    One(PubSubSink),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::One(_) => "Sink::One",
            Self::Cluster(_) => "Sink::Cluster",
        })
    }
}

impl Sink {
    /// Subscribes to `topics` (on a cluster: one `SSUBSCRIBE` per slot, to the shards at once).
    pub(super) async fn subscribe(&mut self, topics: &[String]) -> RedisResult<()> {
        match self {
            Self::One(sink) => sink.subscribe(topics).await,
            Self::Cluster(conn) => {
                let runs = by_slot(topics).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(group).await }
                });
                futures_util::future::join_all(runs)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, topics: &[String]) -> RedisResult<()> {
        match self {
            Self::One(sink) => sink.unsubscribe(topics).await,
            Self::Cluster(conn) => {
                let runs = by_slot(topics).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                futures_util::future::join_all(runs)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }
}

fn by_slot(topics: &[String]) -> Vec<Vec<&str>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
    for topic in topics {
        groups.entry(key_slot(topic)).or_default().push(topic);
    }
    groups.into_values().collect()
}

/// What arrives on the pub/sub connection.
pub(super) enum Incoming {
    One(PubSubStream),
    Cluster(mpsc::UnboundedReceiver<redis::PushInfo>),
}

/// One thing that arrived.
pub(super) enum Arrival {
    Message(redis::Msg),
    /// A shard confirmed a subscription (ours, or the client's re-subscription after a
    /// reconnection or failover): what was published before it must be read from Redis.
    Subscribed(String),
    /// A shard dropped a subscription by itself (its slot moved away).
    Dropped(String),
    /// A shard's connection dropped (it is re-subscribed when it is back).
    Disconnected,
}

impl Incoming {
    /// The next arrival; `None` once the connection is gone for good (one server: reconnect).
    pub(super) async fn next(&mut self) -> Option<Arrival> {
        match self {
            Self::One(stream) => stream.next().await.map(Arrival::Message),
            Self::Cluster(rx) => loop {
                let push = rx.recv().await?;
                let topic = || match push.data.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                };
                match push.kind {
                    PushKind::SSubscribe => return Some(Arrival::Subscribed(topic())),
                    PushKind::SUnsubscribe => return Some(Arrival::Dropped(topic())),
                    PushKind::Disconnection => return Some(Arrival::Disconnected),
                    PushKind::SMessage | PushKind::Message => {
                        if let Some(msg) = redis::Msg::from_push_info(push) {
                            return Some(Arrival::Message(msg));
                        }
                    }
                    _ => {}
                }
            },
        }
    }
}
