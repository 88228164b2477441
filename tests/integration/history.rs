//! History and recovery over real sockets: offsets and epochs, loss-free reconnects (a TCP cut at
//! a proxy, a SIGKILLed node, a Redis that restarted empty), gaps that say so, `History` paging,
//! `Listen` from positions and idempotent pushes, on one node and across nodes.

use std::{collections::HashMap, time::Duration};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{
    cluster::{node, restart_empty, unique_prefix, PrivateRedis, REDIS},
    support::{connect_recovering_at, issue_at, Gateway, Proxy, Ws, PATIENCE},
};

/// `{channel: {"epoch", "offset"}}`, the `recover` parameter.
fn recover(channel: &str, epoch: &str, offset: u64) -> Value {
    json!({ channel: { "epoch": epoch, "offset": offset } })
}

/// The epoch and offset a `connected` frame gives `channel`.
fn position_of(connected: &Value, channel: &str) -> (String, u64) {
    let at = &connected["channels"][channel];
    (
        at["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("{connected}"))
            .to_owned(),
        at["offset"].as_u64().unwrap(),
    )
}

/// Reads pushes until `last` and checks they are exactly `from..=last`, in order.
async fn expect_run(ws: &mut Ws, from: u64, last: u64) {
    for want in from..=last {
        let (offset, payload) = ws.recv_offset().await;
        assert_eq!(offset, want, "pushes out of order or missing");
        assert_eq!(payload, json!(want), "the payload of offset {offset}");
    }
}

#[tokio::test]
async fn a_cut_socket_gets_exactly_the_fifty_pushes_it_missed_then_live_ones() {
    let gw = Gateway::start().await;
    let proxy = Proxy::start(gw.http).await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["room"]).await;
    let mut ws = gw
        .connect_recovering(&creds, &json!({}), Some(proxy.addr))
        .await
        .unwrap();
    let connected = ws.connected().await;
    assert_eq!(connected["resumed"], false);
    let (epoch, offset) = position_of(&connected, "room");
    assert_eq!(offset, 0);
    for i in 1..=3 {
        gw.push("room", &i.to_string()).await;
    }
    expect_run(&mut ws, 1, 3).await;

    proxy.cut();
    gw.wait_for_connections(0).await;
    for i in 4..=53 {
        assert_eq!(
            gw.push("room", &i.to_string()).await,
            0,
            "nobody is connected"
        );
    }
    // Within the grace: the same credentials, and what it saw last.
    let mut ws = gw
        .connect_recovering(&creds, &recover("room", &epoch, 3), None)
        .await
        .unwrap();
    let connected = ws.connected().await;
    assert_eq!(connected["resumed"], true);
    assert_eq!(connected["channels"]["room"]["recovered"], true);
    assert_eq!(position_of(&connected, "room"), (epoch.clone(), 3));
    expect_run(&mut ws, 4, 53).await;
    gw.push("room", "54").await;
    expect_run(&mut ws, 54, 54).await;
}

#[tokio::test]
async fn catching_up_on_a_thousand_pushes_while_a_publisher_pushes_is_one_contiguous_run() {
    let gw = Gateway::start().await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["busy"]).await;
    let mut ws = gw
        .connect_recovering(&creds, &json!({}), None)
        .await
        .unwrap();
    let (epoch, _) = position_of(&ws.connected().await, "busy");
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    for i in 1..=1000 {
        gw.push("busy", &i.to_string()).await;
    }
    // A publisher keeps pushing while the socket reconnects and catches up.
    let (stop_tx, stop) = watch::channel(false);
    let client = gw.client.clone();
    let publisher = tokio::spawn(async move {
        let mut n = 1000u64;
        while !*stop.borrow() || n < 1300 {
            n += 1;
            client.push(&["busy"], &n.to_string()).await.unwrap();
        }
        n
    });
    let mut ws = gw
        .connect_recovering(&creds, &recover("busy", &epoch, 0), None)
        .await
        .unwrap();
    assert_eq!(ws.connected().await["channels"]["busy"]["recovered"], true);
    expect_run(&mut ws, 1, 1100).await;
    stop_tx.send(true).unwrap();
    let last = publisher.await.unwrap();
    expect_run(&mut ws, 1101, last).await;
    gw.push("busy", "\"end\"").await;
    let (offset, payload) = ws.recv_offset().await;
    assert_eq!(
        (offset, payload),
        (last + 1, json!("end")),
        "no duplicate, nothing extra"
    );
}

#[tokio::test]
async fn history_that_does_not_reach_back_gives_recovered_false_and_no_replay() {
    let gw = Gateway::start_with(|c| {
        c.limits.history_size = 10;
        c.limits.recovery_max = 20;
    })
    .await;
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["short", "long"]).await;
    let mut ws = gw
        .connect_recovering(&creds, &json!({}), None)
        .await
        .unwrap();
    let connected = ws.connected().await;
    let (short_epoch, _) = position_of(&connected, "short");
    let (long_epoch, _) = position_of(&connected, "long");
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    for i in 1..=15 {
        gw.push("short", &i.to_string()).await; // history keeps 6..=15: 1..=5 are gone
    }
    for i in 1..=5 {
        gw.push("long", &i.to_string()).await;
    }
    let asked = json!({
        "short": {"epoch": short_epoch, "offset": 0},
        "long": {"epoch": long_epoch, "offset": 0},
    });
    let mut ws = gw.connect_recovering(&creds, &asked, None).await.unwrap();
    let connected = ws.connected().await;
    let short = &connected["channels"]["short"];
    assert_eq!(
        (short["recovered"].as_bool(), short["offset"].as_u64()),
        (Some(false), Some(15))
    );
    assert_eq!(connected["channels"]["long"]["recovered"], true);
    // Only "long" is replayed; then a live push on "short" continues from 16.
    for want in 1..=5 {
        let v = ws.recv_json().await;
        assert_eq!(
            (v["channel"].as_str(), v["offset"].as_u64()),
            (Some("long"), Some(want))
        );
    }
    gw.push("short", "16").await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["channel"].as_str(), v["offset"].as_u64()),
        (Some("short"), Some(16))
    );

    // An epoch the channel no longer has, and more missed pushes than one recovery replays.
    ws.drop_unclean();
    gw.wait_for_connections(0).await;
    for i in 6..=30 {
        gw.push("long", &i.to_string()).await;
    }
    let asked = json!({
        "short": {"epoch": "0123456789abcdef", "offset": 16},
        "long": {"epoch": long_epoch, "offset": 5},
    });
    let mut ws = gw.connect_recovering(&creds, &asked, None).await.unwrap();
    let connected = ws.connected().await;
    for channel in ["short", "long"] {
        assert_eq!(
            connected["channels"][channel]["recovered"], false,
            "{connected}"
        );
    }
    assert_eq!(position_of(&connected, "long"), (long_epoch, 30));
    gw.push("long", "31").await;
    assert_eq!(
        ws.recv_offset().await,
        (31, json!(31)),
        "no replay came first"
    );
    let (_, metrics) = gw.http_get("/metrics", &[]).await;
    assert!(
        metrics.contains(r#"channelgate_recoveries_total{result="gap"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_live_subscribe_tells_a_recovering_socket_where_the_channel_stands() {
    let gw = Gateway::start().await;
    gw.push("later", "1").await;
    gw.push("later", "2").await;
    let (creds, _) = (gw.issue().await, ());
    let mut ws = gw
        .connect_recovering(&creds, &json!({}), None)
        .await
        .unwrap();
    assert_eq!(ws.connected().await["channels"], json!({}));
    gw.subscribe(&creds, &["later"]).await;
    let at = ws.recv_json().await;
    assert_eq!(at["channel"], "later");
    assert_eq!(at["offset"], 2);
    assert!(
        at["epoch"].is_string() && at.get("payload").is_none(),
        "{at}"
    );
    gw.push("later", "3").await;
    assert_eq!(ws.recv_offset().await, (3, json!(3)));
}

/// Sends are not part of a channel's stream: no offset.
#[tokio::test]
async fn a_send_to_one_socket_carries_no_offset() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&[]).await;
    gw.client.send(&creds.digest, "direct", "1").await.unwrap();
    assert_eq!(
        ws.recv_json().await,
        json!({"channel":"direct","payload":1})
    );
}

/// `History` paging, `Listen` from positions and idempotent pushes: `write` takes pushes,
/// `read` answers History and Listen (the same node, or two nodes of a cluster).
async fn history_listen_and_idempotency(write: &Gateway, read: &Gateway) {
    for i in 1..=25 {
        write.push("paged", &i.to_string()).await;
    }
    let page = |since: Option<(&str, u64)>, limit: u32, reverse: bool| {
        let client = read.client.clone();
        let since = since.map(|(e, o)| (e.to_owned(), o));
        async move {
            client
                .history(
                    "paged",
                    since.as_ref().map(|(e, o)| (e.as_str(), *o)),
                    limit,
                    reverse,
                )
                .await
        }
    };
    let offsets = |r: &channelgate::pb::HistoryResponse| {
        r.publications.iter().map(|p| p.offset).collect::<Vec<_>>()
    };
    let first = page(None, 10, false).await.unwrap();
    assert_eq!((first.offset, offsets(&first)), (25, (1..=10).collect()));
    assert_eq!(first.publications[0].json, "1");
    let epoch = first.epoch.clone();
    let next = page(Some((&epoch, 10)), 10, false).await.unwrap();
    assert_eq!(offsets(&next), (11..=20).collect::<Vec<_>>());
    let last = page(Some((&epoch, 20)), 10, false).await.unwrap();
    assert_eq!(offsets(&last), (21..=25).collect::<Vec<_>>());
    let newest = page(None, 3, true).await.unwrap();
    assert_eq!(offsets(&newest), [25, 24, 23]);
    let older = page(Some((&epoch, 23)), 2, true).await.unwrap();
    assert_eq!(offsets(&older), [22, 21]);
    let position = page(None, 0, false).await.unwrap();
    assert_eq!(
        (
            position.epoch.as_str(),
            position.offset,
            position.publications.len()
        ),
        (&*epoch, 25, 0)
    );
    let lost = page(Some(("0123456789abcdef", 3)), 10, false)
        .await
        .unwrap_err();
    assert_eq!(lost.code(), tonic::Code::FailedPrecondition, "{lost}");

    // A listener that restarts catches up from its position, then streams live.
    let since: HashMap<String, (String, u64)> = [("paged".into(), (epoch.clone(), 22))].into();
    let mut events = read.client.listen_from(&["paged"], since).await.unwrap();
    write.push("paged", "26").await;
    for want in 23..=26 {
        let e = crate::support::next_event(&mut events).await;
        assert_eq!(
            (e.offset, e.json.as_str(), e.gap),
            (want, want.to_string().as_str(), false)
        );
        assert_eq!(e.epoch, epoch);
    }
    let since: HashMap<String, (String, u64)> =
        [("paged".into(), ("0123456789abcdef".into(), 2))].into();
    let mut events = read.client.listen_from(&["paged"], since).await.unwrap();
    let e = crate::support::next_event(&mut events).await;
    assert!(e.gap, "{e:?}");
    assert_eq!((e.offset, e.epoch.as_str()), (26, &*epoch));

    // A push retried with its idempotency key is delivered once, whichever node takes the retry.
    let creds = write.issue().await;
    write.subscribe(&creds, &["once"]).await;
    let mut ws = read.connect(&creds).await;
    let first = write
        .client
        .push_keyed(&["once"], "\"hello\"", Some("order-7"))
        .await
        .unwrap();
    let retry = read
        .client
        .push_keyed(&["once"], "\"hello\"", Some("order-7"))
        .await
        .unwrap();
    assert_eq!(first.positions, retry.positions);
    assert_eq!(first.positions[0].offset, 1);
    assert_eq!(retry.queued, 0);
    write.push("once", "\"marker\"").await;
    assert_eq!(ws.recv_offset().await, (1, json!("hello")));
    assert_eq!(
        ws.recv_offset().await,
        (2, json!("marker")),
        "the retry was not delivered"
    );
    let bad = write
        .client
        .push_keyed(&["once"], "1", Some("no spaces allowed"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn history_paging_listen_from_positions_and_idempotent_pushes_on_one_node() {
    let gw = Gateway::start().await;
    history_listen_and_idempotency(&gw, &gw).await;
}

async fn history_paging_listen_from_positions_and_idempotent_pushes_across_nodes() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("history");
    let a = node(redis, &prefix).await;
    let b = node(redis, &prefix).await;
    history_listen_and_idempotency(&a, &b).await;
}

async fn pushes_through_two_nodes_get_one_order_per_channel() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("order");
    let a = node(redis, &prefix).await;
    let b = node(redis, &prefix).await;
    let mut sockets = Vec::new();
    for gw in [&a, &b] {
        let creds = a.issue().await;
        a.subscribe(&creds, &["shared"]).await;
        sockets.push(gw.connect(&creds).await);
    }
    let (ca, cb) = (a.client.clone(), b.client.clone());
    let via_a = tokio::spawn(async move {
        for i in 0..100 {
            ca.push(&["shared"], &json!({"from":"a","i":i}).to_string())
                .await
                .unwrap();
        }
    });
    let via_b = tokio::spawn(async move {
        for i in 0..100 {
            cb.push(&["shared"], &json!({"from":"b","i":i}).to_string())
                .await
                .unwrap();
        }
    });
    via_a.await.unwrap();
    via_b.await.unwrap();
    let mut orders = Vec::new();
    for ws in &mut sockets {
        let mut order = Vec::new();
        for want in 1..=200 {
            let (offset, payload) = ws.recv_offset().await;
            assert_eq!(offset, want);
            order.push(payload);
        }
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "both nodes deliver one order");
}

async fn a_socket_whose_node_was_killed_resumes_on_another_node_with_nothing_lost() {
    let redis = &crate::cluster::redis();
    let prefix = unique_prefix("sigkill-history");
    let (mut doomed, http, grpc) = crate::cluster::spawn_node(&prefix, &[]);
    let survivor = node(redis, &prefix).await;
    let publisher = node(redis, &prefix).await;
    let creds = issue_at(&grpc).await;
    survivor.subscribe(&creds, &["ticker"]).await;
    let mut ws = connect_recovering_at(&http, &creds, &json!({}))
        .await
        .unwrap();
    let (epoch, _) = position_of(&ws.connected().await, "ticker");

    // 100 pushes a second through a third node, for as long as the test runs.
    let (stop_tx, stop) = watch::channel(false);
    let client = publisher.client.clone();
    let pushing = tokio::spawn(async move {
        let mut n = 0u64;
        let mut every = tokio::time::interval(Duration::from_millis(10));
        while !*stop.borrow() {
            every.tick().await;
            n += 1;
            client.push(&["ticker"], &n.to_string()).await.unwrap();
        }
        n
    });
    let mut last = 0;
    while last < 50 {
        let (offset, payload) = ws.recv_offset().await;
        assert_eq!((offset, payload), (last + 1, json!(last + 1)));
        last = offset;
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // Read what the dead node had already written to the socket, then it is gone.
    while let Some(tokio_tungstenite::tungstenite::Message::Text(text)) = ws.next_message().await {
        let v: Value = serde_json::from_str(&text).unwrap();
        let offset = v["offset"].as_u64().unwrap();
        assert_eq!(offset, last + 1);
        last = offset;
    }
    // The id is live on a dead node until its heartbeat lapses; then it resumes here.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut ws = loop {
        match survivor
            .connect_recovering(&creds, &recover("ticker", &epoch, last), None)
            .await
        {
            Ok(ws) => break ws,
            Err(403) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(status) => panic!("not resumed: {status}"),
        }
    };
    let connected = ws.connected().await;
    assert_eq!(connected["resumed"], true);
    assert_eq!(
        connected["channels"]["ticker"]["recovered"], true,
        "{connected}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // a few more live pushes
    stop_tx.send(true).unwrap();
    let pushed = pushing.await.unwrap();
    assert!(
        pushed > last + 100,
        "pushes went on while the node was dead: {pushed} vs {last}"
    );
    expect_run(&mut ws, last + 1, pushed).await;
}

#[tokio::test]
async fn a_redis_that_restarts_empty_means_a_new_epoch_a_gap_and_no_reopened_credentials() {
    let mut redis = PrivateRedis::start();
    let prefix = unique_prefix("redis-restart");
    let a = node(&redis.url(), &prefix).await;
    let b = node(&redis.url(), &prefix).await;
    // A live socket on A that asked for positions, an id closed cleanly, an id disconnected.
    let live = a.issue().await;
    a.subscribe(&live, &["room"]).await;
    let mut ws = a.connect_recovering(&live, &json!({}), None).await.unwrap();
    let (old_epoch, _) = position_of(&ws.connected().await, "room");
    b.push("room", "1").await;
    assert_eq!(ws.recv_offset().await, (1, json!(1)));
    let (closed, closed_ws) = a.subscriber(&[]).await;
    closed_ws.close().await;
    let (ended, mut ended_ws) = b.subscriber(&[]).await;
    a.client
        .disconnect(&ended.digest, 4000, "bye")
        .await
        .unwrap();
    ended_ws.expect_close().await;

    let _redis = restart_empty(&mut redis, &[&a, &b]).await;

    // The socket stayed up, and hears that the channel's past is gone: a new epoch.
    let gap = ws.recv_json().await;
    assert_eq!(gap["channel"], "room");
    assert_eq!(gap["recovered"], false, "{gap}");
    let new_epoch = gap["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(gap["offset"], 0);
    b.push("room", "\"after\"").await;
    assert_eq!(ws.recv_offset().await, (1, json!("after")));
    // Ended credentials stay ended, on every node.
    for gw in [&a, &b] {
        assert_eq!(gw.try_connect(&closed).await.err(), Some(403));
        assert_eq!(gw.try_connect(&ended).await.err(), Some(403));
    }
    // A client that recovers from the old epoch gets recovered:false, not a replay.
    let fresh = b.issue().await;
    b.subscribe(&fresh, &["room"]).await;
    let mut other = b
        .connect_recovering(&fresh, &recover("room", &old_epoch, 1), None)
        .await
        .unwrap();
    let connected = other.connected().await;
    assert_eq!(connected["channels"]["room"]["recovered"], false);
    assert_eq!(position_of(&connected, "room"), (new_epoch, 1));
}

/// A push whose pub/sub message never arrived (Redis blinked): the next one shows the hole, and
/// the node fills it from the channel's log before delivering further; when the log does not
/// have it either, the node says so (`recovered:false`) instead of delivering past it silently.
#[tokio::test]
async fn a_hole_in_the_pubsub_stream_is_filled_from_history_or_signalled() {
    let prefix = unique_prefix("hole");
    let a = node(REDIS, &prefix).await;
    let creds = a.issue().await;
    a.subscribe(&creds, &["room"]).await;
    let mut ws = a
        .connect_recovering(&creds, &json!({}), None)
        .await
        .unwrap();
    ws.connected().await;
    a.push("room", "1").await;
    assert_eq!(ws.recv_offset().await, (1, json!(1)));

    let redis = redis::Client::open(REDIS).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let meta = format!("{prefix}:{{0}}:ch:room:m");
    let log = format!("{prefix}:{{0}}:ch:room:l");
    // Offset 2 is taken and kept in the log, but its publish is lost.
    let two: u64 = redis::cmd("HINCRBY")
        .arg(&meta)
        .arg("o")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(two, 2);
    let _: String = redis::cmd("XADD")
        .arg(&log)
        .arg("0-2")
        .arg("t")
        .arg(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        )
        .arg("p")
        .arg("2")
        .query_async(&mut conn)
        .await
        .unwrap();
    a.push("room", "3").await;
    assert_eq!(ws.recv_offset().await, (2, json!(2)), "filled from the log");
    assert_eq!(ws.recv_offset().await, (3, json!(3)));

    // Offset 4 is taken, never kept, never published: a gap, said once, then 5 as usual.
    let _: u64 = redis::cmd("HINCRBY")
        .arg(&meta)
        .arg("o")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    a.push("room", "5").await;
    let gap = ws.recv_json().await;
    assert_eq!(
        (gap["recovered"].as_bool(), gap["offset"].as_u64()),
        (Some(false), Some(4)),
        "{gap}"
    );
    assert_eq!(ws.recv_offset().await, (5, json!(5)));
    a.push("room", "6").await;
    assert_eq!(ws.recv_offset().await, (6, json!(6)));
    let (_, metrics) = a.http_get("/metrics", &[]).await;
    assert!(metrics.contains("channelgate_gaps_total 1"), "{metrics}");
}

crate::on_both!(
    a_socket_whose_node_was_killed_resumes_on_another_node_with_nothing_lost,
    history_paging_listen_from_positions_and_idempotent_pushes_across_nodes,
    pushes_through_two_nodes_get_one_order_per_channel,
);
