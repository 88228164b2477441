//! Draining: every socket gets 1001 after what was queued for it; readiness flips; SIGTERM to
//! the real binary does the same.

use std::process::Command;

use crate::support::{code, connect_at, issue_at, spawn_binary, wait_until, Gateway};

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
    let (mut child, http, grpc) = spawn_binary(&[]);

    let creds = issue_at(&grpc).await;
    let mut ws = connect_at(&http, &creds).await;

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

#[tokio::test]
async fn a_closed_log_pipe_does_not_crash_the_node() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .env("CHANNELGATE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start channelgate");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("control plane listening") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the node logs its addresses"
        );
    }
    // The log collector goes away; the node's next log lines hit a closed pipe.
    drop(stderr);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
