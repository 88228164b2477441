//! Lifecycle events: `$connect` says whether a socket resumed; every connection ends with
//! exactly one final `$disconnect` saying why, on one node, across nodes, and when the
//! socket's node is SIGKILLed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};

use crate::{
    cluster::{node_with, redis, spawn_node, unique_prefix},
    handle::{join, Service},
    support::{connect_at, wait_until, Creds, Gateway},
};
use channelgate::pb;

const GRACE: Duration = Duration::from_secs(1);

async fn gateway(redis_prefix: Option<&str>) -> Gateway {
    let grace = |c: &mut channelgate::config::Config| c.limits.reconnect_grace = GRACE;
    match redis_prefix {
        Some(prefix) => node_with(&redis(), prefix, grace).await,
        None => Gateway::start_with(grace).await,
    }
}

async fn issue_for(gw: &Gateway, user: &str) -> Creds {
    gw.client
        .issue_for(None, &["room"], user, "")
        .await
        .expect("IssueConnection")
        .into()
}

/// The next lifecycle event: its action, connection id and JSON.
async fn event(svc: &mut Service) -> (String, String, Value) {
    let m: pb::ClientMessage = svc.next().await;
    (
        m.action,
        m.connection_id,
        serde_json::from_str(&m.json).unwrap(),
    )
}

/// Connects a marker socket through `gw` and checks that its `$connect` is the group's next
/// event: nothing extra came before it.
async fn nothing_came_before_a_marker(gw: &Gateway, svc: &mut Service) {
    let marker = issue_for(gw, "marker").await;
    let _ws = gw.connect(&marker).await;
    assert_eq!(
        event(svc).await.1,
        marker.id,
        "no extra event came before this one"
    );
}

/// `a` and `b` may be one node, or two nodes of one cluster.
async fn lifecycle_scenario(a: &Gateway, b: &Gateway, svc: &mut Service) {
    // A clean close: $connect (fresh), then the final $disconnect, "client closed".
    let c1 = issue_for(a, "u").await;
    let ws = a.connect(&c1).await;
    assert_eq!(
        event(svc).await,
        (
            "$connect".into(),
            c1.id.clone(),
            json!({"resumed": false, "user": "u"})
        )
    );
    ws.close().await;
    let (action, id, detail) = event(svc).await;
    assert_eq!(
        (action.as_str(), id.as_str()),
        ("$disconnect", c1.id.as_str())
    );
    assert_eq!(detail["reason"], "client closed");
    assert_eq!(
        (detail["final"].clone(), detail["user"].clone()),
        (json!(true), json!("u"))
    );

    // Dropped, resumed within the grace (on the other node): no $disconnect between the two
    // $connects, and the second says resumed. Then the application ends it.
    let c2 = issue_for(a, "v").await;
    let ws = a.connect(&c2).await;
    assert_eq!(event(svc).await.2["resumed"], false);
    ws.drop_unclean();
    let ws = b.connect_once_free(&c2).await;
    assert_eq!(
        event(svc).await,
        (
            "$connect".into(),
            c2.id.clone(),
            json!({"resumed": true, "user": "v"})
        )
    );
    a.client
        .disconnect(&c2.digest, 4001, "kicked")
        .await
        .unwrap();
    let (action, id, detail) = event(svc).await;
    assert_eq!(
        (action.as_str(), id.as_str()),
        ("$disconnect", c2.id.as_str())
    );
    assert_eq!(detail["reason"], "disconnected by the application");
    assert_eq!(detail["code"], 4001);
    drop(ws);

    // Dropped and never back: the final $disconnect once the grace ran out, "grace expired".
    let c3 = issue_for(b, "w").await;
    let ws = b.connect(&c3).await;
    assert_eq!(event(svc).await.1, c3.id);
    let dropped = Instant::now();
    ws.drop_unclean();
    let (action, id, detail) = event(svc).await;
    assert_eq!(
        (action.as_str(), id.as_str()),
        ("$disconnect", c3.id.as_str())
    );
    assert_eq!(detail["reason"], "grace expired");
    assert!(dropped.elapsed() >= GRACE, "told before the grace ran out");
    assert_eq!(b.try_connect(&c3).await.err(), Some(403));

    // Dropped, and the application disconnects it while it is in its grace: told once, now.
    let c4 = issue_for(a, "x").await;
    let ws = a.connect(&c4).await;
    assert_eq!(event(svc).await.1, c4.id);
    ws.drop_unclean();
    a.wait_for_connections(0).await;
    b.client.disconnect(&c4.digest, 0, "").await.unwrap();
    let (action, id, detail) = event(svc).await;
    assert_eq!(
        (action.as_str(), id.as_str()),
        ("$disconnect", c4.id.as_str())
    );
    assert_eq!(detail["reason"], "disconnected by the application");

    // Nothing else comes: not a second $disconnect for any of them, even after every grace.
    tokio::time::sleep(GRACE * 3).await;
    nothing_came_before_a_marker(a, svc).await;
}

#[tokio::test]
async fn every_connection_ends_with_one_final_disconnect_on_one_node() {
    let gw = gateway(None).await;
    let mut svc = join(&gw, "lifecycle", &[], true).await;
    lifecycle_scenario(&gw, &gw, &mut svc).await;
}

async fn every_connection_ends_with_one_final_disconnect_across_nodes() {
    let prefix = unique_prefix("lifecycle");
    let a = gateway(Some(&prefix)).await;
    let b = gateway(Some(&prefix)).await;
    // The group's one stream is on A; events of sockets on B cross over Redis.
    let mut svc = join(&a, "lifecycle", &[], true).await;
    wait_advertised(&prefix, "lifecycle").await;
    lifecycle_scenario(&a, &b, &mut svc).await;
}

/// A client's own close frame ends its credentials: `$disconnect` says `client closed` and
/// carries the frame's code and reason (1005 and no reason for a close frame without a code).
async fn client_closes(a: &Gateway, svc: &mut Service) {
    for code in [Some(1000), Some(1001), Some(3000), Some(4001), None] {
        let creds = issue_for(a, "u").await;
        let mut ws = a.connect(&creds).await;
        assert_eq!(event(svc).await.1, creds.id);
        let frame = code.map(|code| CloseFrame {
            code: CloseCode::from(code),
            reason: format!("bye {code}").into(),
        });
        ws.ws.close(frame).await.expect("close");
        while let Some(Ok(_)) = ws.ws.next().await {}
        let (action, id, detail) = event(svc).await;
        assert_eq!(
            (action.as_str(), id.as_str()),
            ("$disconnect", creds.id.as_str())
        );
        assert_eq!(detail["reason"], "client closed", "{detail}");
        match code {
            Some(code) => {
                assert_eq!(detail["code"], code, "{detail}");
                assert_eq!(detail["close_reason"], format!("bye {code}"), "{detail}");
            }
            None => {
                assert_eq!(detail["code"], 1005, "{detail}");
                assert_eq!(detail["close_reason"], "", "{detail}");
            }
        }
    }
}

#[tokio::test]
async fn a_clients_close_frame_gives_disconnect_its_code_on_one_node() {
    let gw = gateway(None).await;
    let mut svc = join(&gw, "lifecycle", &[], true).await;
    client_closes(&gw, &mut svc).await;
}

async fn a_clients_close_frame_gives_disconnect_its_code_across_nodes() {
    let prefix = unique_prefix("close-code");
    let a = gateway(Some(&prefix)).await;
    let b = gateway(Some(&prefix)).await;
    let mut svc = join(&a, "lifecycle", &[], true).await;
    wait_advertised(&prefix, "lifecycle").await;
    client_closes(&b, &mut svc).await;
}

/// Waits until `group` is advertised in Redis as taking lifecycle events (every node reads
/// the advertisement when it offers an event), so no event is lost to a race with it.
pub async fn wait_advertised(prefix: &str, group: &str) {
    let key = crate::cluster::key(prefix, "$lifecycle", "act:$lifecycle");
    wait_until(|| {
        let key = key.clone();
        async move {
            let until: Option<f64> =
                crate::cluster::query(redis::cmd("ZSCORE").arg(&key).arg(group)).await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as f64;
            until.is_some_and(|u| u > now + 1000.0)
        }
    })
    .await;
}

async fn a_sigkilled_nodes_sockets_end_with_node_lost_once_the_grace_passed() {
    let prefix = unique_prefix("node-lost");
    let (mut doomed, http, grpc) = spawn_node(&prefix, &["--reconnect-grace", "1s"]);
    let survivor = gateway(Some(&prefix)).await;
    let mut svc = join(&survivor, "lifecycle", &[], true).await;
    let client = channelgate::client::Client::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    wait_advertised(&prefix, "lifecycle").await;
    let creds: Creds = client
        .issue_for(None, &["room"], "v", "")
        .await
        .unwrap()
        .into();
    let _ws = connect_at(&http, &creds).await;
    assert_eq!(
        event(&mut svc).await,
        (
            "$connect".into(),
            creds.id.clone(),
            json!({"resumed": false, "user": "v"})
        )
    );
    doomed.kill().unwrap();
    let killed = Instant::now();
    doomed.wait().unwrap();
    let (action, id, detail) = event(&mut svc).await;
    let took = killed.elapsed();
    assert_eq!(
        (action.as_str(), id.as_str()),
        ("$disconnect", creds.id.as_str())
    );
    assert_eq!(detail["reason"], "node lost");
    assert_eq!(detail["user"], "v");
    // Lease (3 s) + grace (1 s) + one reaper pass (1 s), after the last heartbeat.
    assert!(took <= Duration::from_secs(7), "took {took:?}");
    assert_eq!(survivor.try_connect(&creds).await.err(), Some(403));
    assert_eq!(
        survivor.client.send_user("v", "direct", "1").await.unwrap(),
        0
    );
}

/// Takes the next new entry of `stream` for `group` as a consumer that then dies: it stays
/// pending on that consumer, never acknowledged. The entry is added and taken in one `MULTI`,
/// so no live node reads it first.
async fn add_and_take_as_a_dead_consumer(stream: &str, group: &str, fields: &[(&str, &str)]) {
    let mut conn = crate::cluster::Conn::open().await;
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM");
    let _: Result<(), _> = conn.cmd(&create).await;
    let mut add = redis::cmd("XADD");
    add.arg(stream).arg("*");
    for (k, v) in fields {
        add.arg(*k).arg(*v);
    }
    let mut take = redis::pipe();
    take.atomic()
        .add_command(add)
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("dead-node")
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    let (_, taken): (String, redis::streams::StreamReadReply) = conn.pipe(&take).await.unwrap();
    assert_eq!(
        taken.keys[0].ids.len(),
        1,
        "the dead consumer took the entry"
    );
}

/// A node that wrote nothing wrong but died after taking an event from the outbox, before
/// relaying it: another node claims it and the lifecycle group still gets it, once.
async fn an_event_a_dead_node_took_from_the_outbox_is_relayed_by_another() {
    let prefix = unique_prefix("outbox-claim");
    let a = gateway(Some(&prefix)).await;
    let mut svc = join(&a, "lifecycle", &[], true).await;
    wait_advertised(&prefix, "lifecycle").await;
    let digest = "ab".repeat(32);
    let taken = Instant::now();
    add_and_take_as_a_dead_consumer(
        &crate::cluster::key(&prefix, "any", "out"),
        "relay",
        &[
            ("cid", "orphan-id"),
            ("digest", &digest),
            ("action", "$disconnect"),
            ("json", r#"{"reason":"node lost","final":true,"user":null}"#),
        ],
    )
    .await;
    let (action, id, detail) = event(&mut svc).await;
    assert_eq!((action.as_str(), id.as_str()), ("$disconnect", "orphan-id"));
    assert_eq!(detail["reason"], "node lost");
    assert!(
        taken.elapsed() >= Duration::from_secs(5),
        "claimed before it was idle: {:?}",
        taken.elapsed()
    );
    // Once: the next event is a marker's.
    nothing_came_before_a_marker(&a, &mut svc).await;
}

/// A node of a `Handle` group that took a lifecycle event from the group's queue and died
/// before handing it to its stream: another node of the group claims it for its stream.
async fn a_lifecycle_event_a_dead_group_member_took_reaches_another_member() {
    let prefix = unique_prefix("queue-claim");
    let a = gateway(Some(&prefix)).await;
    let mut svc = join(&a, "lifecycle", &[], true).await;
    wait_advertised(&prefix, "lifecycle").await;
    let digest = "cd".repeat(32);
    add_and_take_as_a_dead_consumer(
        &crate::cluster::key(&prefix, "lifecycle", "q:lifecycle"),
        "handlers",
        &[
            ("origin", "dead-node"),
            ("rid", "0"),
            ("cid", "orphan-id"),
            ("digest", &digest),
            ("action", "$disconnect"),
            ("id", ""),
            (
                "json",
                r#"{"reason":"grace expired","final":true,"user":"u"}"#,
            ),
        ],
    )
    .await;
    let (action, id, detail) = event(&mut svc).await;
    assert_eq!((action.as_str(), id.as_str()), ("$disconnect", "orphan-id"));
    assert_eq!(detail["user"], "u");
    nothing_came_before_a_marker(&a, &mut svc).await;
}

crate::on_both!(
    a_clients_close_frame_gives_disconnect_its_code_across_nodes,
    a_lifecycle_event_a_dead_group_member_took_reaches_another_member,
    an_event_a_dead_node_took_from_the_outbox_is_relayed_by_another,
    every_connection_ends_with_one_final_disconnect_across_nodes,
    a_sigkilled_nodes_sockets_end_with_node_lost_once_the_grace_passed,
);
