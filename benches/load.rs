//! Load generator for channelgate (`cargo run --release --bin channelgate-bench -- --help`).
//!
//! It drives a running node the way applications and browsers do: credentials and
//! subscriptions over gRPC, WebSockets over TCP (spread over source addresses 127.0.0.x so
//! ephemeral ports do not run out), and reads the node's CPU time and RSS from `/proc/PID`.
//!
//! Scenarios:
//! * `idle`: open N subscribed sockets (over `--idle-channels`, in `--namespace` if given) and
//!   report the node's RSS and CPU per socket, in three phases whose CPU is reported apart:
//!   every `IssueConnection`, every `Subscribe`, every handshake (`--concurrency` at once); with
//!   `--namespace`, also `Presence` timings. With `--target nchan`, handshakes only.
//! * `call-route` and `handle` send thousands of client messages over one socket: start the
//!   node with `--message-rate 0` (its per-socket rate limit would answer 429).
//! * `call-route`: round trips of `call-route` through the node to an upstream this generator
//!   serves (`--upstream-listen`; start the node with `--upstream` pointing there), against
//!   direct HTTP requests to the same upstream.
//! * `handle`: round trips of a client message through a `Handle` stream this generator
//!   registers, against `ping` (answered by the node itself).
//! * `push-latency`: a socket on the `--ws` node, pushes through the `--control` node and,
//!   when `--control-b` is given (another node of the same cluster), through that one too:
//!   the time from the `Push` call to the frame's arrival, one push at a time.
//! * `fanout`: N subscribed sockets over `--channels` channels; pushes (timestamped,
//!   sequence-numbered, `--payload` bytes) to random channels at `--rate` per second (0: as
//!   fast as the node accepts) over one `PushStream`, or with `--push-with unary` as unary
//!   `Push` calls (`--in-flight` at once over `--push-connections`; `publish.rs`), for
//!   `--duration` seconds or `--push-count` pushes. With `--target nchan`, the same against
//!   Nchan (`benches/nchan.conf`): sockets on `/sub/CHANNEL`, publishes as HTTP `POST`s. Reports
//!   deliveries/s, latency percentiles, lost/duplicated/out-of-order counts, the node's CPU
//!   time per delivery, and the generator's own CPU. With `--nodes` (more nodes of one
//!   cluster), the sockets spread over every node and the pushes go through all of them in
//!   turn; with `--redis-ports`, the Redis servers' CPU and commands per push, in all and per
//!   server (how the load spreads over a cluster's shards). `benches/cluster.sh` runs it with
//!   three nodes on one Redis and on a three-master Redis Cluster.
//! * `calls`: unary control calls (`IssueConnection` then `Subscribe`, as a page render does)
//!   with `--in-flight` of them at once over `--connections` HTTP/2 connections, `--requests`
//!   in all. Reports calls/s, failures by gRPC status, and the node's CPU per call.
//! * `soak`: `--sockets` sockets over `--channels` channels for `--duration` seconds, pushes at
//!   `--rate` per second to random channels, and a churn of `--churn` reconnects per second
//!   (half closing cleanly, half dropping the TCP connection) among a tenth of the sockets.
//!   Every 10 s: the node's RSS, open file descriptors and sockets; at the end, lost,
//!   duplicated and out-of-order pushes of the sockets that stayed, and the same figures after
//!   every client left.
//! * `recovery`: a recovery storm. N sockets (asking for positions) over `--channels` channels
//!   drop at once; `--misses` pushes are made to each channel while they are away; then all
//!   reconnect with the position they last saw. Reports the time until every socket has
//!   received everything it missed (each checks it got offsets 1..=misses, once, in order),
//!   the node's CPU for the storm, and lost/duplicated/out-of-order counts.
//! * `bandwidth`: bytes on the wire and node CPU per delivery for a state document (about 20 KB
//!   of JSON, a few fields changing per push) and chat messages, each sent plain, with
//!   permessage-deflate, as deltas, and as deltas with deflate, one mode after another in the
//!   same run (`--sockets` per mode, `--pushes` each). Start the node with
//!   `--config benches/bandwidth.toml` (the `delta:` namespace). One socket per mode rebuilds
//!   every payload and checks it byte for byte.
//! * `outbox`, `jetstream`: a node's ingest consumer (`benches/ingest.toml`): rows per second
//!   from one `COMMIT` of `--rows` rows (or that many publishes) to the frames on a socket,
//!   the node's CPU per row, and the latency of single commands at `--rate` (`ingest.rs`).

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::{stream, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{client_async, tungstenite::client::IntoClientRequest, WebSocketStream};

use channelgate::pb::{self, control_client::ControlClient};

mod bandwidth;
mod ingest;
mod publish;
mod raw_ws;
use raw_ws::{RawWs, Read};

#[derive(Debug, Parser)]
struct Args {
    /// Scenario: idle.
    #[arg(long, default_value = "idle")]
    scenario: String,
    /// How the receiving sockets connect: `websocket`, or `sse` (event streams; the fanout,
    /// idle and recovery scenarios).
    #[arg(long, default_value = "websocket", value_parser = ["websocket", "sse"])]
    transport: String,
    /// Control plane of the node.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    control: String,
    /// Client plane of the node.
    #[arg(long, default_value = "127.0.0.1:8080")]
    ws: SocketAddr,
    /// PID of the node, to read its CPU time and RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Sockets to open.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread sockets over.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Round trips per measurement (call-route, handle).
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Where the generator serves the upstream for `call-route`.
    #[arg(long, default_value = "127.0.0.1:18090")]
    upstream_listen: SocketAddr,
    /// Channels the sockets are spread over (`fanout`).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Pushes per second (`fanout`); 0: as fast as the node accepts.
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Seconds of pushing (`fanout`).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Payload size in bytes (`fanout`).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Receive buffer of each generator socket in bytes (SO_RCVBUF; 0: the kernel's autotuned
    /// default, which on loopback lets megabytes per socket pile up unread, so a generator that
    /// falls behind sees seconds of latency before the node notices).
    #[arg(long, default_value_t = 64 << 10)]
    rcvbuf: u32,
    /// A second node's control plane (same cluster), for `push-latency` across nodes.
    #[arg(long)]
    control_b: Option<String>,
    /// Reconnects per second (`soak`).
    #[arg(long, default_value_t = 50)]
    churn: u64,
    /// Calls in flight at once (`calls`).
    #[arg(long, default_value_t = 500)]
    in_flight: usize,
    /// HTTP/2 connections to the control plane (`calls`).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// The `calls` clients use HTTP/2 adaptive flow control (`http2_adaptive_window`), as
    /// throughput-minded tonic users set it; otherwise tonic's defaults.
    #[arg(long)]
    adaptive_window: bool,
    /// Pushes each channel gets while the sockets are away (`recovery`).
    #[arg(long, default_value_t = 100)]
    misses: u64,
    /// Channels the idle sockets are spread over (`idle`).
    #[arg(long, default_value_t = 100)]
    idle_channels: usize,
    /// More nodes of the same cluster, `WS=CONTROL` each (`fanout`): sockets are spread over
    /// all the nodes (`--ws` and these), and pushes go through all their control planes.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Redis servers (ports on 127.0.0.1) whose CPU and commands to report per push
    /// (`fanout`): the one server, or every master of a cluster.
    #[arg(long, value_delimiter = ',')]
    redis_ports: Vec<u16>,
    /// Namespace of the idle sockets' channels (`idle`): `NS:idle-N`. With it, the run ends by
    /// timing `PresenceStats` and `Presence` on the first channel (the node must keep presence
    /// for the namespace).
    #[arg(long)]
    namespace: Option<String>,
    /// The receiving WebSockets offer permessage-deflate, as browsers do, and inflate what
    /// comes compressed (every scenario with the generator's lean client).
    #[arg(long)]
    deflate: bool,
    /// Pushes per mode and document (`bandwidth`).
    #[arg(long, default_value_t = 200)]
    pushes: usize,
    /// The server under test (`fanout`, `idle`): `channelgate`, or `nchan` (nginx with
    /// Nchan, `benches/nchan.conf`: sockets on `/sub/CHANNEL` at `--ws`, no credentials; publishes
    /// are `POST /pub/CHANNEL` there, one at a time on each of `--in-flight` keep-alive
    /// connections).
    #[arg(long, default_value = "channelgate", value_parser = ["channelgate", "nchan"])]
    target: String,
    /// How `fanout` pushes to channelgate: one `PushStream` per node (`stream`), or `unary`
    /// `Push` calls, `--in-flight` at once over `--push-connections` HTTP/2 connections.
    #[arg(long, default_value = "stream", value_parser = ["stream", "unary"])]
    push_with: String,
    /// HTTP/2 connections the unary pushes spread over (`fanout --push-with unary`).
    #[arg(long, default_value_t = 4)]
    push_connections: usize,
    /// Pushes to make in all (`fanout`; 0: as many as `--duration` allows).
    #[arg(long, default_value_t = 0)]
    push_count: u64,
    /// PostgreSQL of the `outbox` scenario (the node's consumer reads the same table).
    #[arg(
        long,
        default_value = "host=127.0.0.1 user=postgres dbname=channelgate_bench"
    )]
    dsn: String,
    /// The outbox table (`outbox`).
    #[arg(long, default_value = "channelgate_outbox")]
    table: String,
    /// NATS of the `jetstream` scenario.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Subject the `jetstream` scenario publishes to (in the node's consumer's stream).
    #[arg(long, default_value = "channelgate.bench")]
    nats_subject: String,
    /// Commands written at once for throughput (`outbox`, `jetstream`).
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows per commit (or publish round) in the latency phase (`outbox`, `jetstream`).
    #[arg(long, default_value_t = 1)]
    batch_rows: usize,
}

/// Resident set size of `pid`, in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// Issues credentials and opens a tungstenite client socket with them (for the round-trip
/// scenarios, which send as well as receive).
async fn open_socket(
    args: &Args,
    i: usize,
    control: &mut ControlClient<tonic::transport::Channel>,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let creds = issue(control, &format!("idle-{}", i % 100)).await?;
    let url = format!("ws://{}{}", args.ws, ws_path(&creds));
    let (ws, _) = client_async(url.into_client_request()?, tcp_from(args, i).await?).await?;
    Ok(ws)
}

/// Issues credentials subscribed to `channel`.
async fn issue(
    control: &mut ControlClient<tonic::transport::Channel>,
    channel: &str,
) -> anyhow::Result<pb::IssueConnectionResponse> {
    Ok(control
        .issue_connection(pb::IssueConnectionRequest {
            ttl_ms: 0,
            channels: vec![channel.to_owned()],
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// The WebSocket path and query for `creds`.
fn ws_path(creds: &pb::IssueConnectionResponse) -> String {
    format!(
        "/ws?socket_connection_id={}&socket_key={}",
        creds.connection_id, creds.socket_key
    )
}

/// A TCP connection to the node from source address 127.0.0.(1 + i % sources), with the
/// generator's receive buffer size.
async fn tcp_from(args: &Args, i: usize) -> anyhow::Result<TcpStream> {
    let source = SocketAddr::from(([127, 0, 0, 1 + (i % args.sources as usize) as u8], 0));
    let socket = TcpSocket::new_v4()?;
    socket.bind(source)?;
    if args.rcvbuf > 0 {
        socket.set_recv_buffer_size(args.rcvbuf)?;
    }
    Ok(socket.connect(ws_of(args, i)?).await?)
}

/// The client plane socket `i` goes to: `--ws`, or one of `--nodes` in turn.
fn ws_of(args: &Args, i: usize) -> anyhow::Result<SocketAddr> {
    let n = args.nodes.len() + 1;
    match i % n {
        0 => Ok(args.ws),
        k => {
            let (ws, _) = args.nodes[k - 1]
                .split_once('=')
                .context("--nodes takes WS=CONTROL")?;
            Ok(ws.parse()?)
        }
    }
}

/// Every node's control plane: `--control`, then those of `--nodes`.
fn controls(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut all = vec![args.control.clone()];
    for node in &args.nodes {
        let (_, control) = node.split_once('=').context("--nodes takes WS=CONTROL")?;
        all.push(control.to_owned());
    }
    Ok(all)
}

/// CPU time (user + system, microseconds) and commands processed of the Redis on `port`.
async fn redis_usage(port: u16) -> anyhow::Result<(u64, u64)> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("all").query_async(&mut conn).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = field("used_cpu_sys:") + field("used_cpu_user:");
    Ok((
        (cpu * 1e6) as u64,
        field("total_commands_processed:") as u64,
    ))
}

async fn redis_usages(ports: &[u16]) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut all = Vec::new();
    for port in ports {
        all.push(redis_usage(*port).await?);
    }
    Ok(all)
}

/// Opens a socket with the generator's lean client ([`RawWs`]).
async fn connect_raw(
    args: &Args,
    i: usize,
    creds: &pb::IssueConnectionResponse,
) -> anyhow::Result<RawWs> {
    open_path(args, i, &ws_path(creds)).await
}

/// Opens socket `i` on `path` (`/ws?...`; an event stream of the same query with
/// `--transport sse`).
async fn open_path(args: &Args, i: usize, path: &str) -> anyhow::Result<RawWs> {
    RawWs::open(
        tcp_from(args, i).await?,
        &ws_of(args, i)?.to_string(),
        path,
        args.transport == "sse",
        args.deflate,
    )
    .await
}

/// Issues credentials subscribed to `channel` and opens a socket with them.
async fn open_raw(
    args: &Args,
    i: usize,
    control: &mut ControlClient<tonic::transport::Channel>,
    channel: &str,
) -> anyhow::Result<RawWs> {
    let creds = issue(control, channel).await?;
    connect_raw(args, i, &creds).await
}

async fn idle(args: &Args) -> anyhow::Result<()> {
    let nchan = args.target == "nchan";
    let control = if nchan {
        None
    } else {
        Some(ControlClient::connect(args.control.clone()).await?)
    };
    let before = args.pid.map(rss_bytes).transpose()?;
    let cpu_start = args.pid.map(cpu_us).transpose()?;
    let started = Instant::now();
    let channel_of = |i: usize| idle_channel(args, i % args.idle_channels.max(1));
    // Three phases, so the node's cost of each shows: every IssueConnection, then every
    // Subscribe of those credentials to their channel, then every WebSocket handshake.
    let mut issued = Vec::new();
    let (mut cpu_issued, mut cpu_subscribed) = (cpu_start, cpu_start);
    if let Some(control) = &control {
        let all: Vec<_> = stream::iter(0..args.sockets)
            .map(|_| {
                let mut control = control.clone();
                async move {
                    Ok::<_, anyhow::Error>(
                        control
                            .issue_connection(pb::IssueConnectionRequest::default())
                            .await?
                            .into_inner(),
                    )
                }
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        issued = all.into_iter().collect::<anyhow::Result<_>>()?;
        cpu_issued = args.pid.map(cpu_us).transpose()?;
        let subscribed: Vec<_> = stream::iter(issued.iter().enumerate())
            .map(|(i, creds)| {
                let mut control = control.clone();
                let request = pb::SubscribeRequest {
                    digest: creds.digest.clone(),
                    channels: vec![channel_of(i)],
                };
                async move { control.subscribe(request).await.map(drop) }
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        subscribed.into_iter().collect::<Result<(), _>>()?;
        cpu_subscribed = args.pid.map(cpu_us).transpose()?;
    }
    let issued = &issued;
    let results: Vec<_> = stream::iter(0..args.sockets)
        .map(|i| async move {
            if nchan {
                open_path(args, i, &format!("/sub/{}", channel_of(i))).await
            } else {
                connect_raw(args, i, &issued[i]).await
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let cpu_connected = args.pid.map(cpu_us).transpose()?;
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a) as f64 / args.sockets.max(1) as f64),
        _ => None,
    };
    let (issue_us, subscribe_us, handshake_us) = (
        per(cpu_start, cpu_issued).filter(|_| !nchan),
        per(cpu_issued, cpu_subscribed).filter(|_| !nchan),
        per(cpu_subscribed, cpu_connected),
    );
    let (sockets, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if let Some(Err(err)) = failed.first() {
        eprintln!("first failure: {err:#}");
    }
    let node_connections = match &control {
        Some(control) => {
            control
                .clone()
                .stats(pb::StatsRequest::default())
                .await?
                .into_inner()
                .connections
        }
        None => 0,
    };
    let after = args.pid.map(rss_bytes).transpose()?;
    let per_socket = match (before, after) {
        (Some(b), Some(a)) if !sockets.is_empty() => {
            Some(a.saturating_sub(b) as f64 / sockets.len() as f64)
        }
        _ => None,
    };
    println!("scenario        idle");
    println!("connected       {}", sockets.len());
    println!("failed          {}", failed.len());
    println!("target          {}", args.target);
    println!("node reports    {node_connections} connections");
    println!(
        "connect time    {:.2} s ({:.0}/s incl. issue and subscribe)",
        elapsed.as_secs_f64(),
        sockets.len() as f64 / elapsed.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "node RSS        {:.1} MiB -> {:.1} MiB",
            b as f64 / 1048576.0,
            a as f64 / 1048576.0
        );
    }
    if let Some(p) = per_socket {
        println!("RSS per socket  {p:.0} B");
    }
    match (issue_us, subscribe_us, handshake_us) {
        (Some(i), Some(s), Some(h)) => println!(
            "node CPU        {i:.1} us per IssueConnection, {s:.1} us per Subscribe, {h:.1} us per handshake, {:.1} us in all",
            i + s + h
        ),
        (_, _, Some(h)) => println!("node CPU        {h:.1} us per handshake"),
        _ => {}
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "idle", "connected": sockets.len(), "failed": failed.len(),
            "target": args.target,
            "node_connections": node_connections, "connect_seconds": elapsed.as_secs_f64(),
            "rss_before": before, "rss_after": after, "rss_per_socket": per_socket,
            "node_cpu_us_per_issue": issue_us, "node_cpu_us_per_subscribe": subscribe_us,
            "node_cpu_us_per_handshake": handshake_us,
        })
    );
    if let (Some(_), Some(control)) = (&args.namespace, &control) {
        presence_timing(args, &mut control.clone()).await?;
    }
    drop(sockets);
    Ok(())
}

/// The name of the `n`th idle channel.
fn idle_channel(args: &Args, n: usize) -> String {
    match &args.namespace {
        Some(ns) => format!("{ns}:idle-{n}"),
        None => format!("idle-{n}"),
    }
}

/// Times `PresenceStats` and `Presence` on the first idle channel, 21 calls each.
async fn presence_timing(
    args: &Args,
    control: &mut ControlClient<tonic::transport::Channel>,
) -> anyhow::Result<()> {
    let channel = idle_channel(args, 0);
    let request = || pb::PresenceRequest {
        channel: channel.clone(),
    };
    let (mut stats_us, mut list_us) = (Vec::new(), Vec::new());
    let (mut members, mut counts) = (0, (0, 0));
    for _ in 0..21 {
        let t = Instant::now();
        let r = control.presence_stats(request()).await?.into_inner();
        stats_us.push(t.elapsed().as_micros() as u64);
        counts = (r.connections, r.users);
        let t = Instant::now();
        members = control
            .presence(request())
            .await?
            .into_inner()
            .members
            .len();
        list_us.push(t.elapsed().as_micros() as u64);
    }
    stats_us.sort_unstable();
    list_us.sort_unstable();
    println!(
        "presence        {channel}: PresenceStats {:?} in {:.2} ms (median of 21, max {:.2}); Presence {members} members in {:.2} ms (max {:.2})",
        counts,
        stats_us[10] as f64 / 1000.0,
        stats_us[20] as f64 / 1000.0,
        list_us[10] as f64 / 1000.0,
        list_us[20] as f64 / 1000.0,
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "presence", "channel": channel, "members": members,
            "presence_stats_ms_p50": stats_us[10] as f64 / 1000.0,
            "presence_ms_p50": list_us[10] as f64 / 1000.0,
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The generator's own client libraries log with RUST_LOG (e.g. `h2=debug`); quiet otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match args.scenario.as_str() {
        "idle" => idle(&args).await,
        "call-route" => call_route(&args).await,
        "handle" => handle(&args).await,
        "push-latency" => push_latency(&args).await,
        "fanout" => fanout(&args).await,
        "recovery" => recovery(&args).await,
        "calls" => calls(&args).await,
        "soak" => soak(&args).await,
        "bandwidth" => bandwidth::run(&args).await,
        "outbox" | "jetstream" => ingest::run(&args, &args.scenario).await,
        other => bail!("unknown scenario {other:?}"),
    }
}

/// Percentiles of a set of durations, in microseconds.
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut samples: Vec<std::time::Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64()
                * 1e6
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    fn row(&self, name: &str) {
        println!(
            "{name:<22} p50 {:>8.1} us   p90 {:>8.1} us   p99 {:>8.1} us   max {:>8.1} us",
            self.p50, self.p90, self.p99, self.max
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50_us": self.p50, "p90_us": self.p90, "p99_us": self.p99, "max_us": self.max})
    }
}

/// One WebSocket with fresh credentials.
async fn client(args: &Args) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let mut control = ControlClient::connect(args.control.clone()).await?;
    open_socket(args, 0, &mut control).await
}

/// Reads text frames until one whose JSON satisfies `wanted`, and returns it.
async fn next_json_where(
    ws: &mut WebSocketStream<TcpStream>,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                if wanted(&v) {
                    return Ok(v);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket closed"),
        }
    }
}

/// Sends `message` (with `"id":i` spliced in) `n` times, one at a time; returns each round trip.
async fn round_trips(
    ws: &mut WebSocketStream<TcpStream>,
    n: usize,
    message: &str,
) -> anyhow::Result<Vec<std::time::Duration>> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let text = format!(r#"{{"id":{i},{}"#, &message[1..]);
        let started = Instant::now();
        ws.send(Message::text(text)).await?;
        let reply = next_json_where(ws, |v| v["id"] == i).await?;
        if reply["status"] == 429 {
            bail!("the node rate-limits client messages: start it with --message-rate 0 for this scenario");
        }
        if reply["status"] != 200 {
            bail!("reply {reply}");
        }
        samples.push(started.elapsed());
    }
    Ok(samples)
}

async fn call_route(args: &Args) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    // The upstream: one JSON route.
    let listener = tokio::net::TcpListener::bind(args.upstream_listen).await?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(bytes::Bytes::from_static(br#"{"ok":true}"#)))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    // Direct: the same pooled client the gateway uses.
    let http: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://{}/bench?x=1", args.upstream_listen).parse()?;
    let mut direct = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let started = Instant::now();
        let response = http.get(uri.clone()).await?;
        response.into_body().collect().await?;
        direct.push(started.elapsed());
    }
    let mut ws = client(args).await?;
    let via = round_trips(
        &mut ws,
        args.requests,
        r#"{"action":"call-route","uri":"/bench","input":{"x":1}}"#,
    )
    .await?;
    let ping = round_trips(&mut ws, args.requests, r#"{"action":"ping"}"#).await?;
    let (direct, via, ping) = (Latency::of(direct), Latency::of(via), Latency::of(ping));
    println!(
        "scenario call-route, {} sequential requests each",
        args.requests
    );
    direct.row("direct HTTP");
    via.row("call-route via node");
    ping.row("ping via node");
    println!(
        "added by the gateway   p50 {:>8.1} us   p99 {:>8.1} us",
        via.p50 - direct.p50,
        via.p99 - direct.p99
    );
    println!(
        "{}",
        serde_json::json!({"scenario":"call-route","requests":args.requests,"direct":direct.json(),"call_route":via.json(),"ping":ping.json()})
    );
    Ok(())
}

async fn handle(args: &Args) -> anyhow::Result<()> {
    use pb::handle_request::Kind;
    let mut control = ControlClient::connect(args.control.clone()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(pb::HandleRequest {
        kind: Some(Kind::Register(pb::Register {
            group: "bench".into(),
            actions: vec!["bench.echo".into()],
            lifecycle_events: false,
        })),
    })
    .await?;
    let mut messages = control
        .handle(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(m)) = messages.message().await {
            let reply = pb::Reply {
                delivery_id: m.delivery_id,
                status: 200,
                headers: Default::default(),
                body_json: String::new(),
            };
            if tx
                .send(pb::HandleRequest {
                    kind: Some(Kind::Reply(reply)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut ws = client(args).await?;
    let via = round_trips(&mut ws, args.requests, r#"{"action":"bench.echo"}"#).await?;
    let ping = round_trips(&mut ws, args.requests, r#"{"action":"ping"}"#).await?;
    let (via, ping) = (Latency::of(via), Latency::of(ping));
    println!(
        "scenario handle, {} sequential requests each",
        args.requests
    );
    via.row("Handle round trip");
    ping.row("ping (node only)");
    println!(
        "added by the Handle hop p50 {:>8.1} us   p99 {:>8.1} us",
        via.p50 - ping.p50,
        via.p99 - ping.p99
    );
    println!(
        "{}",
        serde_json::json!({"scenario":"handle","requests":args.requests,"handle":via.json(),"ping":ping.json()})
    );
    Ok(())
}

/// Pushes through `control` to a socket subscribed to `channel`, one at a time.
async fn push_latencies(
    control: &str,
    ws: &mut WebSocketStream<TcpStream>,
    channel: &str,
    n: usize,
) -> anyhow::Result<Vec<std::time::Duration>> {
    let mut control = ControlClient::connect(control.to_owned()).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        control
            .push(pb::PushRequest {
                channels: vec![channel.into()],
                json: format!(r#"{{"seq":{i}}}"#),
                ..Default::default()
            })
            .await?;
        next_json_where(ws, |v| v["payload"]["seq"] == i).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

async fn push_latency(args: &Args) -> anyhow::Result<()> {
    let mut control = ControlClient::connect(args.control.clone()).await?;
    let creds = control
        .issue_connection(pb::IssueConnectionRequest::default())
        .await?
        .into_inner();
    control
        .subscribe(pb::SubscribeRequest {
            digest: creds.digest.clone(),
            channels: vec!["latency".into()],
        })
        .await?;
    let url = format!(
        "ws://{}/ws?socket_connection_id={}&socket_key={}",
        args.ws, creds.connection_id, creds.socket_key
    );
    let stream = TcpStream::connect(args.ws).await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = client_async(url.into_client_request()?, stream).await?;
    let same = Latency::of(push_latencies(&args.control, &mut ws, "latency", args.requests).await?);
    println!(
        "scenario push-latency, {} sequential pushes each (Push call to frame arrival)",
        args.requests
    );
    same.row("same node");
    let mut json = serde_json::json!({"scenario":"push-latency","requests":args.requests,"same_node":same.json()});
    if let Some(b) = &args.control_b {
        let cross = Latency::of(push_latencies(b, &mut ws, "latency", args.requests).await?);
        cross.row("across nodes");
        println!(
            "added by the crossing  p50 {:>8.1} us   p99 {:>8.1} us",
            cross.p50 - same.p50,
            cross.p99 - same.p99
        );
        json["cross_node"] = cross.json();
    }
    println!("{json}");
    Ok(())
}

/// CPU time (user + system) of `pid` in microseconds, from `/proc/PID/stat`.
fn cpu_us(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks * 10_000)
}

/// Per-socket delivery bookkeeping of the `fanout` scenario.
#[derive(Default)]
struct Tally {
    received: u64,
    /// Text frames that were not a push of this scenario (counted as lost, and said).
    unreadable: u64,
    duplicated: u64,
    reordered: u64,
    latencies_us: Vec<u32>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn fanout(args: &Args) -> anyhow::Result<()> {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };

    let nchan = args.target == "nchan";
    let control = if nchan {
        None
    } else {
        Some(ControlClient::connect(args.control.clone()).await?)
    };
    // Channels of this run only: a server that keeps messages (Nchan, or a node's history)
    // has nothing of an earlier run to hand the new sockets.
    let run = std::process::id();
    let channels: Vec<String> = (0..args.channels)
        .map(|c| format!("fan-{run}-{c}"))
        .collect();
    let started = Instant::now();
    let node_cpu_before = args.pid.map(cpu_us).transpose()?;
    let names = &channels;
    let sockets: Vec<_> = stream::iter(0..args.sockets)
        .map(|i| {
            let control = control.clone();
            let channel = names[i % names.len()].clone();
            let channels = names;
            async move {
                let ws = match control {
                    Some(mut control) => open_raw(args, i, &mut control, &channel).await,
                    None => open_path(args, i, &format!("/sub/{channel}")).await,
                };
                ws.map(|ws| (i % channels.len(), ws))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let connect_elapsed = started.elapsed();
    let node_cpu_connected = args.pid.map(cpu_us).transpose()?;
    let failed = sockets.iter().filter(|s| s.is_err()).count();
    if let Some(Err(err)) = sockets.iter().find(|s| s.is_err()) {
        eprintln!("first failed socket: {err:#}");
    }
    let sockets: Vec<_> = sockets.into_iter().filter_map(Result::ok).collect();
    let subscribers_per_channel = {
        let mut n = vec![0u64; channels.len()];
        for (c, _) in &sockets {
            n[*c] += 1;
        }
        n
    };

    // Readers: one task per socket, tallying what arrives.
    let stop = tokio_util::sync::CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for (_, ws) in sockets {
        let stop = stop.clone();
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut tally = Tally::default();
            // Per channel and publishing worker: the last sequence number.
            let mut last: HashMap<u64, u64> = HashMap::new();
            loop {
                let read = tokio::select! {
                    read = ws.read(|text| {
                        let at = now_us();
                        // {"channel":"fan-C","payload":{"c":C,"s":SEQ,"t":MICROS,"p":"..."}}
                        // The generator's own cost must stay small: read the three numbers
                        // without building a JSON tree.
                        let (Some(c), Some(seq), Some(t0)) =
                            (field(text, b"\"c\":"), field(text, b"\"s\":"), field(text, b"\"t\":"))
                        else {
                            if tally.unreadable == 0 {
                                eprintln!("an unreadable frame: {:?}", String::from_utf8_lossy(&text[..text.len().min(200)]));
                            }
                            tally.unreadable += 1;
                            return;
                        };
                        let w = field(text, b"\"w\":").unwrap_or(0);
                        tally.received += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                        let prev = last.entry(c << 20 | w).or_insert(0);
                        if seq == *prev {
                            tally.duplicated += 1;
                        } else if seq < *prev {
                            tally.reordered += 1;
                        }
                        *prev = seq.max(*prev);
                        tally
                            .latencies_us
                            .push(at.saturating_sub(t0).min(u32::MAX as u64) as u32);
                    }) => read,
                    _ = stop.cancelled() => break,
                };
                match read {
                    Ok(Read::More) => {}
                    Ok(Read::Closed) => break,
                    Err(err) => {
                        eprintln!("a reader failed: {err:#}");
                        break;
                    }
                }
            }
            tally
        }));
    }

    // The publisher (`publish.rs`): one PushStream per node, fed by one worker, pushes of a
    // channel always through the same node; or one call per push (unary `Push`, or Nchan's
    // HTTP publish), --in-flight workers at once.
    let per_call = nchan || args.push_with == "unary";
    let mut push_calls = Vec::new();
    let target = if nchan {
        publish::Target::Nchan(args.ws)
    } else if per_call {
        let mut clients = Vec::new();
        for _ in 0..args.push_connections.max(1) {
            let endpoint = tonic::transport::Endpoint::from_shared(args.control.clone())?;
            clients.push(ControlClient::new(endpoint.connect().await?));
        }
        publish::Target::Unary(clients)
    } else {
        let mut txs = Vec::new();
        for url in controls(args)? {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::PushRequest>(16);
            let mut push_client = ControlClient::connect(url).await?;
            push_calls.push(tokio::spawn(async move {
                push_client
                    .push_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            }));
            txs.push(tx);
        }
        publish::Target::Stream(txs)
    };
    let redis_start = redis_usages(&args.redis_ports).await?;
    let node_cpu_start = args.pid.map(cpu_us).transpose()?;
    let gen_cpu_start = cpu_us(std::process::id())?;
    let pushing_started = Instant::now();
    let plan = Arc::new(publish::Plan {
        channels: channels.clone(),
        subscribers: subscribers_per_channel.clone(),
        payload: args.payload,
        deadline: pushing_started + std::time::Duration::from_secs(args.duration),
        count: args.push_count,
        rate: args.rate,
        started: AtomicU64::new(0),
        pushed: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let workers = if per_call { args.in_flight } else { 1 };
    // Returns once every worker is done, its senders (and with them the streams) closed.
    publish::run(plan.clone(), target, workers).await?;
    let mut summary = pb::PushStreamResponse {
        pushes: plan.pushed.load(Ordering::Relaxed),
        ..Default::default()
    };
    if !push_calls.is_empty() {
        // The nodes' own count of what the streams took.
        summary.pushes = 0;
        for call in push_calls {
            let part = call.await??.into_inner();
            summary.pushes += part.pushes;
            summary.queued += part.queued;
        }
    }
    let push_failures = plan.failed.load(Ordering::Relaxed);
    let expected = plan.expected.load(Ordering::Relaxed);
    let push_elapsed = pushing_started.elapsed();
    // Let in-flight frames land: wait until all expected frames arrived, or nothing has
    // arrived for three seconds.
    let expected_total = expected;
    let mut last = (received.load(Ordering::Relaxed), Instant::now());
    while received.load(Ordering::Relaxed) < expected_total {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > std::time::Duration::from_secs(3) {
            break;
        }
    }
    let node_cpu_end = args.pid.map(cpu_us).transpose()?;
    let gen_cpu_end = cpu_us(std::process::id())?;
    let redis_end = redis_usages(&args.redis_ports).await?;
    stop.cancel();
    let mut total = Tally::default();
    for r in readers {
        let t = r.await?;
        total.received += t.received;
        total.unreadable += t.unreadable;
        total.duplicated += t.duplicated;
        total.reordered += t.reordered;
        total.latencies_us.extend(t.latencies_us);
    }
    let lost = expected.saturating_sub(total.received - total.duplicated);
    if total.unreadable > 0 {
        eprintln!("{} frames were not pushes of this run", total.unreadable);
    }
    let mut lat = total.latencies_us;
    lat.sort_unstable();
    let pct = |q: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0
        }
    };
    let secs = push_elapsed.as_secs_f64();
    let node_cpu = match (node_cpu_start, node_cpu_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let handshake_cpu = match (node_cpu_before, node_cpu_connected) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gen_cpu = gen_cpu_end - gen_cpu_start;
    let per_delivery = node_cpu.map(|c| c as f64 / total.received.max(1) as f64);
    let per_handshake = handshake_cpu.map(|c| c as f64 / args.sockets.max(1) as f64);
    println!(
        "scenario fanout: {} sockets on {} channels, rate {} /s, {} s, {} B payload",
        args.sockets, args.channels, args.rate, args.duration, args.payload
    );
    println!(
        "connected       {} ({} failed) in {:.2} s",
        args.sockets - failed,
        failed,
        connect_elapsed.as_secs_f64()
    );
    println!(
        "pushes          {} accepted ({:.0}/s), node queued {}, {} failed, by {}",
        summary.pushes,
        summary.pushes as f64 / secs,
        summary.queued,
        push_failures,
        match (nchan, per_call) {
            (true, _) => format!("HTTP POST, {} in flight (Nchan)", args.in_flight),
            (false, true) => format!(
                "unary Push, {} in flight over {} connection(s)",
                args.in_flight, args.push_connections
            ),
            (false, false) => "PushStream".to_owned(),
        }
    );
    println!(
        "deliveries      {} received of {} expected ({:.0}/s)",
        total.received,
        expected,
        total.received as f64 / secs
    );
    println!(
        "lost/dup/order  {} / {} / {}",
        lost, total.duplicated, total.reordered
    );
    println!(
        "latency ms      p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    if let Some(p) = per_delivery {
        println!(
            "node CPU        {:.2} us per delivery ({:.0}% of a core)",
            p,
            node_cpu.unwrap_or(0) as f64 / 1e4 / secs
        );
    }
    if let Some(p) = per_handshake {
        println!("node CPU        {p:.1} us per issue+subscribe+handshake");
    }
    println!(
        "generator CPU   {:.0}% of a core while pushing",
        gen_cpu as f64 / 1e4 / secs
    );
    // Redis: CPU and commands per push, in all and per server (the spread over shards).
    let shards: Vec<(u64, u64)> = redis_start
        .iter()
        .zip(&redis_end)
        .map(|(a, b)| (b.0 - a.0, b.1 - a.1))
        .collect();
    let redis_cpu: u64 = shards.iter().map(|s| s.0).sum();
    let pushes = summary.pushes.max(1) as f64;
    if !shards.is_empty() {
        println!(
            "redis CPU       {:.2} us per push in all ({:.0}% of a core), over {} server(s)",
            redis_cpu as f64 / pushes,
            redis_cpu as f64 / 1e4 / secs,
            shards.len()
        );
        for (port, (cpu, commands)) in args.redis_ports.iter().zip(&shards) {
            println!(
                "redis :{port}    {:.2} us per push, {:.0}% of the Redis CPU, {:.2} commands per push",
                *cpu as f64 / pushes,
                100.0 * *cpu as f64 / redis_cpu.max(1) as f64,
                *commands as f64 / pushes
            );
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "fanout", "sockets": args.sockets, "channels": args.channels, "rate": args.rate,
            "duration_s": args.duration, "payload": args.payload, "connected": args.sockets - failed, "failed": failed,
            "pushes": summary.pushes, "pushes_per_s": summary.pushes as f64 / secs, "push_failures": push_failures,
            "target": args.target, "push_with": if nchan { "http" } else { args.push_with.as_str() },
            "deliveries": total.received, "expected": expected, "deliveries_per_s": total.received as f64 / secs,
            "lost": lost, "duplicated": total.duplicated, "reordered": total.reordered,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0)},
            "node_cpu_us_per_delivery": per_delivery, "node_cpu_us_per_handshake": per_handshake,
            "generator_cpu_pct": gen_cpu as f64 / 1e4 / secs,
            "nodes": args.nodes.len() + 1,
            "redis_cpu_us_per_push": (!shards.is_empty()).then(|| redis_cpu as f64 / pushes),
            "redis_shards": args.redis_ports.iter().zip(&shards).map(|(port, (cpu, commands))| serde_json::json!({
                "port": port, "cpu_us_per_push": *cpu as f64 / pushes, "commands_per_push": *commands as f64 / pushes,
            })).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The `soak` scenario (see the module's documentation).
async fn soak(args: &Args) -> anyhow::Result<()> {
    use rand::Rng;
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };
    let pid = args
        .pid
        .context("soak needs --pid (the node's RSS and descriptors)")?;
    let control = ControlClient::connect(args.control.clone()).await?;
    let channels: Vec<String> = (0..args.channels.max(1))
        .map(|c| format!("soak-{c}"))
        .collect();
    let rss_start = rss_bytes(pid)?;
    let fds_start = open_fds(pid)?;
    let churners = (args.sockets / 10).max(1);
    let stayers = args.sockets.saturating_sub(churners).max(1);
    let names = &channels;
    // The sockets that stay: lean readers, each checking its channel's sequence.
    let opened: Vec<anyhow::Result<(usize, RawWs)>> = stream::iter(0..stayers)
        .map(|i| {
            let mut control = control.clone();
            async move {
                let c = i % names.len();
                open_raw(args, i, &mut control, &names[c])
                    .await
                    .map(|ws| (c, ws))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let failed = opened.iter().filter(|o| o.is_err()).count();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for (c, ws) in opened.into_iter().filter_map(Result::ok) {
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let (mut received, mut dup, mut reordered, mut last) = (0u64, 0u64, 0u64, 0u64);
            let mut closed = false;
            loop {
                let read = tokio::select! {
                    read = ws.read(|text| {
                        let Some(seq) = field(text, b"\"s\":") else { return };
                        received += 1;
                        if seq == last {
                            dup += 1;
                        } else if seq < last {
                            reordered += 1;
                        }
                        last = last.max(seq);
                    }) => read,
                    _ = stop.cancelled() => break,
                };
                if !matches!(read, Ok(Read::More)) {
                    closed = true;
                    break;
                }
            }
            (c, received, dup, reordered, closed)
        }));
    }
    // The churn: a tenth of the sockets, reconnecting with new credentials, half of them
    // closing cleanly and half dropping the connection.
    let reconnects = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, reconnects, control) = (stop.clone(), reconnects.clone(), control.clone());
        let (args_ws, sources, rcvbuf, churn_rate, channels) = (
            args.ws,
            args.sources,
            args.rcvbuf,
            args.churn.max(1),
            channels.clone(),
        );
        let lean = Args {
            ws: args_ws,
            sources,
            rcvbuf,
            ..Args::parse_from(["soak"])
        };
        tokio::spawn(async move {
            let mut pool: Vec<Option<RawWs>> = (0..churners).map(|_| None).collect();
            let mut every =
                tokio::time::interval(std::time::Duration::from_secs_f64(1.0 / churn_rate as f64));
            let mut n = 0usize;
            while !stop.is_cancelled() {
                every.tick().await;
                let slot = n % pool.len();
                if let Some(ws) = pool[slot].take() {
                    if n.is_multiple_of(2) {
                        let _ = ws.close().await;
                    } else {
                        drop(ws);
                    }
                }
                let mut control = control.clone();
                let channel = &channels[n % channels.len()];
                if let Ok(ws) = open_raw(&lean, stayers + slot, &mut control, channel).await {
                    pool[slot] = Some(ws);
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            drop(pool);
        })
    };
    // The publisher.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PushRequest>(16);
    let mut push_client = control.clone();
    let push_call = tokio::spawn(async move {
        push_client
            .push_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut seqs = vec![0u64; channels.len()];
    let started = Instant::now();
    let deadline = started + std::time::Duration::from_secs(args.duration);
    let interval = std::time::Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next_at = tokio::time::Instant::now();
    let mut next_report = started + std::time::Duration::from_secs(10);
    let mut samples = Vec::new();
    let mut rng = rand::rng();
    let pad = "x".repeat(args.payload.saturating_sub(30));
    println!("scenario soak: {} sockets ({stayers} staying, {churners} churning at {}/s) on {} channels, {} pushes/s, {} s", args.sockets, args.churn, channels.len(), args.rate, args.duration);
    while Instant::now() < deadline {
        tokio::time::sleep_until(next_at).await;
        next_at += interval;
        let c = rng.random_range(0..channels.len());
        seqs[c] += 1;
        let json = format!(r#"{{"c":{c},"s":{},"p":"{pad}"}}"#, seqs[c]);
        if tx
            .send(pb::PushRequest {
                channels: vec![channels[c].clone()],
                json,
                ..Default::default()
            })
            .await
            .is_err()
        {
            break;
        }
        if Instant::now() >= next_report {
            next_report += std::time::Duration::from_secs(10);
            let sample = serde_json::json!({
                "t_s": started.elapsed().as_secs(),
                "rss": rss_bytes(pid)?,
                "fds": open_fds(pid)?,
                "reconnects": reconnects.load(Ordering::Relaxed),
            });
            println!("{sample}");
            samples.push(sample);
        }
    }
    drop(tx);
    let summary = push_call.await??.into_inner();
    // Let the last pushes land, then everybody leaves.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.cancel();
    churn.await?;
    let mut lost = 0u64;
    let (mut dup, mut reordered, mut closed, mut received) = (0u64, 0u64, 0usize, 0u64);
    for r in readers {
        let (c, got, d, o, was_closed) = r.await?;
        received += got;
        lost += seqs[c].saturating_sub(got.saturating_sub(d));
        dup += d;
        reordered += o;
        closed += usize::from(was_closed);
    }
    // Every client gone: the node should give back what it held.
    let mut after = serde_json::Value::Null;
    for _ in 0..60 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let mut control = control.clone();
        let stats = control
            .stats(pb::StatsRequest::default())
            .await?
            .into_inner();
        after = serde_json::json!({
            "rss": rss_bytes(pid)?, "fds": open_fds(pid)?, "connections": stats.connections,
            "sessions": stats.sessions,
        });
        if stats.connections == 0 {
            break;
        }
    }
    println!(
        "stayed {} ({failed} failed to connect, {closed} closed by the node); pushes {}; received {received}; lost/dup/order {lost} / {dup} / {reordered}; reconnects {}",
        stayers - failed, summary.pushes, reconnects.load(Ordering::Relaxed)
    );
    println!("node before: rss {rss_start} fds {fds_start}; after every client left: {after}");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "soak", "sockets": args.sockets, "stayers": stayers - failed, "churn_per_s": args.churn,
            "channels": channels.len(), "rate": args.rate, "duration_s": args.duration,
            "pushes": summary.pushes, "received": received, "lost": lost, "duplicated": dup, "reordered": reordered,
            "stayers_closed": closed, "reconnects": reconnects.load(Ordering::Relaxed),
            "before": {"rss": rss_start, "fds": fds_start}, "samples": samples, "after": after,
        })
    );
    Ok(())
}

/// The `calls` scenario (see the module's documentation).
async fn calls(args: &Args) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let endpoint = tonic::transport::Endpoint::from_shared(args.control.clone())?
            .http2_adaptive_window(args.adaptive_window);
        clients.push(ControlClient::new(endpoint.connect().await?));
    }
    let node_cpu_start = args.pid.map(cpu_us).transpose()?;
    let started = Instant::now();
    let clients = &clients;
    let outcomes: Vec<Result<(), tonic::Code>> = stream::iter(0..args.requests)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            async move {
                let creds = issue(&mut client, "calls").await.map_err(|e| {
                    e.downcast_ref::<tonic::Status>()
                        .map_or(tonic::Code::Unknown, tonic::Status::code)
                })?;
                client
                    .subscribe(pb::SubscribeRequest {
                        digest: creds.digest,
                        channels: vec!["calls-more".into()],
                    })
                    .await
                    .map(drop)
                    .map_err(|status| status.code())
            }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let node_cpu = match (node_cpu_start, args.pid.map(cpu_us).transpose()?) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    for code in outcomes.iter().filter_map(|o| o.err()) {
        *failures.entry(format!("{code:?}")).or_default() += 1;
    }
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    // Two calls per request (IssueConnection, Subscribe).
    let calls = 2 * args.requests;
    println!(
        "scenario calls: {} requests (IssueConnection + Subscribe), {} in flight over {} connection(s){}",
        args.requests,
        args.in_flight,
        args.connections,
        if args.adaptive_window { ", adaptive window" } else { "" }
    );
    println!(
        "done            {ok} ok in {elapsed:.2} s ({:.0} calls/s); failures {failures:?}",
        calls as f64 / elapsed
    );
    if let Some(cpu) = node_cpu {
        println!(
            "node CPU        {:.1} us per call",
            cpu as f64 / calls as f64
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "calls", "requests": args.requests, "in_flight": args.in_flight,
            "connections": args.connections, "adaptive_window": args.adaptive_window,
            "ok": ok, "failures": failures,
            "calls_per_s": calls as f64 / elapsed,
            "node_cpu_us_per_call": node_cpu.map(|c| c as f64 / calls as f64),
        })
    );
    Ok(())
}

/// The `recovery` scenario (see the module's documentation).
async fn recovery(args: &Args) -> anyhow::Result<()> {
    let mut control = ControlClient::connect(args.control.clone()).await?;
    let channels: Vec<String> = (0..args.channels.max(1))
        .map(|c| format!("storm-{c}"))
        .collect();
    let names = &channels;
    // Connect, asking for positions; remember each socket's credentials and its channel's epoch.
    type Connected = (usize, pb::IssueConnectionResponse, String, RawWs);
    let connected: Vec<anyhow::Result<Connected>> = stream::iter(0..args.sockets)
        .map(|i| {
            let mut control = control.clone();
            async move {
                let c = i % names.len();
                let creds = issue(&mut control, &names[c]).await?;
                let path = format!("{}&recover=%7B%7D", ws_path(&creds));
                let mut ws = open_path(args, i, &path).await?;
                let mut epoch = None;
                while epoch.is_none() {
                    let read = ws
                        .read_until(|text| {
                            let text = String::from_utf8_lossy(text);
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            epoch = v["connected"]["channels"][&names[c]]["epoch"]
                                .as_str()
                                .map(str::to_owned);
                            epoch.is_some()
                        })
                        .await?;
                    if matches!(read, Read::Closed) {
                        bail!("closed before the connected frame");
                    }
                }
                Ok((c, creds, epoch.unwrap_or_default(), ws))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let failed = connected.iter().filter(|r| r.is_err()).count();
    if let Some(Err(err)) = connected.iter().find(|r| r.is_err()) {
        eprintln!("first connect failure: {err:#}");
    }
    let (sockets, open): (Vec<_>, Vec<_>) = connected
        .into_iter()
        .filter_map(Result::ok)
        .map(|(c, creds, epoch, ws)| ((c, creds, epoch), ws))
        .unzip();
    // All drop at once, without a close frame, as a network failure would do.
    drop(open);
    // Every socket is gone once the node counts none.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats = control
            .stats(pb::StatsRequest::default())
            .await?
            .into_inner();
        if stats.connections == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} sockets still open after the drop", stats.connections);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The misses: pushed while nobody is connected.
    let pad = "x".repeat(args.payload.saturating_sub(20));
    let pushes: Vec<pb::PushRequest> = (1..=args.misses)
        .flat_map(|n| channels.iter().map(move |c| (c.clone(), n)))
        .map(|(channel, n)| pb::PushRequest {
            channels: vec![channel],
            json: format!(r#"{{"s":{n},"p":"{pad}"}}"#),
            ..Default::default()
        })
        .collect();
    control.push_stream(stream::iter(pushes)).await?;

    // The storm: everybody reconnects with what it saw (offset 0) and reads until it has all.
    let node_cpu_start = args.pid.map(cpu_us).transpose()?;
    let started = Instant::now();
    let misses = args.misses;
    // Per socket: the last offset in a row, duplicates, out of order, recovered, done at (s).
    type Outcome = (u64, u64, u64, bool, f64);
    let results: Vec<anyhow::Result<Outcome>> = stream::iter(sockets.into_iter().enumerate())
        .map(|(i, (c, creds, epoch))| {
            let names = names.clone();
            async move {
                let recover = format!(r#"{{"{}":{{"epoch":"{epoch}","offset":0}}}}"#, names[c]);
                let path = format!(
                    "{}&recover={}",
                    ws_path(&creds),
                    form_urlencoded::byte_serialize(recover.as_bytes()).collect::<String>()
                );
                let mut ws = open_path(args, i, &path).await?;
                let (mut next, mut dup, mut reordered, mut recovered) = (1u64, 0u64, 0u64, false);
                while next <= misses {
                    let read = ws
                        .read_until(|text| {
                            if text.starts_with(b"{\"connected\"") {
                                recovered = text.windows(16).any(|w| w == b"\"recovered\":true");
                                return false;
                            }
                            let Some(offset) = field(text, b"\"offset\":") else {
                                return false;
                            };
                            match offset.cmp(&next) {
                                std::cmp::Ordering::Equal => next += 1,
                                std::cmp::Ordering::Less => dup += 1,
                                std::cmp::Ordering::Greater => {
                                    reordered += 1;
                                    next = offset + 1;
                                }
                            }
                            next > misses
                        })
                        .await?;
                    if matches!(read, Read::Closed) {
                        break;
                    }
                }
                Ok((
                    next - 1,
                    dup,
                    reordered,
                    recovered,
                    started.elapsed().as_secs_f64(),
                ))
            }
        })
        .buffer_unordered(args.sockets.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();
    let node_cpu = match (node_cpu_start, args.pid.map(cpu_us).transpose()?) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let storm_failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        eprintln!("first reconnect failure: {err:#}");
    }
    let ok: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
    let received: u64 = ok.iter().map(|r| r.0).sum();
    let lost = (ok.len() as u64 * misses).saturating_sub(received);
    let dup: u64 = ok.iter().map(|r| r.1).sum();
    let reordered: u64 = ok.iter().map(|r| r.2).sum();
    let unrecovered = ok.iter().filter(|r| !r.3).count();
    let mut done: Vec<f64> = ok.iter().map(|r| r.4).collect();
    done.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        done.get(((done.len() as f64 * q) as usize).min(done.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "scenario recovery: {} sockets on {} channels, {} missed pushes each",
        args.sockets,
        channels.len(),
        misses
    );
    println!(
        "connected       {} ({} failed), then all dropped",
        args.sockets - failed,
        failed
    );
    println!(
        "storm           every socket recovered in {:.2} s (p50 {:.2} s, p99 {:.2} s); {} reconnects failed, {} not recovered",
        elapsed.as_secs_f64(), pct(0.5), pct(0.99), storm_failed, unrecovered
    );
    println!("replayed        {received} pushes; lost/dup/order {lost} / {dup} / {reordered}");
    if let Some(cpu) = node_cpu {
        println!(
            "node CPU        {:.2} s for the storm ({:.1} us per socket, {:.2} us per replayed push)",
            cpu as f64 / 1e6,
            cpu as f64 / ok.len().max(1) as f64,
            cpu as f64 / received.max(1) as f64
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "recovery", "sockets": args.sockets, "channels": channels.len(), "misses": misses,
            "connected": args.sockets - failed, "reconnect_failed": storm_failed, "not_recovered": unrecovered,
            "storm_seconds": elapsed.as_secs_f64(), "p50_seconds": pct(0.5), "p99_seconds": pct(0.99),
            "replayed": received, "lost": lost, "duplicated": dup, "reordered": reordered,
            "node_cpu_us": node_cpu,
        })
    );
    Ok(())
}

/// The unsigned integer after `key` in `text` (the generator's own payloads only).
fn field(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    Some(
        text[start..start + digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}
