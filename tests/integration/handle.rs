//! `Handle` and `Listen` streams with real gRPC clients.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::support::{Gateway, PATIENCE};
use channelgate::pb::{self, handle_request::Kind};

/// A `Handle` stream: the sender of replies and the stream of client messages.
pub struct Service {
    pub tx: mpsc::Sender<pb::HandleRequest>,
    pub rx: Streaming<pb::ClientMessage>,
}

/// The first message of a `Handle` stream.
fn register(group: &str, actions: &[&str], lifecycle: bool) -> pb::HandleRequest {
    pb::HandleRequest {
        kind: Some(Kind::Register(pb::Register {
            group: group.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            lifecycle_events: lifecycle,
        })),
    }
}

pub async fn join(gw: &Gateway, group: &str, actions: &[&str], lifecycle: bool) -> Service {
    let (tx, rx) = mpsc::channel(64);
    tx.send(register(group, actions, lifecycle)).await.unwrap();
    let rx = gw
        .control()
        .handle(ReceiverStream::new(rx))
        .await
        .expect("Handle accepted")
        .into_inner();
    Service { tx, rx }
}

impl Service {
    pub async fn next(&mut self) -> pb::ClientMessage {
        tokio::time::timeout(PATIENCE, self.rx.message())
            .await
            .expect("a client message in time")
            .expect("stream healthy")
            .expect("stream open")
    }

    pub async fn reply(&self, delivery_id: u64, status: u32, body_json: &str) {
        self.tx
            .send(pb::HandleRequest {
                kind: Some(Kind::Reply(pb::Reply {
                    delivery_id,
                    status,
                    headers: [("x-by".to_string(), "service".to_string())].into(),
                    body_json: body_json.into(),
                })),
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_reply_reaches_only_the_calling_socket() {
    let gw = Gateway::start().await;
    let mut svc = join(&gw, "app", &["chat.say"], false).await;
    let (caller_creds, mut caller) = gw.subscriber(&["room"]).await;
    let (_, mut other) = gw.subscriber(&["room"]).await;
    caller
        .send_text(r#"{"action":"chat.say","id":7,"text":"hi"}"#)
        .await;
    let m = svc.next().await;
    assert_eq!(m.action, "chat.say");
    assert_eq!(m.id, "7");
    assert_eq!(m.digest, caller_creds.digest);
    assert_eq!(m.connection_id, caller_creds.id);
    let sent: serde_json::Value = serde_json::from_str(&m.json).unwrap();
    assert_eq!(sent["text"], "hi");
    svc.reply(m.delivery_id, 201, r#"{"ok":true}"#).await;
    assert_eq!(
        caller.recv_json().await,
        json!({"id":7,"status":201,"headers":{"x-by":"service"},"body":{"ok":true}})
    );
    // The other socket got nothing: its next frame is this push.
    gw.push("room", "1").await;
    assert_eq!(other.recv_push().await.1, 1);
}

#[tokio::test]
async fn two_streams_in_a_group_share_the_load() {
    let gw = Gateway::start().await;
    let mut a = join(&gw, "workers", &["work"], false).await;
    let mut b = join(&gw, "workers", &["work"], false).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    for id in 0..4 {
        ws.send_text(&json!({"action":"work","id":id}).to_string())
            .await;
    }
    // Round robin: two each.
    let mut got = Vec::new();
    for svc in [&mut a, &mut b] {
        for _ in 0..2 {
            let m = svc.next().await;
            got.push(m.id.clone());
            svc.reply(m.delivery_id, 200, "").await;
        }
    }
    got.sort();
    assert_eq!(got, ["0", "1", "2", "3"]);
    for _ in 0..4 {
        let r = ws.recv_json().await;
        assert_eq!(
            (r["status"].clone(), r["body"].clone()),
            (json!(200), json!(null))
        );
    }
}

#[tokio::test]
async fn a_stream_that_dies_mid_delivery_yields_503() {
    let gw = Gateway::start().await;
    let mut svc = join(&gw, "fragile", &["slow"], false).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    ws.send_text(r#"{"action":"slow","id":1}"#).await;
    let _m = svc.next().await;
    drop(svc);
    let reply = ws.recv_json().await;
    assert_eq!(
        (reply["id"].clone(), reply["status"].clone()),
        (json!(1), json!(503))
    );
}

#[tokio::test]
async fn no_reply_in_time_is_504_and_no_handler_is_404() {
    let gw = Gateway::start_with(|c| c.limits.handler_timeout = Duration::from_millis(200)).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    assert_eq!(
        ws.request(json!({"action":"nobody","id":1})).await["status"],
        404
    );
    let mut svc = join(&gw, "mute", &["ignored"], false).await;
    ws.send_text(r#"{"action":"ignored","id":2}"#).await;
    let m = svc.next().await;
    assert_eq!(ws.recv_json().await["status"], 504);
    // A reply after the timeout is ignored, and the stream stays usable.
    svc.reply(m.delivery_id, 200, "").await;
    assert_eq!(
        ws.request(json!({"action":"ping","id":3})).await["status"],
        200
    );
}

#[tokio::test]
async fn lifecycle_events_arrive() {
    let gw = Gateway::start().await;
    let mut svc = join(&gw, "presence", &[], true).await;
    let (creds, ws) = gw.subscriber(&[]).await;
    let connect = svc.next().await;
    assert_eq!(
        (connect.action.as_str(), connect.digest.as_str()),
        ("$connect", creds.digest.as_str())
    );
    ws.close().await;
    let disconnect = svc.next().await;
    assert_eq!(disconnect.action, "$disconnect");
    assert_eq!(disconnect.connection_id, creds.id);
}

#[tokio::test]
async fn malformed_registrations_and_replies_are_invalid_argument() {
    let gw = Gateway::start().await;
    // Replying before registering.
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::HandleRequest {
        kind: Some(Kind::Reply(pb::Reply::default())),
    })
    .await
    .unwrap();
    let err = gw
        .control()
        .handle(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Claiming a built-in action; an empty group.
    for (group, action) in [("g", "ping"), ("", "x"), ("g", "has space")] {
        let (tx, rx) = mpsc::channel(4);
        tx.send(register(group, &[action], false)).await.unwrap();
        let err = gw
            .control()
            .handle(ReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{group:?} {action:?}");
    }
    // A bad reply ends that stream only.
    let mut bad = join(&gw, "g1", &["a"], false).await;
    let mut good = join(&gw, "g2", &["b"], false).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    ws.send_text(r#"{"action":"a","id":1}"#).await;
    let m = bad.next().await;
    bad.reply(m.delivery_id, 200, "{not json").await;
    let status = tokio::time::timeout(PATIENCE, bad.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(ws.recv_json().await["status"], 503);
    ws.send_text(r#"{"action":"b","id":2}"#).await;
    let m = good.next().await;
    good.reply(m.delivery_id, 200, "\"fine\"").await;
    assert_eq!(ws.recv_json().await["body"], "fine");
}

/// A stream refused for a bad reply always ends with its error status, never `OK`: the
/// status is sent before the member leaves, and the end of its deliveries waits for it. On a
/// runtime with two workers, so the stream's end can race the reply task as in production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handle_stream_always_ends_with_its_status() {
    // One socket sends all the messages: no per-socket rate limit.
    let gw = Gateway::start_with(|c| c.limits.message_rate = 0).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    for i in 0..1000 {
        let action = format!("a{i}");
        let mut svc = join(&gw, &format!("g{i}"), &[&action], false).await;
        ws.send_text(&json!({"action": action, "id": i}).to_string())
            .await;
        let m = svc.next().await;
        svc.reply(m.delivery_id, 700, "").await;
        let end = tokio::time::timeout(PATIENCE, svc.rx.message())
            .await
            .expect("the stream ends in time");
        match end {
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "try {i}: {status:?}"),
            Ok(other) => panic!("try {i}: a refused stream ended without its status: {other:?}"),
        }
        let reply = ws.recv_json().await;
        assert_eq!(
            (reply["id"].clone(), reply["status"].clone()),
            (json!(i), json!(503))
        );
    }
}

#[tokio::test]
async fn listen_receives_pushes() {
    let gw = Gateway::start().await;
    let mut events = gw
        .control()
        .listen(pb::ListenRequest {
            channels: vec!["news".into(), "alerts".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The listener counts as soon as the call returns; pushes now reach it.
    gw.push("news", r#"{"n":1}"#).await;
    gw.push("other", "0").await;
    gw.push("alerts", "2").await;
    let e = tokio::time::timeout(PATIENCE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.channel.as_str(), e.json.as_str()),
        ("news", r#"{"n":1}"#)
    );
    let e = tokio::time::timeout(PATIENCE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((e.channel.as_str(), e.json.as_str()), ("alerts", "2"));
}
