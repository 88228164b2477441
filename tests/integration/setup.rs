//! What the tests need from the machine, made ready by the tests themselves, so that `cargo
//! test` alone works on a fresh machine: Debian's Chromium and ChromeDriver (the browser test),
//! Node.js 20+ (the browser client's tests), HAProxy and nginx (the tests behind a real proxy),
//! and Redis on 127.0.0.1:6379 plus `redis-server` (the cluster tests). Each is checked once per test run; what is missing is installed with
//! `apt-get` (as root, or through `sudo -n`) and Redis is started if nothing answers. A step
//! that cannot be done fails the tests that need it with the reason, never silently.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// One `apt-get` at a time; `apt-get update` once per run.
static APT: Mutex<bool> = Mutex::new(false);

/// Installs Debian `packages`.
fn apt_install(packages: &[&str]) -> Result<(), String> {
    let mut updated = APT.lock().unwrap_or_else(|e| e.into_inner());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| -> Result<(), String> {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        let output = command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running apt-get: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "apt-get {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    if !*updated {
        eprintln!("setup: apt-get update");
        apt(&["update", "-qq"])?;
        *updated = true;
    }
    eprintln!("setup: installing {}", packages.join(" "));
    let mut args = vec!["install", "-y", "-qq"];
    args.extend_from_slice(packages);
    apt(&args)
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn once(cell: &'static OnceLock<Result<(), String>>, f: fn() -> Result<(), String>) {
    if let Err(why) = cell.get_or_init(f) {
        panic!("test setup: {why}");
    }
}

/// Debian's `chromium` and `chromium-driver`, at `/usr/bin/chromium` and `/usr/bin/chromedriver`.
pub fn chromium() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || {
        if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
            return Ok(());
        }
        apt_install(&["chromium", "chromium-driver"])
    });
}

/// `node`, version 20 or later (the browser client's tests use its WebSocket).
pub fn node() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || {
        if !on_path("node") {
            apt_install(&["nodejs"])?;
        }
        let version = Command::new("node")
            .arg("--version")
            .output()
            .map_err(|e| format!("running node: {e}"))?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        let major: u32 = version
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 20 {
            return Err(format!(
                "node {version} is too old: the browser client's tests need Node.js 20 or later"
            ));
        }
        Ok(())
    });
}

/// The program at `path`, installed from Debian's `package` when missing.
fn installed(path: &str, package: &str) -> Result<(), String> {
    if !Path::new(path).exists() {
        apt_install(&[package])?;
    }
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(format!("{path} is missing after installing {package}"))
    }
}

/// Debian's HAProxy, at `/usr/sbin/haproxy` (the PROXY protocol tests).
pub fn haproxy() -> &'static str {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || installed(HAPROXY, "haproxy"));
    HAPROXY
}

/// Debian's nginx, at `/usr/sbin/nginx` (the `X-Forwarded-For` tests).
pub fn nginx() -> &'static str {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || installed(NGINX, "nginx"));
    NGINX
}

const HAPROXY: &str = "/usr/sbin/haproxy";
const NGINX: &str = "/usr/sbin/nginx";

/// `redis-server` on the PATH, and a Redis answering on 127.0.0.1:6379 (started here, with no
/// persistence, when nothing answers).
pub fn redis() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || {
        if !on_path("redis-server") {
            apt_install(&["redis-server"])?;
        }
        if redis_answers() {
            return Ok(());
        }
        eprintln!("setup: starting redis-server on 127.0.0.1:6379");
        let status = Command::new("redis-server")
            .args([
                "--daemonize",
                "yes",
                "--port",
                "6379",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("starting redis-server: {e}"))?;
        if !status.success() {
            return Err(format!("redis-server exited with {status}"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_answers() {
            if Instant::now() > deadline {
                return Err("redis-server did not answer on 127.0.0.1:6379 within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
}

/// Whether something answers `PING` with `+PONG` on 127.0.0.1:6379.
fn redis_answers() -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().expect("a socket address"),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn answers(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// Waits up to 20 s for 127.0.0.1:`port`.
fn wait_for_port(port: u16, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers(port) {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not answer on 127.0.0.1:{port} within 20 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`), newest version first.
pub fn postgres_bin() -> std::path::PathBuf {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|bin| bin.join("initdb").exists())
        .expect("PostgreSQL's server programs under /usr/lib/postgresql/*/bin")
}

/// PostgreSQL on 127.0.0.1:5432 with trust authentication for `postgres` (the outbox tests),
/// and its server programs (a test runs a private server of its own to restart it). Started
/// with Debian's `pg_ctlcluster` if nothing answers.
pub fn postgres() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || {
        if !Path::new("/usr/lib/postgresql").exists() {
            apt_install(&["postgresql"])?;
        }
        if answers(5432) {
            return Ok(());
        }
        eprintln!("setup: starting PostgreSQL on 127.0.0.1:5432");
        let status = Command::new("sh")
            .args([
                "-c",
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | tail -1) main start",
            ])
            .status()
            .map_err(|e| format!("starting PostgreSQL: {e}"))?;
        if !status.success() {
            return Err(format!("pg_ctlcluster exited with {status}"));
        }
        wait_for_port(5432, "PostgreSQL")
    });
}

/// NATS with JetStream on 127.0.0.1:4222 (the JetStream tests), and `nats-server` (a test runs
/// a private server of its own to restart it). Started if nothing answers.
pub fn nats() -> &'static str {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    once(&READY, || {
        if !Path::new("/usr/sbin/nats-server").exists() && !on_path("nats-server") {
            apt_install(&["nats-server"])?;
        }
        if answers(4222) {
            return Ok(());
        }
        eprintln!("setup: starting nats-server on 127.0.0.1:4222");
        let dir = std::env::temp_dir().join("channelgate-nats");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
        Command::new(nats_server())
            .args(["-a", "127.0.0.1", "-p", "4222", "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting nats-server: {e}"))?;
        wait_for_port(4222, "nats-server")
    });
    "nats://127.0.0.1:4222"
}

/// The `nats-server` program.
pub fn nats_server() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}
