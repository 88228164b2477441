//! Users: credentials issued for a user, and `Send` / `Disconnect` that address every
//! connection of the user, on one node and across two nodes on Redis.

use crate::{
    cluster::{node, redis, unique_prefix},
    support::{code, Creds, Gateway},
};

async fn issue_for(gw: &Gateway, user: &str, info: &str) -> Creds {
    gw.client
        .issue_for(None, &["room"], user, info)
        .await
        .expect("IssueConnection for a user")
        .into()
}

/// User U has a socket on `a` and one on `b`, user V one on `a`; U also holds credentials it
/// never used. `Send(U)` reaches both of U's sockets and not V's; `Disconnect(U)` closes both,
/// and none of U's credentials connects again, wherever; V is untouched.
async fn user_scenario(a: &Gateway, b: &Gateway) {
    let u1 = issue_for(a, "u", r#"{"name":"Ursula"}"#).await;
    let u2 = issue_for(b, "u", "").await;
    let unused = issue_for(a, "u", "").await;
    let v = issue_for(a, "v", "").await;
    let mut ws_u1 = a.connect(&u1).await;
    let mut ws_u2 = b.connect(&u2).await;
    let mut ws_v = a.connect(&v).await;

    assert_eq!(
        a.client
            .send_user("u", "direct", r#""to u""#)
            .await
            .unwrap(),
        2
    );
    assert_eq!(ws_u1.recv_push().await, ("direct".into(), "to u".into()));
    assert_eq!(ws_u2.recv_push().await, ("direct".into(), "to u".into()));
    // V got nothing: the next frame V sees is the one sent to V alone.
    assert_eq!(
        b.client
            .send_user("v", "direct", r#""to v""#)
            .await
            .unwrap(),
        1
    );
    assert_eq!(ws_v.recv_push().await, ("direct".into(), "to v".into()));
    assert_eq!(
        a.client.send_user("nobody", "direct", "1").await.unwrap(),
        0
    );

    assert_eq!(
        b.client
            .disconnect_user("u", 4003, "logged out")
            .await
            .unwrap(),
        2
    );
    assert_eq!(code(&ws_u1.expect_close().await), 4003);
    assert_eq!(code(&ws_u2.expect_close().await), 4003);
    for creds in [&u1, &u2, &unused] {
        assert_eq!(a.try_connect(creds).await.err(), Some(403));
        assert_eq!(b.try_connect(creds).await.err(), Some(403));
    }
    assert_eq!(a.client.send_user("u", "direct", "1").await.unwrap(), 0);
    // V's socket still works.
    a.push("room", "\"still here\"").await;
    assert_eq!(ws_v.recv_push().await, ("room".into(), "still here".into()));
}

#[tokio::test]
async fn send_and_disconnect_by_user_reach_every_connection_of_the_user() {
    let gw = Gateway::start().await;
    user_scenario(&gw, &gw).await;
}

async fn send_and_disconnect_by_user_reach_the_users_sockets_on_every_node() {
    let prefix = unique_prefix("users");
    let a = node(&redis(), &prefix).await;
    let b = node(&redis(), &prefix).await;
    user_scenario(&a, &b).await;
}

#[tokio::test]
async fn bad_users_and_addresses_are_refused_with_invalid_argument() {
    let gw = Gateway::start().await;
    let refused = |r: Result<channelgate::client::Credentials, tonic::Status>| {
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    };
    refused(
        gw.client
            .issue_for(None, &["room"], &"x".repeat(257), "")
            .await,
    );
    refused(gw.client.issue_for(None, &["room"], "bad\nname", "").await);
    refused(gw.client.issue_for(None, &["room"], "", r#"{"a":1}"#).await);
    refused(gw.client.issue_for(None, &["room"], "u", "{not json").await);
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2100));
    refused(gw.client.issue_for(None, &["room"], "u", &big).await);
    // Send and Disconnect take a digest or a user, not both, not neither.
    let creds = gw.issue().await;
    let mut control = gw.control();
    for (digest, user) in [("", ""), (creds.digest.as_str(), "u")] {
        let send = control
            .send(channelgate::pb::SendRequest {
                digest: digest.into(),
                channel: "direct".into(),
                json: "1".into(),
                user: user.into(),
            })
            .await;
        assert_eq!(
            send.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
        let disconnect = control
            .disconnect(channelgate::pb::DisconnectRequest {
                digest: digest.into(),
                user: user.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            disconnect.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
    // The gateway still works for everyone else.
    let (_, mut ws) = gw.subscriber(&["room"]).await;
    gw.push("room", "1").await;
    assert_eq!(ws.recv_push().await, ("room".into(), 1.into()));
}

crate::on_both!(send_and_disconnect_by_user_reach_the_users_sockets_on_every_node,);
