//! The ingest tests' sources: a database of a test's own on the machine's PostgreSQL (dropped
//! at the end), private PostgreSQL and NATS servers a test may stop and start again, and the
//! `[[consumers]]` tables that point a node at them.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use tokio_postgres::{Client, NoTls};

use crate::setup;

/// A fresh name: `prefix`, the process and a random tail.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A free TCP port on 127.0.0.1 (bound and let go; good enough for a server started at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Connects to PostgreSQL; the connection runs on its own task.
pub async fn pg_connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of this test's own on a PostgreSQL server, with the outbox table `table`
/// created from `channelgate outbox-schema`'s SQL; dropped when the value is.
pub struct TestDb {
    pub name: String,
    pub dsn: String,
    pub table: String,
    port: u16,
}

impl TestDb {
    /// On the machine's PostgreSQL (127.0.0.1:5432).
    pub async fn create(tag: &str) -> Self {
        setup::postgres();
        Self::create_on(5432, tag).await
    }

    /// On the PostgreSQL at 127.0.0.1:`port`.
    pub async fn create_on(port: u16, tag: &str) -> Self {
        let name = unique(&format!("cgtest_{tag}"));
        let admin = pg_connect(&format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres"
        ))
        .await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let db = Self {
            dsn: format!("host=127.0.0.1 port={port} user=postgres dbname={name}"),
            table: "channelgate_outbox".into(),
            name,
            port,
        };
        let sql = channelgate::ingest::outbox_schema(&db.table).unwrap();
        db.client()
            .await
            .batch_execute(&sql)
            .await
            .expect("the outbox schema applies");
        db
    }

    pub async fn client(&self) -> Client {
        pg_connect(&self.dsn).await
    }

    /// Rows left in the outbox.
    pub async fn pending(&self) -> i64 {
        let c = self.client().await;
        c.query_one(&format!("SELECT count(*) FROM {}", self.table), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// How many nodes' consumers are connected to this database (their connections'
    /// `application_name`).
    pub async fn connected_nodes(&self) -> i64 {
        let c = self.client().await;
        c.query_one(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'channelgate %'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// The dead-letter table's rows: (id, method, error).
    pub async fn dead(&self) -> Vec<(i64, String, String)> {
        let c = self.client().await;
        c.query(
            &format!(
                "SELECT id, method, error FROM {}_dead ORDER BY id",
                self.table
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    }

    /// A `[[consumers]]` table of kind postgres on this database, with `extra` TOML lines.
    pub fn consumer(&self, extra: &str) -> String {
        format!(
            "[[consumers]]\nkind = \"postgres\"\nname = \"outbox\"\ndsn = \"{}\"\ntable = \"{}\"\n{extra}\n",
            self.dsn, self.table
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A node of a cluster of its own (`tag`) whose Redis is behind a [`super::Valve`] the test
/// can close, running the consumers of `toml`.
pub async fn node_behind_a_valve(tag: &str, toml: String) -> (super::Valve, super::Gateway) {
    let redis = crate::cluster::REDIS.trim_start_matches("redis://");
    let valve = super::Valve::start(redis.parse().expect("Redis's address")).await;
    let url = format!("redis://{}", valve.addr);
    let prefix = crate::cluster::unique_prefix(tag);
    let gw =
        crate::cluster::node_with(&url, &prefix, move |c| c.consumers = consumers(&toml)).await;
    (valve, gw)
}

/// The node's consumers from `toml` (one or more `[[consumers]]` tables).
pub fn consumers(toml: &str) -> channelgate::config::Consumers {
    channelgate::config::Settings::parse_toml(toml)
        .expect("consumer tables parse")
        .consumers
        .expect("consumer tables")
}

/// A PostgreSQL server of a test's own (initdb in a temporary directory, run as `postgres`),
/// to stop and start again; stopped and removed when dropped.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    /// Server options beyond the port and address (`-c ssl=on ...`).
    options: String,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that also takes TLS, with `pki`'s server certificate (for 127.0.0.1).
    pub fn start_tls(pki: &super::TestPki) -> Self {
        Self::start_with(Some(pki))
    }

    fn start_with(pki: Option<&super::TestPki>) -> Self {
        setup::postgres();
        let dir = std::env::temp_dir().join(unique("cgtest_pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            chown.success(),
            "chown the private cluster's directory to postgres"
        );
        let initdb = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(setup::postgres_bin().join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .status()
            .expect("run initdb as postgres");
        assert!(initdb.success(), "initdb");
        let mut options = String::new();
        if let Some(pki) = pki {
            // PostgreSQL wants its key owned by its user and private.
            for name in ["server.pem", "server.key"] {
                std::fs::copy(pki.path(name), dir.join(name)).unwrap();
            }
            let owned = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "chown postgres {0}/server.pem {0}/server.key && chmod 600 {0}/server.key",
                    dir.display()
                ))
                .status()
                .unwrap();
            assert!(owned.success(), "hand the TLS files to postgres");
            options = format!(
                " -c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
                dir.display()
            );
        }
        let pg = Self {
            port: free_port(),
            dir,
            options,
        };
        pg.start_again();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(setup::postgres_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl")
    }

    /// Starts the server (again), on the same port and data.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.options
        );
        let log = self.dir.join("log");
        let status = self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &options, "start"]);
        assert!(status.success(), "pg_ctl start");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Stops the server (fast: connections are closed).
    pub fn stop(&self) {
        let status = self.pg_ctl(&["-w", "-m", "fast", "stop"]);
        assert!(status.success(), "pg_ctl stop");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A NATS server with JetStream of a test's own, to stop and start again (same port, same
/// store); killed and removed when dropped.
pub struct PrivateNats {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        setup::nats();
        let dir = std::env::temp_dir().join(unique("cgtest_nats"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nats = Self {
            port: free_port(),
            dir,
            child: None,
        };
        nats.start_again();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let child = Command::new(setup::nats_server())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + super::PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server answers");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: its clients see the connection drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
