//! Redis Cluster for the tests: three masters and three replicas started from `redis-server`
//! on free ports (`redis-cli --cluster create`), shared by the suite ([`shared_url`]) or
//! private to one test ([`RedisCluster::start`], for faults). Every server is watched: it is
//! killed when the test process exits, and a private cluster when it is dropped.
//!
//! [`on_both!`] runs a cross-node test twice: against one Redis and against the shared cluster.

use std::{
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Runs `async fn $name()` as two tests, `$name::single` (one Redis server) and
/// `$name::cluster` (the shared Redis Cluster); inside, [`redis`](crate::cluster::redis) is
/// the one it runs against.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn single() {
                let url = $crate::cluster::REDIS.to_owned();
                $crate::cluster::REDIS_URL.scope(url, super::$name()).await
            }
            #[tokio::test]
            async fn cluster() {
                let url = $crate::redis_cluster::shared_url();
                $crate::cluster::REDIS_URL.scope(url, super::$name()).await
            }
        }
    )*};
}

/// The seed URL of the suite's shared cluster, started on first use.
pub fn shared_url() -> String {
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    SHARED.get_or_init(RedisCluster::start).url()
}

/// The slot of `channel`'s keys and topic: its partition's hash tag's (computed here
/// independently of the gateway: `slot / 128` is the partition; its tag, the first integer
/// in it).
pub fn slot_of_channel(channel: &str) -> u16 {
    slot(&tag_of(channel))
}

/// The hash tag of `name`'s partition on a cluster: the first integer whose slot is in the
/// same 128-slot range as `name`'s.
pub fn tag_of(name: &str) -> String {
    let partition = slot(name) / 128;
    (0u64..)
        .map(|k| k.to_string())
        .find(|k| slot(k) / 128 == partition)
        .unwrap()
}

fn slot(name: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(name.as_bytes()) % 16_384
}

pub struct RedisCluster {
    /// Masters first, then replicas (as `--cluster create` pairs them).
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    /// The shells that kill each server with the test process (they end with their server).
    watchdogs: Vec<std::process::Child>,
}

fn free_port() -> u16 {
    // A port whose cluster bus port (+10000) is free too.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// Three masters with one replica each, ready (every slot served, replicas in sync).
    pub fn start() -> Self {
        crate::setup::redis();
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let dir = std::env::temp_dir().join(format!(
            "channelgate-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        let mut watchdogs = Vec::new();
        for port in &ports {
            // A watchdog shell: the server dies with the test process.
            let script = format!(
                "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no \
                 --cluster-enabled yes --cluster-config-file nodes-{port}.conf \
                 --cluster-node-timeout 2000 --dir '{dir}' >/dev/null 2>&1 & r=$!; \
                 while kill -0 {me} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 1; done; \
                 kill -9 $r 2>/dev/null",
                dir = dir.display()
            );
            let watchdog = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh runs");
            watchdogs.push(watchdog);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &ports {
            while cli(*port, &["PING"]).trim() != "PONG" {
                assert!(
                    Instant::now() < deadline,
                    "redis-server {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self {
            ports,
            dir,
            watchdogs,
        };
        cluster.wait_healthy();
        cluster
    }

    /// Waits until every node sees the cluster ok and every replica is in sync.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in &self.ports {
            loop {
                let info = cli(*port, &["CLUSTER", "INFO"]);
                let replication = cli(*port, &["INFO", "replication"]);
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                if info.contains("cluster_state:ok") && synced {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster node {port} not healthy");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports[..3]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// The ports of the current masters.
    pub fn masters(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|p| cli(*p, &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// The master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        for port in self.masters() {
            let nodes = cli(port, &["CLUSTER", "NODES"]);
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 9 || !fields[2].contains("myself") {
                    continue;
                }
                for range in &fields[8..] {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) {
                        if (lo..=hi).contains(&slot) {
                            return port;
                        }
                    }
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The node id of the server on `port`.
    pub fn id(&self, port: u16) -> String {
        cli(port, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Moves `slot` (its keys too) from the master on `from` to the master on `to`, the way
    /// `redis-cli --cluster reshard` does: importing and migrating marks, `MIGRATE` of its keys
    /// in batches, then the new owner told to every master.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let slot = slot.to_string();
        let (from_id, to_id) = (self.id(from), self.id(to));
        cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        loop {
            let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            cli(from, &args);
        }
        for port in self.masters() {
            cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
    }

    /// SIGKILLs the server on `port`.
    pub fn kill(&self, port: u16) {
        let info = cli(port, &["INFO", "server"]);
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .map(|p| p.trim().to_owned())
            .expect("redis-server reports its pid");
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in &self.ports {
            let _ = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "SHUTDOWN", "NOSAVE"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for watchdog in &mut self.watchdogs {
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
