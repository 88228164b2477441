//! The real binary run as a process (for SIGTERM, SIGKILL and memory figures).

use super::PATIENCE;

/// `channelgate serve` on port 0 for both planes, not started.
pub fn serve_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_channelgate"));
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    command
}

/// Runs the real binary as `channelgate serve` on port 0 with `extra` arguments; returns the
/// process and the client-plane and control-plane addresses it logged.
pub fn spawn_binary(extra: &[&str]) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = serve_command()
        .args(["--log-format", "json"])
        .args(extra)
        .env("CHANNELGATE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start channelgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading to the end: a closed pipe would make the node's later log writes fail.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
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
    (child, http.unwrap(), grpc.unwrap())
}
