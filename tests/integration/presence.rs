//! Presence on one node and across nodes: who is subscribed and connected in a channel whose
//! namespace keeps presence, with user and info; a resume within the grace changes nothing.

use std::time::Duration;

use crate::{
    cluster::{node_with, redis, restart_empty, spawn_node, unique_prefix, PrivateRedis, REDIS},
    support::{connect_at, keep_presence, next_event, wait_until, Creds, Gateway},
};
use channelgate::pb;

async fn presence_node() -> Gateway {
    Gateway::start_with(|c| {
        c.limits.reconnect_grace = Duration::from_secs(30);
        c.limits.namespaces = keep_presence("chat");
    })
    .await
}

async fn issue_for(gw: &Gateway, user: &str, info: &str) -> Creds {
    gw.client
        .issue_for(None, &["chat:room"], user, info)
        .await
        .expect("IssueConnection")
        .into()
}

#[tokio::test]
async fn presence_lists_connected_subscribers_with_users_and_survives_a_resume() {
    let gw = presence_node().await;
    let u1 = issue_for(&gw, "u", r#"{"name":"Ursula"}"#).await;
    let u2 = issue_for(&gw, "u", "").await;
    let v = issue_for(&gw, "v", "").await;
    // Issued but never connected: not present.
    let _unused = issue_for(&gw, "w", "").await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (0, 0));
    let ws_u1 = gw.connect(&u1).await;
    let ws_u2 = gw.connect(&u2).await;
    let _ws_v = gw.connect(&v).await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (3, 2));
    let mut members = gw.client.presence("chat:room").await.unwrap();
    members.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
    let mut expected = vec![
        (
            u1.id.clone(),
            u1.digest.clone(),
            "u",
            r#"{"name":"Ursula"}"#,
        ),
        (u2.id.clone(), u2.digest.clone(), "u", ""),
        (v.id.clone(), v.digest.clone(), "v", ""),
    ];
    expected.sort();
    let got: Vec<_> = members
        .iter()
        .map(|m| {
            assert!(m.since_unix_ms > 0);
            (
                m.connection_id.clone(),
                m.digest.clone(),
                m.user.as_str(),
                m.info_json.as_str(),
            )
        })
        .collect();
    assert_eq!(got, expected);

    // Dropped: still present within the grace, and the resume changes nothing.
    let since = members
        .iter()
        .find(|m| m.digest == u1.digest)
        .unwrap()
        .since_unix_ms;
    ws_u1.drop_unclean();
    gw.wait_for_connections(2).await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (3, 2));
    let _ws_u1 = gw.connect(&u1).await;
    let again = gw.client.presence("chat:room").await.unwrap();
    assert_eq!(
        again
            .iter()
            .find(|m| m.digest == u1.digest)
            .unwrap()
            .since_unix_ms,
        since
    );

    // A clean close leaves; so does an unsubscribe; a subscribe while live joins.
    ws_u2.close().await;
    gw.wait_for_connections(2).await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (2, 2));
    gw.unsubscribe(&v, &["chat:room"]).await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (1, 1));
    gw.subscribe(&v, &["chat:room", "chat:other"]).await;
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (2, 2));
    assert_eq!(
        gw.client.presence_stats("chat:other").await.unwrap(),
        (1, 1)
    );
    // Disconnect(user) empties the room of that user.
    gw.client.disconnect_user("u", 0, "").await.unwrap();
    assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (1, 1));
}

#[tokio::test]
async fn presence_on_a_channel_that_keeps_none_is_failed_precondition() {
    let gw = presence_node().await;
    for channel in ["lobby", "news:today"] {
        let err = gw.client.presence(channel).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{channel}");
        let err = gw.client.presence_stats(channel).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{channel}");
    }
    let err = gw.client.presence("bad channel").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// A node of the cluster `prefix` that keeps presence for `chat:*`.
async fn cluster_node(prefix: &str) -> Gateway {
    node_with(&redis(), prefix, |c| {
        c.limits.reconnect_grace = Duration::from_secs(1);
        c.limits.namespaces = keep_presence("chat");
    })
    .await
}

/// `chat:room`'s presence through `gw`: `(connection id, user, info)`, sorted.
async fn listed(gw: &Gateway) -> Vec<(String, String, String)> {
    let mut members: Vec<_> = gw
        .client
        .presence("chat:room")
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.connection_id, m.user, m.info_json))
        .collect();
    members.sort();
    members
}

/// A node of the cluster `prefix` in a process of its own (to SIGKILL), keeping presence for
/// `chat:*` with reconnect grace `grace`; its config lives in the returned directory.
fn spawn_presence_node(
    prefix: &str,
    grace: &str,
) -> (std::process::Child, String, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("cg-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("channelgate.toml");
    std::fs::write(
        &config,
        format!("reconnect-grace = \"{grace}\"\n[namespaces.chat]\npresence = true\n"),
    )
    .unwrap();
    let (child, http, grpc) = spawn_node(prefix, &["--config", config.to_str().unwrap()]);
    (child, http, grpc, dir)
}

/// Credentials for `user` on `chat:room`, issued through the control plane at `grpc`.
async fn issue_for_at(grpc: &str, user: &str) -> Creds {
    channelgate::client::Client::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .issue_for(None, &["chat:room"], user, "")
        .await
        .unwrap()
        .into()
}

async fn presence_spans_nodes_and_a_sigkilled_nodes_connections_leave() {
    let prefix = unique_prefix("presence");
    let a = cluster_node(&prefix).await;
    let b = cluster_node(&prefix).await;
    let (mut doomed, http, grpc, dir) = spawn_presence_node(&prefix, "1s");
    let mut events = a
        .client
        .listen_presence(&["chat:room"], pb::PresenceEvents::Connection, false)
        .await
        .unwrap();
    // U on A and on B, V on the doomed node.
    let u1 = issue_for(&a, "u", r#"{"n":1}"#).await;
    let u2 = issue_for(&b, "u", "").await;
    let v = issue_for_at(&grpc, "v").await;
    let _ws_u1 = a.connect(&u1).await;
    let ws_u2 = b.connect(&u2).await;
    let _ws_v = connect_at(&http, &v).await;
    let mut joined = Vec::new();
    for _ in 0..3 {
        let e = next_event(&mut events).await;
        assert_eq!(e.presence(), pb::PresenceChange::Join, "{e:?}");
        joined.push(e.member.unwrap().connection_id);
    }
    joined.sort();
    let mut ids = vec![u1.id.clone(), u2.id.clone(), v.id.clone()];
    ids.sort();
    assert_eq!(joined, ids);
    for gw in [&a, &b] {
        assert_eq!(gw.client.presence_stats("chat:room").await.unwrap(), (3, 2));
        let users = listed(gw).await;
        let mut expected = vec![
            (u1.id.clone(), "u".to_owned(), r#"{"n":1}"#.to_owned()),
            (u2.id.clone(), "u".to_owned(), String::new()),
            (v.id.clone(), "v".to_owned(), String::new()),
        ];
        expected.sort();
        assert_eq!(users, expected);
    }
    // A drop resumed on the other node changes nothing.
    ws_u2.drop_unclean();
    let _ws_u2 = a.connect_once_free(&u2).await;
    assert_eq!(b.client.presence_stats("chat:room").await.unwrap(), (3, 2));

    // V's node dies: V leaves once its lease and grace passed (3 s + 1 s + a reaper pass).
    doomed.kill().unwrap();
    let killed = std::time::Instant::now();
    doomed.wait().unwrap();
    wait_until(|| async { a.client.presence_stats("chat:room").await.unwrap() == (2, 1) }).await;
    assert!(
        killed.elapsed() <= Duration::from_secs(7),
        "took {:?}",
        killed.elapsed()
    );
    let listed = b.client.presence("chat:room").await.unwrap();
    assert!(listed.iter().all(|m| m.user == "u"), "{listed:?}");
    // The Listen stream on A got V's leave next: nothing for U's resume before it.
    let e = next_event(&mut events).await;
    assert_eq!(e.presence(), pb::PresenceChange::Leave, "{e:?}");
    assert_eq!(
        (e.member.unwrap().connection_id, e.of_user),
        (v.id.clone(), true)
    );
    // Disconnect(user) through B: U leaves everywhere.
    b.client.disconnect_user("u", 0, "").await.unwrap();
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (0, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis that restarts empty loses presence with everything else; each node re-records its
/// live sockets when it reconnects, and their presence with them (a join event each).
#[tokio::test]
async fn presence_is_restored_after_redis_comes_back_empty() {
    let mut redis = PrivateRedis::start();
    let prefix = unique_prefix("presence-restore");
    let presence = |c: &mut channelgate::config::Config| {
        c.limits.namespaces = keep_presence("chat");
    };
    let a = node_with(&redis.url(), &prefix, presence).await;
    let b = node_with(&redis.url(), &prefix, presence).await;
    let (u, v) = (
        issue_for(&a, "u", r#"{"n":1}"#).await,
        issue_for(&b, "v", "").await,
    );
    let _ws_u = a.connect(&u).await;
    let _ws_v = b.connect(&v).await;
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (2, 2));

    let _redis = restart_empty(&mut redis, &[&a, &b]).await;
    wait_until(|| async { b.client.presence_stats("chat:room").await.ok() == Some((2, 2)) }).await;
    let listed = listed(&a).await;
    let mut expected = vec![
        (u.id.clone(), "u".to_owned(), r#"{"n":1}"#.to_owned()),
        (v.id.clone(), "v".to_owned(), String::new()),
    ];
    expected.sort();
    assert_eq!(listed, expected);
}

/// Presence is a lease: a SIGKILLed node's connections leave within 10 s of its last
/// heartbeat even with a long reconnect grace (their credentials stay resumable), and one that
/// resumes elsewhere joins again.
#[tokio::test]
async fn a_dead_nodes_connections_leave_presence_within_ten_seconds_and_rejoin_on_resume() {
    let prefix = unique_prefix("presence-lease");
    let a = node_with(REDIS, &prefix, |c| {
        c.limits.reconnect_grace = Duration::from_secs(30);
        c.limits.namespaces = keep_presence("chat");
    })
    .await;
    let (mut doomed, http, grpc, dir) = spawn_presence_node(&prefix, "30s");
    let mut events = a
        .client
        .listen_presence(&["chat:room"], pb::PresenceEvents::Connection, false)
        .await
        .unwrap();
    let v = issue_for_at(&grpc, "v").await;
    let _ws_v = connect_at(&http, &v).await;
    let e = next_event(&mut events).await;
    assert_eq!(
        (e.presence(), e.member.unwrap().connection_id),
        (pb::PresenceChange::Join, v.id.clone())
    );

    doomed.kill().unwrap();
    let killed = std::time::Instant::now();
    doomed.wait().unwrap();
    let e = next_event(&mut events).await;
    assert_eq!(
        (e.presence(), e.member.unwrap().connection_id),
        (pb::PresenceChange::Leave, v.id.clone())
    );
    assert!(
        killed.elapsed() <= Duration::from_secs(10),
        "left after {:?}",
        killed.elapsed()
    );
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (0, 0));

    // Its credentials are still within their grace: the resume on A joins again.
    let _ws_v = a.connect_once_free(&v).await;
    let e = next_event(&mut events).await;
    assert_eq!(
        (e.presence(), e.member.unwrap().connection_id),
        (pb::PresenceChange::Join, v.id.clone())
    );
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (1, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node that finds it was taken out of presence (it was silent: a stall, a partition) puts
/// its connections back with its next heartbeat.
#[tokio::test]
async fn a_node_that_lost_its_presence_while_silent_rejoins() {
    let prefix = unique_prefix("presence-back");
    let a = node_with(REDIS, &prefix, |c| {
        c.limits.namespaces = keep_presence("chat");
    })
    .await;
    let u = issue_for(&a, "u", "").await;
    let _ws = a.connect(&u).await;
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (1, 1));
    // What another node's reaper does to a silent node: its presence goes, and it is marked.
    let redis = redis::Client::open(REDIS).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let node: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:{{0}}:nodes"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(format!("{prefix}:{{0}}:ch:chat:room:pr"))
        .arg(format!("{prefix}:{{0}}:ch:chat:room:pu"))
        .ignore()
        .cmd("ZADD")
        .arg(format!("{prefix}:{{0}}:presence-gone"))
        .arg(1)
        .arg(&node[0])
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(a.client.presence_stats("chat:room").await.unwrap(), (0, 0));
    wait_until(|| async { a.client.presence_stats("chat:room").await.unwrap() == (1, 1) }).await;
}

crate::on_both!(presence_spans_nodes_and_a_sigkilled_nodes_connections_leave,);
