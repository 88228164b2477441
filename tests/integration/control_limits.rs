//! HTTP/2 limits of the control plane that hold: the advertised concurrent-stream limit and
//! refusals past it, unary calls timed from their arrival, a bound on connections, keepalive,
//! rapid reset and a flood of streams with bounded memory and CPU, and stock tonic clients
//! (default settings and adaptive flow control) that get every call answered with hundreds and
//! thousands of calls in flight on one connection.

use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use tonic::transport::Endpoint;

use crate::{
    h2raw::{self, RawH2},
    support::{spawn_binary, Gateway, PATIENCE},
};
use channelgate::pb::{self, control_client::ControlClient};

const SUBSCRIBE: &str = "/channelgate.v1.Control/Subscribe";

/// `IssueConnection` then `Subscribe`, `requests` times with `in_flight` at once, over one
/// connection of a stock tonic client (`adaptive`: HTTP/2 adaptive flow control); every
/// failure's status.
async fn page_renders(
    grpc: std::net::SocketAddr,
    adaptive: bool,
    requests: usize,
    in_flight: usize,
) -> Vec<tonic::Status> {
    let channel = Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .http2_adaptive_window(adaptive)
        .connect()
        .await
        .unwrap();
    let client = ControlClient::new(channel);
    let outcomes: Vec<Result<(), tonic::Status>> = stream::iter(0..requests)
        .map(|_| {
            let mut client = client.clone();
            async move {
                let creds = client
                    .issue_connection(pb::IssueConnectionRequest::default())
                    .await?
                    .into_inner();
                client
                    .subscribe(pb::SubscribeRequest {
                        digest: creds.digest,
                        channels: vec!["renders".into()],
                    })
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    outcomes.into_iter().filter_map(Result::err).collect()
}

/// Each unary reply used to be one DATA frame of a few bytes, and a client on h2 0.4.16+ with a
/// 64 KiB window (adaptive flow control) that read them a little late closed its own connection
/// (`too_many_data_frames`), failing 40-88% of the calls. Every call is answered now, with both
/// stock settings; on a runtime with two workers, so the client's connection task can outrun
/// the task reading the replies, as in an application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_tonic_clients_get_every_call_answered_with_thousands_in_flight() {
    let gw = Gateway::start().await;
    for adaptive in [false, true] {
        for in_flight in [500, 5000] {
            let failures = page_renders(gw.grpc, adaptive, 2 * in_flight, in_flight).await;
            assert!(
                failures.is_empty(),
                "adaptive window {adaptive}, {in_flight} in flight: {} calls failed, first: {:?}",
                failures.len(),
                failures.first()
            );
        }
    }
}

/// The node advertises its concurrent-stream limit; streams past it are refused at once with
/// RST_STREAM(REFUSED_STREAM), as HTTP/2 says; a call whose body never comes ends with
/// DEADLINE_EXCEEDED one call timeout after it arrived, not after waiting behind others.
#[tokio::test]
async fn streams_past_the_limit_are_refused_and_calls_are_timed_from_arrival() {
    let timeout = Duration::from_secs(1);
    let gw = Gateway::start_with(move |c| {
        c.grpc_max_streams = 10;
        c.grpc_call_timeout = timeout;
    })
    .await;
    let mut h2 = RawH2::connect(gw.grpc).await;
    assert_eq!(
        h2.settings.get(&h2raw::SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&10)
    );
    let opened = Instant::now();
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    for _ in 0..15 {
        let (id, bytes) = h2.open_frame(SUBSCRIBE);
        ids.push(id);
        batch.extend(bytes);
    }
    h2.send(&batch).await;
    let (mut refused, mut ended) = (Vec::new(), Vec::new());
    while refused.len() + ended.len() < 15 {
        let f = tokio::time::timeout(PATIENCE, h2.next())
            .await
            .expect("an answer in time")
            .expect("the connection stays open");
        match f.kind {
            h2raw::RST_STREAM if f.error_code() == h2raw::REFUSED_STREAM => {
                refused.push((f.stream, opened.elapsed()))
            }
            h2raw::HEADERS if f.flags & h2raw::END_STREAM != 0 => {
                ended.push((f.stream, opened.elapsed()))
            }
            _ => {}
        }
    }
    // The first 10 were taken, the 5 past the limit refused at once.
    assert_eq!(
        refused.iter().map(|r| r.0).collect::<Vec<_>>(),
        ids[10..],
        "{refused:?}"
    );
    assert!(refused.iter().all(|r| r.1 < timeout / 2), "{refused:?}");
    // Each taken call ended by its own deadline, from its arrival.
    assert_eq!(ended.len(), 10, "{ended:?}");
    for (stream, took) in &ended {
        assert!(
            *took >= timeout && *took < timeout + Duration::from_millis(800),
            "stream {stream} ended after {took:?}"
        );
    }
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    let line =
        format!("channelgate_control_requests_total{{code=\"4\",method=\"{SUBSCRIBE}\"}} 10");
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    let gw = Gateway::start_with(|c| c.grpc_max_connections = 3).await;
    // The harness's two clients hold two connections; one more fits.
    let mut third = RawH2::connect(gw.grpc).await;
    let fourth = tokio::net::TcpStream::connect(gw.grpc).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncReadExt;
        let mut fourth = fourth;
        fourth.read(&mut buf).await
    })
    .await
    .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains("channelgate_refused_connections_total{reason=\"grpc_connections\"} 1"),
        "{metrics}"
    );
    // The one that fits works.
    let id = third.open(SUBSCRIBE).await;
    let _ = id;
    assert!(third.received().iter().all(|f| f.kind != h2raw::GOAWAY));
}

#[tokio::test]
async fn a_connection_that_does_not_answer_pings_is_closed() {
    let keepalive = Duration::from_millis(300);
    let gw = Gateway::start_with(move |c| c.grpc_keepalive = keepalive).await;
    let mut h2 = RawH2::connect(gw.grpc).await;
    let started = Instant::now();
    let mut pings = 0;
    // Read, never answer: pings come, then the connection ends.
    while let Some(f) = tokio::time::timeout(PATIENCE, h2.next())
        .await
        .expect("closed in time")
    {
        if f.kind == h2raw::PING && f.flags & h2raw::ACK == 0 {
            pings += 1;
        }
    }
    assert!(pings >= 1);
    let took = started.elapsed();
    assert!(
        took >= keepalive && took < keepalive * 4 + Duration::from_secs(1),
        "{took:?}"
    );
}

/// Resident memory and CPU time (user + system) of a process.
fn usage(pid: u32) -> (u64, Duration) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss_kb << 10, Duration::from_millis(ticks * 10))
}

/// A client that opens 100,000 streams (headers only, ignoring the advertised limit, on as
/// many connections as the node lets it have), and one that opens and resets 100,000 streams
/// at once (rapid reset, CVE-2023-44487): the node refuses and closes, spends bounded CPU, and
/// its memory is back where it was once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_floods_and_rapid_reset_leave_memory_and_cpu_bounded() {
    let (mut node, _http, grpc) = spawn_binary(&[]);
    let grpc: std::net::SocketAddr = grpc.parse().unwrap();
    let pid = node.id();
    // Warm up the node's allocator and control plane with a few ordinary calls first.
    assert!(page_renders(grpc, false, 200, 50).await.is_empty());
    let (rss_before, cpu_before) = usage(pid);

    // 100,000 streams that never send a body.
    let (mut opened, mut connections, mut goaways) = (0, 0, 0);
    while opened < 100_000 {
        let mut h2 = RawH2::connect(grpc).await;
        connections += 1;
        for _ in 0..4 {
            let mut batch = Vec::new();
            for _ in 0..500 {
                batch.extend(h2.open_frame(SUBSCRIBE).1);
            }
            if !h2.try_send(&batch).await {
                break;
            }
            opened += 500;
        }
        // The node refuses past the limit and soon closes a connection that keeps going.
        while let Some(f) = tokio::time::timeout(PATIENCE, h2.next())
            .await
            .expect("the node answers")
        {
            if f.kind == h2raw::GOAWAY {
                goaways += 1;
                assert_eq!(
                    f.error_code(),
                    h2raw::ENHANCE_YOUR_CALM,
                    "{:?}",
                    String::from_utf8_lossy(&f.payload[8..])
                );
                break;
            }
        }
    }
    let (rss_flood, cpu_flood) = usage(pid);

    // Rapid reset: HEADERS then RST_STREAM(CANCEL), 100,000 times, as fast as the node reads.
    let mut reset = 0;
    let mut reset_goaways = 0;
    while reset < 100_000 {
        let mut h2 = RawH2::connect(grpc).await;
        for _ in 0..10 {
            let mut batch = Vec::new();
            for _ in 0..1000 {
                let (id, bytes) = h2.open_frame(SUBSCRIBE);
                batch.extend(bytes);
                batch.extend(h2raw::reset(id, h2raw::CANCEL));
            }
            if !h2.try_send(&batch).await {
                break;
            }
            reset += 1000;
        }
        // The node reads on, or closes the connection (GOAWAY) when resets come faster than
        // it accepts the streams.
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(500), h2.next()).await {
            if f.kind == h2raw::GOAWAY {
                reset_goaways += 1;
                break;
            }
        }
    }
    let (rss_reset, cpu_reset) = usage(pid);

    // Everyone gone: ordinary calls still work, and memory is back.
    assert!(page_renders(grpc, false, 200, 50).await.is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after, _) = usage(pid);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "flood: {opened} streams over {connections} connections ({goaways} GOAWAY), CPU {:?}; \
         rapid reset: {reset} streams ({reset_goaways} GOAWAY), CPU {:?}; RSS MiB: before {:.1}, \
         after flood {:.1}, after reset {:.1}, after {:.1}",
        cpu_flood - cpu_before,
        cpu_reset - cpu_flood,
        mib(rss_before),
        mib(rss_flood),
        mib(rss_reset),
        mib(rss_after),
    );
    assert!(
        rss_after < rss_before + (8 << 20),
        "RSS {:.1} MiB before, {:.1} MiB after",
        mib(rss_before),
        mib(rss_after)
    );
    assert!(rss_flood.max(rss_reset) < rss_before + (32 << 20));
    // The debug build's CPU: bounded, not proportional to what a server that took every
    // stream would spend.
    assert!(
        cpu_reset - cpu_flood < Duration::from_secs(20),
        "{:?}",
        cpu_reset - cpu_flood
    );
    let _ = node.kill();
    let _ = node.wait();
}
