//! Pushes: who receives them, exactly once, in order; and a slow socket never holds others up.

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{code, Gateway, PATIENCE};
use channelgate::pb;

#[tokio::test]
async fn a_push_with_no_subscribers_succeeds() {
    let gw = Gateway::start().await;
    assert_eq!(gw.push("empty", r#"{"a":1}"#).await, 0);
}

#[tokio::test]
async fn one_and_two_subscribers_receive_channel_and_payload() {
    let gw = Gateway::start().await;
    let (_, mut a) = gw.subscriber(&["news"]).await;
    assert_eq!(gw.push("news", r#"{"n":1}"#).await, 1);
    assert_eq!(
        a.recv_json().await,
        json!({"channel":"news","offset":1,"payload":{"n":1}})
    );
    let (_, mut b) = gw.subscriber(&["news"]).await;
    assert_eq!(gw.push("news", r#"{"n":2}"#).await, 2);
    for ws in [&mut a, &mut b] {
        assert_eq!(
            ws.recv_json().await,
            json!({"channel":"news","offset":2,"payload":{"n":2}})
        );
    }
}

#[tokio::test]
async fn the_payload_arrives_byte_for_byte() {
    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&["raw"]).await;
    gw.push("raw", r#"{"b":1.50, "a" : [ "x" ]}"#).await;
    match ws.next_message().await {
        Some(Message::Text(t)) => assert_eq!(
            t.as_str(),
            r#"{"channel":"raw","offset":1,"payload":{"b":1.50, "a" : [ "x" ]}}"#
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_channel_does_not_reach_a_longer_namesake() {
    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&["foo_channelf"]).await;
    assert_eq!(gw.push("foo_channel", "\"wrong\"").await, 0);
    gw.push("foo_channelf", "\"right\"").await;
    assert_eq!(
        ws.recv_push().await,
        ("foo_channelf".into(), "right".into())
    );
}

#[tokio::test]
async fn send_by_digest_reaches_only_that_socket() {
    let gw = Gateway::start().await;
    let (a_creds, mut a) = gw.subscriber(&["shared"]).await;
    let (b_creds, mut b) = gw.subscriber(&["shared"]).await;
    let send = |digest: String, json: &str| pb::SendRequest {
        digest,
        channel: "private".into(),
        json: json.into(),
        ..Default::default()
    };
    let r = gw
        .control()
        .send(send(a_creds.digest.clone(), r#""for a""#))
        .await
        .unwrap()
        .into_inner();
    assert!(r.queued);
    assert_eq!(a.recv_push().await, ("private".into(), "for a".into()));
    gw.control()
        .send(send(b_creds.digest.clone(), r#""for b""#))
        .await
        .unwrap();
    // b's first message is its own: a's never reached it.
    assert_eq!(b.recv_push().await, ("private".into(), "for b".into()));
}

#[tokio::test]
async fn live_unsubscribe_stops_delivery_at_once() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&["a", "b"]).await;
    gw.push("a", "1").await;
    assert_eq!(ws.recv_push().await, ("a".into(), 1.into()));
    gw.unsubscribe(&creds, &["a"]).await;
    assert_eq!(gw.push("a", "2").await, 0);
    gw.push("b", "3").await;
    assert_eq!(ws.recv_push().await, ("b".into(), 3.into()));
}

#[tokio::test]
async fn live_subscribe_starts_delivery_at_once() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&[]).await;
    assert!(gw.subscribe(&creds, &["late"]).await);
    assert_eq!(gw.push("late", "1").await, 1);
    assert_eq!(ws.recv_push().await, ("late".into(), 1.into()));
}

#[tokio::test]
async fn five_hundred_rapid_pushes_arrive_complete_and_in_order() {
    let gw = Gateway::start().await;
    let (_, mut a) = gw.subscriber(&["seq"]).await;
    let (_, mut b) = gw.subscriber(&["seq"]).await;
    for i in 0..500 {
        assert_eq!(gw.push("seq", &i.to_string()).await, 2);
    }
    for ws in [&mut a, &mut b] {
        for i in 0..500 {
            assert_eq!(ws.recv_push().await.1, i);
        }
    }
}

#[tokio::test]
async fn concurrent_publishers_are_seen_in_one_order_by_every_subscriber() {
    let gw = Gateway::start().await;
    let (_, mut a) = gw.subscriber(&["c"]).await;
    let (_, mut b) = gw.subscriber(&["c"]).await;
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut control = gw.control();
        publishers.push(tokio::spawn(async move {
            for i in 0..100 {
                let json = json!({"p": p, "i": i}).to_string();
                control
                    .push(pb::PushRequest {
                        channels: vec!["c".into()],
                        json,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut seen_a = Vec::new();
    for _ in 0..400 {
        seen_a.push(a.recv_push().await.1);
    }
    let mut seen_b = Vec::new();
    for _ in 0..400 {
        seen_b.push(b.recv_push().await.1);
    }
    assert_eq!(seen_a, seen_b);
    for p in 0..4 {
        let is: Vec<_> = seen_a
            .iter()
            .filter(|v| v["p"] == p)
            .map(|v| v["i"].as_u64().unwrap())
            .collect();
        assert_eq!(is, (0..100).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn push_stream_delivers_in_order() {
    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&["s"]).await;
    let pushes = (0..200).map(|i| pb::PushRequest {
        channels: vec!["s".into()],
        json: i.to_string(),
        ..Default::default()
    });
    let r = gw
        .control()
        .push_stream(futures_util::stream::iter(pushes))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.pushes, r.queued), (200, 200));
    for i in 0..200 {
        assert_eq!(ws.recv_push().await.1, i);
    }
}

#[tokio::test]
async fn a_socket_that_never_reads_is_closed_as_too_slow_while_a_reader_gets_everything() {
    let gw = Gateway::start_with(|c| {
        c.limits.outbound_queue = 256 << 10;
        c.limits.max_push_size = 64 << 10;
    })
    .await;
    let (_, mut slow) = gw.subscriber(&["firehose"]).await;
    let (_, mut reader) = gw.subscriber(&["firehose"]).await;
    let payload = format!("\"{}\"", "x".repeat(8 << 10));

    // The reader reads concurrently and reports every sequence number it saw.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        while let Some(Ok(message)) = reader.ws.next().await {
            if let Message::Text(t) = message {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if seen_tx.send(v["payload"]["seq"].as_u64().unwrap()).is_err() {
                    break;
                }
            }
        }
    });

    // Push until the slow socket is gone (kernel buffers fill first; bounded at 100 MB).
    let mut pushed = 0u64;
    loop {
        let json = format!(r#"{{"seq":{pushed},"pad":{payload}}}"#);
        gw.push("firehose", &json).await;
        pushed += 1;
        if gw.stats().await.connections == 1 {
            break;
        }
        assert!(pushed < 12_000, "the slow socket was never closed");
    }
    for expected in 0..pushed {
        let seen = tokio::time::timeout(PATIENCE, seen_rx.recv())
            .await
            .expect("every push reaches the reader");
        assert_eq!(seen, Some(expected));
    }
    // The reader is still connected: only the slow socket was closed.
    assert_eq!(gw.stats().await.connections, 1);
    reading.abort();

    let close = slow.expect_close().await;
    assert_eq!(code(&close), 4100);
    assert_eq!(close.reason.as_str(), "too slow: outbound queue full");
}

/// Runs the load generator against `gw` with `args`; returns its JSON report line.
/// `args` is the generator's command line after the program name, split at whitespace.
pub(crate) async fn run_generator(gw: &Gateway, args: &str) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_channelgate-bench"))
        .args(args.split_whitespace())
        .args([
            "--control",
            &format!("http://{}", gw.grpc),
            "--ws",
            &gw.http.to_string(),
        ])
        .args(["--pid", &std::process::id().to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("a JSON report line in {stdout}"))
}

/// The load generator's smoke run: tiny sizes, a second of pushing, zero loss.
#[tokio::test]
async fn the_load_generator_runs_and_loses_nothing() {
    let gw = Gateway::start().await;
    let report = run_generator(
        &gw,
        "--scenario fanout --sockets 20 --channels 2 --rate 100 --duration 1",
    )
    .await;
    assert_eq!(report["connected"], 20);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["reordered"], 0);
    assert!(report["deliveries"].as_u64().unwrap() > 0, "{report}");
}

/// The unary publishers (`--push-with unary`): every push counted, delivered once, in order per
/// worker and channel.
#[tokio::test]
async fn the_load_generator_pushes_with_unary_calls_and_loses_nothing() {
    let gw = Gateway::start().await;
    let report = run_generator(
        &gw,
        "--scenario fanout --sockets 20 --channels 5 --rate 0 --duration 30 --push-with unary --push-connections 2 --in-flight 4 --push-count 200",
    )
    .await;
    assert_eq!(report["push_with"], "unary", "{report}");
    assert_eq!(report["pushes"], 200, "{report}");
    assert_eq!(report["push_failures"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["reordered"], 0);
    assert_eq!(report["deliveries"], report["expected"], "{report}");
}

#[tokio::test]
async fn issue_can_subscribe_in_the_same_call() {
    let gw = Gateway::start().await;
    let r = gw
        .control()
        .issue_connection(pb::IssueConnectionRequest {
            ttl_ms: 0,
            channels: vec!["a".into(), "b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let creds = crate::support::Creds::from(r);
    let mut ws = gw.connect(&creds).await;
    assert_eq!(gw.push("b", "2").await, 1);
    assert_eq!(ws.recv_push().await, ("b".into(), 2.into()));
    // A bad channel mints nothing.
    let before = gw.stats().await.sessions;
    let err = gw
        .control()
        .issue_connection(pb::IssueConnectionRequest {
            ttl_ms: 0,
            channels: vec!["bad name".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(gw.stats().await.sessions, before);
}

/// The generator's idle scenario (S4 memory, S5 issue and handshake cost): tiny sizes.
#[tokio::test]
async fn the_load_generator_measures_idle_sockets() {
    let gw = Gateway::start().await;
    let report = run_generator(&gw, "--scenario idle --sockets 20").await;
    assert_eq!(report["connected"], 20, "{report}");
    assert_eq!(report["node_connections"], 20, "{report}");
    assert!(report["node_cpu_us_per_issue"].is_number(), "{report}");
    assert!(report["node_cpu_us_per_subscribe"].is_number(), "{report}");
    assert!(report["node_cpu_us_per_handshake"].is_number(), "{report}");
    assert!(report["rss_per_socket"].is_number(), "{report}");
}

/// The generator's recovery storm (issue 12's benchmark): tiny sizes, everything recovered.
#[tokio::test]
async fn the_load_generator_runs_a_recovery_storm() {
    let gw = Gateway::start().await;
    let report = run_generator(
        &gw,
        "--scenario recovery --sockets 40 --channels 4 --misses 25",
    )
    .await;
    assert_eq!(report["connected"], 40, "{report}");
    assert_eq!(report["reconnect_failed"], 0, "{report}");
    assert_eq!(report["not_recovered"], 0, "{report}");
    assert_eq!(report["replayed"], 40 * 25, "{report}");
    assert_eq!(
        (report["lost"].as_u64(), report["duplicated"].as_u64()),
        (Some(0), Some(0))
    );
}

/// The generator's soak (issue 13's): tiny sizes, a few seconds, nothing lost by the sockets
/// that stayed, every descriptor given back once the clients left.
#[tokio::test]
async fn the_load_generator_runs_a_soak() {
    let gw = Gateway::start().await;
    let report = run_generator(
        &gw,
        "--scenario soak --sockets 60 --channels 6 --rate 100 --churn 20 --duration 3",
    )
    .await;
    assert_eq!(report["stayers"], 54, "{report}");
    assert_eq!(
        (report["lost"].as_u64(), report["duplicated"].as_u64()),
        (Some(0), Some(0)),
        "{report}"
    );
    assert!(report["reconnects"].as_u64().unwrap() > 10, "{report}");
    assert_eq!(report["after"]["connections"], 0, "{report}");
}
