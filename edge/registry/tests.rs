//! Unit tests of the registry's rooms together, without sockets.

use crate::clock::now_ms;
use std::{collections::HashMap, time::Duration};

use super::*;
use crate::{
    credentials::Credentials, domain::Position, error::Close, fanout::Drained, protocol::Recover,
};

fn registry() -> Registry {
    Registry::new(
        Secrets::new(b"registry test secret 0123456789", None).unwrap(),
        Limits::default(),
        Arc::default(),
    )
}

fn ch(name: &str) -> Channel {
    Channel::new(name).unwrap()
}

fn connect(r: &Registry, c: &Credentials) -> Arc<Conn> {
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    r.attach(&v, "id", None).unwrap()
}

/// Pushes `json` to `channel`; returns the sockets it was queued to.
fn push(r: &Registry, channel: &str, json: &str) -> u64 {
    r.push(&[ch(channel)], &Json::parse(json).unwrap(), None)
        .unwrap()
        .queued
}

async fn frames(conn: &Conn) -> Vec<String> {
    match conn.outbox.next().await {
        Drained::Frames(f) => f.iter().map(|f| f.to_string()).collect(),
        Drained::Close(c) => panic!("closed: {c:?}"),
    }
}

#[tokio::test]
async fn subscriptions_made_before_connect_apply_on_connect() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    assert!(!r.subscribe(&c.digest, &[ch("a"), ch("b")]).unwrap());
    let conn = connect(&r, &c);
    assert_eq!(push(&r, "b", "1"), 1);
    assert_eq!(
        frames(&conn).await,
        [r#"{"channel":"b","offset":1,"payload":1}"#]
    );
}

#[tokio::test]
async fn fan_out_counts_every_subscriber_in_the_backlog_until_written() {
    let r = registry();
    let conns: Vec<_> = (0..3)
        .map(|_| {
            let c = r.issue(None, None).unwrap();
            r.subscribe(&c.digest, &[ch("a")]).unwrap();
            connect(&r, &c)
        })
        .collect();
    assert_eq!(push(&r, "a", "1"), 3);
    let len = r#"{"channel":"a","offset":1,"payload":1}"#.len();
    assert_eq!(r.backlog().bytes(), 3 * len);
    for conn in &conns {
        frames(conn).await; // taken and settled, as a writer does
    }
    assert_eq!(r.backlog().bytes(), 0);
}

#[test]
fn ids_are_single_use() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let conn = r.attach(&v, "id", None).unwrap();
    assert_eq!(
        r.attach(&v, "id", None).unwrap_err(),
        AttachRefusal::AlreadyLive
    );
    r.detach(&conn, Ending::Final);
    assert_eq!(r.attach(&v, "id", None).unwrap_err(), AttachRefusal::Ended);
    assert!(matches!(
        r.subscribe(&c.digest, &[ch("a")]),
        Err(Error::UnknownDigest)
    ));
}

#[test]
fn resumable_drop_keeps_subscriptions_within_grace() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let conn = connect(&r, &c);
    r.detach(&conn, Ending::Resumable);
    assert_eq!(r.stats(false, &[]).connections, 0);
    assert_eq!(push(&r, "a", "1"), 0);
    let again = connect(&r, &c);
    assert_eq!(push(&r, "a", "1"), 1);
    // The old socket's late detach must not end the new one.
    r.detach(&conn, Ending::Final);
    assert_eq!(r.stats(false, &[]).connections, 1);
    drop(again);
}

#[test]
fn disconnect_ends_credentials_and_closes_outbox() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let conn = connect(&r, &c);
    let close = Close::Application {
        code: 4001,
        reason: "bye".into(),
    };
    assert!(r.disconnect(&c.digest, close).unwrap());
    assert!(conn.outbox.is_closed());
    assert_eq!(push(&r, "a", "1"), 0);
    r.detach(&conn, Ending::Resumable);
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    assert_eq!(r.attach(&v, "id", None).unwrap_err(), AttachRefusal::Ended);
    let s = r.stats(true, &[]);
    assert_eq!((s.connections, s.channels, s.subscriptions), (0, 0, 0));
}

#[test]
fn expired_credentials_are_refused() {
    let r = registry();
    let secrets = Secrets::new(b"registry test secret 0123456789", None).unwrap();
    let c = secrets.issue(now_ms() - 1);
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    assert_eq!(
        r.attach(&v, "id", None).unwrap_err(),
        AttachRefusal::Expired
    );
}

#[test]
fn an_id_this_registry_never_recorded_is_refused() {
    // Signed with the deployment's secret, but issued before this node (re)started: whether it
    // was used cannot be known, so it is refused, never reopened.
    let r = registry();
    let secrets = Secrets::new(b"registry test secret 0123456789", None).unwrap();
    let c = secrets.issue(now_ms() + 60_000);
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    assert_eq!(
        r.attach(&v, "id", None).unwrap_err(),
        AttachRefusal::Unknown
    );
}

#[test]
fn invalid_calls_are_refused() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    assert!(matches!(
        r.subscribe(&c.digest, &[]),
        Err(Error::NoChannels)
    ));
    assert!(matches!(r.check_payload("{"), Err(Error::BadJson(_))));
    let other: Digest = "00".repeat(32).parse().unwrap();
    assert!(matches!(
        r.subscribe(&other, &[ch("a")]),
        Err(Error::UnknownDigest)
    ));
    assert!(matches!(
        r.issue(Some(Duration::ZERO), None),
        Err(Error::BadTtl { .. })
    ));
}

#[test]
fn stats_count_what_is_held() {
    let r = registry();
    let a = r.issue(None, None).unwrap();
    let b = r.issue(None, None).unwrap();
    r.subscribe(&a.digest, &[ch("x"), ch("y")]).unwrap();
    r.subscribe(&b.digest, &[ch("x")]).unwrap();
    let _conn = connect(&r, &a);
    let s = r.stats(true, &[ch("x"), ch("z")]);
    assert_eq!(s.connections, 1);
    assert_eq!(s.channels, 2);
    assert_eq!(s.subscriptions, 3);
    assert_eq!(s.sessions, 2);
    assert_eq!(s.per_channel, [("x".to_string(), 1), ("z".to_string(), 0)]);
}

#[test]
fn the_live_count_follows_every_transition() {
    let r = registry();
    let live = |r: &Registry| r.stats(false, &[]).connections;
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let first = r.attach(&v, "id", None).unwrap();
    assert_eq!(live(&r), 1);
    // The cluster hands the id to a new socket here: the old one is closed, still one live.
    let second = r.attach_accepted(
        &v,
        "id",
        vec![ch("a"), ch("b")],
        None,
        None,
        &HashMap::new(),
        false,
    );
    assert!(first.outbox.is_closed());
    assert_eq!(live(&r), 1);
    assert_eq!(push(&r, "b", "1"), 1);
    // A late detach of the replaced socket changes nothing.
    r.detach(&first, Ending::Resumable);
    assert_eq!(live(&r), 1);
    r.detach(&second, Ending::Resumable);
    assert_eq!(live(&r), 0);
    let third = r.attach(&v, "id", None).unwrap();
    assert_eq!(live(&r), 1);
    assert!(r.disconnect(&c.digest, Close::GoingAway).unwrap());
    assert_eq!(live(&r), 0);
    // Disconnecting again finds nothing, and counts nothing.
    assert!(r.disconnect(&c.digest, Close::GoingAway).is_err());
    r.detach(&third, Ending::Final);
    assert_eq!(live(&r), 0);
    let s = r.stats(false, &[]);
    assert_eq!((s.channels, s.subscriptions), (0, 0));
}

fn recover_from(entries: &[(&str, &Position)]) -> Recover {
    Recover::of(entries.iter().map(|(c, p)| (ch(c), (*p).clone())).collect())
}

fn json(frame: &str) -> serde_json::Value {
    serde_json::from_str(frame).unwrap()
}

#[tokio::test]
async fn a_resumed_socket_gets_exactly_what_it_missed_then_live_pushes() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a"), ch("b")]).unwrap();
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let conn = r.attach(&v, "id", Some(&Recover::default())).unwrap();
    let first = frames(&conn).await;
    let connected = json(&first[0]);
    assert_eq!(connected["connected"]["resumed"], false);
    let epoch = connected["connected"]["channels"]["a"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(connected["connected"]["channels"]["a"]["offset"], 0);
    for i in 1..=3 {
        push(&r, "a", &i.to_string());
    }
    assert_eq!(frames(&conn).await.len(), 3);
    r.detach(&conn, Ending::Resumable);
    for i in 4..=6 {
        push(&r, "a", &i.to_string());
    }
    let seen = Position {
        epoch: epoch.as_str().into(),
        offset: 3,
    };
    let again = r
        .attach(&v, "id", Some(&recover_from(&[("a", &seen)])))
        .unwrap();
    push(&r, "a", "7");
    let got: Vec<_> = frames(&again).await.iter().map(|f| json(f)).collect();
    assert_eq!(got[0]["connected"]["resumed"], true);
    assert_eq!(got[0]["connected"]["channels"]["a"]["recovered"], true);
    assert_eq!(
        got[0]["connected"]["channels"]["a"]["offset"], 3,
        "continues from what it saw"
    );
    assert!(
        got[0]["connected"]["channels"]["b"]["recovered"].is_null(),
        "not asked"
    );
    let offsets: Vec<_> = got[1..]
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 5, 6, 7]);
}

#[tokio::test]
async fn history_that_does_not_reach_back_means_a_gap_and_no_replay() {
    let limits = Limits {
        history_size: 2,
        ..Limits::default()
    };
    let r = Registry::new(
        Secrets::new(b"registry test secret 0123456789", None).unwrap(),
        limits,
        Arc::default(),
    );
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    for i in 1..=5 {
        push(&r, "a", &i.to_string());
    }
    let epoch = r.position(&ch("a")).unwrap().epoch;
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let stale = Position {
        epoch: epoch.clone(),
        offset: 1,
    };
    let conn = r
        .attach(&v, "id", Some(&recover_from(&[("a", &stale)])))
        .unwrap();
    let got = frames(&conn).await;
    assert_eq!(got.len(), 1, "no partial replay: {got:?}");
    let a = &json(&got[0])["connected"]["channels"]["a"];
    assert_eq!(
        (a["recovered"].as_bool(), a["offset"].as_u64()),
        (Some(false), Some(5))
    );
    r.detach(&conn, Ending::Resumable);
    let old_epoch = Position {
        epoch: "0123456789abcdef".into(),
        offset: 5,
    };
    let conn = r
        .attach(&v, "id", Some(&recover_from(&[("a", &old_epoch)])))
        .unwrap();
    let a = json(&frames(&conn).await[0]);
    assert_eq!(a["connected"]["channels"]["a"]["recovered"], false);
    assert_eq!(a["connected"]["channels"]["a"]["epoch"], &*epoch);
}

#[test]
fn an_idempotent_push_is_taken_once() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let _conn = connect(&r, &c);
    let payload = Json::parse("1").unwrap();
    let first = r.push(&[ch("a"), ch("b")], &payload, Some("k-1")).unwrap();
    let retry = r.push(&[ch("a"), ch("b")], &payload, Some("k-1")).unwrap();
    assert_eq!(first.queued, 1);
    assert_eq!(retry.queued, 0, "a retry is not delivered again");
    assert_eq!(first.positions, retry.positions);
    let other = r.push(&[ch("a")], &payload, Some("k-2")).unwrap();
    assert_eq!(other.positions[0].1.offset, 2);
}

#[tokio::test]
async fn a_listener_from_a_position_replays_then_streams_live() {
    let r = registry();
    for i in 1..=3 {
        push(&r, "a", &i.to_string());
    }
    let at = Position {
        offset: 1,
        ..r.position(&ch("a")).unwrap()
    };
    let since: HashMap<Channel, Position> = [(ch("a"), at.clone())].into();
    let mut listener = r
        .listen(&[ch("a")], &since, &HashMap::new(), Default::default())
        .unwrap();
    push(&r, "a", "4");
    let mut got = Vec::new();
    for _ in 0..3 {
        let event = listener.recv().await.unwrap();
        got.push((event.position.offset, event.json().unwrap().to_owned()));
    }
    assert_eq!(got, [(2, "2".into()), (3, "3".into()), (4, "4".into())]);
    let gone = Position {
        epoch: "elsewhere".into(),
        offset: 1,
    };
    let since: HashMap<Channel, Position> = [(ch("a"), gone)].into();
    let mut listener = r
        .listen(&[ch("a")], &since, &HashMap::new(), Default::default())
        .unwrap();
    let event = listener.recv().await.unwrap();
    assert!(event.is_gap());
    assert_eq!(event.position.offset, 4);
}

#[test]
fn unused_channels_are_forgotten_after_their_position_expires() {
    let limits = Limits {
        position_ttl: Duration::ZERO,
        history_ttl: Duration::ZERO,
        ..Limits::default()
    };
    let r = Registry::new(
        Secrets::new(b"registry test secret 0123456789", None).unwrap(),
        limits,
        Arc::default(),
    );
    push(&r, "a", "1");
    assert_eq!(r.history_bytes(), 0, "a ttl of 0 keeps nothing");
    r.sweep_channels();
    assert_eq!(
        r.position(&ch("a")).unwrap().offset,
        0,
        "a new epoch starts over"
    );
}

// Timed behaviour on paused time: the registry reads tokio's clock (`crate::clock`), so these
// move an hour or a grace in no time and check both sides of each deadline to the millisecond.

fn registry_with(limits: Limits) -> Registry {
    Registry::new(
        Secrets::new(b"registry test secret 0123456789", None).unwrap(),
        limits,
        Arc::default(),
    )
}

async fn advance(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn credentials_are_good_until_their_ttl_and_refused_after() {
    let r = registry();
    let early = r.issue(Some(Duration::from_secs(3600)), None).unwrap();
    let late = r.issue(Some(Duration::from_secs(3600)), None).unwrap();
    advance(3_600_000 - 20).await;
    connect(&r, &early);
    advance(40).await;
    let v = r.verify(&late.connection_id, &late.socket_key).unwrap();
    assert_eq!(
        r.attach(&v, "id", None).unwrap_err(),
        AttachRefusal::Expired
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_socket_resumes_within_the_grace_and_ends_once_after_it() {
    let grace = Duration::from_secs(30);
    let r = registry_with(Limits {
        reconnect_grace: grace,
        ..Limits::default()
    });
    let mut lifecycle = r.take_lifecycle().unwrap();
    let (inside, outside) = (r.issue(None, None).unwrap(), r.issue(None, None).unwrap());
    for c in [&inside, &outside] {
        r.subscribe(&c.digest, &[ch("a")]).unwrap();
        let conn = connect(&r, c);
        r.detach(&conn, Ending::Resumable);
    }
    advance(30_000 - 20).await;
    r.sweep();
    let resumed = connect(&r, &inside);
    advance(40).await;
    r.sweep();
    let v = r
        .verify(&outside.connection_id, &outside.socket_key)
        .unwrap();
    assert_eq!(r.attach(&v, "id", None).unwrap_err(), AttachRefusal::Ended);
    match lifecycle.try_recv() {
        Ok(Lifecycle::Ended(ended)) => {
            assert_eq!(
                (ended.digest, ended.reason),
                (outside.digest, EndReason::GraceExpired)
            )
        }
        other => panic!("expected the grace's end, got {other:?}"),
    }
    assert!(lifecycle.try_recv().is_err(), "told once");
    assert_eq!(
        push(&r, "a", "1"),
        1,
        "the resumed socket keeps its subscription"
    );
    drop(resumed);
}

#[tokio::test(start_paused = true)]
async fn a_socket_silent_past_the_idle_timeout_is_closed_and_one_heard_from_is_pinged() {
    let idle = Duration::from_secs(60);
    let r = registry();
    let (quiet, chatty) = (r.issue(None, None).unwrap(), r.issue(None, None).unwrap());
    let (quiet, chatty) = (connect(&r, &quiet), connect(&r, &chatty));
    advance(60_000).await;
    r.heartbeat(0, 1, idle);
    assert!(
        !quiet.outbox.is_closed(),
        "exactly the timeout is not past it"
    );
    chatty.touch();
    advance(10).await;
    r.heartbeat(0, 1, idle);
    assert!(matches!(
        quiet.outbox.next().await,
        Drained::Close(Close::IdleTimeout)
    ));
    assert!(!chatty.outbox.is_closed());
}

#[tokio::test(start_paused = true)]
async fn vacated_is_told_after_the_vacate_delay_unless_a_member_comes_back() {
    let delay = Duration::from_secs(5);
    let policy = crate::config::NamespacePolicy {
        presence: true,
        occupancy: Some(delay),
        ..Default::default()
    };
    let r = registry_with(Limits {
        namespaces: crate::config::Namespaces([("room".to_owned(), policy)].into()),
        ..Limits::default()
    });
    let mut lifecycle = r.take_lifecycle().unwrap();
    let occupancy = |lifecycle: &mut tokio::sync::mpsc::Receiver<Lifecycle>| {
        let mut told = Vec::new();
        while let Ok(event) = lifecycle.try_recv() {
            if let Lifecycle::Occupancy { channel, occupied } = event {
                told.push((channel.to_string(), occupied));
            }
        }
        told
    };
    let members: Vec<_> = ["room:back", "room:gone"]
        .iter()
        .map(|channel| {
            let c = r.issue(None, None).unwrap();
            r.subscribe(&c.digest, &[ch(channel)]).unwrap();
            (c.clone(), *channel, connect(&r, &c))
        })
        .collect();
    assert_eq!(
        occupancy(&mut lifecycle),
        [("room:back".into(), true), ("room:gone".into(), true)]
    );
    for (c, channel, _) in &members {
        r.unsubscribe(&c.digest, &[ch(channel)]).unwrap();
    }
    advance(4_990).await;
    r.sweep();
    assert_eq!(occupancy(&mut lifecycle), []);
    r.subscribe(&members[0].0.digest, &[ch("room:back")])
        .unwrap();
    advance(20).await;
    r.sweep();
    assert_eq!(occupancy(&mut lifecycle), [("room:gone".into(), false)]);
}

#[tokio::test]
async fn a_client_whose_positions_are_lost_gets_a_gap_on_every_channel_and_no_replay() {
    let r = registry();
    let c = r.issue(None, None).unwrap();
    r.subscribe(&c.digest, &[ch("a"), ch("b")]).unwrap();
    push(&r, "a", "1");
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let conn = r.attach(&v, "id", Some(&Recover::lost())).unwrap();
    let first = frames(&conn).await;
    assert_eq!(first.len(), 1, "the connected frame alone: {first:?}");
    let connected = json(&first[0]);
    for channel in ["a", "b"] {
        assert_eq!(
            connected["connected"]["channels"][channel]["recovered"], false,
            "{connected}"
        );
    }
    assert_eq!(connected["connected"]["channels"]["a"]["offset"], 1);
}
