//! Draining: every socket gets 1001 after what was queued for it; readiness flips; SIGTERM to
//! the real binary does the same.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use crate::support::{code, wait_until, Creds, Gateway, PATIENCE};
use channelgate::pb::{self, control_client::ControlClient};

#[tokio::test]
async fn draining_closes_every_socket_with_1001() {
    let gw = Gateway::start().await;
    let (_, mut a) = gw.subscriber(&["x"]).await;
    let (_, mut b) = gw.subscriber(&["x"]).await;
    gw.push("x", "\"last\"").await;
    gw.begin_shutdown();
    for ws in [&mut a, &mut b] {
        assert_eq!(ws.recv_push().await.1, "last");
        assert_eq!(code(&ws.expect_close().await), 1001);
    }
    // The clients answered the close, so the drain ends well within its grace.
    let started = std::time::Instant::now();
    gw.shutdown().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_drains_the_binary_with_1001() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("CHANNELGATE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start channelgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut http, mut grpc) = (None, None);
    while http.is_none() || grpc.is_none() {
        let line = rx
            .recv_timeout(PATIENCE)
            .expect("the node logs its addresses");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let message = v["fields"]["message"].as_str().unwrap_or("");
        let addr = v["fields"]["addr"].as_str().map(str::to_owned);
        if message.starts_with("client plane listening") {
            http = addr;
        } else if message.starts_with("control plane listening") {
            grpc = addr;
        }
    }
    let (http, grpc) = (http.unwrap(), grpc.unwrap());

    let mut control = ControlClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let r = control
        .issue_connection(pb::IssueConnectionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let creds = Creds {
        id: r.connection_id,
        key: r.socket_key,
        digest: r.digest,
        expires_at_ms: 0,
    };
    let url = format!(
        "ws://{http}/ws?socket_connection_id={}&socket_key={}",
        creds.id, creds.key
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake");
    let mut ws = crate::support::Ws { ws };

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(code(&ws.expect_close().await), 1001);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn readiness_flips_while_draining() {
    let gw =
        Gateway::start_with(|c| c.limits.shutdown_grace = std::time::Duration::from_secs(5)).await;
    // A socket that never reads its close keeps the drain going while we look.
    let (_, _ws) = gw.subscriber(&[]).await;
    let unused = gw.issue().await;
    assert_eq!(gw.http_get("/readyz", &[]).await.0, 200);
    gw.begin_shutdown();
    wait_until(|| async { gw.http_get("/readyz", &[]).await.0 == 503 }).await;
    // Still alive, and refusing new sockets while it drains.
    assert_eq!(gw.http_get("/healthz", &[]).await.0, 200);
    assert_eq!(gw.try_connect(&unused).await.err(), Some(503));
}
