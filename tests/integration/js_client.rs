//! The browser client's own tests (`clients/js/test/`), run by Node's test runner against the
//! real `channelgate` binary, so `cargo test` covers the JavaScript too.

use std::process::Command;

#[test]
fn browser_client_tests_pass_under_node() {
    crate::setup::node();
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("node")
        // Node 20 needs the flag for its WebSocket; Node 22+ has it on by default and accepts it.
        // A failed test that leaves a socket or a timer behind must not keep the runner alive.
        .args([
            "--test",
            "--test-force-exit",
            "--experimental-websocket",
            "clients/js/test/",
        ])
        .current_dir(root)
        .env("CHANNELGATE_BIN", env!("CARGO_BIN_EXE_channelgate"))
        .output()
        .expect("run node (Node.js 20 or later is needed for the browser client's tests)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
}
