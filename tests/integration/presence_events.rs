//! Presence events: joins and leaves to `Listen` streams that ask (per connection or per user)
//! and to the sockets of a namespace with `join-leave`; `occupied` / `vacated` to `Listen`
//! streams and, as `$occupied` / `$vacated`, to `Handle` lifecycle groups, once per transition
//! and after the vacate delay. Each scenario runs on one node and across two nodes of one Redis.

use std::time::{Duration, Instant};

use channelgate::{
    config::{JoinLeave, NamespacePolicy, Namespaces},
    pb::{self, PresenceChange, PresenceEvents},
};
use serde_json::{json, Value};

use crate::{
    cluster::{node_with, redis, unique_prefix},
    handle::{join, Service},
    lifecycle::wait_advertised,
    support::{next_event, Creds, Gateway, Ws},
};

const VACATE_DELAY: Duration = Duration::from_secs(1);

/// `chat:*` keeps presence, tells every connection's joins and leaves to its sockets, and tells
/// occupancy with a one-second vacate delay.
fn chat() -> Namespaces {
    let policy = NamespacePolicy {
        presence: true,
        join_leave: JoinLeave::Connection,
        occupancy: Some(VACATE_DELAY),
        ..Default::default()
    };
    Namespaces([("chat".to_owned(), policy)].into())
}

async fn node(redis_prefix: Option<&str>) -> Gateway {
    let adjust = |c: &mut channelgate::config::Config| {
        c.limits.reconnect_grace = Duration::from_secs(30);
        c.limits.namespaces = chat();
    };
    match redis_prefix {
        Some(prefix) => node_with(&redis(), prefix, adjust).await,
        None => Gateway::start_with(adjust).await,
    }
}

async fn issue_for(gw: &Gateway, channel: &str, user: &str) -> Creds {
    gw.client
        .issue_for(None, &[channel], user, r#"{"tab":1}"#)
        .await
        .expect("IssueConnection")
        .into()
}

/// The next event of a `Listen` stream, which must be a presence event: what changed, the
/// connection id (empty for occupancy) and whether it was its user's first or last.
async fn change(events: &mut tonic::Streaming<pb::ListenEvent>) -> (PresenceChange, String, bool) {
    let e = next_event(events).await;
    let change = e.presence();
    (
        change,
        e.member.unwrap_or_default().connection_id,
        e.of_user,
    )
}

/// The next join or leave frame a socket got: `("join"|"leave", connection id, user, info)`.
async fn frame(ws: &mut Ws) -> (String, String, Value, Value) {
    let v = ws.recv_json().await;
    let kind = if v.get("join").is_some() {
        "join"
    } else {
        "leave"
    };
    let who = &v[kind];
    assert!(who.is_object(), "expected a join or leave frame, got {v}");
    (
        kind.to_owned(),
        who["connection_id"].as_str().unwrap().to_owned(),
        who["user"].clone(),
        who["info"].clone(),
    )
}

/// `a` and `b` may be one node, or two nodes of one cluster. User U has a socket on each, V one
/// on `b`.
async fn join_leave_scenario(a: &Gateway, b: &Gateway) {
    let room = "chat:room";
    let mut per_connection = a
        .client
        .listen_presence(&[room], PresenceEvents::Connection, false)
        .await
        .unwrap();
    let mut per_user = b
        .client
        .listen_presence(&[room], PresenceEvents::User, false)
        .await
        .unwrap();
    let (u1, u2, v) = (
        issue_for(a, room, "u").await,
        issue_for(b, room, "u").await,
        issue_for(b, room, "v").await,
    );
    let mut ws_u1 = a.connect(&u1).await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Join, u1.id.clone(), true)
    );
    let ws_u2 = b.connect(&u2).await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Join, u2.id.clone(), false)
    );
    let ws_v = b.connect(&v).await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Join, v.id.clone(), true)
    );
    // Per user: U's second tab is no join.
    assert_eq!(
        change(&mut per_user).await,
        (PresenceChange::Join, u1.id.clone(), true)
    );
    assert_eq!(
        change(&mut per_user).await,
        (PresenceChange::Join, v.id.clone(), true)
    );
    // The socket of the namespace sees the others join, with user and info.
    let tab = json!({"tab": 1});
    assert_eq!(
        frame(&mut ws_u1).await,
        ("join".into(), u2.id.clone(), json!("u"), tab.clone())
    );
    assert_eq!(
        frame(&mut ws_u1).await,
        ("join".into(), v.id.clone(), json!("v"), tab.clone())
    );

    // U's second socket drops and resumes (on the other node): no leave, no join anywhere.
    ws_u2.drop_unclean();
    let ws_u2 = a.connect_once_free(&u2).await;

    // V closes: its leave is the next event everywhere.
    ws_v.close().await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Leave, v.id.clone(), true)
    );
    assert_eq!(
        change(&mut per_user).await,
        (PresenceChange::Leave, v.id.clone(), true)
    );
    assert_eq!(
        frame(&mut ws_u1).await,
        ("leave".into(), v.id.clone(), json!("v"), tab.clone())
    );
    // U's first tab closes: a leave per connection, none per user; U's last (an Unsubscribe)
    // is U's leave.
    ws_u1.close().await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Leave, u1.id.clone(), false)
    );
    b.unsubscribe(&u2, &[room]).await;
    assert_eq!(
        change(&mut per_connection).await,
        (PresenceChange::Leave, u2.id.clone(), true)
    );
    assert_eq!(
        change(&mut per_user).await,
        (PresenceChange::Leave, u2.id.clone(), true)
    );
    drop(ws_u2);
}

/// The next `$occupied` / `$vacated` of a lifecycle group (skipping sockets' `$connect` and
/// `$disconnect`): its action and channel.
async fn occupancy(svc: &mut Service) -> (String, String) {
    loop {
        let m: pb::ClientMessage = svc.next().await;
        if m.action == "$occupied" || m.action == "$vacated" {
            assert_eq!((m.connection_id.as_str(), m.digest.as_str()), ("", ""));
            let detail: Value = serde_json::from_str(&m.json).unwrap();
            return (m.action, detail["channel"].as_str().unwrap().to_owned());
        }
    }
}

async fn occupancy_scenario(a: &Gateway, b: &Gateway, svc: &mut Service) {
    let room = "chat:occupancy";
    let mut listen = b
        .client
        .listen_presence(&[room], PresenceEvents::None, true)
        .await
        .unwrap();
    let occupied = ("$occupied".to_owned(), room.to_owned());
    let vacated = ("$vacated".to_owned(), room.to_owned());

    let first = issue_for(a, room, "u").await;
    let ws = a.connect(&first).await;
    assert_eq!(occupancy(svc).await, occupied);
    assert_eq!(change(&mut listen).await.0, PresenceChange::Occupied);
    // The last member leaves and another comes within the delay, on the other node: no flap.
    ws.close().await;
    let second = issue_for(b, room, "v").await;
    let ws = b.connect(&second).await;
    ws.close().await;
    let left = Instant::now();
    assert_eq!(occupancy(svc).await, vacated);
    assert!(
        left.elapsed() >= VACATE_DELAY,
        "vacated after {:?}, before the delay",
        left.elapsed()
    );
    assert_eq!(change(&mut listen).await.0, PresenceChange::Vacated);
    // Once per transition: the next event of both is the next occupied.
    let third = issue_for(a, room, "w").await;
    let _ws = a.connect(&third).await;
    assert_eq!(occupancy(svc).await, occupied);
    assert_eq!(change(&mut listen).await.0, PresenceChange::Occupied);
}

#[tokio::test]
async fn joins_and_leaves_reach_listeners_and_sockets_on_one_node() {
    let gw = node(None).await;
    join_leave_scenario(&gw, &gw).await;
}

async fn joins_and_leaves_reach_listeners_and_sockets_across_nodes() {
    let prefix = unique_prefix("joins");
    let a = node(Some(&prefix)).await;
    let b = node(Some(&prefix)).await;
    join_leave_scenario(&a, &b).await;
}

#[tokio::test]
async fn occupied_and_vacated_fire_once_per_transition_after_the_delay_on_one_node() {
    let gw = node(None).await;
    let mut svc = join(&gw, "occupancy", &[], true).await;
    occupancy_scenario(&gw, &gw, &mut svc).await;
}

async fn occupied_and_vacated_fire_once_per_transition_after_the_delay_across_nodes() {
    let prefix = unique_prefix("occupancy");
    let a = node(Some(&prefix)).await;
    let b = node(Some(&prefix)).await;
    // The group's one stream is on B; A's transitions cross over Redis.
    let mut svc = join(&b, "occupancy", &[], true).await;
    wait_advertised(&prefix, "occupancy").await;
    occupancy_scenario(&a, &b, &mut svc).await;
}

#[tokio::test]
async fn presence_events_on_channels_that_do_not_keep_them_are_failed_precondition() {
    let gw = Gateway::start_with(|c| {
        c.limits.namespaces = Namespaces(
            [(
                "feed".to_owned(),
                NamespacePolicy {
                    presence: true,
                    ..Default::default()
                },
            )]
            .into(),
        );
    })
    .await;
    for (channel, events, occupancy) in [
        ("lobby", PresenceEvents::Connection, false),
        ("news:1", PresenceEvents::User, false),
        ("feed:1", PresenceEvents::None, true),
    ] {
        let err = gw
            .client
            .listen_presence(&[channel], events, occupancy)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{channel}");
    }
    // Joins and leaves of a presence channel need no occupancy.
    gw.client
        .listen_presence(&["feed:1"], PresenceEvents::Connection, false)
        .await
        .unwrap();
    let mut bad = pb::ListenRequest {
        channels: vec!["feed:1".into()],
        ..Default::default()
    };
    bad.presence_events = 7;
    let err = gw.control().listen(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

crate::on_both!(
    joins_and_leaves_reach_listeners_and_sockets_across_nodes,
    occupied_and_vacated_fire_once_per_transition_after_the_delay_across_nodes,
);
