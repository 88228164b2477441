//! One readiness: `/readyz` and the gRPC health service (`Check` and `Watch`, for
//! `channelgate.v1.Control` and `""`) say the same thing before the node is ready, while Redis
//! is down or stalled, and while the node drains; and both come back together.

use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::{
    cluster::{unique_prefix, PrivateRedis, SECRET},
    support::{wait_until, Gateway, Valve, PATIENCE},
};

const SERVICES: [&str; 2] = ["", "channelgate.v1.Control"];

async fn health(gw: &Gateway) -> HealthClient<Channel> {
    HealthClient::new(
        Channel::from_shared(format!("http://{}", gw.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

/// `Check` of every service, and `/readyz`: `Some(true)` when all say ready, `Some(false)`
/// when all say not ready, `None` when they disagree.
async fn probes(gw: &Gateway, client: &mut HealthClient<Channel>) -> Option<bool> {
    let mut answers = Vec::new();
    for service in SERVICES {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Check answers")
            .into_inner()
            .status;
        answers.push(status == ServingStatus::Serving as i32);
        assert!(
            status == ServingStatus::Serving as i32 || status == ServingStatus::NotServing as i32,
            "{status}"
        );
    }
    let (status, _) = gw.http_get("/readyz", &[]).await;
    answers.push(status == 200);
    answers
        .iter()
        .all(|a| *a == answers[0])
        .then_some(answers[0])
}

/// Waits until every probe says `ready` (they may disagree for the instant a change takes,
/// never for longer).
async fn wait_probes(gw: &Gateway, client: &mut HealthClient<Channel>, ready: bool) {
    wait_until(|| {
        let mut client = client.clone();
        async move { probes(gw, &mut client).await == Some(ready) }
    })
    .await;
}

/// A `Watch` stream of `service`.
async fn watch(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    client
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("Watch answers")
        .into_inner()
}

async fn next_status(stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a status in time")
        .expect("the Watch stream is fine")
        .expect("the Watch stream goes on")
        .status
}

#[tokio::test]
async fn grpc_health_says_what_readyz_says_before_ready_while_redis_is_down_or_stalled() {
    // The node starts before its Redis exists: not ready, on every probe.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let valve = Valve::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let prefix = unique_prefix("probes");
    let (url, redis_prefix) = (format!("redis://{}", valve.addr), prefix.clone());
    let gw = Gateway::start_with(move |c| {
        c.redis = Some(url);
        c.redis_prefix = redis_prefix;
        c.secret = Some(SECRET.into());
    })
    .await;
    let mut client = health(&gw).await;
    assert_eq!(probes(&gw, &mut client).await, Some(false));
    let mut watches = Vec::new();
    for service in SERVICES {
        let mut stream = watch(&mut client, service).await;
        assert_eq!(
            next_status(&mut stream).await,
            ServingStatus::NotServing as i32
        );
        watches.push(stream);
    }

    // Redis appears: ready everywhere, and each Watch says so.
    let mut redis = PrivateRedis::start_on(port);
    wait_probes(&gw, &mut client, true).await;
    for stream in &mut watches {
        assert_eq!(next_status(stream).await, ServingStatus::Serving as i32);
    }

    // Redis stalls (the network drops its packets): not ready everywhere, then ready again.
    valve.set_open(false);
    wait_probes(&gw, &mut client, false).await;
    for stream in &mut watches {
        assert_eq!(next_status(stream).await, ServingStatus::NotServing as i32);
    }
    valve.set_open(true);
    wait_probes(&gw, &mut client, true).await;
    for stream in &mut watches {
        assert_eq!(next_status(stream).await, ServingStatus::Serving as i32);
    }

    // Redis dies: not ready everywhere.
    redis.kill();
    wait_probes(&gw, &mut client, false).await;
    for stream in &mut watches {
        assert_eq!(next_status(stream).await, ServingStatus::NotServing as i32);
    }
}

#[tokio::test]
async fn grpc_health_says_not_serving_while_the_node_drains() {
    let gw = Gateway::start().await;
    let mut client = health(&gw).await;
    assert_eq!(probes(&gw, &mut client).await, Some(true));
    let mut stream = watch(&mut client, "channelgate.v1.Control").await;
    assert_eq!(
        next_status(&mut stream).await,
        ServingStatus::Serving as i32
    );
    // A socket that does not answer its close keeps the drain going for a while; the control
    // plane answers meanwhile.
    let (_, _ws) = gw.subscriber(&["room"]).await;
    gw.begin_shutdown();
    assert_eq!(
        next_status(&mut stream).await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(probes(&gw, &mut client).await, Some(false));
}

#[tokio::test]
async fn grpc_health_of_an_unknown_service_is_not_found_or_unknown() {
    let gw = Gateway::start().await;
    let mut client = health(&gw).await;
    let status = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let mut stream = watch(&mut client, "no.such.Service").await;
    assert_eq!(
        next_status(&mut stream).await,
        ServingStatus::ServiceUnknown as i32
    );
}
