//! Fewer bytes to every client: permessage-deflate (RFC 7692), compressed once per frame for every
//! socket that negotiated it; client messages inflated within `--max-message-size` (a deflate
//! bomb closes its socket and nothing else); Fossil deltas per channel for sockets that ask.

use std::time::Duration;

use channelgate::{
    config::{NamespacePolicy, Namespaces},
    edge::fossil,
};
use serde_json::{json, Value};

use crate::support::*;

/// The node's answer to an offer it accepts.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A state document of about `players` x 110 bytes; `tick` moves a few fields.
fn state(players: usize, tick: u64) -> String {
    let list: Vec<String> = (0..players as u64)
        .map(|i| {
            let moved = if i % 13 == tick % 13 { tick } else { 0 };
            format!(
                r#"{{"id":{i},"name":"player-{i}","team":"{}","x":{},"y":{},"hp":100,"ready":true}}"#,
                if i % 2 == 0 { "red" } else { "blue" },
                i * 7 + moved,
                i * 3
            )
        })
        .collect();
    format!(
        r#"{{"match":"final","clock":"12:{:02}","score":[{},{}],"players":[{}]}}"#,
        tick % 60,
        tick / 3,
        tick / 5,
        list.join(",")
    )
}

pub(crate) fn delta_namespace(namespace: &str) -> Namespaces {
    let policy = NamespacePolicy {
        delta: true,
        ..Default::default()
    };
    Namespaces([(namespace.to_owned(), policy)].into())
}

#[tokio::test]
async fn deflate_is_negotiated_and_a_push_is_compressed_once_for_every_socket() {
    let gw = Gateway::start().await;
    let http = gw.http.to_string();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let creds = gw.issue().await;
        gw.subscribe(&creds, &["room:1"]).await;
        let ws = RawWs::open(&http, &creds, "", Some(BROWSER_OFFER)).await;
        assert_eq!(ws.extensions().as_deref(), Some(ANSWER));
        sockets.push(ws);
    }
    // A client that offers nothing gets the same frames, uncompressed.
    let (_, mut plain) = gw.subscriber(&["room:1"]).await;
    gw.wait_for_connections(21).await;

    let payload = state(40, 1);
    assert_eq!(gw.push("room:1", &payload).await, 21);
    let expected = format!(r#"{{"channel":"room:1","offset":1,"payload":{payload}}}"#);
    let mut packed = Vec::new();
    for ws in &mut sockets {
        let frame = ws.text_frame().await;
        assert!(frame.rsv1, "a compressed frame (RSV1)");
        assert!(
            frame.payload.len() < expected.len() / 4,
            "{} B",
            frame.payload.len()
        );
        assert_eq!(frame.text(), expected);
        packed.push(frame.payload);
    }
    assert!(
        packed.windows(2).all(|w| w[0] == w[1]),
        "the same bytes for every socket"
    );
    assert_eq!(
        gw.metric("channelgate_compressions_total").await,
        1,
        "compressed once"
    );
    assert_eq!(
        plain.recv_json().await,
        serde_json::from_str::<Value>(&expected).unwrap()
    );

    // Below the threshold (128 B), frames go as they are.
    gw.push("room:1", r#"{"short":true}"#).await;
    for ws in &mut sockets {
        let frame = ws.text_frame().await;
        assert!(!frame.rsv1);
        assert_eq!(
            frame.text(),
            r#"{"channel":"room:1","offset":2,"payload":{"short":true}}"#
        );
    }

    // What the client compresses is inflated: one frame, and a message in three fragments.
    let ws = &mut sockets[0];
    ws.send(0xC1, &deflate(br#"{"action":"ping","id":7}"#, 6))
        .await;
    assert_eq!(ws.json().await["id"], 7);
    let message = deflate(
        br#"{"action":"ping","id":8,"pad":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#,
        6,
    );
    let (a, rest) = message.split_at(5);
    let (b, c) = rest.split_at(5);
    ws.send(0x41, a).await;
    ws.send(0x80 | 0x09, b"mid-message ping").await;
    ws.send(0x00, b).await;
    ws.send(0x80, c).await;
    let pong = ws.frame().await.unwrap();
    assert_eq!(
        (pong.opcode, &pong.payload[..]),
        (0xA, &b"mid-message ping"[..])
    );
    assert_eq!(ws.json().await["id"], 8);
}

#[tokio::test]
async fn offers_the_node_cannot_honour_and_compression_off_run_uncompressed() {
    let gw = Gateway::start().await;
    let http = gw.http.to_string();
    let creds = gw.issue().await;
    // A server window below 15 bits cannot share the node's bytes: declined.
    let mut ws = RawWs::open(
        &http,
        &creds,
        "",
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(ws.extensions(), None);
    // Without deflate, a compressed frame is a protocol error (1002).
    ws.send(0xC1, &deflate(br#"{"action":"ping","id":1}"#, 6))
        .await;
    assert_eq!(ws.close_frame().await.close_code(), 1002);

    let off = Gateway::start_with(|c| c.limits.compression = false).await;
    let creds = off.issue().await;
    off.subscribe(&creds, &["room:1"]).await;
    let mut ws = RawWs::open(&off.http.to_string(), &creds, "", Some(BROWSER_OFFER)).await;
    assert_eq!(ws.extensions(), None);
    off.wait_for_connections(1).await;
    off.push("room:1", &state(40, 1)).await;
    assert!(!ws.text_frame().await.rsv1);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_deflate_bomb_closes_its_socket_and_nothing_else() {
    let (mut node, http, grpc) = spawn_binary(&["--max-message-size", "64KiB"]);
    let client = channelgate::client::Client::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let bystander: Creds = client.issue(None, &["room:1"]).await.unwrap().into();
    let mut bystander = RawWs::open(&http, &bystander, "", Some(BROWSER_OFFER)).await;
    let before = rss_kib(node.id());

    // 60 KiB on the wire that inflate to about 60 MiB: the inflater stops at 64 KiB.
    let bomb = {
        let mut c = flate2::Compress::new(flate2::Compression::best(), false);
        let zeros = vec![0u8; 1 << 20];
        let mut out = Vec::with_capacity(64 << 10);
        while out.len() < 60 << 10 {
            c.compress_vec(&zeros, &mut out, flate2::FlushCompress::None)
                .unwrap();
            out.reserve(4096);
        }
        c.compress_vec(&[], &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        out
    };
    assert!(bomb.len() <= 64 << 10, "{} B", bomb.len());
    for _ in 0..5 {
        let attacker: Creds = client.issue(None, &["room:1"]).await.unwrap().into();
        let mut attacker = RawWs::open(&http, &attacker, "", Some(BROWSER_OFFER)).await;
        attacker.send(0xC1, &bomb).await;
        let code = attacker.close_frame().await.close_code();
        assert!(code == 1008 || code == 1009, "closed with {code}");
    }
    // One that would inflate to 1 GiB needs about 1 MiB compressed: refused at its header.
    let attacker: Creds = client.issue(None, &["room:2"]).await.unwrap().into();
    let mut attacker = RawWs::open(&http, &attacker, "", Some(BROWSER_OFFER)).await;
    let mut head = encode(0xC1, &vec![0u8; 1 << 20]);
    head.truncate(14 + 4096);
    attacker.send_raw(&head).await;
    let code = attacker.close_frame().await.close_code();
    assert!(code == 1008 || code == 1009, "closed with {code}");

    let after = rss_kib(node.id());
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The bystander never noticed.
    client
        .push(&["room:1"], r#"{"still":"here"}"#)
        .await
        .unwrap();
    assert_eq!(bystander.json().await["payload"]["still"], "here");
    let _ = node.kill();
    let _ = node.wait();
}

/// Applies the delta frames a socket gets to the payloads it had: `(offset, whole?, payload)`.
struct Rebuilt {
    base: Option<(u64, String)>,
}

impl Rebuilt {
    fn take(&mut self, frame: &Value) -> (u64, bool, String) {
        let offset = frame["offset"].as_u64().expect("a push");
        let (whole, text) = match frame.get("delta") {
            Some(delta) => {
                let (at, base) = self.base.as_ref().expect("a base before a delta");
                assert_eq!(*at + 1, offset, "a delta against the previous push");
                let bytes =
                    fossil::apply(base.as_bytes(), delta.as_str().unwrap().as_bytes(), 1 << 20)
                        .expect("the delta applies and its checksum holds");
                (false, String::from_utf8(bytes).unwrap())
            }
            None => (true, frame["payload"].to_string()),
        };
        self.base = Some((offset, text.clone()));
        (offset, whole, text)
    }
}

/// The raw frame's payload text, exactly as pushed.
fn raw_payload(frame_text: &str) -> String {
    let at = frame_text.find(r#","payload":"#).unwrap() + 11;
    frame_text[at..frame_text.len() - 1].to_owned()
}

#[tokio::test]
async fn deltas_reach_the_sockets_that_ask_and_rebuild_every_payload_byte_for_byte() {
    let gw = Gateway::start_with(|c| c.limits.namespaces = delta_namespace("state")).await;
    let http = gw.http.to_string();
    let (asks, plain) = (gw.issue().await, gw.issue().await);
    for creds in [&asks, &plain] {
        gw.subscribe(creds, &["state:match", "room:1"]).await;
    }
    let mut asks = RawWs::open(&http, &asks, "&delta=1", Some(BROWSER_OFFER)).await;
    let mut plain = RawWs::open(&http, &plain, "", None).await;
    gw.wait_for_connections(2).await;

    let mut rebuilt = Rebuilt { base: None };
    for tick in 1..=6 {
        let payload = state(60, tick);
        gw.push("state:match", &payload).await;
        let frame = asks.text_frame().await;
        let value: Value = serde_json::from_str(&frame.text()).unwrap();
        let (offset, whole, text) = rebuilt.take(&value);
        assert_eq!(
            (offset, whole),
            (tick, tick == 1),
            "whole first, then deltas"
        );
        assert_eq!(text, payload, "byte for byte");
        if !whole {
            assert!(frame.rsv1, "a delta is compressed too");
            let wire = frame.payload.len();
            // About ten fields of 300 changed: the issue's goal is 10% of the plain bytes.
            assert!(
                wire * 10 < payload.len(),
                "{wire} B on the wire for {} B",
                payload.len()
            );
        }
        // A socket that did not ask gets the push whole.
        let whole_frame = plain.text_frame().await.text();
        assert_eq!(raw_payload(&whole_frame), payload);
    }
    // Outside a delta namespace, pushes go whole even to a socket that asked.
    gw.push("room:1", &state(60, 1)).await;
    gw.push("room:1", &state(60, 2)).await;
    for _ in 0..2 {
        let text = asks.text_frame().await.text();
        assert!(text.contains(r#""payload":"#), "{text}");
    }
    assert_eq!(gw.metric("channelgate_delta_frames_total").await, 5);
    // History is the payloads themselves, never deltas.
    let history = gw
        .client
        .history("state:match", None, 10, false)
        .await
        .unwrap();
    let kept: Vec<String> = history.publications.into_iter().map(|p| p.json).collect();
    assert_eq!(
        kept,
        (1..=6).map(|tick| state(60, tick)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_recovery_replays_the_first_missed_push_whole_then_deltas() {
    let gw = Gateway::start_with(|c| c.limits.namespaces = delta_namespace("state")).await;
    let http = gw.http.to_string();
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["state:match"]).await;
    let mut ws = RawWs::open(&http, &creds, "&delta=1&recover=%7B%7D", None).await;
    let connected = ws.json().await;
    let epoch = connected["connected"]["channels"]["state:match"]["epoch"].clone();
    let mut rebuilt = Rebuilt { base: None };
    for tick in 1..=3 {
        gw.push("state:match", &state(60, tick)).await;
        let (offset, whole, _) = rebuilt.take(&ws.json().await);
        assert_eq!((offset, whole), (tick, tick == 1));
    }
    drop(ws); // the connection drops without a close frame
    gw.wait_for_connections(0).await;
    for tick in 4..=7 {
        gw.push("state:match", &state(60, tick)).await;
    }
    let recover = json!({"state:match": {"epoch": epoch, "offset": 3}}).to_string();
    let query = format!(
        "&delta=1&recover={}",
        form_urlencoded::byte_serialize(recover.as_bytes()).collect::<String>()
    );
    let mut ws = RawWs::open(&http, &creds, &query, None).await;
    let connected = ws.json().await;
    assert_eq!(
        connected["connected"]["channels"]["state:match"]["recovered"],
        true
    );
    // The client keeps its base across the drop, but the new socket starts whole.
    for tick in 4..=8 {
        if tick == 8 {
            gw.push("state:match", &state(60, tick)).await;
        }
        let (offset, whole, text) = rebuilt.take(&ws.json().await);
        assert_eq!(
            (offset, whole),
            (tick, tick == 4),
            "whole first, then deltas"
        );
        assert_eq!(text, state(60, tick));
    }
}

#[tokio::test]
async fn event_streams_that_ask_get_deltas_too() {
    let gw = Gateway::start_with(|c| c.limits.namespaces = delta_namespace("state")).await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["state:match"]).await;
    let mut sse = open_sse_at(
        gw.http,
        &format!("/sse?socket_connection_id={}&delta=1", creds.id),
        &creds.key,
        None,
        &[],
    )
    .await
    .unwrap();
    gw.wait_for_connections(1).await;
    let mut rebuilt = Rebuilt { base: None };
    assert!(
        sse.data().await.get("connected").is_some(),
        "a stream starts with its positions"
    );
    for tick in 1..=3 {
        gw.push("state:match", &state(60, tick)).await;
        let (offset, whole, text) = rebuilt.take(&sse.data().await);
        assert_eq!((offset, whole), (tick, tick == 1));
        assert_eq!(text, state(60, tick));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sse.next())
            .await
            .is_err(),
        "nothing else"
    );
}

/// The load generator's `bandwidth` scenario in small: every mode rebuilds every payload, and
/// deltas with deflate carry the state document in a tenth of its bytes.
#[tokio::test]
async fn the_bandwidth_scenario_runs_and_rebuilds_every_payload() {
    let gw = Gateway::start_with(|c| c.limits.namespaces = delta_namespace("delta")).await;
    let report =
        crate::fanout::run_generator(&gw, "--scenario bandwidth --sockets 4 --pushes 12").await;
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{report}");
    assert!(rows.iter().all(|r| r["verified"] == true), "{report}");
    let state = |mode: &str| {
        rows.iter()
            .find(|r| r["doc"] == "state" && r["mode"] == mode)
            .unwrap()["percent_of_plain"]
            .as_f64()
            .unwrap()
    };
    assert!(state("deflate") < 50.0, "{report}");
    assert!(state("delta+deflate") < 10.0, "{report}");
}
