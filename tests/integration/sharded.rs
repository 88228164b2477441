//! What only a Redis Cluster has: a master's failover while a channel is busy, and sharded
//! pub/sub's connection count. Each test runs a private cluster (three masters, three
//! replicas), so killing a master or counting clients disturbs no other test.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    cluster::{node, unique_prefix},
    redis_cluster::{cli, slot_of_channel, RedisCluster},
    support::{wait_until, Gateway, Ws},
};

/// Two nodes of `cluster` (deployment `name`) and a socket on the second subscribed to `busy`
/// through the first, asking for positions.
async fn busy_socket(cluster: &RedisCluster, name: &str) -> (Gateway, Gateway, Ws) {
    busy_socket_on(cluster, name, &cluster.url()).await
}

/// [`busy_socket`], the second node given `host_url` (its own seeds) for the cluster.
async fn busy_socket_on(
    cluster: &RedisCluster,
    name: &str,
    host_url: &str,
) -> (Gateway, Gateway, Ws) {
    let prefix = unique_prefix(name);
    let publisher = node(&cluster.url(), &prefix).await;
    let host = node(host_url, &prefix).await;
    let creds = publisher.issue().await;
    publisher.subscribe(&creds, &["busy"]).await;
    let mut ws = host
        .connect_recovering(&creds, &json!({}), None)
        .await
        .unwrap();
    ws.connected().await;
    (publisher, host, ws)
}

/// What a socket of `busy` got: the pushes' sequence numbers, and how many `recovered:false`.
#[derive(Default)]
struct Seen {
    received: BTreeSet<u64>,
    gaps: u32,
}

impl Seen {
    /// Records a frame; the sequence number when it is a push.
    fn take(&mut self, frame: &Value) -> Option<u64> {
        if frame["recovered"] == json!(false) {
            self.gaps += 1;
        }
        let seq = frame["payload"].as_u64()?;
        self.received.insert(seq);
        Some(seq)
    }

    /// Reads `ws` until the last of `accepted` arrived, then checks that every accepted push
    /// arrived or a `recovered:false` said some may not have.
    async fn all_or_said(&mut self, ws: &mut Ws, accepted: &BTreeSet<u64>, what: &str) {
        let last = *accepted.last().expect("pushes were accepted");
        while !self.received.contains(&last) {
            self.take(&ws.recv_json().await);
        }
        let missing: Vec<u64> = accepted.difference(&self.received).copied().collect();
        eprintln!(
            "{what}: {} pushes accepted, {} missing at the socket, {} recovered:false",
            accepted.len(),
            missing.len(),
            self.gaps
        );
        assert!(
            missing.is_empty() || self.gaps > 0,
            "accepted pushes {missing:?} never arrived and no recovered:false said so"
        );
    }
}

/// SIGKILL the master that owns a busy channel while another gateway node pushes to it: the
/// replica takes over, every node follows, delivery resumes within 10 s, and the socket sees
/// every push that was accepted, or a `recovered:false` saying it may have missed some.
#[tokio::test]
async fn a_masters_failover_resumes_delivery_within_ten_seconds_with_nothing_lost_unsaid() {
    let cluster = RedisCluster::start();
    let (publisher, _host, mut ws) = busy_socket(&cluster, "failover").await;

    // The publisher: one push every 20 ms through the other node; an accepted push is recorded
    // (a refused one, UNAVAILABLE while the shard has no master, was not made).
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0u32));
    let stop = Arc::new(AtomicBool::new(false));
    let pushing = {
        let (accepted, refused, stop) = (accepted.clone(), refused.clone(), stop.clone());
        let client = publisher.client.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                match client.push(&["busy"], &seq.to_string()).await {
                    Ok(_) => {
                        accepted.lock().unwrap().insert(seq);
                    }
                    Err(_) => *refused.lock().unwrap() += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seq
        })
    };

    let mut seen = Seen::default();
    let mut last_before = 0;
    while seen.received.len() < 20 {
        if let Some(seq) = seen.take(&ws.recv_json().await) {
            last_before = seq;
        }
    }
    let master = cluster.master_of(slot_of_channel("busy"));
    cluster.kill(master);
    let killed = Instant::now();

    // Delivery resumes: a push made after the kill reaches the socket.
    let resumed = loop {
        let v = tokio::time::timeout(Duration::from_secs(20), ws.recv_json())
            .await
            .expect("delivery resumes");
        if let Some(seq) = seen.take(&v) {
            if seq > last_before && *refused.lock().unwrap() > 0 {
                break killed.elapsed();
            }
        }
    };
    eprintln!(
        "failover: delivery resumed {resumed:?} after the SIGKILL ({} pushes refused meanwhile)",
        refused.lock().unwrap()
    );
    assert!(
        resumed <= Duration::from_secs(10),
        "delivery resumed only after {resumed:?}"
    );

    // A little more traffic, then everything accepted must have arrived or been said missing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    pushing.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    seen.all_or_said(&mut ws, &accepted, "failover").await;
}

/// A node given one seed, that seed a master which then dies: the node keeps the nodes it
/// discovered and reconnects through them, so it is ready again within 10 s of the replica's
/// promotion, like a node given every seed, and its socket gets every push accepted meanwhile
/// or a `recovered:false`.
#[tokio::test]
async fn a_node_given_one_seed_follows_the_cluster_when_that_seeds_master_dies() {
    let cluster = RedisCluster::start();
    let slot = slot_of_channel("busy");
    let seed = cluster.master_of(slot);
    let one_seed = format!("redis-cluster://127.0.0.1:{seed}");
    let (publisher, lone, mut ws) = busy_socket_on(&cluster, "one-seed", &one_seed).await;
    let mut accepted = BTreeSet::new();
    for seq in 1..=20u64 {
        publisher.push("busy", &seq.to_string()).await;
        accepted.insert(seq);
    }

    cluster.kill(seed);
    // The replica takes over (the cluster's own detection: cluster-node-timeout 2 s).
    let promoted = {
        let started = Instant::now();
        loop {
            let masters = cluster.masters();
            if masters.len() == 3 && !masters.contains(&seed) && cluster.master_of(slot) != seed {
                break Instant::now();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no failover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Pushes through the other node while the lone node follows.
    let mut seq = 20u64;
    let ready = loop {
        seq += 1;
        if publisher
            .client
            .push(&["busy"], &seq.to_string())
            .await
            .is_ok()
        {
            accepted.insert(seq);
        }
        if lone.http_get("/readyz", &[]).await.0 == 200 {
            break promoted.elapsed();
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(10),
            "the node given one seed was not ready 10 s after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("one seed: ready {ready:?} after the replica's promotion");
    // It works as a node again: a push through it, and everything accepted reached its socket
    // or was said missing.
    lone.client
        .push(&["busy"], &(seq + 1).to_string())
        .await
        .unwrap();
    accepted.insert(seq + 1);
    Seen::default()
        .all_or_said(&mut ws, &accepted, "one seed")
        .await;
}

/// Moving the slot of a busy channel to another master while pushes flow (`MIGRATE`, `ASK`
/// then `MOVED` for the nodes): pushes keep flowing, and the socket sees every accepted push or
/// a `recovered:false`.
#[tokio::test]
async fn a_busy_channels_slot_moves_to_another_master_and_delivery_goes_on() {
    let cluster = RedisCluster::start();
    let (publisher, _host, mut ws) = busy_socket(&cluster, "reshard").await;
    let slot = slot_of_channel("busy");
    let from = cluster.master_of(slot);
    let to = *cluster.masters().iter().find(|m| **m != from).unwrap();
    let mut accepted = BTreeSet::new();
    for seq in 1..=200u64 {
        if seq == 50 {
            cluster.move_slot(slot, from, to);
        }
        if publisher
            .client
            .push(&["busy"], &seq.to_string())
            .await
            .is_ok()
        {
            accepted.insert(seq);
        }
    }
    assert_eq!(cluster.master_of(slot), to, "the slot moved");
    let last = *accepted.last().expect("pushes were accepted");
    assert!(
        last > 150,
        "pushes go on after the move (last accepted: {last})"
    );
    Seen::default()
        .all_or_said(&mut ws, &accepted, "slot move")
        .await;
}

/// A node subscribed to channels on every shard holds one pub/sub connection per master,
/// whatever the number of channels.
#[tokio::test]
async fn a_node_holds_one_pubsub_connection_per_shard_not_per_channel() {
    let cluster = RedisCluster::start();
    let prefix = unique_prefix("ssub");
    let gw = node(&cluster.url(), &prefix).await;
    let channels: Vec<String> = (0..60).map(|i| format!("room-{i}")).collect();
    let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut sockets = Vec::new();
    for chunk in channels.chunks(20) {
        sockets.push(gw.subscriber(chunk).await);
    }
    // Every channel works: a push to each reaches its socket.
    for (i, chunk) in channels.chunks(20).enumerate() {
        for channel in chunk {
            gw.push(channel, "1").await;
            assert_eq!(sockets[i].1.recv_push().await.0, *channel);
        }
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let subscribed = |port: u16| -> Vec<u32> {
        cli(port, &["CLIENT", "LIST"])
            .lines()
            .filter_map(|line| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix("ssub="))
                    .and_then(|n| n.parse::<u32>().ok())
            })
            .filter(|n| *n > 0)
            .collect()
    };
    wait_until(|| async { masters.iter().all(|m| subscribed(*m).len() == 1) }).await;
    let per_master: Vec<Vec<u32>> = masters.iter().map(|m| subscribed(*m)).collect();
    eprintln!("sharded pub/sub: subscriptions per connection on each master {per_master:?}");
    let total: u32 = per_master.iter().flatten().sum();
    // 60 channels plus the node's own topics (its command topic and 128 outbox wake-ups).
    assert_eq!(total, 60 + 1 + 128, "{per_master:?}");
    // And what the README says a node holds: per master one pub/sub connection and two for
    // commands (the cluster client's, and the pipelines sent straight to it), plus one that
    // reads the slot map, on one node.
    let clients = |port: u16| {
        cli(port, &["CLIENT", "LIST"])
            .lines()
            .filter(|l| {
                !l.contains("cmd=client") && !l.contains("flags=S ") && !l.contains("flags=M ")
            })
            .count()
    };
    wait_until(|| async {
        let per_master: Vec<usize> = masters.iter().map(|m| clients(*m)).collect();
        per_master.iter().all(|n| *n >= 3) && per_master.iter().sum::<usize>() == 3 * 3 + 1
    })
    .await;
}
