//! Load generator for channelgate (`cargo bench --bench load -- --help`).
//!
//! It drives a running node the way applications and browsers do: credentials and
//! subscriptions over gRPC, WebSockets over TCP (spread over source addresses 127.0.0.x so
//! ephemeral ports do not run out), and reads the node's CPU time and RSS from `/proc/PID`.
//!
//! Scenarios:
//! * `idle`: open N subscribed sockets and report the node's RSS per socket.

use std::{net::SocketAddr, time::Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::{stream, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{client_async, tungstenite::client::IntoClientRequest, WebSocketStream};

use channelgate::pb::{self, control_client::ControlClient};

#[derive(Debug, Parser)]
struct Args {
    /// Scenario: idle.
    #[arg(long, default_value = "idle")]
    scenario: String,
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
    /// Cargo passes this to benches.
    #[arg(long, hide = true)]
    bench: bool,
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

async fn open_socket(
    args: &Args,
    i: usize,
    control: &mut ControlClient<tonic::transport::Channel>,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let creds = control
        .issue_connection(pb::IssueConnectionRequest::default())
        .await?
        .into_inner();
    control
        .subscribe(pb::SubscribeRequest {
            digest: creds.digest.clone(),
            channels: vec![format!("idle-{}", i % 100)],
        })
        .await?;
    let source = SocketAddr::from(([127, 0, 0, 1 + (i % args.sources as usize) as u8], 0));
    let socket = TcpSocket::new_v4()?;
    socket.bind(source)?;
    let stream = socket.connect(args.ws).await?;
    let url = format!(
        "ws://{}/ws?socket_connection_id={}&socket_key={}",
        args.ws, creds.connection_id, creds.socket_key
    );
    let (ws, _) = client_async(url.into_client_request()?, stream).await?;
    Ok(ws)
}

async fn idle(args: &Args) -> anyhow::Result<()> {
    let control = ControlClient::connect(args.control.clone()).await?;
    let before = args.pid.map(rss_bytes).transpose()?;
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..args.sockets)
        .map(|i| {
            let mut control = control.clone();
            async move { open_socket(args, i, &mut control).await }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let (sockets, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if let Some(Err(err)) = failed.first() {
        eprintln!("first failure: {err:#}");
    }
    let mut control = control.clone();
    let stats = control
        .stats(pb::StatsRequest::default())
        .await?
        .into_inner();
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
    println!("node reports    {} connections", stats.connections);
    println!(
        "connect time    {:.2} s ({:.0}/s incl. issue+subscribe)",
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
    println!(
        "{}",
        serde_json::json!({
            "scenario": "idle", "connected": sockets.len(), "failed": failed.len(),
            "node_connections": stats.connections, "connect_seconds": elapsed.as_secs_f64(),
            "rss_before": before, "rss_after": after, "rss_per_socket": per_socket,
        })
    );
    drop(sockets);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario.as_str() {
        "idle" => idle(&args).await,
        other => bail!("unknown scenario {other:?}"),
    }
}
