//! `call-route` against a real HTTP upstream.

use std::{sync::atomic::Ordering, time::Duration};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{spawn_upstream, wait_until, Gateway, Ws};

/// A gateway whose upstream is `upstream`, and a socket connected with a session cookie and
/// the key in the key cookie (as a browser would).
async fn setup(
    upstream: &str,
    adjust: impl FnOnce(&mut channelgate::config::Config),
) -> (Gateway, crate::support::Creds, Ws) {
    let upstream = upstream.to_owned();
    let gw = Gateway::start_with(|c| {
        c.upstream = Some(upstream);
        adjust(c);
    })
    .await;
    let creds = gw.issue().await;
    let mut req = format!("{}?socket_connection_id={}", gw.ws_url(), creds.id)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "cookie",
        format!("session=s1; socket_key={}; theme=dark", creds.key)
            .parse()
            .unwrap(),
    );
    let ws = gw.connect_request(req).await.unwrap();
    (gw, creds, ws)
}

fn call(id: u64, method: &str, uri: &str, input: Value) -> Value {
    json!({"action":"call-route","id":id,"method":method,"uri":uri,"input":input})
}

#[tokio::test]
async fn get_with_query_forwards_cookie_and_identity_but_never_the_key() {
    let up = spawn_upstream().await;
    let (_gw, creds, mut ws) = setup(&format!("http://{}", up.addr), |_| {}).await;
    let reply = ws
        .request(call(1, "get", "/echo?page=2", json!({"q":"a b","n":3})))
        .await;
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["headers"]["x-upstream"], "yes");
    let body = &reply["body"];
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/echo");
    assert_eq!(body["query"], "page=2&q=a+b&n=3");
    assert_eq!(body["cookie"], "session=s1; theme=dark");
    assert_eq!(body["connection_id"], creds.id.as_str());
    assert_eq!(body["digest"], creds.digest.as_str());
    assert!(
        !reply.to_string().contains(&creds.key),
        "the socket key reached the upstream"
    );
}

#[tokio::test]
async fn post_sends_input_as_a_json_body() {
    let up = spawn_upstream().await;
    let (_gw, _, mut ws) = setup(&format!("http://{}", up.addr), |_| {}).await;
    let reply = ws
        .request(call(2, "PoSt", "/echo", json!({"title":"hi","tags":[1,2]})))
        .await;
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["body"]["method"], "POST");
    assert_eq!(reply["body"]["content_type"], "application/json");
    let sent: Value = serde_json::from_str(reply["body"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent, json!({"title":"hi","tags":[1,2]}));
}

#[tokio::test]
async fn text_redirect_and_error_statuses_pass_through() {
    let up = spawn_upstream().await;
    let (_gw, _, mut ws) = setup(&format!("http://{}", up.addr), |_| {}).await;
    let text = ws
        .request(json!({"action":"call-route","id":"t","uri":"/text"}))
        .await;
    assert_eq!(
        (text["status"].clone(), text["body"].clone()),
        (json!(200), json!("hello"))
    );
    let redirect = ws.request(call(3, "get", "/redirect", Value::Null)).await;
    assert_eq!(redirect["status"], 302);
    assert_eq!(redirect["headers"]["location"], "/elsewhere");
    let missing = ws.request(call(4, "get", "/missing", Value::Null)).await;
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["body"], json!({"error":"no such thing"}));
}

#[tokio::test]
async fn upstream_down_is_502_slow_is_504_and_none_is_501() {
    let free = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (_gw, _, mut ws) = setup(&format!("http://{free}"), |_| {}).await;
    assert_eq!(
        ws.request(call(1, "get", "/echo", Value::Null)).await["status"],
        502
    );

    let up = spawn_upstream().await;
    let (_gw, _, mut ws) = setup(&format!("http://{}", up.addr), |c| {
        c.limits.upstream_timeout = Duration::from_millis(200)
    })
    .await;
    assert_eq!(
        ws.request(call(2, "get", "/slow", Value::Null)).await["status"],
        504
    );

    let gw = Gateway::start().await;
    let (_, mut ws) = gw.subscriber(&[]).await;
    assert_eq!(
        ws.request(call(3, "get", "/echo", Value::Null)).await["status"],
        501
    );
}

#[tokio::test]
async fn bad_call_route_messages_are_400() {
    let up = spawn_upstream().await;
    let (_gw, _, mut ws) = setup(&format!("http://{}", up.addr), |_| {}).await;
    assert_eq!(
        ws.request(json!({"action":"call-route","id":1})).await["status"],
        400
    );
    assert_eq!(
        ws.request(json!({"action":"call-route","id":2,"uri":"http://evil/"}))
            .await["status"],
        400
    );
    assert_eq!(
        ws.request(json!({"action":"call-route","id":3,"uri":"/x","method":"NOT A METHOD"}))
            .await["status"],
        400
    );
    assert_eq!(
        ws.request(json!({"action":"call-route","id":4,"uri":"/x","input":[1]}))
            .await["status"],
        400
    );
}

#[tokio::test]
async fn more_than_sixteen_in_flight_get_429_and_replies_match_by_id() {
    let up = spawn_upstream().await;
    let (_gw, _, mut ws) = setup(&format!("http://{}", up.addr), |_| {}).await;
    for id in 0..16 {
        ws.send_text(&call(id, "get", "/hold", Value::Null).to_string())
            .await;
    }
    wait_until(|| async { up.held.load(Ordering::SeqCst) == 16 }).await;
    let over = ws.request(call(99, "get", "/echo", Value::Null)).await;
    assert_eq!(
        (over["id"].clone(), over["status"].clone()),
        (json!(99), json!(429))
    );
    up.release.add_permits(16);
    let mut ids: Vec<u64> = Vec::new();
    for _ in 0..16 {
        let reply = ws.recv_json().await;
        assert_eq!(reply["status"], 200);
        ids.push(reply["id"].as_u64().unwrap());
    }
    ids.sort();
    assert_eq!(ids, (0..16).collect::<Vec<_>>());
    // Capacity is back.
    assert_eq!(
        ws.request(call(100, "get", "/echo", Value::Null)).await["status"],
        200
    );
}
