//! Presence on one node: who is subscribed and connected in a channel whose namespace keeps
//! presence, with user and info; a resume within the grace changes nothing.

use std::time::Duration;

use channelgate::config::{NamespacePolicy, Namespaces};

use crate::support::{Creds, Gateway};

async fn presence_node() -> Gateway {
    Gateway::start_with(|c| {
        c.limits.reconnect_grace = Duration::from_secs(30);
        c.limits.namespaces = Namespaces(
            [(
                "chat".to_owned(),
                NamespacePolicy {
                    presence: true,
                    ..Default::default()
                },
            )]
            .into(),
        );
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
