//! Client messages: ping, bad input of every kind, server pings and the idle timeout. A bad
//! message never disturbs another socket.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{code, Gateway};

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    assert_eq!(
        ws.request(json!({"action":"ping","id":1})).await,
        json!({"id":1,"status":200,"headers":{},"body":"pong"})
    );
    assert_eq!(
        ws.request(json!({"action":"ping","id":"abc"})).await["id"],
        "abc"
    );
}

#[tokio::test]
async fn bad_messages_get_error_replies_and_the_socket_lives_on() {
    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&["room"]).await;
    let cases = [
        ("{not json", json!(null), 400),
        ("[1,2,3]", json!(null), 400),
        ("\"just a string\"", json!(null), 400),
        (r#"{"id":7}"#, json!(7), 400),
        (r#"{"id":8,"action":42}"#, json!(8), 400),
        (r#"{"id":9,"action":"no-such-action"}"#, json!(9), 404),
    ];
    for (text, id, status) in cases {
        ws.send_text(text).await;
        let reply = ws.recv_json().await;
        assert_eq!(reply["id"], id, "{text}");
        assert_eq!(reply["status"], status, "{text}");
        assert!(reply["body"].is_string(), "{text}");
    }
    ws.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(ws.recv_json().await["status"], 400);
    // Still subscribed and answering.
    gw.push("room", "1").await;
    assert_eq!(ws.recv_push().await.1, 1);
}

#[tokio::test]
async fn an_oversized_message_closes_only_that_socket_with_1008() {
    let gw = Gateway::start().await;
    let (_, mut bad) = gw.subscriber(&["room"]).await;
    let (_, mut good) = gw.subscriber(&["room"]).await;
    let huge = format!(
        r#"{{"action":"ping","id":1,"pad":"{}"}}"#,
        "x".repeat(65 << 10)
    );
    bad.send_text(&huge).await;
    let close = bad.expect_close().await;
    assert_eq!(code(&close), 1008);
    gw.wait_for_connections(1).await;
    assert_eq!(gw.push("room", "2").await, 1);
    assert_eq!(good.recv_push().await.1, 2);
    assert_eq!(
        good.request(json!({"action":"ping","id":2})).await["status"],
        200
    );
}

#[tokio::test]
async fn the_server_pings_and_closes_silent_sockets() {
    let gw = Gateway::start_with(|c| {
        c.limits.ping_interval = Duration::from_millis(50);
        c.limits.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (_, mut silent) = gw.subscriber(&[]).await;
    let (_, mut lively) = gw.subscriber(&[]).await;
    // The lively client reads (and so answers pings) for longer than the idle timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    let mut pings = 0;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut lively.ws)).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 2, "saw {pings} pings");
    // The silent one read nothing, answered no ping, and was closed as idle.
    gw.wait_for_connections(1).await;
    assert_eq!(code(&silent.expect_close().await), 4101);
    assert_eq!(
        lively.request(json!({"action":"ping","id":1})).await["status"],
        200
    );
}

#[tokio::test]
async fn invalid_utf8_closes_only_that_socket_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    };
    let gw = Gateway::start().await;
    let (_, mut bad) = gw.subscriber(&["room"]).await;
    let (_, mut good) = gw.subscriber(&["room"]).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    bad.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(code(&bad.expect_close().await), 1007);
    gw.wait_for_connections(1).await;
    assert_eq!(gw.push("room", "1").await, 1);
    assert_eq!(good.recv_push().await.1, 1);
}

#[tokio::test]
async fn a_one_megabyte_message_closes_only_that_socket_with_1008() {
    let gw = Gateway::start().await;
    let (_, mut bad) = gw.subscriber(&["room"]).await;
    let (_, mut good) = gw.subscriber(&["room"]).await;
    let huge = format!(r#"{{"action":"ping","pad":"{}"}}"#, "x".repeat(1 << 20));
    // The gateway may close before the whole megabyte is written.
    let _ = bad.ws.send(Message::text(huge)).await;
    assert_eq!(code(&bad.expect_close().await), 1008);
    assert_eq!(
        good.request(json!({"action":"ping","id":1})).await["status"],
        200
    );
    assert_eq!(gw.push("room", "1").await, 1);
}

#[tokio::test]
async fn a_socket_over_its_message_rate_gets_429_then_1008_and_others_do_not_notice() {
    let gw = Gateway::start_with(|c| {
        c.limits.message_rate = 1;
        c.limits.message_burst = 3;
    })
    .await;
    let (_, mut flood) = gw.subscriber(&["room"]).await;
    let (_, mut calm) = gw.subscriber(&["room"]).await;
    for id in 0..3 {
        assert_eq!(
            flood.request(json!({"action":"ping","id":id})).await["status"],
            200
        );
    }
    let refused = flood.request(json!({"action":"ping","id":"over"})).await;
    assert_eq!(
        (refused["id"].clone(), refused["status"].clone()),
        (json!("over"), json!(429))
    );
    // Keeps flooding: closed for policy.
    for id in 0..10 {
        flood
            .send_text(&json!({"action":"ping","id":id}).to_string())
            .await;
    }
    assert_eq!(code(&flood.expect_close().await), 1008);
    assert_eq!(
        calm.request(json!({"action":"ping","id":1})).await["status"],
        200
    );
    assert_eq!(gw.push("room", "1").await, 1);
    assert_eq!(calm.recv_push().await.1, 1);
}

/// A close the node decides (a flood, a message too large) comes after every frame queued
/// before it: the replies to the messages it accepted reach the client first.
#[tokio::test]
async fn replies_queued_before_a_policy_close_are_written_before_it() {
    let gw = Gateway::start_with(|c| {
        c.limits.message_rate = 1;
        c.limits.message_burst = 10;
    })
    .await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    // Sent together: the node reads them all before its writer runs.
    use futures_util::SinkExt;
    let frames: Vec<_> = (0..40)
        .map(|id| {
            Ok(tokio_tungstenite::tungstenite::Message::text(
                json!({"action":"ping","id":id}).to_string(),
            ))
        })
        .collect();
    ws.ws
        .send_all(&mut futures_util::stream::iter(frames))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    let close = loop {
        match ws.next_message().await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                statuses.push((v["id"].as_u64().unwrap(), v["status"].as_u64().unwrap()));
            }
            Some(tokio_tungstenite::tungstenite::Message::Close(frame)) => break frame.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code(&close), 1008);
    let pongs: Vec<_> = statuses
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        pongs,
        (0..10).collect::<Vec<_>>(),
        "every accepted message's reply: {statuses:?}"
    );
    assert!(
        statuses.iter().skip(10).all(|(_, s)| *s == 429),
        "{statuses:?}"
    );

    // Too large: the pong queued before it arrives, then 1008.
    let gw = Gateway::start_with(|c| c.limits.max_message_size = 1024).await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    let frames = vec![
        Ok(tokio_tungstenite::tungstenite::Message::text(
            json!({"action":"ping","id":1}).to_string(),
        )),
        Ok(tokio_tungstenite::tungstenite::Message::text(
            "x".repeat(4096),
        )),
    ];
    ws.ws
        .send_all(&mut futures_util::stream::iter(frames))
        .await
        .unwrap();
    assert_eq!(ws.recv_json().await["status"], 200);
    assert_eq!(code(&ws.expect_close().await), 1008);
}
