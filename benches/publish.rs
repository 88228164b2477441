//! The `fanout` scenario's publishers: one worker feeding a `PushStream` per node (a channel's
//! pushes always through the same node), or workers that make one call per push: unary `Push`
//! calls over `--push-connections` HTTP/2 connections (`--push-with unary`), or, against Nchan
//! (`--target nchan`), one HTTP `POST /pub/CHANNEL` per publish over keep-alive HTTP/1.1
//! connections, `--in-flight` calls at once, each worker making its calls one after another.
//! A worker numbers its own pushes per channel (`"w"` and `"s"` in the payload), so the readers
//! check order per worker and channel, which is what one sequential caller is promised.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use rand::Rng;

use channelgate::pb::{self, control_client::ControlClient};

/// What every worker shares.
pub(crate) struct Plan {
    pub(crate) channels: Vec<String>,
    pub(crate) subscribers: Vec<u64>,
    pub(crate) payload: usize,
    pub(crate) deadline: Instant,
    /// Pushes to make in all (0: until the deadline).
    pub(crate) count: u64,
    /// Pushes per second in all (0: as fast as accepted).
    pub(crate) rate: u64,
    pub(crate) started: AtomicU64,
    pub(crate) pushed: AtomicU64,
    pub(crate) expected: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// How pushes leave the generator.
pub(crate) enum Target {
    /// Into the `PushStream` of each node, a channel's pushes always into the same one (pushes
    /// through two nodes are ordered by Redis, not by their caller).
    Stream(Vec<tokio::sync::mpsc::Sender<pb::PushRequest>>),
    /// Unary `Push` calls, round robin over these clients (one HTTP/2 connection each).
    Unary(Vec<ControlClient<tonic::transport::Channel>>),
    /// HTTP `POST`s to Nchan's publisher location on this address.
    Nchan(std::net::SocketAddr),
}

impl Plan {
    /// Takes the next push's turn: `false` once the deadline or the count is reached.
    fn take(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        self.count == 0 || n < self.count
    }

    fn json(&self, c: usize, w: usize, seq: u64, pad: &str) -> String {
        format!(
            r#"{{"c":{c},"w":{w},"s":{seq},"t":{},"p":"{pad}"}}"#,
            super::now_us()
        )
    }

    fn accepted(&self, c: usize) {
        self.pushed.fetch_add(1, Ordering::Relaxed);
        self.expected
            .fetch_add(self.subscribers[c], Ordering::Relaxed);
    }
}

/// Runs `workers` publishers until the plan's deadline or count; returns when all have.
pub(crate) async fn run(plan: Arc<Plan>, target: Target, workers: usize) -> anyhow::Result<()> {
    let workers = workers.max(1);
    // Pacing for a set rate: one worker's turn every `workers / rate` seconds, staggered.
    let interval =
        (plan.rate > 0).then(|| Duration::from_secs_f64(workers as f64 / plan.rate as f64));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let plan = plan.clone();
        let start = tokio::time::Instant::now()
            + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / workers as f64));
        let mut sender = match &target {
            Target::Stream(txs) => Sender::Stream(txs.clone()),
            Target::Unary(clients) => Sender::Unary(clients[w % clients.len()].clone()),
            Target::Nchan(addr) => Sender::Nchan(nchan_connection(*addr).await?, *addr),
        };
        tasks.push(tokio::spawn(async move {
            let pad = "x".repeat(plan.payload.saturating_sub(48));
            let mut seqs = vec![0u64; plan.channels.len()];
            let mut next_at = start;
            while plan.take() {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next_at).await;
                    next_at += interval;
                }
                let c = rand::rng().random_range(0..plan.channels.len());
                seqs[c] += 1;
                let json = plan.json(c, w, seqs[c], &pad);
                match sender.push(c, &plan.channels[c], json).await {
                    Ok(()) => plan.accepted(c),
                    Err(err) => {
                        if plan.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("a push failed: {err:#}");
                        }
                        if matches!(sender, Sender::Stream(_)) {
                            // The stream ended (its call says why): nothing more goes in.
                            break;
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

enum Sender {
    Stream(Vec<tokio::sync::mpsc::Sender<pb::PushRequest>>),
    Unary(ControlClient<tonic::transport::Channel>),
    Nchan(
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        std::net::SocketAddr,
    ),
}

impl Sender {
    /// Pushes `json` to `channel`, the `c`th.
    async fn push(&mut self, c: usize, channel: &str, json: String) -> anyhow::Result<()> {
        match self {
            Self::Stream(txs) => {
                txs[c % txs.len()]
                    .send(pb::PushRequest {
                        channels: vec![channel.to_owned()],
                        json,
                        ..Default::default()
                    })
                    .await
                    .context("the push stream ended")?;
            }
            Self::Unary(client) => {
                client
                    .push(pb::PushRequest {
                        channels: vec![channel.to_owned()],
                        json,
                        ..Default::default()
                    })
                    .await?;
            }
            Self::Nchan(send, addr) => {
                let request = http::Request::post(format!("/pub/{channel}"))
                    .header(http::header::HOST, addr.to_string())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(json)))?;
                let response = send.send_request(request).await?;
                let status = response.status();
                // Drain the body so the connection can take the next request.
                http_body_util::BodyExt::collect(response.into_body()).await?;
                anyhow::ensure!(status.is_success(), "Nchan answered {status}");
            }
        }
        Ok(())
    }
}

/// A keep-alive HTTP/1.1 connection to Nchan.
async fn nchan_connection(
    addr: std::net::SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting to Nchan")?;
    stream.set_nodelay(true)?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            eprintln!("an Nchan connection failed: {err}");
        }
    });
    Ok(send)
}
