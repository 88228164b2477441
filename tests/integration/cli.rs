//! The CLI, run as a process against a live gateway: every control subcommand, its output and
//! its exit codes.

use std::process::Stdio;

use serde_json::{json, Value};
use tokio::{io::AsyncBufReadExt, process::Command};

use crate::support::{Creds, Gateway, PATIENCE};

/// Runs `channelgate ARGS --server <gw>`; returns the exit code and standard output.
async fn cg(gw: &Gateway, args: &[&str], stdin: Option<&str>) -> (i32, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(args)
        .args(["--server", &format!("http://{}", gw.grpc)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json_line(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[tokio::test]
async fn every_control_subcommand_works_as_a_process() {
    let gw = Gateway::start().await;
    // issue (JSON), and issue --env with --channel.
    let (code, out) = cg(&gw, &["issue"], None).await;
    assert_eq!(code, 0);
    let issued = json_line(&out);
    assert_eq!(issued["digest"].as_str().unwrap().len(), 64);
    let (code, out) = cg(&gw, &["issue", "--env", "--channel", "pre"], None).await;
    assert_eq!(code, 0);
    let var = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap()
            .to_owned()
    };
    let creds = Creds {
        id: var("CONNECTION_ID"),
        key: var("SOCKET_KEY"),
        digest: var("DIGEST"),
        expires_at_ms: 0,
    };
    let mut ws = gw.connect(&creds).await;
    gw.push("pre", "0").await;
    assert_eq!(ws.recv_push().await.1, 0);

    // subscribe, push (argument and standard input), unsubscribe.
    let (code, out) = cg(&gw, &["subscribe", &creds.digest, "news"], None).await;
    assert_eq!((code, json_line(&out)), (0, json!({"live": true})));
    let (code, out) = cg(&gw, &["push", "news", r#"{"a":1}"#], None).await;
    let pushed = json_line(&out);
    assert_eq!((code, &pushed["queued"]), (0, &json!(1)), "{pushed}");
    assert_eq!(pushed["positions"]["news"]["offset"], 1, "{pushed}");
    let epoch = pushed["positions"]["news"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ws.recv_push().await, ("news".into(), json!({"a":1})));
    // A retry with the same key is taken once.
    for _ in 0..2 {
        let (code, out) = cg(&gw, &["push", "news", "2", "--key", "k1"], None).await;
        assert_eq!(
            (code, &json_line(&out)["positions"]["news"]["offset"]),
            (0, &json!(2))
        );
    }
    assert_eq!(ws.recv_push().await.1, json!(2));
    let (code, out) = cg(
        &gw,
        &["history", "news", "--since", &format!("{epoch}:1")],
        None,
    )
    .await;
    assert_eq!(
        (code, json_line(&out)),
        (
            0,
            json!({"epoch": epoch, "offset": 2, "pushes": [{"offset": 2, "json": "2"}]})
        )
    );
    let (code, _) = cg(&gw, &["push", "news"], Some(r#"{"from":"stdin"}"#)).await;
    assert_eq!(code, 0);
    assert_eq!(ws.recv_push().await.1, json!({"from":"stdin"}));
    let (code, _) = cg(&gw, &["unsubscribe", &creds.digest, "news"], None).await;
    assert_eq!(code, 0);
    let (_, out) = cg(&gw, &["push", "news", "1"], None).await;
    assert_eq!(json_line(&out)["queued"], 0);

    // send, stats, disconnect.
    let (code, out) = cg(&gw, &["send", &creds.digest, "direct", "\"hi\""], None).await;
    assert_eq!((code, json_line(&out)), (0, json!({"queued": true})));
    assert_eq!(ws.recv_push().await, ("direct".into(), json!("hi")));
    let (code, out) = cg(&gw, &["stats", "--per-channel"], None).await;
    assert_eq!(code, 0);
    let stats = json_line(&out);
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["channel_subscribers"]["pre"], 1);
    let (code, out) = cg(
        &gw,
        &[
            "disconnect",
            &creds.digest,
            "--code",
            "4005",
            "--reason",
            "cli",
        ],
        None,
    )
    .await;
    assert_eq!((code, json_line(&out)), (0, json!({"closed": true})));
    assert_eq!(crate::support::code(&ws.expect_close().await), 4005);
}

#[tokio::test]
async fn refused_requests_exit_2_and_unreachable_servers_exit_1() {
    let gw = Gateway::start().await;
    let (code, _) = cg(&gw, &["push", "bad name", "1"], None).await;
    assert_eq!(code, 2);
    let (code, _) = cg(&gw, &["push", "ok", "{not json"], None).await;
    assert_eq!(code, 2);
    let (code, _) = cg(&gw, &["subscribe", &"0".repeat(64), "x"], None).await;
    assert_eq!(code, 2);
    let out = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(["stats", "--server", "http://127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn listen_prints_each_push_as_a_json_line() {
    let gw = Gateway::start().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args([
            "listen",
            "alerts",
            "--server",
            &format!("http://{}", gw.grpc),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The listener registers asynchronously: push until a line arrives.
    let line = tokio::time::timeout(PATIENCE, async {
        loop {
            gw.push("alerts", r#"{"level":"high"}"#).await;
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(std::time::Duration::from_millis(100), lines.next_line()).await
            {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let event = json_line(&line);
    assert_eq!(
        (&event["channel"], &event["json"]),
        (&json!("alerts"), &json!(r#"{"level":"high"}"#)),
        "{event}"
    );
    assert!(
        event["offset"].as_u64().unwrap() >= 1 && event["epoch"].is_string(),
        "{event}"
    );
}

/// The WebSocket path a node reports at start, given a config file, an environment variable
/// and a flag (each optional).
fn ws_path_chosen(file: Option<&str>, env: Option<&str>, flag: Option<&str>) -> String {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!(
        "channelgate-cfg-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("channelgate.toml");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_channelgate"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .env_remove("CHANNELGATE_WS_PATH")
        .env("CHANNELGATE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    if let Some(value) = file {
        std::fs::write(&path, format!("ws-path = \"{value}\"\n")).unwrap();
        command.args(["--config", path.to_str().unwrap()]);
    }
    if let Some(value) = env {
        command.env("CHANNELGATE_WS_PATH", value);
    }
    if let Some(value) = flag {
        command.args(["--ws-path", value]);
    }
    let mut child = command.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let line = stderr
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("client plane listening"))
        .expect("the node logs its WebSocket path");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let start = line.find("WebSocket at ").unwrap() + "WebSocket at ".len();
    line[start..].split(',').next().unwrap().to_owned()
}

#[test]
fn settings_come_from_flag_then_environment_then_file() {
    assert_eq!(ws_path_chosen(Some("/file"), None, None), "/file");
    assert_eq!(ws_path_chosen(Some("/file"), Some("/env"), None), "/env");
    assert_eq!(
        ws_path_chosen(Some("/file"), Some("/env"), Some("/flag")),
        "/flag"
    );
    assert_eq!(ws_path_chosen(None, None, None), "/ws");
}

#[test]
fn an_unknown_config_key_is_an_error_that_names_it() {
    let dir = std::env::temp_dir().join(format!("channelgate-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "listne = \"127.0.0.1:1\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listne"), "{stderr}");
}

#[tokio::test]
async fn users_and_presence_from_the_cli() {
    let gw =
        Gateway::start_with(|c| c.limits.namespaces = crate::support::keep_presence("chat")).await;
    let (code, out) = cg(
        &gw,
        &[
            "issue",
            "--user",
            "u",
            "--info",
            r#"{"n":1}"#,
            "--channel",
            "chat:room",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0);
    let issued = json_line(&out);
    let creds = Creds {
        id: issued["connection_id"].as_str().unwrap().into(),
        key: issued["socket_key"].as_str().unwrap().into(),
        digest: issued["digest"].as_str().unwrap().into(),
        expires_at_ms: 0,
    };
    let mut ws = gw.connect(&creds).await;
    let (code, out) = cg(&gw, &["presence", "chat:room", "--stats"], None).await;
    assert_eq!(
        (code, json_line(&out)),
        (0, json!({"connections": 1, "users": 1}))
    );
    let (code, out) = cg(&gw, &["presence", "chat:room"], None).await;
    assert_eq!(code, 0);
    let members = json_line(&out)["members"].clone();
    assert_eq!(members[0]["connection_id"], creds.id.as_str());
    assert_eq!(
        (members[0]["user"].clone(), members[0]["info_json"].clone()),
        (json!("u"), json!(r#"{"n":1}"#))
    );
    let (code, out) = cg(&gw, &["send-user", "u", "direct", "\"hi\""], None).await;
    assert_eq!(
        (code, json_line(&out)["connections"].clone()),
        (0, json!(1))
    );
    assert_eq!(ws.recv_push().await, ("direct".into(), "hi".into()));
    let (code, out) = cg(&gw, &["disconnect", "--user", "u"], None).await;
    assert_eq!(
        (code, json_line(&out)["connections"].clone()),
        (0, json!(1))
    );
    assert_eq!(crate::support::code(&ws.expect_close().await), 4000);
    // A channel that keeps no presence: a clear error and a non-zero exit.
    let (code, _) = cg(&gw, &["presence", "lobby"], None).await;
    assert_ne!(code, 0);
}

async fn next_json(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Value {
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("the client runs");
    json_line(&line)
}

/// `connect --transport sse`: frames as lines, and each line of standard input POSTed, its
/// reply printed; the same for the WebSocket.
#[tokio::test]
async fn connect_prints_frames_and_sends_lines_over_either_transport() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start().await;
    for transport in ["sse", "websocket"] {
        let creds = gw.issue().await;
        gw.subscribe(&creds, &["cli"]).await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
            .args(["connect", "--transport", transport])
            .args([
                "--url",
                &gw.ws_url(),
                "--id",
                &creds.id,
                "--key",
                &creds.key,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        gw.wait_for_connections(1).await;
        gw.push("cli", r#"{"n":1}"#).await;
        let mut first = next_json(&mut lines).await;
        if first.get("connected").is_some() {
            first = next_json(&mut lines).await; // an event stream starts with its positions
        }
        assert_eq!(first["payload"], json!({"n":1}), "{transport}");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"action\":\"ping\",\"id\":7}\n")
            .await
            .unwrap();
        assert_eq!(
            next_json(&mut lines).await,
            json!({"id":7,"status":200,"headers":{},"body":"pong"}),
            "{transport}"
        );
        drop(stdin);
        child.kill().await.unwrap();
        gw.wait_for_connections(0).await;
    }
}
