//! Server-Sent Events over real sockets: the same frames as a WebSocket, the same refusals, and
//! resume from `Last-Event-ID` on every channel at once, on one node and on another node of a
//! cluster (also after the first node was SIGKILLed), with ids that stay small on many
//! channels and a forged id that changes nothing but its own stream's replay.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use crate::{
    cluster::{node, unique_prefix},
    handle::join,
    support::{issue_at, open_sse, Creds, Gateway, Sse, PATIENCE},
};

/// Reads events until `want` pushes arrived; returns them by channel, as offsets and payloads
/// in arrival order. Position frames are checked to be in their channel's order too.
async fn pushes(sse: &mut Sse, want: usize) -> HashMap<String, Vec<(u64, Value)>> {
    let mut got: HashMap<String, Vec<(u64, Value)>> = HashMap::new();
    let mut n = 0;
    while n < want {
        let event = sse.next().await.expect("the stream goes on");
        let data = event.data;
        if let (Some(channel), Some(offset)) = (data["channel"].as_str(), data["offset"].as_u64()) {
            if data.get("payload").is_some() {
                assert!(event.id.is_some(), "a push moves the id: {data}");
                got.entry(channel.to_owned())
                    .or_default()
                    .push((offset, data["payload"].clone()));
                n += 1;
            }
        }
    }
    got
}

/// The offsets of `channel` in `got` are exactly `from..=to`, in order.
fn exactly(got: &HashMap<String, Vec<(u64, Value)>>, channel: &str, from: u64, to: u64) {
    let offsets: Vec<u64> = got
        .get(channel)
        .map(|v| v.iter().map(|(o, _)| *o).collect())
        .unwrap_or_default();
    assert_eq!(offsets, (from..=to).collect::<Vec<_>>(), "{channel}");
}

/// Reconnects with `last_id` as an EventSource does: while the node says "come back later" (it
/// has not seen the old stream's end yet, or the old node's heartbeat has not lapsed), it
/// comes back, until PATIENCE.
async fn reconnect(http: SocketAddr, creds: &Creds, last_id: &str) -> Sse {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match open_sse(http, creds, Some(last_id), &[]).await {
            Ok(sse) => return sse,
            Err((200, _)) if tokio::time::Instant::now() < deadline => {
                // EventSource's `retry`, shortened.
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(refused) => panic!("not resumed: {refused:?}"),
        }
    }
}

/// Pushes each of `rounds` (its number as the payload) to every one of `channels` through `gw`.
async fn push_rounds(gw: &Gateway, channels: &[&str], rounds: std::ops::RangeInclusive<u64>) {
    for round in rounds {
        for channel in channels {
            gw.push(channel, &round.to_string()).await;
        }
    }
}

async fn open(gw: SocketAddr, creds: &Creds, last_id: Option<&str>) -> Sse {
    open_sse(gw, creds, last_id, &[])
        .await
        .unwrap_or_else(|(status, body)| panic!("stream refused: {status} {body}"))
}

#[tokio::test]
async fn an_event_stream_carries_what_a_websocket_gets_and_is_refused_what_a_handshake_is() {
    let gw = Gateway::start().await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["news", "sport"]).await;
    let mut sse = open(gw.http, &creds, None).await;
    assert!(
        sse.head
            .to_ascii_lowercase()
            .contains("cache-control: no-cache"),
        "{}",
        sse.head
    );
    let connected = sse.next().await.unwrap();
    assert_eq!(
        connected.data["connected"]["resumed"], false,
        "{connected:?}"
    );
    assert!(
        connected.id.is_some(),
        "the first event names the stream's anchor"
    );
    gw.wait_for_connections(1).await;
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains(r#"channelgate_handshakes_total{result="accepted",transport="sse"} 1"#)
            && metrics.contains("channelgate_event_streams 1"),
        "{metrics}"
    );

    gw.push("news", r#"{"title":"a"}"#).await;
    let push = sse.next().await.unwrap();
    assert_eq!(
        push.data,
        json!({"channel":"news","offset":1,"payload":{"title":"a"}})
    );
    gw.client
        .send(&creds.digest, "direct", r#"{"to":"you"}"#)
        .await
        .unwrap();
    let send = sse.next().await.unwrap();
    assert_eq!(
        send.data,
        json!({"channel":"direct","payload":{"to":"you"}})
    );
    assert_eq!(send.id, None, "a Send moves no position");
    // A payload with line breaks arrives whole.
    gw.push("sport", "{\n\"score\": [1,\n2]\n}").await;
    let push = sse.next().await.unwrap();
    assert_eq!(push.data["payload"], json!({"score":[1,2]}));

    // Single use: a second stream, or a WebSocket, on the same id while the first is live. The
    // stream is told to come back later (EventSource fails for good on any status but 200).
    assert_eq!(
        open_sse(gw.http, &creds, None, &[]).await.err(),
        Some((200, "in_use".to_owned()))
    );
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
    // Refusals as for the handshake.
    let forged = Creds {
        key: "not-the-key".into(),
        ..creds.clone()
    };
    assert_eq!(
        open_sse(gw.http, &forged, None, &[])
            .await
            .err()
            .map(|e| e.0),
        Some(403)
    );
    let (status, _) = gw
        .http_get("/sse", &[("Cookie", &format!("socket_key={}", creds.key))])
        .await;
    assert_eq!(status, 400, "no connection id");
    let put = gw
        .raw_http(&format!(
            "PUT /sse?socket_connection_id={} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            creds.id
        ))
        .await;
    assert!(put.starts_with("HTTP/1.1 405"), "{put}");

    // The application's disconnect ends the stream with its reason, and the id for good.
    gw.client
        .disconnect(&creds.digest, 4001, "bye")
        .await
        .unwrap();
    let close = sse.next().await.unwrap();
    assert_eq!(
        (close.kind.as_str(), &close.data),
        ("close", &json!({"code":4001,"reason":"bye"}))
    );
    assert!(sse.next().await.is_none(), "the stream ends");
    assert_eq!(
        open_sse(gw.http, &creds, sse.last_id.as_deref(), &[])
            .await
            .err()
            .map(|e| e.0),
        Some(403)
    );
}

#[tokio::test]
async fn origins_off_the_allow_list_are_refused_and_allowed_ones_get_cors_headers() {
    let gw = Gateway::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let creds = gw.issue().await;
    let refused = open_sse(gw.http, &creds, None, &[("Origin", "https://evil.example")]).await;
    assert_eq!(refused.err().map(|e| e.0), Some(403));
    let sse = open_sse(gw.http, &creds, None, &[("Origin", "https://app.example")])
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let head = sse.head.to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
}

/// A stream on `channels` is cut after some pushes on each; more pushes go to every channel
/// while it is away; the reconnect with the last id it saw (on `resume_on`) gets exactly what
/// it missed on every channel, in order, then live pushes.
async fn cut_and_resume(
    publish: &Gateway,
    first: &Gateway,
    resume_on: &Gateway,
    channels: &[&str],
) {
    let creds = publish.issue().await;
    publish.subscribe(&creds, channels).await;
    let mut sse = open(first.http, &creds, None).await;
    sse.next().await.expect("connected");
    first.wait_for_connections(1).await;
    push_rounds(publish, channels, 1..=3).await;
    let before = pushes(&mut sse, 3 * channels.len()).await;
    for channel in channels {
        exactly(&before, channel, 1, 3);
    }
    let last_id = sse.last_id.clone().expect("pushes carry ids");
    drop(sse); // the cut: the node sees the stream's end, not a close
    push_rounds(publish, channels, 4..=6).await;
    let mut sse = reconnect(resume_on.http, &creds, &last_id).await;
    let connected = sse.next().await.unwrap();
    assert_eq!(
        connected.data["connected"]["resumed"], true,
        "{connected:?}"
    );
    for channel in channels {
        assert_eq!(
            connected.data["connected"]["channels"][channel]["recovered"], true,
            "{connected:?}"
        );
    }
    let missed = pushes(&mut sse, 3 * channels.len()).await;
    for channel in channels {
        exactly(&missed, channel, 4, 6);
    }
    publish.push(channels[0], "7").await;
    let live = pushes(&mut sse, 1).await;
    exactly(&live, channels[0], 7, 7);
}

#[tokio::test]
async fn a_cut_stream_resumes_every_channel_from_its_last_event_id() {
    let gw = Gateway::start().await;
    cut_and_resume(&gw, &gw, &gw, &["a", "b", "c"]).await;
}

#[tokio::test]
async fn ids_stay_small_on_a_hundred_channels_and_still_resume_them_all() {
    let gw = Gateway::start().await;
    let channels: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let creds = gw.issue().await;
    gw.subscribe(&creds, &names).await;
    let mut sse = open(gw.http, &creds, None).await;
    sse.next().await.expect("connected");
    gw.wait_for_connections(1).await;
    let mut longest = 0;
    for round in 1..=2 {
        for name in &names {
            gw.push(name, &round.to_string()).await;
            let event = sse.next().await.unwrap();
            assert_eq!(event.data["offset"], round, "{event:?}");
            longest = longest.max(event.id.expect("an id").len());
        }
    }
    assert!(longest <= 140, "ids stay small: {longest} bytes");
    let last_id = sse.last_id.clone().unwrap();
    drop(sse);
    for name in &names {
        gw.push(name, "3").await;
    }
    let mut sse = reconnect(gw.http, &creds, &last_id).await;
    sse.next().await.expect("connected");
    let missed = pushes(&mut sse, 100).await;
    for name in &names {
        exactly(&missed, name, 3, 3);
    }
}

#[tokio::test]
async fn a_forged_last_event_id_changes_nothing_but_its_own_stream() {
    let gw = Gateway::start().await;
    let (victim, forger) = (gw.issue().await, gw.issue().await);
    gw.subscribe(&victim, &["v"]).await;
    gw.subscribe(&forger, &["v"]).await;
    let mut watching = open(gw.http, &victim, None).await;
    watching.next().await.expect("connected");
    gw.push("v", "1").await;
    pushes(&mut watching, 1).await;
    let victims_id = watching.last_id.clone().unwrap();
    // The victim's id, and ids that name nothing: each opens the forger's own stream with
    // `recovered:false` on its channels and no replay; the victim's stream goes on untouched.
    for forged in [
        victims_id.as_str(),
        "999.0-5",
        "1.7-3",
        "garbage",
        "18446744073709551615.0-18446744073709551615",
    ] {
        let mut sse = open(gw.http, &forger, Some(forged)).await;
        let connected = sse.next().await.unwrap();
        // What the forger's stream saw cannot be told: every channel is a gap, never silence.
        assert_eq!(
            connected.data["connected"]["channels"]["v"]["recovered"], false,
            "{forged}: {connected:?}"
        );
        gw.push("v", "\"x\"").await;
        let got = pushes(&mut sse, 1).await;
        assert_eq!(
            got["v"][0].1,
            json!("x"),
            "only the live push, no replay: {got:?}"
        );
        pushes(&mut watching, 1).await;
        drop(sse);
        // The node sees the cut (the victim's stream stays) before the next attempt reuses
        // the id.
        gw.wait_for_connections(1).await;
    }
}

async fn a_stream_resumes_on_another_node_from_its_last_event_id() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("sse-resume");
    let a = node(redis, &prefix).await;
    let b = node(redis, &prefix).await;
    cut_and_resume(&a, &a, &b, &["x", "y", "z"]).await;
}

async fn a_stream_whose_node_was_killed_resumes_on_another_node() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("sse-sigkill");
    let (mut doomed, http, grpc) = crate::cluster::spawn_node(&prefix, &[]);
    let survivor = node(redis, &prefix).await;
    let creds = issue_at(&grpc).await;
    let channels = ["k1", "k2", "k3"];
    survivor.subscribe(&creds, &channels).await;
    let mut sse = open(http.parse().unwrap(), &creds, None).await;
    sse.next().await.expect("connected");
    push_rounds(&survivor, &channels, 1..=3).await;
    let before = pushes(&mut sse, 9).await;
    for channel in channels {
        exactly(&before, channel, 1, 3);
    }
    let last_id = sse.last_id.clone().unwrap();
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    push_rounds(&survivor, &channels, 4..=5).await;
    // The id is live on a dead node until its heartbeat lapses; then it resumes here.
    let mut sse = reconnect(survivor.http, &creds, &last_id).await;
    let connected = sse.next().await.unwrap();
    assert_eq!(
        connected.data["connected"]["resumed"], true,
        "{connected:?}"
    );
    let missed = pushes(&mut sse, 6).await;
    for channel in channels {
        exactly(&missed, channel, 4, 5);
    }
}

/// Behind a balancer that does not route by connection id, a POST reaches another node than
/// its stream's: it is answered there all the same (a `Handle` action included), and the
/// stream goes on; credentials with no live stream anywhere get 409.
async fn a_message_posted_to_another_node_than_its_stream_is_answered() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("sse-post-elsewhere");
    let a = node(redis, &prefix).await;
    let b = node(redis, &prefix).await;
    let mut svc = join(&b, "app", &["chat.say"], false).await;
    let creds = a.issue().await;
    a.subscribe(&creds, &["p"]).await;
    let (status, _, _) = post(
        &b,
        &creds,
        r#"{"action":"ping","id":1}"#,
        "application/json",
        &[],
    )
    .await;
    assert_eq!(status, 409, "no stream anywhere yet");
    let mut sse = open(a.http, &creds, None).await;
    sse.next().await.expect("connected");
    a.wait_for_connections(1).await;
    let (status, _, body) = post(
        &b,
        &creds,
        r#"{"action":"ping","id":1}"#,
        "application/json",
        &[],
    )
    .await;
    assert_eq!(
        (status, reply(&body)),
        (200, json!({"id":1,"status":200,"headers":{},"body":"pong"}))
    );
    let answer = {
        let (b, creds) = (&b, &creds);
        let asking = post(
            b,
            creds,
            r#"{"action":"chat.say","id":2}"#,
            "application/json",
            &[],
        );
        let serving = async {
            let m = svc.next().await;
            assert_eq!(m.connection_id, creds.id);
            svc.reply(m.delivery_id, 200, r#"{"ok":true}"#).await;
        };
        tokio::join!(asking, serving).0
    };
    assert_eq!(reply(&answer.2)["body"], json!({"ok":true}));
    b.push("p", "1").await;
    assert_eq!(
        pushes(&mut sse, 1).await["p"][0].1,
        json!(1),
        "the stream goes on"
    );
}

crate::on_both!(
    a_stream_resumes_on_another_node_from_its_last_event_id,
    a_stream_whose_node_was_killed_resumes_on_another_node,
    a_message_posted_to_another_node_than_its_stream_is_answered,
);

/// POSTs `body` as a client message of `creds` (with `content_type`, and `extra` headers);
/// returns the status, the head and the body.
async fn post(
    gw: &Gateway,
    creds: &Creds,
    body: &str,
    content_type: &str,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let mut request = format!(
        "POST /sse?socket_connection_id={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Socket-Key: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        creds.id,
        creds.key,
        body.len()
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let answer = gw.raw_http(&request).await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status, head.to_owned(), body.to_owned())
}

fn reply(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test]
async fn messages_posted_beside_a_stream_get_the_replies_a_websocket_gets() {
    let gw = Gateway::start().await;
    let mut svc = join(&gw, "app", &["chat.say"], false).await;
    let creds = gw.issue().await;
    // No stream yet: nowhere to count the message.
    let (status, _, _) = post(
        &gw,
        &creds,
        r#"{"action":"ping","id":1}"#,
        "application/json",
        &[],
    )
    .await;
    assert_eq!(status, 409);
    let mut sse = open(gw.http, &creds, None).await;
    sse.next().await.expect("connected");
    gw.wait_for_connections(1).await;

    let (status, _, body) = post(
        &gw,
        &creds,
        r#"{"action":"ping","id":1}"#,
        "application/json",
        &[],
    )
    .await;
    assert_eq!(
        (status, reply(&body)),
        (200, json!({"id":1,"status":200,"headers":{},"body":"pong"}))
    );
    let (status, _, body) = post(
        &gw,
        &creds,
        "{not json",
        "application/json; charset=utf-8",
        &[],
    )
    .await;
    assert_eq!((status, reply(&body)["status"].clone()), (200, json!(400)));
    // A content type a cross-site form could send without asking is refused.
    let (status, _, _) = post(
        &gw,
        &creds,
        r#"{"action":"ping","id":2}"#,
        "text/plain",
        &[],
    )
    .await;
    assert_eq!(status, 415);
    let forged = Creds {
        key: "x".into(),
        ..creds.clone()
    };
    let (status, _, _) = post(
        &gw,
        &forged,
        r#"{"action":"ping","id":2}"#,
        "application/json",
        &[],
    )
    .await;
    assert_eq!(status, 403);

    // A `Handle` action: the service sees the stream's identity and its reply comes back in
    // the response.
    let answer = {
        let (gw, creds) = (&gw, &creds);
        let asking = post(
            gw,
            creds,
            r#"{"action":"chat.say","id":"m1","text":"hi"}"#,
            "application/json",
            &[],
        );
        let serving = async {
            let m = svc.next().await;
            assert_eq!(
                (m.action.as_str(), m.connection_id.as_str()),
                ("chat.say", creds.id.as_str())
            );
            svc.reply(m.delivery_id, 201, r#"{"ok":true}"#).await;
        };
        tokio::join!(asking, serving).0
    };
    assert_eq!(
        (answer.0, reply(&answer.2)),
        (
            200,
            json!({"id":"m1","status":201,"headers":{"x-by":"service"},"body":{"ok":true}})
        )
    );
    // No reply went down the stream: its next event is this Send.
    gw.client.send(&creds.digest, "n", "2").await.unwrap();
    assert_eq!(sse.data().await, json!({"channel":"n","payload":2}));
}

#[tokio::test]
async fn posted_messages_count_against_the_streams_limits() {
    let gw = Gateway::start_with(|c| {
        c.limits.message_rate = 1;
        c.limits.message_burst = 2;
        c.limits.max_message_size = 256;
    })
    .await;
    let creds = gw.issue().await;
    let mut sse = open(gw.http, &creds, None).await;
    sse.next().await.expect("connected");
    gw.wait_for_connections(1).await;
    let ping = |id: u32| format!(r#"{{"action":"ping","id":{id}}}"#);
    for id in 1..=2 {
        let (_, _, body) = post(&gw, &creds, &ping(id), "application/json", &[]).await;
        assert_eq!(reply(&body)["status"], 200);
    }
    let (status, _, body) = post(&gw, &creds, &ping(3), "application/json", &[]).await;
    assert_eq!(
        (
            status,
            reply(&body)["status"].clone(),
            reply(&body)["id"].clone()
        ),
        (200, json!(429), json!(3))
    );
    // A burst's worth of refusals in a row closes the stream, as it closes a WebSocket.
    let (status, _, _) = post(&gw, &creds, &ping(4), "application/json", &[]).await;
    assert_eq!(status, 429);
    let close = sse.next().await.unwrap();
    assert_eq!(
        (close.kind.as_str(), close.data["code"].clone()),
        ("close", json!(1008))
    );

    // Over the size limit: 413, and the stream is closed with 1008.
    let creds = gw.issue().await;
    let mut sse = open(gw.http, &creds, None).await;
    sse.next().await.expect("connected");
    let big = format!(r#"{{"action":"ping","id":1,"pad":"{}"}}"#, "x".repeat(300));
    let (status, _, _) = post(&gw, &creds, &big, "application/json", &[]).await;
    assert_eq!(status, 413);
    let close = sse.next().await.unwrap();
    assert_eq!(close.data["code"], 1008, "{close:?}");
}

#[tokio::test]
async fn cross_site_posts_need_an_allowed_origin_and_a_preflight() {
    let gw = Gateway::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let creds = gw.issue().await;
    let mut sse = open_sse(gw.http, &creds, None, &[("Origin", "https://app.example")])
        .await
        .unwrap();
    sse.next().await.expect("connected");
    gw.wait_for_connections(1).await;
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /sse HTTP/1.1\r\nHost: x\r\nConnection: close\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n"
        )
    };
    let allowed = gw
        .raw_http(&preflight("https://app.example"))
        .await
        .to_ascii_lowercase();
    assert!(allowed.starts_with("http/1.1 204"), "{allowed}");
    assert!(
        allowed.contains("access-control-allow-origin: https://app.example"),
        "{allowed}"
    );
    assert!(
        allowed.contains("access-control-allow-headers: content-type"),
        "{allowed}"
    );
    assert!(
        allowed.contains("access-control-allow-credentials: true"),
        "{allowed}"
    );
    let refused = gw.raw_http(&preflight("https://evil.example")).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let ping = r#"{"action":"ping","id":1}"#;
    let (status, _, _) = post(
        &gw,
        &creds,
        ping,
        "application/json",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, head, body) = post(
        &gw,
        &creds,
        ping,
        "application/json",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!((status, reply(&body)["body"].clone()), (200, json!("pong")));
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
}

/// A TLS connection to `gw` offering only `h2`, trusting `ca_pem`, driven by hyper's HTTP/2
/// client (as a browser's one connection per origin).
async fn h2_client(
    gw: &Gateway,
    ca_pem: &[u8],
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN chose h2"
    );
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

fn h2_request(
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .header("x-socket-key", key)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap()
}

/// Reads `body` until its text holds `needle`.
async fn read_until(body: &mut hyper::body::Incoming, needle: &str) -> String {
    use http_body_util::BodyExt;
    let mut text = String::new();
    while !text.contains(needle) {
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("data in time")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    text
}

#[tokio::test]
async fn ten_event_streams_and_their_messages_share_one_http2_connection_over_tls() {
    let pki = crate::support::TestPki::in_dir("sse-h2");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let gw = Gateway::start_with(move |c| (c.tls_cert, c.tls_key) = (Some(cert), Some(key))).await;
    let mut send = h2_client(&gw, &pki.read("ca.pem")).await;
    let mut streams = Vec::new();
    for _ in 0..10 {
        let creds = gw.issue().await;
        gw.subscribe(&creds, &["h2"]).await;
        let path = format!("/sse?socket_connection_id={}", creds.id);
        let response = send
            .send_request(h2_request("GET", &path, &creds.key, ""))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let mut body = response.into_body();
        read_until(&mut body, "\"connected\"").await;
        streams.push((creds, body));
    }
    gw.wait_for_connections(10).await;
    gw.push("h2", r#"{"n":1}"#).await;
    for (_, body) in &mut streams {
        read_until(body, r#""payload":{"n":1}"#).await;
    }
    // A message of each stream, on the same connection.
    for (creds, _) in &streams {
        let path = format!("/sse?socket_connection_id={}", creds.id);
        let response = send
            .send_request(h2_request(
                "POST",
                &path,
                &creds.key,
                r#"{"action":"ping","id":9}"#,
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        read_until(&mut body, "pong").await;
    }
    // A WebSocket needs HTTP/1.1 (browsers open one beside the HTTP/2 connection).
    let (creds, _) = &streams[0];
    let response = send
        .send_request(h2_request(
            "GET",
            &format!("/ws?socket_connection_id={}", creds.id),
            &creds.key,
            "",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// An open stream is a socket, not a connection in its HTTP phase: it gives its share of
/// `max-pending-per-ip` back, as an upgrade does, so one address holds more streams than that.
#[tokio::test]
async fn open_streams_do_not_count_as_pending_connections() {
    let gw = Gateway::start_with(|c| c.limits.max_pending_per_ip = 4).await;
    let mut streams = Vec::new();
    for _ in 0..12 {
        let creds = gw.issue().await;
        let mut sse = open(gw.http, &creds, None).await;
        sse.next().await.expect("connected");
        streams.push(sse);
    }
    gw.wait_for_connections(12).await;
}

/// A drain ends every stream with `going away` (1001, so a client comes back, to another
/// node), and the node stops once they are gone.
#[tokio::test]
async fn a_drain_ends_streams_with_going_away() {
    let gw = Gateway::start().await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["d"]).await;
    let mut sse = open(gw.http, &creds, None).await;
    sse.next().await.expect("connected");
    gw.wait_for_connections(1).await;
    gw.begin_shutdown();
    let close = sse.next().await.expect("a close event");
    assert_eq!(
        (close.kind.as_str(), close.data["code"].clone()),
        ("close", json!(1001)),
        "{close:?}"
    );
    assert!(sse.next().await.is_none(), "the stream ends");
    gw.shutdown().await;
}
