//! The NATS JetStream consumer against a real NATS: each test makes a stream and subjects of its
//! own (deleted at the end) on the machine's server, or runs a private server to restart it.

use async_nats::{jetstream, HeaderMap};
use serde_json::{json, Value};

use crate::{
    cluster::{self, unique_prefix},
    outbox::metric_at,
    support::{consumers, node_behind_a_valve, unique, wait_until, Gateway, PrivateNats, Ws},
};

/// A stream and subject of this test's own on the NATS at `url`; the stream is deleted when
/// the value is dropped (on a runtime thread of its own).
struct TestStream {
    url: String,
    stream: String,
    subject: String,
    js: jetstream::Context,
}

impl TestStream {
    async fn new(url: &str) -> Self {
        let tag = unique("cgtest");
        let client = async_nats::connect(url).await.expect("connect to NATS");
        Self {
            url: url.to_owned(),
            stream: tag.to_uppercase(),
            subject: format!("{tag}.commands"),
            js: jetstream::new(client),
        }
    }

    /// A `[[consumers]]` table of kind nats on this stream, with `extra` TOML lines.
    fn consumer(&self, extra: &str) -> String {
        format!(
            "[[consumers]]\nkind = \"nats\"\nname = \"events\"\nurl = \"{}\"\nstream = \"{}\"\n\
             subject = \"{}\"\ncreate = true\npoll-interval = \"200ms\"\nmax-backoff = \"200ms\"\n{extra}\n",
            self.url, self.stream, self.subject
        )
    }

    /// Publishes `body` with `method` (no header when `None`), acknowledged by the stream.
    async fn publish(&self, method: Option<&str>, body: &str) {
        let mut headers = HeaderMap::new();
        if let Some(method) = method {
            headers.insert("Channelgate-Method", method);
        }
        self.js
            .publish_with_headers(self.subject.clone(), headers, body.to_owned().into())
            .await
            .expect("publish")
            .await
            .expect("the stream stored it");
    }

    /// Publishes a push of `{"n": n}` to channel `js` for each `n`, in order.
    async fn pushes(&self, ns: std::ops::Range<u64>) {
        for n in ns {
            self.push(n).await;
        }
    }

    async fn push(&self, n: u64) {
        let body = json!({"channel": "js", "data": {"n": n}}).to_string();
        self.publish(Some("push"), &body).await;
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = async_nats::connect(url).await {
                    let js = jetstream::new(client);
                    let _ = js.delete_stream(&stream).await;
                    // The consumer's lease bucket.
                    let _ = js
                        .delete_stream(format!("KV_channelgate_lease_{stream}_channelgate"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Reads pushes `from..to` on `ws` in order, then no other.
async fn expect_pushes(ws: &mut Ws, from: u64, to: u64) {
    for n in from..to {
        let (channel, payload) = ws.recv_push().await;
        assert_eq!(
            (channel.as_str(), &payload),
            ("js", &json!({"n": n})),
            "push {n}"
        );
    }
}

/// A marker message, which must be the next frame: nothing came twice before it.
async fn nothing_more(stream: &TestStream, ws: &mut Ws) {
    let body = json!({"channel": "js", "data": {"marker": true}}).to_string();
    stream.publish(Some("push"), &body).await;
    let (_, payload): (String, Value) = ws.recv_push().await;
    assert_eq!(payload, json!({"marker": true}));
}

const CONNECTED: &str = "channelgate_consumer_connected{consumer=\"events\"}";

/// A node running the consumers of `toml`, and a socket on channel `js`, once the node's
/// consumer has reached its source.
async fn consuming(toml: &str) -> (Gateway, Ws) {
    let gw = Gateway::start_with(|c| c.consumers = consumers(toml)).await;
    let ws = subscribed_once_consuming(&gw).await;
    (gw, ws)
}

/// A socket of `gw` on channel `js`, once `gw`'s consumer has reached its source.
async fn subscribed_once_consuming(gw: &Gateway) -> Ws {
    let (_, ws) = gw.subscriber(&["js"]).await;
    wait_until(|| async { gw.metric(CONNECTED).await == 1 }).await;
    ws
}

#[tokio::test]
async fn messages_reach_sockets_once_in_order_and_poison_is_terminated() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    let toml = stream.consumer("batch = 16");
    let (gw, mut ws) = consuming(&toml).await;

    for n in 0..100 {
        stream.push(n).await;
        match n {
            10 => stream.publish(None, r#"{"channel":"js","data":1}"#).await,
            20 => stream.publish(Some("teleport"), "{}").await,
            30 => stream.publish(Some("push"), "{not json").await,
            40 => {
                stream
                    .publish(Some("push"), r#"{"channel":"no way!","data":1}"#)
                    .await
            }
            _ => {}
        }
    }
    expect_pushes(&mut ws, 0, 100).await;
    nothing_more(&stream, &mut ws).await;
    let failed = |reason: &str| {
        format!("channelgate_consumer_failed_total{{consumer=\"events\",reason=\"{reason}\"}}")
    };
    assert_eq!(gw.metric(&failed("unknown_method")).await, 2);
    assert_eq!(gw.metric(&failed("bad_json")).await, 1);
    assert_eq!(gw.metric(&failed("bad_channel")).await, 1);
    assert_eq!(
        gw.metric("channelgate_consumer_applied_total{consumer=\"events\"}")
            .await,
        101
    );
    // Everything acked or terminated: nothing left for the consumer.
    let consumer: jetstream::consumer::PullConsumer = stream
        .js
        .get_stream(&stream.stream)
        .await
        .unwrap()
        .get_consumer("channelgate")
        .await
        .unwrap();
    wait_until(|| async {
        let info = consumer.get_info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
}

#[tokio::test]
async fn a_deleted_consumer_is_created_again_where_it_stopped() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    let toml = stream.consumer("");
    let (_gw, mut ws) = consuming(&toml).await;
    stream.pushes(0..50).await;
    expect_pushes(&mut ws, 0, 50).await;

    stream
        .js
        .delete_consumer_from_stream("channelgate", &stream.stream)
        .await
        .expect("delete the consumer");
    stream.pushes(50..100).await;
    // The first 50 are not delivered again: the new consumer starts after them.
    expect_pushes(&mut ws, 50, 100).await;
    nothing_more(&stream, &mut ws).await;
}

#[tokio::test]
async fn a_deleted_stream_is_created_again_and_consumed_from_its_start() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    let toml = stream.consumer("");
    let (_gw, mut ws) = consuming(&toml).await;
    stream.pushes(0..20).await;
    expect_pushes(&mut ws, 0, 20).await;

    stream
        .js
        .delete_stream(&stream.stream)
        .await
        .expect("delete the stream");
    // The consumer makes the stream again (create = true); publishes succeed once it has.
    wait_until(|| async { stream.js.get_stream(&stream.stream).await.is_ok() }).await;
    stream.pushes(20..40).await;
    // The new stream's sequences start at 1 again: read from its start, nothing skipped.
    expect_pushes(&mut ws, 20, 40).await;
    nothing_more(&stream, &mut ws).await;
}

#[tokio::test]
async fn messages_that_meet_a_stalled_redis_come_back_and_arrive_once_in_order() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    let (valve, gw) = node_behind_a_valve("js-stall", stream.consumer("batch = 4")).await;
    let mut ws = subscribed_once_consuming(&gw).await;
    stream.push(0).await;
    expect_pushes(&mut ws, 0, 1).await;

    valve.set_open(false);
    stream.pushes(1..11).await;
    let transient = "channelgate_consumer_failed_total{consumer=\"events\",reason=\"transient\"}";
    wait_until(|| async { gw.metric(transient).await >= 2 }).await;
    valve.set_open(true);
    // Naked with the back-off's delay and pulled again once due: redelivered before newer
    // messages, each applied once (a push taken late by Redis makes its retry a no-op).
    expect_pushes(&mut ws, 1, 11).await;
    nothing_more(&stream, &mut ws).await;
}

#[tokio::test]
async fn one_node_at_a_time_consumes_and_another_takes_over_when_it_dies() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    let toml = stream.consumer("batch = 8\nlease-ttl = \"2s\"\nack-wait = \"2s\"");
    let file = std::env::temp_dir().join(format!("{}.toml", stream.stream));
    std::fs::write(&file, &toml).unwrap();
    let prefix = unique_prefix("js-lease");
    let (mut doomed, doomed_http, _) =
        cluster::spawn_node(&prefix, &["--config", file.to_str().unwrap()]);
    let held = "channelgate_consumer_partitions_held{consumer=\"events\"}";
    wait_until(|| async { metric_at(&doomed_http, held).await == 1 }).await;
    let survivor = cluster::node_with(&cluster::redis(), &prefix, move |c| {
        c.consumers = consumers(&toml)
    })
    .await;
    wait_until(|| async { survivor.metric(CONNECTED).await == 1 }).await;
    let (_, mut ws) = survivor.subscriber(&["js"]).await;

    stream.pushes(0..100).await;
    // The first node applies them (through Redis to this socket); the other stands by.
    expect_pushes(&mut ws, 0, 30).await;
    assert_eq!(survivor.metric(held).await, 0, "one node at a time");
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    stream.pushes(100..150).await;
    // The lease ages out (2 s), the survivor takes it, waits out the dead node's deliveries
    // (ack-wait, 2 s) and goes on: each message once, in order, the dead node's unacked ones
    // no-ops where it had applied them (their keys).
    expect_pushes(&mut ws, 30, 150).await;
    assert_eq!(survivor.metric(held).await, 1);
    nothing_more(&stream, &mut ws).await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn a_draining_holder_hands_the_consumer_over_at_once() {
    let url = crate::setup::nats();
    let stream = TestStream::new(url).await;
    // A lease that would outlive the test's patience: only its deletion lets the other in.
    let toml = stream.consumer("lease-ttl = \"60s\"");
    let held = "channelgate_consumer_partitions_held{consumer=\"events\"}";
    let (leaving, _) = consuming(&toml).await;
    wait_until(|| async { leaving.metric(held).await == 1 }).await;
    let (staying, mut ws) = consuming(&toml).await;
    assert_eq!(staying.metric(held).await, 0, "one node at a time");

    leaving.shutdown().await;
    wait_until(|| async { staying.metric(held).await == 1 }).await;
    stream.pushes(0..10).await;
    expect_pushes(&mut ws, 0, 10).await;
    nothing_more(&stream, &mut ws).await;
}

#[tokio::test]
async fn nats_restarted_the_consumer_recovers_and_loses_nothing() {
    let mut nats = PrivateNats::start();
    let stream = TestStream::new(&nats.url()).await;
    let toml = stream.consumer("");
    let (gw, mut ws) = consuming(&toml).await;
    stream.pushes(0..100).await;
    expect_pushes(&mut ws, 0, 100).await;

    nats.kill();
    wait_until(|| async { gw.metric(CONNECTED).await == 0 }).await;
    assert_eq!(
        gw.http_get("/readyz", &[]).await.0,
        200,
        "not the client plane's readiness"
    );
    nats.start_again();
    let again = TestStream {
        url: stream.url.clone(),
        stream: stream.stream.clone(),
        subject: stream.subject.clone(),
        js: jetstream::new(async_nats::connect(nats.url()).await.unwrap()),
    };
    again.pushes(100..200).await;
    expect_pushes(&mut ws, 100, 200).await;
    nothing_more(&again, &mut ws).await;
    std::mem::forget(stream); // `again` deletes the stream.
}
