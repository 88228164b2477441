//! The PostgreSQL outbox consumer against a real PostgreSQL: each test makes a database of its
//! own (dropped at the end), creates the outbox from `channelgate outbox-schema`'s SQL, and
//! watches real sockets.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::{
    cluster::{self, unique_prefix},
    support::{
        consumers, node_behind_a_valve, serve_command, wait_until, Gateway, PrivatePostgres,
        TestDb, TestPki, Ws, PATIENCE,
    },
};

/// Inserts `(partition, method, payload)` rows in one statement, in order.
async fn insert(c: &impl tokio_postgres::GenericClient, table: &str, rows: &[(i32, &str, Value)]) {
    let partitions: Vec<i32> = rows.iter().map(|r| r.0).collect();
    let methods: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let payloads: Vec<String> = rows.iter().map(|r| r.2.to_string()).collect();
    c.execute(
        &format!(
            "INSERT INTO {table} (partition, method, payload) \
             SELECT p, m, j::jsonb FROM unnest($1::int4[], $2::text[], $3::text[]) \
             WITH ORDINALITY AS u(p, m, j, n) ORDER BY n"
        ),
        &[&partitions, &methods, &payloads],
    )
    .await
    .expect("insert outbox rows");
}

/// A push row of partition `p` to channel `p{p}` carrying `{"n": n}`.
fn push(p: i32, n: u64) -> (i32, &'static str, Value) {
    (
        p,
        "push",
        json!({"channel": format!("p{p}"), "data": {"n": n}}),
    )
}

/// Each partition's `n`s in arrival order, by channel (`p0`, `p1`, ...).
type Arrived = HashMap<String, Vec<u64>>;

/// Reads `count` pushes into `got`.
async fn read_pushes(ws: &mut Ws, count: usize, got: &mut Arrived) {
    for _ in 0..count {
        let (channel, payload) = ws.recv_push().await;
        let n = payload["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("a row's push, got {payload} on {channel}"));
        got.entry(channel).or_default().push(n);
    }
}

/// Reads pushes until partition `p` has `counts[p]` of them (besides those in `got`), then
/// checks that each got `0..counts[p]`: every row once, in order.
async fn all_once_in_order(ws: &mut Ws, mut got: Arrived, counts: &[u64]) {
    let have: usize = got.values().map(Vec::len).sum();
    let want = counts.iter().sum::<u64>() as usize;
    read_pushes(ws, want.saturating_sub(have), &mut got).await;
    for (p, &count) in counts.iter().enumerate() {
        let expected: Vec<u64> = (0..count).collect();
        assert_eq!(
            got.get(&format!("p{p}")).cloned().unwrap_or_default(),
            expected,
            "partition {p}: each row once, in order"
        );
    }
}

/// A marker row through every partition, then the next frames must be exactly the markers:
/// nothing was delivered twice before them.
async fn nothing_more(db: &TestDb, ws: &mut Ws, partitions: i32) {
    let c = db.client().await;
    let rows: Vec<_> = (0..partitions)
        .map(|p| {
            (
                p,
                "push",
                json!({"channel": format!("p{p}"), "data": {"marker": true}}),
            )
        })
        .collect();
    insert(&c, &db.table, &rows).await;
    for _ in 0..partitions {
        let (channel, payload) = ws.recv_push().await;
        assert_eq!(
            payload,
            json!({"marker": true}),
            "an extra push on {channel}"
        );
    }
}

#[tokio::test]
async fn committed_rows_reach_sockets_once_in_partition_order_and_rolled_back_rows_never() {
    let db = TestDb::create("order").await;
    let toml = db.consumer("partitions = 4\nbatch = 64\nrebalance-interval = \"100ms\"");
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (_, mut ws) = gw.subscriber(&["p0", "p1", "p2", "p3"]).await;

    // Interleaved writers: committed transactions of mixed partitions, and one rolled back.
    let mut writer = db.client().await;
    let mut next = [0u64; 4];
    for round in 0..10 {
        let tx = writer.transaction().await.unwrap();
        let rows: Vec<_> = (0..40)
            .map(|i| {
                let p = (i * 7 + round) % 4;
                next[p as usize] += 1;
                push(p, next[p as usize] - 1)
            })
            .collect();
        insert(&tx, &db.table, &rows).await;
        tx.commit().await.unwrap();
        let tx = writer.transaction().await.unwrap();
        insert(
            &tx,
            &db.table,
            &[(0, "push", json!({"channel": "p0", "data": {"n": 999_999}}))],
        )
        .await;
        tx.rollback().await.unwrap();
    }
    all_once_in_order(&mut ws, Arrived::new(), &next).await;
    nothing_more(&db, &mut ws, 4).await;
    wait_until(|| async { db.pending().await == 0 }).await;
    assert_eq!(
        gw.metric("channelgate_consumer_applied_total{consumer=\"outbox\"}")
            .await,
        404
    );
    assert_eq!(
        gw.metric("channelgate_consumer_connected{consumer=\"outbox\"}")
            .await,
        1
    );
    assert_eq!(
        gw.metric("channelgate_consumer_partitions_held{consumer=\"outbox\"}")
            .await,
        4
    );
}

#[tokio::test]
async fn every_method_applies_from_the_outbox() {
    let db = TestDb::create("methods").await;
    let toml = db.consumer("partitions = 1");
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (creds, mut ws) = gw.subscriber(&[]).await;
    let digest = creds.digest.clone();
    let c = db.client().await;
    insert(
        &c,
        &db.table,
        &[
            (
                0,
                "subscribe",
                json!({"digest": digest, "channels": ["a", "b"]}),
            ),
            (0, "push", json!({"channels": ["a"], "data": {"n": 1}})),
            (0, "unsubscribe", json!({"digest": digest, "channel": "a"})),
            (0, "push", json!({"channel": "a", "data": {"n": 2}})),
            (
                0,
                "push",
                json!({"channel": "b", "data": {"n": 3}, "idempotency_key": "k1"}),
            ),
            (
                0,
                "push",
                json!({"channel": "b", "data": {"n": 4}, "idempotency_key": "k1"}),
            ),
            (
                0,
                "send",
                json!({"digest": digest, "channel": "direct", "data": {"n": 5}}),
            ),
            (
                0,
                "disconnect",
                json!({"digest": digest, "code": 4003, "reason": "bye"}),
            ),
        ],
    )
    .await;
    assert_eq!(ws.recv_push().await, ("a".into(), json!({"n": 1})));
    // Unsubscribed from a: n 2 is not for this socket; k1 took n 3 and refused n 4.
    assert_eq!(ws.recv_push().await, ("b".into(), json!({"n": 3})));
    assert_eq!(ws.recv_push().await, ("direct".into(), json!({"n": 5})));
    let close = ws.expect_close().await;
    assert_eq!(crate::support::code(&close), 4003);
    wait_until(|| async { db.pending().await == 0 }).await;
    assert!(db.dead().await.is_empty());
}

#[tokio::test]
async fn a_single_node_keeps_no_idempotency_records_for_its_rows() {
    let db = TestDb::create("unkeyed").await;
    let toml = db.consumer("partitions = 1");
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (_, mut ws) = gw.subscriber(&["p0"]).await;
    insert(&db.client().await, &db.table, &[push(0, 1)]).await;
    assert_eq!(ws.recv_push().await.1, json!({"n": 1}));
    // Row 1's key, had the consumer made a record (as in cluster mode): a push with it would be
    // taken for a retry and not delivered. One node keeps none: its table of records would fill
    // at sustained rates (1,000,000 in the window), and would die with it anyway.
    gw.control()
        .push(channelgate::pb::PushRequest {
            channels: vec!["p0".into()],
            json: r#"{"n":2}"#.into(),
            idempotency_key: "outbox:1".into(),
        })
        .await
        .unwrap();
    assert_eq!(ws.recv_push().await.1, json!({"n": 2}));
}

#[tokio::test]
async fn a_poison_row_goes_aside_with_its_error_and_the_rows_after_it_flow() {
    let db = TestDb::create("poison").await;
    let toml = db.consumer("partitions = 1");
    let gw = Gateway::start_with(|c| {
        c.consumers = consumers(&toml);
        c.limits.max_push_size = 1024;
    })
    .await;
    let (_, mut ws) = gw.subscriber(&["p0"]).await;
    let c = db.client().await;
    insert(
        &c,
        &db.table,
        &[
            push(0, 0),
            (0, "teleport", json!({"channel": "p0"})),
            (0, "push", json!({"channel": "not a channel!", "data": 1})),
            (0, "push", json!({"channel": "p0"})),
            (
                0,
                "push",
                json!({"channel": "p0", "data": {"n": "x".repeat(2_000)}}),
            ),
            push(0, 1),
        ],
    )
    .await;
    for n in 0..2 {
        let (_, payload) = ws.recv_push().await;
        assert!(
            payload == json!({"n": n}),
            "expected n {n}, got {:.80}",
            payload.to_string()
        );
    }
    wait_until(|| async { db.pending().await == 0 }).await;
    let dead = db.dead().await;
    let methods: Vec<_> = dead.iter().map(|d| d.1.as_str()).collect();
    assert_eq!(methods, ["teleport", "push", "push", "push"], "{dead:?}");
    assert!(dead[0].2.contains("unknown method"), "{dead:?}");
    assert!(dead[1].2.contains("channel"), "{dead:?}");
    assert!(dead[2].2.contains("data"), "{dead:?}");
    assert!(dead[3].2.contains("over the limit"), "{dead:?}");
    let failed = |reason: &str| {
        format!("channelgate_consumer_failed_total{{consumer=\"outbox\",reason=\"{reason}\"}}")
    };
    assert_eq!(gw.metric(&failed("unknown_method")).await, 1);
    assert_eq!(gw.metric(&failed("bad_channel")).await, 1);
    assert_eq!(gw.metric(&failed("too_large")).await, 1);
    nothing_more(&db, &mut ws, 1).await;
}

#[tokio::test]
async fn nodes_consuming_another_database_are_not_peers() {
    let (one, two) = (
        TestDb::create("peers1").await,
        TestDb::create("peers2").await,
    );
    let held = "channelgate_consumer_partitions_held{consumer=\"outbox\"}";
    let toml_one = one.consumer("partitions = 2\nrebalance-interval = \"50ms\"");
    let toml_two = two.consumer("partitions = 2\nrebalance-interval = \"50ms\"");
    let gw_one = Gateway::start_with(|c| c.consumers = consumers(&toml_one)).await;
    let gw_two = Gateway::start_with(|c| c.consumers = consumers(&toml_two)).await;
    // Both tables are `channelgate_outbox`; each node holds every partition of its own.
    wait_until(|| async { gw_one.metric(held).await == 2 && gw_two.metric(held).await == 2 }).await;
    // And keeps them after several rounds of counting peers.
    let counted = "channelgate_consumer_pending{consumer=\"outbox\"}";
    insert(
        &one.client().await,
        &one.table,
        &[(7, "push", json!({"channel": "x", "data": 1}))],
    )
    .await;
    wait_until(|| async { gw_one.metric(counted).await == 1 }).await;
    // Partition 7 of 2: no node reads it, and the gauge says so.
    let stranded = "channelgate_consumer_stranded_rows{consumer=\"outbox\"}";
    wait_until(|| async { gw_one.metric(stranded).await == 1 }).await;
    assert_eq!(gw_one.metric(held).await, 2);
    assert_eq!(gw_two.metric(held).await, 2);
}

#[tokio::test]
async fn two_outboxes_with_the_same_ids_feed_one_node_without_colliding() {
    let (one, two) = (TestDb::create("same1").await, TestDb::create("same2").await);
    let toml = format!(
        "{}{}",
        one.consumer("partitions = 1")
            .replace("name = \"outbox\"", "name = \"orders\""),
        two.consumer("partitions = 1")
            .replace("name = \"outbox\"", "name = \"chat\""),
    );
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (_, mut ws) = gw.subscriber(&["p0"]).await;
    // Row 1 of each table, to the same channel: two pushes, not one and a duplicate.
    insert(&one.client().await, &one.table, &[push(0, 1)]).await;
    assert_eq!(ws.recv_push().await.1, json!({"n": 1}));
    insert(&two.client().await, &two.table, &[push(0, 2)]).await;
    assert_eq!(ws.recv_push().await.1, json!({"n": 2}));
}

#[tokio::test]
async fn rows_that_meet_a_stalled_redis_are_retried_and_arrive_once_in_order() {
    let db = TestDb::create("stall").await;
    let toml = db.consumer("partitions = 1\nmax-backoff = \"100ms\"");
    let (valve, gw) = node_behind_a_valve("outbox-stall", toml).await;
    let (_, mut ws) = gw.subscriber(&["p0"]).await;
    insert(&db.client().await, &db.table, &[push(0, 0), push(0, 1)]).await;
    for n in 0..2 {
        assert_eq!(ws.recv_push().await.1, json!({"n": n}));
    }

    valve.set_open(false);
    let rows: Vec<_> = (2..6).map(|n| push(0, n)).collect();
    insert(&db.client().await, &db.table, &rows).await;
    let transient = "channelgate_consumer_failed_total{consumer=\"outbox\",reason=\"transient\"}";
    wait_until(|| async { gw.metric(transient).await >= 2 }).await;
    assert_eq!(
        db.pending().await,
        4,
        "nothing was dropped while Redis stalled"
    );
    valve.set_open(true);
    // The push that timed out may have been taken once Redis answered; its retry is then a
    // no-op (its idempotency key): each row once, in order.
    for n in 2..6 {
        assert_eq!(ws.recv_push().await.1, json!({"n": n}));
    }
    nothing_more(&db, &mut ws, 1).await;
}

#[tokio::test]
async fn a_node_killed_mid_batch_of_10000_rows_loses_and_duplicates_nothing() {
    let db = TestDb::create("kill").await;
    let prefix = unique_prefix("outbox-kill");
    let toml = db.consumer("partitions = 4\nbatch = 500\nrebalance-interval = \"100ms\"");
    let file = std::env::temp_dir().join(format!("{}.toml", db.name));
    std::fs::write(&file, &toml).unwrap();
    let (mut doomed, doomed_http, _) =
        cluster::spawn_node(&prefix, &["--config", file.to_str().unwrap()]);
    let survivor = cluster::node_with(&cluster::redis(), &prefix, {
        let toml = toml.clone();
        move |c| c.consumers = consumers(&toml)
    })
    .await;
    let held = "channelgate_consumer_partitions_held{consumer=\"outbox\"}";
    // Two nodes: two partitions each.
    wait_until(|| async {
        survivor.metric(held).await == 2 && metric_at(&doomed_http, held).await == 2
    })
    .await;
    let (_, mut ws) = survivor.subscriber(&["p0", "p1", "p2", "p3"]).await;

    let rows: Vec<_> = (0..10_000u64)
        .map(|i| push((i % 4) as i32, i / 4))
        .collect();
    insert(&db.client().await, &db.table, &rows).await;
    let mut got = Arrived::new();
    read_pushes(&mut ws, 1_500, &mut got).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let left = db.pending().await;
    assert!(left > 0, "the kill came before the end (rows left: {left})");
    all_once_in_order(&mut ws, got, &[2_500; 4]).await;
    wait_until(|| async { survivor.metric(held).await == 4 }).await;
    nothing_more(&db, &mut ws, 4).await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn postgres_restarted_the_consumer_recovers_and_loses_nothing() {
    let pg = PrivatePostgres::start();
    let db = TestDb::create_on(pg.port, "restart").await;
    let toml = db.consumer(
        "partitions = 2\npoll-interval = \"200ms\"\nrebalance-interval = \"100ms\"\nmax-backoff = \"200ms\"",
    );
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (_, mut ws) = gw.subscriber(&["p0", "p1"]).await;
    let connected = "channelgate_consumer_connected{consumer=\"outbox\"}";
    wait_until(|| async { gw.metric(connected).await == 1 }).await;

    let rows: Vec<_> = (0..2_000u64).map(|i| push((i % 2) as i32, i / 2)).collect();
    insert(&db.client().await, &db.table, &rows).await;
    // Stopped while the rows are being applied.
    let mut got = Arrived::new();
    read_pushes(&mut ws, 1, &mut got).await;
    pg.stop();
    wait_until(|| async { gw.metric(connected).await == 0 }).await;
    // The client plane's readiness is not the consumer's.
    assert_eq!(gw.http_get("/readyz", &[]).await.0, 200);
    pg.start_again();
    let more: Vec<_> = (2_000..2_200u64)
        .map(|i| push((i % 2) as i32, i / 2))
        .collect();
    let writer = tokio::time::timeout(PATIENCE, async {
        loop {
            // PostgreSQL takes a moment to accept connections again.
            if let Ok((c, conn)) = tokio_postgres::connect(&db.dsn, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    insert(&writer, &db.table, &more).await;

    all_once_in_order(&mut ws, got, &[1_100; 2]).await;
    wait_until(|| async { gw.metric(connected).await == 1 }).await;
    nothing_more(&db, &mut ws, 2).await;
}

#[tokio::test]
async fn the_consumer_connects_over_tls_verified_with_sslmode_require() {
    let pki = TestPki::in_dir("outbox-tls");
    let pg = PrivatePostgres::start_tls(&pki);
    let db = TestDb::create_on(pg.port, "tls").await;
    let toml = db
        .consumer(&format!(
            "partitions = 1\nca-file = \"{}\"",
            pki.path("ca.pem").display()
        ))
        .replace(&db.dsn, &format!("{} sslmode=require", db.dsn));
    let gw = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let (_, mut ws) = gw.subscriber(&["p0"]).await;
    insert(&db.client().await, &db.table, &[push(0, 1)]).await;
    assert_eq!(ws.recv_push().await.1, json!({"n": 1}));
    // Every connection of the consumer is encrypted.
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = current_database() AND a.application_name LIKE 'channelgate %'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.len() >= 2,
        "the listening connection and the partition's"
    );
    assert!(rows.iter().all(|r| r.get::<_, bool>(0)), "all over TLS");

    // A server whose certificate the consumer cannot verify is not used.
    let other = TestPki::in_dir("outbox-tls-other");
    let toml = db
        .consumer(&format!(
            "partitions = 1\nca-file = \"{}\"",
            other.path("ca.pem").display()
        ))
        .replace(&db.dsn, &format!("{} sslmode=require", db.dsn));
    let refused = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    // It tried: the server saw its handshakes fail on the certificate it would not trust.
    wait_until(|| async { pg.log().contains("could not accept SSL connection") }).await;
    let connected = "channelgate_consumer_connected{consumer=\"outbox\"}";
    assert_eq!(refused.metric(connected).await, 0);
    assert_eq!(
        db.connected_nodes().await,
        1,
        "only the first node is connected"
    );
}

#[tokio::test]
async fn a_draining_node_lets_go_of_its_partitions_for_the_others() {
    let db = TestDb::create("drain").await;
    let toml = db.consumer("partitions = 2\nrebalance-interval = \"50ms\"");
    let leaving = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    let held = "channelgate_consumer_partitions_held{consumer=\"outbox\"}";
    wait_until(|| async { leaving.metric(held).await == 2 }).await;
    let staying = Gateway::start_with(|c| c.consumers = consumers(&toml)).await;
    wait_until(|| async { leaving.metric(held).await == 1 && staying.metric(held).await == 1 })
        .await;
    let (_, mut ws) = staying.subscriber(&["p0", "p1"]).await;

    // The node's drain waits for its consumer, whose connections (and locks) go with it.
    leaving.shutdown().await;
    assert_eq!(
        db.connected_nodes().await,
        1,
        "the drained node's connections are closed"
    );
    let c = db.client().await;
    wait_until(|| async { staying.metric(held).await == 2 }).await;
    insert(&c, &db.table, &[push(0, 0), push(1, 0)]).await;
    let mut got = vec![ws.recv_push().await.0, ws.recv_push().await.0];
    got.sort();
    assert_eq!(got, ["p0", "p1"]);
}

#[tokio::test]
async fn outbox_schema_prints_sql_that_creates_the_tables() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(["outbox-schema", "--table", "app.events_outbox"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let sql = String::from_utf8(out.stdout).unwrap();
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS app.events_outbox ("),
        "{sql}"
    );
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS app.events_outbox_dead ("),
        "{sql}"
    );
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args(["outbox-schema", "--table", "x; DROP TABLE y"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    // And PostgreSQL takes it, in a schema of the test's own.
    let db = TestDb::create("schema").await;
    let c = db.client().await;
    c.batch_execute(&format!("CREATE SCHEMA app; {sql}"))
        .await
        .expect("the SQL applies");
    c.batch_execute(&sql)
        .await
        .expect("and applies again (IF NOT EXISTS)");
}

#[tokio::test]
async fn a_consumer_table_that_is_wrong_stops_serve_before_it_binds() {
    let file =
        std::env::temp_dir().join(format!("cgtest-bad-consumer-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[[consumers]]\nkind = \"postgres\"\ndsn-env = \"CG_TEST_NO_SUCH_VAR\"\n",
    )
    .unwrap();
    let out = serve_command().arg("--config").arg(&file).output().unwrap();
    let _ = std::fs::remove_file(file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CG_TEST_NO_SUCH_VAR is not set"), "{err}");
}

/// A metric of the node whose client plane is `http`.
pub async fn metric_at(http: &str, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
        return 0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}
