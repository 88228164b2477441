//! The control plane: the gRPC status of every invalid request, Stats, Disconnect, and
//! bearer-token authentication.

use tonic::{Code, Request};

use crate::support::{code, Gateway, TestPki};

fn code_of<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    result.expect_err("the call must fail").code()
}
use channelgate::pb::{self, control_client::ControlClient};

#[tokio::test]
async fn invalid_requests_get_their_status_codes() {
    let gw = Gateway::start().await;
    let mut c = gw.control();
    let creds = gw.issue().await;
    let digest = creds.digest.clone();
    let sub = |digest: &str, channels: &[&str]| pb::SubscribeRequest {
        digest: digest.into(),
        channels: channels.iter().map(|s| s.to_string()).collect(),
    };

    assert_eq!(
        code_of(c.subscribe(sub(&digest, &[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.subscribe(sub(&digest, &["has space"])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.subscribe(sub(&digest, &[""])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.subscribe(sub(&digest, &[&"x".repeat(256)])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.subscribe(sub("not-hex", &["a"])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.subscribe(sub(&"0".repeat(64), &["a"])).await),
        Code::NotFound
    );
    let unsub = pb::UnsubscribeRequest {
        digest: digest.clone(),
        channels: vec![],
    };
    assert_eq!(code_of(c.unsubscribe(unsub).await), Code::InvalidArgument);

    let push = |channels: Vec<String>, json: &str| pb::PushRequest {
        channels,
        json: json.into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.push(push(vec!["a".into()], "{not json")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.push(push(vec!["a".into()], "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.push(push(vec![], "1")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.push(push(vec!["a b".into()], "1")).await),
        Code::InvalidArgument
    );
    let big = format!("\"{}\"", "x".repeat(300 << 10));
    assert_eq!(
        code_of(c.push(push(vec!["a".into()], &big)).await),
        Code::ResourceExhausted
    );

    let send = |digest: &str, channel: &str, json: &str| pb::SendRequest {
        digest: digest.into(),
        channel: channel.into(),
        json: json.into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.send(send(&digest, "a", "nope")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.send(send(&digest, "", "1")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.send(send(&"f".repeat(64), "a", "1")).await),
        Code::NotFound
    );

    let disconnect = |code: u32, reason: &str| pb::DisconnectRequest {
        digest: digest.clone(),
        code,
        reason: reason.into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(c.disconnect(disconnect(1000, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code_of(c.disconnect(disconnect(5000, "")).await),
        Code::InvalidArgument
    );
    // Disconnect ends the credentials, so the codes that tell a client to reconnect (4100-4299)
    // or that no range defines are refused: one close-code contract for node and client.
    for code in [4100, 4101, 4200, 4299, 4300, 4999] {
        assert_eq!(
            code_of(c.disconnect(disconnect(code, "")).await),
            Code::InvalidArgument,
            "code {code}"
        );
    }
    assert_eq!(
        code_of(c.disconnect(disconnect(4000, &"r".repeat(124))).await),
        Code::InvalidArgument
    );

    let ttl = pb::IssueConnectionRequest {
        ttl_ms: 48 * 3600 * 1000,
        channels: vec![],
        ..Default::default()
    };
    assert_eq!(
        code_of(c.issue_connection(ttl).await),
        Code::InvalidArgument
    );
    let stats = pb::StatsRequest {
        per_channel: true,
        channels: vec!["bad name".into()],
    };
    assert_eq!(code_of(c.stats(stats).await), Code::InvalidArgument);

    // None of it disturbed the credentials.
    gw.connect(&creds).await;
}

#[tokio::test]
async fn disconnect_closes_with_the_application_code_and_ends_the_id() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&["x"]).await;
    let r = gw
        .control()
        .disconnect(pb::DisconnectRequest {
            digest: creds.digest.clone(),
            code: 4003,
            reason: "banned".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.closed);
    let close = ws.expect_close().await;
    assert_eq!((code(&close), close.reason.as_str()), (4003, "banned"));
    assert_eq!(gw.try_connect(&creds).await.err(), Some(403));

    let (creds, mut ws) = gw.subscriber(&[]).await;
    gw.control()
        .disconnect(pb::DisconnectRequest {
            digest: creds.digest,
            code: 0,
            reason: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(code(&ws.expect_close().await), 4000);
}

#[tokio::test]
async fn a_message_sent_just_before_disconnect_arrives_first() {
    let gw = Gateway::start().await;
    let (creds, mut ws) = gw.subscriber(&[]).await;
    let mut c = gw.control();
    c.send(pb::SendRequest {
        digest: creds.digest.clone(),
        channel: "bye".into(),
        json: "\"goodbye\"".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.disconnect(pb::DisconnectRequest {
        digest: creds.digest,
        code: 4001,
        reason: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ws.recv_push().await, ("bye".into(), "goodbye".into()));
    assert_eq!(code(&ws.expect_close().await), 4001);
}

#[tokio::test]
async fn stats_report_connections_channels_and_subscriptions() {
    let gw = Gateway::start().await;
    let (_, _a) = gw.subscriber(&["x", "y"]).await;
    let (_, _b) = gw.subscriber(&["x"]).await;
    let offline = gw.issue().await;
    gw.subscribe(&offline, &["z"]).await;
    let s = gw
        .control()
        .stats(pb::StatsRequest {
            per_channel: true,
            channels: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.connections, s.channels, s.subscriptions, s.sessions),
        (2, 2, 4, 3)
    );
    assert_eq!(s.channel_subscribers.get("x"), Some(&2));
    assert_eq!(s.channel_subscribers.get("y"), Some(&1));
    let s = gw.stats().await;
    assert!(s.channel_subscribers.is_empty());
}

#[tokio::test]
async fn control_tokens_are_required_when_configured() {
    let gw = Gateway::start_with(|c| {
        c.control_token = Some(vec!["old-token".into(), "new-token".into()])
    })
    .await;
    let mut c = ControlClient::connect(format!("http://{}", gw.grpc))
        .await
        .unwrap();
    let call = |token: Option<&str>| {
        let mut r = Request::new(pb::IssueConnectionRequest::default());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    assert_eq!(
        c.issue_connection(call(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.issue_connection(call(Some("wrong")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(c.issue_connection(call(Some("old-token"))).await.is_ok());
    assert!(c.issue_connection(call(Some("new-token"))).await.is_ok());
}

#[tokio::test]
async fn grpc_health_and_reflection_answer_even_with_tokens() {
    let gw = Gateway::start_with(|c| c.control_token = Some(vec!["secret-token".into()])).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "channelgate.v1.Control".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "channelgate.v1.Control"),
        "{list:?}"
    );
}

#[tokio::test]
async fn mutual_tls_on_the_control_plane() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = TestPki::new();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let gw = Gateway::start_with(move |c| {
        (c.grpc_tls_cert, c.grpc_tls_key) = (Some(cert), Some(key));
        c.grpc_client_ca = Some(ca);
    })
    .await;
    let url = format!("https://localhost:{}", gw.grpc.port());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.pem")))
        .domain_name("localhost");

    // With a client certificate from the CA: served.
    let with_cert = tls.clone().identity(Identity::from_pem(
        pki.read("client.pem"),
        pki.read("client.key"),
    ));
    let channel = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(with_cert)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ControlClient::new(channel);
    assert!(c
        .issue_connection(pb::IssueConnectionRequest::default())
        .await
        .is_ok());

    // Without one: the TLS handshake is refused, so no call gets through.
    let refused = match Endpoint::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => ControlClient::new(channel)
            .issue_connection(pb::IssueConnectionRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // Plaintext: refused too.
    let plain = match ControlClient::connect(format!("http://{}", gw.grpc)).await {
        Err(_) => true,
        Ok(mut c) => c
            .issue_connection(pb::IssueConnectionRequest::default())
            .await
            .is_err(),
    };
    assert!(plain, "a plaintext client was served");
}

/// Many tools (Python's grpcio-reflection, older grpcurl, Postman) ask for reflection v1alpha
/// only; both versions list the Control service.
#[tokio::test]
async fn reflection_answers_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let gw = Gateway::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = alpha
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list, got {reply:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "channelgate.v1.Control"),
        "{list:?}"
    );

    let mut stable = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = stable
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("v1 reflection is served")
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    assert!(format!("{reply:?}").contains("channelgate.v1.Control"));
}

/// The typed client (`channelgate::client`) drives every call of a node: the one the CLI and
/// the chat example use.
#[tokio::test]
async fn the_typed_client_drives_a_node() {
    use channelgate::client::Client;
    let gw = Gateway::start_with(|c| c.control_token = Some(vec!["t0ken".into()])).await;
    let url = format!("http://{}", gw.grpc);
    let without = Client::connect(url.clone()).await.unwrap();
    let refused = without.stats(false, &["a"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let client = Client::builder(url).token("t0ken").connect().await.unwrap();
    let creds = client.issue(None, &["room"]).await.unwrap();
    assert!(
        !format!("{creds:?}").contains(&creds.socket_key),
        "the key stays out of Debug"
    );
    let mut ws = gw
        .connect(&crate::support::Creds {
            id: creds.connection_id.clone(),
            key: creds.socket_key.clone(),
            digest: creds.digest.clone(),
            expires_at_ms: creds.expires_at_unix_ms,
        })
        .await;
    let mut listen = client.listen(&["room"]).await.unwrap();
    assert_eq!(client.push(&["room"], r#"{"n":1}"#).await.unwrap(), 1);
    assert_eq!(ws.recv_push().await.1, serde_json::json!({"n": 1}));
    assert_eq!(listen.message().await.unwrap().unwrap().json, r#"{"n":1}"#);
    assert!(client.send(&creds.digest, "me", "2").await.unwrap());
    assert_eq!(ws.recv_push().await, ("me".into(), serde_json::json!(2)));
    assert!(client.subscribe(&creds.digest, &["other"]).await.unwrap());
    assert!(client.unsubscribe(&creds.digest, &["other"]).await.unwrap());
    let stats = client.stats(true, &["room"]).await.unwrap();
    assert_eq!(stats.channel_subscribers.get("room"), Some(&1));

    let mut handler = client.handle("app", &["hello"], false).await.unwrap();
    ws.send_text(r#"{"action":"hello","id":7}"#).await;
    let message = handler.next().await.unwrap().expect("a client message");
    assert_eq!(message.action, "hello");
    handler
        .reply(message.delivery_id, 200, r#"{"hi":true}"#)
        .await
        .unwrap();
    let reply = ws.recv_json().await;
    assert_eq!(
        (reply["id"].clone(), reply["status"].clone()),
        (7.into(), 200.into())
    );

    assert!(client.disconnect(&creds.digest, 4001, "bye").await.unwrap());
    assert_eq!(code(&ws.expect_close().await), 4001);
}

/// A page-render burst: many `IssueConnection` + `Subscribe` calls in flight at once over one
/// HTTP/2 connection, and over sixteen. Every call succeeds.
async fn burst(gw: &Gateway, connections: usize, in_flight: usize) {
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(
            channelgate::client::Client::connect(format!("http://{}", gw.grpc))
                .await
                .unwrap(),
        );
    }
    // Each call its own task, as in a server rendering pages on many threads.
    let calls: Vec<_> = (0..in_flight)
        .map(|i| {
            let client = clients[i % connections].clone();
            tokio::spawn(async move {
                let creds = client.issue(None, &[] as &[&str]).await?;
                client.subscribe(&creds.digest, &["burst"]).await
            })
        })
        .collect();
    let results: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("the call's task"))
        .collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {in_flight} calls failed over {connections} connection(s), e.g. {:?}",
        failed.len(),
        failed.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_in_flight_over_one_connection_all_succeed() {
    let gw = Gateway::start().await;
    burst(&gw, 1, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_in_flight_over_sixteen_connections_all_succeed() {
    let gw = Gateway::start().await;
    burst(&gw, 16, 1000).await;
}
