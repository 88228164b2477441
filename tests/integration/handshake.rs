//! The upgrade: where the key may come from, and every refusal with its status.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{Creds, Gateway};

fn request(
    gw: &Gateway,
    query: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    format!("{}?{query}", gw.ws_url())
        .into_client_request()
        .unwrap()
}

#[tokio::test]
async fn key_from_query_cookie_or_header() {
    let gw = Gateway::start().await;
    for how in ["query", "cookie", "header"] {
        let c = gw.issue().await;
        gw.subscribe(&c, &["k"]).await;
        let mut req = request(&gw, &format!("socket_connection_id={}", c.id));
        match how {
            "query" => {
                req = request(
                    &gw,
                    &format!("socket_connection_id={}&socket_key={}", c.id, c.key),
                )
            }
            "cookie" => {
                req.headers_mut().insert(
                    "cookie",
                    format!("session=abc; socket_key={}", c.key)
                        .parse()
                        .unwrap(),
                );
            }
            _ => {
                req.headers_mut()
                    .insert("x-socket-key", c.key.parse().unwrap());
            }
        }
        let mut ws = gw
            .connect_request(req)
            .await
            .unwrap_or_else(|s| panic!("{how}: {s}"));
        assert_eq!(gw.push("k", &format!("\"{how}\"")).await, 1);
        assert_eq!(ws.recv_push().await.1, how, "{how}");
        ws.close().await;
    }
}

#[tokio::test]
async fn wrong_key_forged_and_foreign_ids_are_403() {
    let gw = Gateway::start().await;
    let a = gw.issue().await;
    let b = gw.issue().await;
    // Wrong key: b's key with a's id.
    let wrong = Creds {
        key: b.key.clone(),
        ..a.clone()
    };
    assert_eq!(gw.try_connect(&wrong).await.err(), Some(403));
    // Forged: one character of the id changed.
    let mut id = a.id.clone().into_bytes();
    id[10] = if id[10] == b'A' { b'B' } else { b'A' };
    let forged = Creds {
        id: String::from_utf8(id).unwrap(),
        ..a.clone()
    };
    assert_eq!(gw.try_connect(&forged).await.err(), Some(403));
    // Not an id at all.
    let junk = Creds {
        id: "hello".into(),
        ..a.clone()
    };
    assert_eq!(gw.try_connect(&junk).await.err(), Some(403));
    // Signed by another deployment.
    let other =
        Gateway::start_with(|c| c.secret = Some("another deployment's secret!!".into())).await;
    let foreign = other.issue().await;
    assert_eq!(gw.try_connect(&foreign).await.err(), Some(403));
    // The genuine credentials still work after all that.
    gw.connect(&a).await;
}

#[tokio::test]
async fn an_id_already_live_is_403() {
    let gw = Gateway::start().await;
    let c = gw.issue().await;
    let _ws = gw.connect(&c).await;
    assert_eq!(gw.try_connect(&c).await.err(), Some(403));
}

#[tokio::test]
async fn an_expired_id_is_403() {
    let gw = Gateway::start().await;
    let c = gw.issue_ttl(1).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let until_expired = std::time::Duration::from_millis(c.expires_at_ms + 1).saturating_sub(now);
    tokio::time::sleep(until_expired).await;
    assert_eq!(gw.try_connect(&c).await.err(), Some(403));
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let gw = Gateway::start().await;
    let c = gw.issue().await;
    assert_eq!(
        gw.connect_request(request(&gw, &format!("socket_key={}", c.key)))
            .await
            .err(),
        Some(400)
    );
    assert_eq!(
        gw.connect_request(request(&gw, &format!("socket_connection_id={}", c.id)))
            .await
            .err(),
        Some(400)
    );
    let (status, body) = gw
        .http_get(
            &format!("/ws?socket_connection_id={}&socket_key={}", c.id, c.key),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = gw
        .http_get(
            &format!("/ws?socket_connection_id={}&socket_key={}", c.id, c.key),
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "8"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
    assert_eq!(status, 400);
    // None of this used the credentials up.
    gw.connect(&c).await;
}

#[tokio::test]
async fn origin_outside_the_allow_list_is_403() {
    let gw = Gateway::start_with(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    let c = gw.issue().await;
    let with_origin = |origin: &str| {
        let mut req = request(
            &gw,
            &format!("socket_connection_id={}&socket_key={}", c.id, c.key),
        );
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    assert_eq!(
        gw.connect_request(with_origin("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        gw.connect_request(with_origin("https://app.example.evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert!(gw
        .connect_request(with_origin("https://app.example"))
        .await
        .is_ok());
}

#[tokio::test]
async fn a_full_node_answers_503() {
    let gw = Gateway::start_with(|c| c.limits.max_connections = 1).await;
    let (_, _ws) = gw.subscriber(&[]).await;
    let c = gw.issue().await;
    assert_eq!(gw.try_connect(&c).await.err(), Some(503));
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = Gateway::start().await;
    assert_eq!(gw.http_get("/healthz", &[]).await, (200, "ok\n".into()));
    assert_eq!(gw.http_get("/readyz", &[]).await, (200, "ready\n".into()));
    assert_eq!(gw.http_get("/nope", &[]).await.0, 404);
}

/// The value of `name` (with its labels, e.g. `x_total{result="accepted"}`) in a scrape.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_follow_traffic() {
    let gw = Gateway::start().await;
    let (status, before) = gw.http_get("/metrics", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&before, "channelgate_connections"), 0.0);
    let (creds, mut ws) = gw.subscriber(&["m"]).await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
    gw.push("m", "1").await;
    ws.recv_push().await;
    ws.request(serde_json::json!({"action":"ping","id":1}))
        .await;
    let (_, after) = gw.http_get("/metrics", &[]).await;
    assert_eq!(metric(&after, "channelgate_connections"), 1.0);
    assert_eq!(
        metric(
            &after,
            "channelgate_handshakes_total{result=\"accepted\",transport=\"websocket\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "channelgate_handshakes_total{result=\"in_use\",transport=\"websocket\"}"
        ),
        1.0
    );
    assert_eq!(metric(&after, "channelgate_pushes_total"), 1.0);
    assert_eq!(metric(&after, "channelgate_deliveries_total"), 1.0);
    // The push frame and the pong reply.
    let push = r#"{"channel":"m","offset":1,"payload":1}"#.len() as f64;
    let pong = r#"{"id":1,"status":200,"headers":{},"body":"pong"}"#.len() as f64;
    assert_eq!(metric(&after, "channelgate_bytes_out_total"), push + pong);
    assert_eq!(metric(&after, "channelgate_messages_in_total"), 1.0);
    assert_eq!(
        metric(&after, "channelgate_replies_total{status=\"200\"}"),
        1.0
    );
    assert_eq!(metric(&after, "channelgate_bus_ready"), 1.0);
    ws.close().await;
    gw.wait_for_connections(0).await;
    let (_, closed) = gw.http_get("/metrics", &[]).await;
    assert_eq!(
        metric(&closed, "channelgate_closes_total{code=\"peer\"}"),
        1.0
    );
}

#[tokio::test]
async fn an_address_over_its_connection_limit_gets_429() {
    let gw = Gateway::start_with(|c| c.limits.max_connections_per_ip = 2).await;
    let (_, _a) = gw.subscriber(&[]).await;
    let (_, b) = gw.subscriber(&[]).await;
    let third = gw.issue().await;
    assert_eq!(gw.try_connect(&third).await.err(), Some(429));
    // A slot frees when a socket ends; the refused credentials were not used up.
    b.close().await;
    gw.wait_for_connections(1).await;
    crate::support::wait_until(|| async { gw.try_connect(&third).await.is_ok() }).await;
}

#[tokio::test]
async fn an_address_over_its_handshake_rate_gets_429() {
    let gw = Gateway::start_with(|c| c.limits.handshake_rate_per_ip = 1).await;
    // A burst of two, then one per second.
    let (_, _a) = gw.subscriber(&[]).await;
    let (_, _b) = gw.subscriber(&[]).await;
    let third = gw.issue().await;
    assert_eq!(gw.try_connect(&third).await.err(), Some(429));
    let (_, scrape) = gw.http_get("/metrics", &[]).await;
    assert_eq!(
        metric(
            &scrape,
            "channelgate_handshakes_total{result=\"handshake_rate\",transport=\"websocket\"}"
        ),
        1.0
    );
}

/// RFC 6455 needs HTTP/1.1: an upgrade over HTTP/1.0 gets 400 (counted as not an upgrade), not a
/// `101` followed by a dead socket.
#[tokio::test]
async fn an_upgrade_over_http_1_0_is_refused_with_400() {
    let gw = Gateway::start().await;
    let creds = gw.issue().await;
    let request = format!(
        "GET /ws?socket_connection_id={}&socket_key={} HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        creds.id, creds.key
    );
    let answer = gw.raw_http(&request).await;
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains(
            r#"channelgate_handshakes_total{result="not_upgrade",transport="websocket"} 1"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"result="accepted""#), "{metrics}");
    // The credentials were not spent: the same id connects over HTTP/1.1.
    gw.connect(&creds).await;
}

/// A connection from `source` that sends the start of an upgrade request and then nothing.
async fn stall(gw: &Gateway, source: [u8; 4]) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut stream = socket.connect(gw.http).await.ok()?;
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Stall: ")
        .await
        .ok()?;
    Some(stream)
}

/// Stalled handshakes from one address take only that address's pending slots: a client on
/// another address connects at once, and probes are answered, while the stalls go on.
#[tokio::test]
async fn stalled_handshakes_from_one_address_do_not_lock_others_out() {
    let gw = Gateway::start_with(|c| {
        c.limits.max_pending_handshakes = 200;
        c.limits.max_pending_per_ip = 16;
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..300 {
        stalled.extend(stall(&gw, [127, 0, 0, 2]).await);
    }
    let started = std::time::Instant::now();
    let (status, _) = gw.http_get("/healthz", &[]).await;
    assert_eq!(status, 200);
    let (creds, mut ws) = gw.subscriber(&["room"]).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "a client elsewhere waited {:?}",
        started.elapsed()
    );
    gw.push("room", "1").await;
    assert_eq!(ws.recv_push().await.1, 1);
    let _ = creds;
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains(r#"channelgate_refused_connections_total{reason="pending_per_ip"}"#),
        "{metrics}"
    );
    drop(stalled);
}

/// Stalls from many addresses can take every handshake permit; probes are still answered
/// (and upgrades get a quick 503) on the spare lane.
#[tokio::test]
async fn probes_are_answered_while_every_handshake_permit_is_taken() {
    let gw = Gateway::start_with(|c| {
        c.limits.max_pending_handshakes = 64;
        c.limits.max_pending_per_ip = 16;
    })
    .await;
    let mut stalled = Vec::new();
    for source in 2..=6u8 {
        for _ in 0..16 {
            stalled.extend(stall(&gw, [127, 0, 0, source]).await);
        }
    }
    assert_eq!(stalled.len(), 80);
    // Every permit is held once the node admitted the stalls (this probe is on the spare lane).
    crate::support::wait_until(|| async {
        let (_, metrics) = gw.http_get("/metrics", &[]).await;
        metrics.contains("channelgate_pending_handshakes 64")
    })
    .await;
    let started = std::time::Instant::now();
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(gw.http_get(path, &[]).await.0, 200, "{path}");
    }
    let creds = gw.issue().await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(503));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
    // The stalls are gone: upgrades work again.
    crate::support::wait_until(|| async { gw.try_connect(&creds).await.is_ok() }).await;
}
