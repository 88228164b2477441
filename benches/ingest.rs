//! The `outbox` and `jetstream` scenarios: what a node's consumer costs and how fast it applies.
//!
//! Start the node with a `[[consumers]]` table for the source (`benches/ingest.toml`), then:
//! * throughput: `--rows` commands to `--channels` channels (`ingest-P`, one per outbox
//!   partition), all at once: for the outbox, one transaction whose `COMMIT` makes every row
//!   visible together (so the time from `COMMIT` to the last frame is the node's applying
//!   alone); for JetStream, published as fast as the stream acknowledges them (the report
//!   gives the publishing time beside it). One socket subscribed to every channel checks each
//!   arrives once, in order per channel. Reports rows/s and the node's CPU per row.
//! * latency: `--requests` single commands at `--rate` per second, each its own transaction
//!   (outbox) or publish (JetStream); the time from just before `COMMIT` (or the publish) to the
//!   frame's arrival, in percentiles.

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context as _};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use channelgate::pb::{self, control_client::ControlClient};

use crate::{cpu_us, tcp_from, ws_path, Args, Latency};

/// What the commands go into.
enum Source {
    Outbox {
        client: tokio_postgres::Client,
        table: String,
    },
    JetStream {
        js: async_nats::jetstream::Context,
        subject: String,
    },
}

impl Source {
    async fn open(args: &Args, scenario: &str) -> anyhow::Result<Self> {
        Ok(match scenario {
            "outbox" => {
                let (client, connection) =
                    tokio_postgres::connect(&args.dsn, tokio_postgres::NoTls)
                        .await
                        .with_context(|| format!("connecting to {}", args.dsn))?;
                tokio::spawn(connection);
                Self::Outbox {
                    client,
                    table: args.table.clone(),
                }
            }
            _ => {
                let client = async_nats::connect(&args.nats_url).await?;
                Self::JetStream {
                    js: async_nats::jetstream::new(client),
                    subject: args.nats_subject.clone(),
                }
            }
        })
    }

    /// Writes `rows` (partition, payload) as one transaction, or publishes them; returns when
    /// the last was committed or acknowledged. `committing` is set just before `COMMIT` (or the
    /// first publish).
    async fn write(
        &mut self,
        rows: &[(i32, String)],
        committing: &mut Option<Instant>,
    ) -> anyhow::Result<()> {
        match self {
            Self::Outbox { client, table } => {
                let tx = client.transaction().await?;
                for chunk in rows.chunks(10_000) {
                    let partitions: Vec<i32> = chunk.iter().map(|r| r.0).collect();
                    let payloads: Vec<&str> = chunk.iter().map(|r| r.1.as_str()).collect();
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} (partition, method, payload) \
                             SELECT p, 'push', j::jsonb FROM unnest($1::int4[], $2::text[]) \
                             WITH ORDINALITY AS u(p, j, n) ORDER BY n"
                        ),
                        &[&partitions, &payloads],
                    )
                    .await?;
                }
                *committing = Some(Instant::now());
                tx.commit().await?;
            }
            Self::JetStream { js, subject } => {
                *committing = Some(Instant::now());
                // The client holds at most a few thousand acks in flight: await the oldest
                // past 1,000.
                let mut acks = std::collections::VecDeque::with_capacity(1_000);
                for (_, payload) in rows {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Channelgate-Method", "push");
                    if acks.len() == 1_000 {
                        if let Some(ack) = acks.pop_front() {
                            ack.await?;
                        }
                    }
                    acks.push_back(
                        js.publish_with_headers(subject.clone(), headers, payload.clone().into())
                            .await?,
                    );
                }
                for ack in acks {
                    ack.await?;
                }
            }
        }
        Ok(())
    }
}

/// A push of partition `p`'s channel carrying `seq`.
fn row(p: usize, seq: u64) -> (i32, String) {
    (
        p as i32,
        format!(r#"{{"channel":"ingest-{p}","data":{{"seq":{seq}}}}}"#),
    )
}

/// The `outbox` and `jetstream` scenarios (see the module's documentation).
pub(crate) async fn run(args: &Args, scenario: &str) -> anyhow::Result<()> {
    let partitions = args.channels.max(1);
    let channels: Vec<String> = (0..partitions).map(|p| format!("ingest-{p}")).collect();
    let mut control = ControlClient::connect(args.control.clone()).await?;
    let creds = control
        .issue_connection(pb::IssueConnectionRequest {
            channels: channels.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let url = format!("ws://{}{}", args.ws, ws_path(&creds));
    let tcp = tcp_from(args, 0).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?,
        tcp,
    )
    .await?;
    let mut source = Source::open(args, scenario).await?;

    // Throughput.
    let rows: Vec<_> = (0..args.rows)
        .map(|i| row(i as usize % partitions, i / partitions as u64))
        .collect();
    let cpu_before = args.pid.map(cpu_us).transpose()?;
    let mut committing = None;
    let written_at;
    {
        let reader = read_all(&mut ws, args.rows);
        let writer = async {
            source.write(&rows, &mut committing).await?;
            Ok::<_, anyhow::Error>(Instant::now())
        };
        let (read, written) = tokio::join!(reader, writer);
        written_at = written?;
        let (done, problems) = read?;
        let start = committing.context("written")?;
        let applied = done.duration_since(start);
        let cpu = match (cpu_before, args.pid) {
            (Some(before), Some(pid)) => Some(cpu_us(pid)? - before),
            _ => None,
        };
        println!(
            "scenario {scenario}: {} rows over {partitions} partitions/channels, then {} one at a time at {}/s",
            args.rows, args.requests, args.rate
        );
        println!(
            "throughput      {:>9.0} rows/s   ({} rows, {:.1} ms from {} to the last frame; writing took {:.1} ms)",
            args.rows as f64 / applied.as_secs_f64(),
            args.rows,
            applied.as_secs_f64() * 1e3,
            if scenario == "outbox" { "COMMIT" } else { "the first publish" },
            written_at.duration_since(start).as_secs_f64() * 1e3,
        );
        if let Some(cpu) = cpu {
            println!(
                "node CPU        {:>9.2} us per row",
                cpu as f64 / args.rows as f64
            );
        }
        println!(
            "lost {}  duplicated {}  out of order {}",
            problems.0, problems.1, problems.2
        );
    }

    // Latency: `--requests` commits (or publishes) of `--batch-rows` rows each at `--rate` per
    // second, each timed until its last row's frame arrived.
    let per = args.batch_rows.max(1);
    // Where each partition's numbering stands after the throughput phase's rows.
    let (whole, extra) = (args.rows / partitions as u64, args.rows % partitions as u64);
    let mut next_seq: Vec<u64> = (0..partitions as u64)
        .map(|p| whole + u64::from(p < extra))
        .collect();
    let mut samples = Vec::with_capacity(args.requests);
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let cpu_before = args.pid.map(cpu_us).transpose()?;
    let began = Instant::now();
    let mut next = began;
    for _ in 0..args.requests {
        tokio::time::sleep_until(next).await;
        next += gap;
        let batch: Vec<_> = (0..per)
            .map(|j| {
                let p = j % partitions;
                next_seq[p] += 1;
                row(p, next_seq[p] - 1)
            })
            .collect();
        let mut started = None;
        source.write(&batch, &mut started).await?;
        let started = started.context("written")?;
        for _ in 0..per {
            let v = next_json(&mut ws).await?;
            if v["payload"]["seq"].as_u64().is_none() {
                bail!("expected a bench push, got {v}");
            }
        }
        samples.push(started.elapsed());
    }
    let took = began.elapsed();
    let rows = (args.requests * per) as f64;
    let latency = Latency::of(samples);
    println!(
        "steady           {:>9.0} rows/s   ({} {} of {per} rows at {}/s)",
        rows / took.as_secs_f64(),
        args.requests,
        if scenario == "outbox" {
            "commits"
        } else {
            "publish rounds"
        },
        args.rate
    );
    if let (Some(before), Some(pid)) = (cpu_before, args.pid) {
        println!(
            "node CPU        {:>9.2} us per row",
            (cpu_us(pid)? - before) as f64 / rows
        );
    }
    latency.row(if scenario == "outbox" {
        "COMMIT to frame"
    } else {
        "publish to frame"
    });
    Ok(())
}

/// The next text frame, as JSON.
async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> anyhow::Result<serde_json::Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => bail!("no frame in 30 s"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("socket closed"),
        }
    }
}

/// Reads `n` pushes; returns when the last came and (lost, duplicated, out of order) counts.
async fn read_all(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    n: u64,
) -> anyhow::Result<(Instant, (u64, u64, u64))> {
    let mut next: HashMap<String, u64> = HashMap::new();
    let (mut duplicated, mut disorder) = (0, 0);
    let mut seen = 0;
    while seen < n {
        let v = next_json(ws).await?;
        let channel = v["channel"].as_str().context("a push")?.to_owned();
        let seq = v["payload"]["seq"].as_u64().context("a bench push")?;
        let expected = next.entry(channel).or_insert(0);
        match seq.cmp(expected) {
            std::cmp::Ordering::Equal => *expected += 1,
            std::cmp::Ordering::Less => duplicated += 1,
            std::cmp::Ordering::Greater => {
                disorder += 1;
                *expected = seq + 1;
            }
        }
        seen += 1;
    }
    let got: u64 = next.values().sum();
    let lost = n.saturating_sub(got);
    Ok((Instant::now(), (lost, duplicated, disorder)))
}
