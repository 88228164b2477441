//! Credential lifetime over real sockets: single use, reconnect grace, clean close, rotation.

use std::time::Duration;

use crate::support::Gateway;

#[tokio::test]
async fn reconnect_within_grace_keeps_subscriptions() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&["room"]).await;
    assert_eq!(gw.push("room", "1").await, 1);
    assert_eq!(ws.recv_push().await.1, 1);
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    // Counted as lost (a vanished peer), not as a protocol error of ours.
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains("channelgate_closes_total{code=\"lost\"} 1"),
        "{metrics}"
    );
    let mut ws = gw.connect(&creds).await;
    assert_eq!(gw.push("room", "2").await, 1);
    assert_eq!(ws.recv_push().await, ("room".into(), 2.into()));
}

#[tokio::test]
async fn after_a_clean_close_the_id_is_dead() {
    let gw = Gateway::start().await;
    let (creds, ws) = gw.subscriber(&["room"]).await;
    ws.close().await;
    gw.wait_for_connections(0).await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
    // Its subscriptions are gone with it.
    assert_eq!(gw.stats().await.subscriptions, 0);
}

#[tokio::test]
async fn a_client_close_in_the_reconnect_now_range_keeps_the_id_resumable() {
    let gw = Gateway::start().await;
    let (creds, ws) = gw.subscriber(&["room"]).await;
    // What the browser client sends when its keepalive goes unanswered.
    ws.close_with(4200).await;
    gw.wait_for_connections(0).await;
    let mut ws = gw.connect(&creds).await;
    assert_eq!(gw.push("room", "1").await, 1);
    assert_eq!(ws.recv_push().await, ("room".into(), 1.into()));
    // Any other client close code ends the credentials, as 1000 does.
    ws.close_with(4000).await;
    gw.wait_for_connections(0).await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
}

#[tokio::test]
async fn after_the_grace_period_the_id_is_dead() {
    let grace = Duration::from_millis(300);
    let gw = Gateway::start_with(|c| c.limits.reconnect_grace = grace).await;
    let (creds, ws) = gw.subscriber(&["room"]).await;
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    // The grace period is the event this test waits for.
    tokio::time::sleep(grace + Duration::from_millis(50)).await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
}

#[tokio::test]
async fn zero_grace_is_strict() {
    let gw = Gateway::start_with(|c| c.limits.reconnect_grace = Duration::ZERO).await;
    let (creds, ws) = gw.subscriber(&[]).await;
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));
}

/// Rotation is a rolling restart of a cluster: the state of issued ids lives in Redis, so a
/// node started with the new secret (and the old one as previous) accepts ids the old nodes
/// issued; a node without the old secret refuses them.
async fn ids_signed_with_the_previous_secret_are_accepted_after_rotation() {
    let prefix = crate::cluster::unique_prefix("rotation");
    let node = |secret: &'static str, previous: Option<&'static str>| {
        let prefix = prefix.clone();
        async move {
            let gw = Gateway::start_with(move |c| {
                c.redis = Some(crate::cluster::redis());
                c.redis_prefix = prefix;
                c.secret = Some(secret.into());
                c.previous_secret = previous.map(Into::into);
            })
            .await;
            // A cluster node takes calls once it is ready (connected to Redis).
            crate::support::wait_until(|| async { gw.http_get("/readyz", &[]).await.0 == 200 })
                .await;
            gw
        }
    };
    let old = node("the old deployment secret", None).await;
    let creds = old.issue().await;
    let rotated = node(
        "the new deployment secret",
        Some("the old deployment secret"),
    )
    .await;
    rotated.connect(&creds).await;
    let fresh = old.issue().await;
    let unrotated = node("the new deployment secret", None).await;
    assert_eq!(unrotated.try_connect(&fresh).await.err(), Some(403));
}

/// A single node keeps the state of its ids in memory: after a restart it cannot know whether
/// an id it issued before was used, so it refuses it (the client gets new credentials) rather
/// than reopen ended ones.
#[tokio::test]
async fn a_restarted_single_node_refuses_ids_issued_before_it_started() {
    let secret = "one deployment secret for both";
    let before = Gateway::start_with(|c| c.secret = Some(secret.into())).await;
    let (used, ws) = before.subscriber(&[]).await;
    ws.close().await;
    let unused = before.issue().await;
    before.shutdown().await;
    let after = Gateway::start_with(|c| c.secret = Some(secret.into())).await;
    assert_eq!(
        after.try_connect(&used).await.err(),
        Some(403),
        "ended: stays ended"
    );
    assert_eq!(
        after.try_connect(&unused).await.err(),
        Some(403),
        "unknown: refused"
    );
    let (status, body) = after.http_get("/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"channelgate_handshakes_total{result="unknown",transport="websocket"} 2"#),
        "{body}"
    );
    after.subscriber(&[]).await;
}

crate::on_both!(ids_signed_with_the_previous_secret_are_accepted_after_rotation,);
