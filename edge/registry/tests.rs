//! Unit tests of the registry's rooms together, without sockets.

use std::time::Duration;

use super::*;
use crate::{credentials::Credentials, error::Close, fanout::Batch};

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
    r.attach(&v).unwrap()
}

async fn frames(conn: &Conn) -> Vec<String> {
    match conn.outbox.next().await {
        Batch::Frames(f) => f.iter().map(|f| f.to_string()).collect(),
        Batch::Close(c) => panic!("closed: {c:?}"),
    }
}

#[tokio::test]
async fn subscriptions_made_before_connect_apply_on_connect() {
    let r = registry();
    let c = r.issue(None).unwrap();
    assert!(!r.subscribe(&c.digest, &[ch("a"), ch("b")]).unwrap());
    let conn = connect(&r, &c);
    assert_eq!(r.push(&[ch("b")], "1").unwrap(), 1);
    assert_eq!(frames(&conn).await, [r#"{"channel":"b","payload":1}"#]);
}

#[tokio::test]
async fn fan_out_counts_every_subscriber_in_the_backlog_until_written() {
    let r = registry();
    let conns: Vec<_> = (0..3)
        .map(|_| {
            let c = r.issue(None).unwrap();
            r.subscribe(&c.digest, &[ch("a")]).unwrap();
            connect(&r, &c)
        })
        .collect();
    assert_eq!(r.push(&[ch("a")], "1").unwrap(), 3);
    let len = r#"{"channel":"a","payload":1}"#.len();
    assert_eq!(r.backlog().bytes(), 3 * len);
    for conn in &conns {
        frames(conn).await; // taken and settled, as a writer does
    }
    assert_eq!(r.backlog().bytes(), 0);
}

#[test]
fn ids_are_single_use() {
    let r = registry();
    let c = r.issue(None).unwrap();
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let conn = r.attach(&v).unwrap();
    assert_eq!(r.attach(&v).unwrap_err(), Refusal::AlreadyLive);
    r.detach(&conn, Ending::Final);
    assert_eq!(r.attach(&v).unwrap_err(), Refusal::Ended);
    assert!(matches!(
        r.subscribe(&c.digest, &[ch("a")]),
        Err(Error::UnknownDigest)
    ));
}

#[test]
fn resumable_drop_keeps_subscriptions_within_grace() {
    let r = registry();
    let c = r.issue(None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let conn = connect(&r, &c);
    r.detach(&conn, Ending::Resumable);
    assert_eq!(r.stats(false, &[]).connections, 0);
    assert_eq!(r.push(&[ch("a")], "1").unwrap(), 0);
    let again = connect(&r, &c);
    assert_eq!(r.push(&[ch("a")], "1").unwrap(), 1);
    // The old socket's late detach must not end the new one.
    r.detach(&conn, Ending::Final);
    assert_eq!(r.stats(false, &[]).connections, 1);
    drop(again);
}

#[test]
fn disconnect_ends_credentials_and_closes_outbox() {
    let r = registry();
    let c = r.issue(None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let conn = connect(&r, &c);
    let close = Close::Application {
        code: 4001,
        reason: "bye".into(),
    };
    assert!(r.disconnect(&c.digest, close).unwrap());
    assert!(conn.outbox.is_closed());
    assert_eq!(r.push(&[ch("a")], "1").unwrap(), 0);
    r.detach(&conn, Ending::Resumable);
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    assert_eq!(r.attach(&v).unwrap_err(), Refusal::Ended);
    let s = r.stats(true, &[]);
    assert_eq!((s.connections, s.channels, s.subscriptions), (0, 0, 0));
}

#[test]
fn expired_credentials_are_refused() {
    let r = registry();
    let secrets = Secrets::new(b"registry test secret 0123456789", None).unwrap();
    let c = secrets.issue(now_ms() - 1);
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    assert_eq!(r.attach(&v).unwrap_err(), Refusal::Expired);
}

#[test]
fn invalid_calls_are_refused() {
    let r = registry();
    let c = r.issue(None).unwrap();
    assert!(matches!(
        r.subscribe(&c.digest, &[]),
        Err(Error::NoChannels)
    ));
    assert!(matches!(r.push(&[ch("a")], "{"), Err(Error::BadJson(_))));
    let other: Digest = "00".repeat(32).parse().unwrap();
    assert!(matches!(
        r.subscribe(&other, &[ch("a")]),
        Err(Error::UnknownDigest)
    ));
    assert!(matches!(
        r.issue(Some(Duration::ZERO)),
        Err(Error::BadTtl { .. })
    ));
}

#[test]
fn stats_count_what_is_held() {
    let r = registry();
    let a = r.issue(None).unwrap();
    let b = r.issue(None).unwrap();
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
    let c = r.issue(None).unwrap();
    r.subscribe(&c.digest, &[ch("a")]).unwrap();
    let v = r.verify(&c.connection_id, &c.socket_key).unwrap();
    let first = r.attach(&v).unwrap();
    assert_eq!(live(&r), 1);
    // The cluster hands the id to a new socket here: the old one is closed, still one live.
    let second = r.attach_accepted(&v, vec![ch("a"), ch("b")]);
    assert!(first.outbox.is_closed());
    assert_eq!(live(&r), 1);
    assert_eq!(r.push(&[ch("b")], "1").unwrap(), 1);
    // A late detach of the replaced socket changes nothing.
    r.detach(&first, Ending::Resumable);
    assert_eq!(live(&r), 1);
    r.detach(&second, Ending::Resumable);
    assert_eq!(live(&r), 0);
    let third = r.attach(&v).unwrap();
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
