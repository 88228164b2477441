//! The unary fast path (`control/fast.rs`) over a real HTTP/2 connection from hyper's client,
//! with request bodies built by hand: a good call gets one padded message and `grpc-status: 0`
//! in trailers, and bodies tonic refuses get tonic's answers (stock clients, which never send
//! them, are covered by every other control test).

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use prost::Message;

use channelgate::pb;

use crate::support::Gateway;

const PUSH: &str = "/channelgate.v1.Control/Push";

/// What a unary call answered: the head's and trailers' `grpc-status`, and the body's bytes.
struct Answer {
    head_status: Option<String>,
    trailer_status: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

impl Answer {
    /// The call's status: trailers-only (in the head) or in the trailers.
    fn status(&self) -> &str {
        self.head_status
            .as_deref()
            .or(self.trailer_status.as_deref())
            .unwrap_or("none")
    }
}

/// Sends `body` as a unary call to `path` over a fresh HTTP/2 connection.
async fn call(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
    let stream = tokio::net::TcpStream::connect(gw.grpc).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::post(format!("http://{}{path}", gw.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = send
        .send_request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (head_status, content_type) = (header("grpc-status"), header("content-type"));
    let collected = response.into_body().collect().await.unwrap();
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    Answer {
        head_status,
        trailer_status,
        content_type,
        body: collected.to_bytes(),
    }
}

/// One gRPC message: the uncompressed flag, the length, the bytes.
fn framed(message: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out
}

fn push_request(channel: &str) -> Vec<u8> {
    pb::PushRequest {
        channels: vec![channel.into()],
        json: r#"{"n":1}"#.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[tokio::test]
async fn a_unary_push_is_answered_with_one_padded_message_and_status_zero() {
    let gw = Gateway::start().await;
    let answer = call(&gw, PUSH, &[], framed(&push_request("fast")).freeze()).await;
    assert_eq!(answer.head_status, None, "not trailers-only");
    assert_eq!(answer.trailer_status.as_deref(), Some("0"));
    assert_eq!(answer.content_type.as_deref(), Some("application/grpc"));
    // Padded to 512 bytes (control/pad.rs), one whole message that decodes.
    assert!(answer.body.len() >= 512, "{} bytes", answer.body.len());
    assert_eq!(answer.body[0], 0);
    let len = u32::from_be_bytes(answer.body[1..5].try_into().unwrap()) as usize;
    assert_eq!(answer.body.len(), 5 + len);
    let reply = pb::PushResponse::decode(&answer.body[5..]).unwrap();
    assert_eq!(reply.positions.len(), 1);
    assert_eq!(reply.positions[0].offset, 1);
    assert_eq!(
        gw.metric(&format!(
            "channelgate_control_requests_total{{code=\"0\",method=\"{PUSH}\"}}"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn bodies_tonic_refuses_get_tonics_answers_and_nothing_else_changes() {
    let gw = Gateway::start().await;
    let good = framed(&push_request("fast"));
    let mut two = good.clone();
    two.extend_from_slice(&good);
    let mut flagged = good.clone();
    flagged[0] = 1;
    let truncated = good.clone().split_to(good.len() - 3);
    let garbage = framed(&[0xff; 16]);
    let mut huge = BytesMut::new();
    huge.put_u8(0);
    huge.put_u32((4 << 20) + 1);
    huge.put_bytes(b'x', (4 << 20) + 1);
    let cases: [(&str, BytesMut, &str); 6] = [
        ("two messages", two, "13"),
        ("compressed flag without an encoding", flagged, "13"),
        ("a truncated message", truncated, "13"),
        ("a message that does not decode", garbage, "13"),
        ("no message", BytesMut::new(), "13"),
        ("a message over 4 MiB", huge, "8"),
    ];
    for (what, body, status) in cases {
        let answer = call(&gw, PUSH, &[], body.freeze()).await;
        assert_eq!(answer.status(), status, "{what}");
    }
    // A compressed request goes to tonic, which does not take gzip here.
    let gzip = call(
        &gw,
        PUSH,
        &[("grpc-encoding", "gzip")],
        good.clone().freeze(),
    )
    .await;
    assert_eq!(gzip.status(), "12", "gzip");
    // None of them pushed anything: the good call is the channel's first push.
    let answer = call(&gw, PUSH, &[], good.freeze()).await;
    assert_eq!(answer.status(), "0");
    let reply = pb::PushResponse::decode(&answer.body[5..]).unwrap();
    assert_eq!(reply.positions[0].offset, 1);
}

#[tokio::test]
async fn the_fast_path_checks_the_bearer_token() {
    let gw = Gateway::start_with(|c| c.control_token = Some(vec!["s3cret".into()])).await;
    let body = || framed(&push_request("fast")).freeze();
    assert_eq!(call(&gw, PUSH, &[], body()).await.status(), "16");
    let wrong = [("authorization", "Bearer nope")];
    assert_eq!(call(&gw, PUSH, &wrong, body()).await.status(), "16");
    let right = [("authorization", "Bearer s3cret")];
    assert_eq!(call(&gw, PUSH, &right, body()).await.status(), "0");
}
