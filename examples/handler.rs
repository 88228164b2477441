//! A handler service: answers the client action `echo` over a `Handle` stream, and logs
//! sockets as they connect and disconnect.
//!
//! ```sh
//! cargo run --release -- serve            # terminal 1: the gateway
//! cargo run --example handler             # terminal 2: this service
//! ```
//! Then a client sending `{"action":"echo","id":1,"text":"hi"}` gets
//! `{"id":1,"status":200,"headers":{"x-handled-by":"example"},"body":{"echo":"HI"}}`.

use std::collections::HashMap;

use channelgate::pb::{
    control_client::ControlClient, handle_request::Kind, HandleRequest, Register, Reply,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("CHANNELGATE_SERVER").unwrap_or("http://127.0.0.1:50051".into());
    let mut control = ControlClient::connect(server).await?;

    // The first message registers the actions (and a group: streams in one group share the load).
    let (tx, rx) = mpsc::channel(256);
    tx.send(HandleRequest {
        kind: Some(Kind::Register(Register {
            group: "example".into(),
            actions: vec!["echo".into()],
            lifecycle_events: true,
        })),
    })
    .await?;
    let mut messages = control.handle(ReceiverStream::new(rx)).await?.into_inner();
    println!("handling `echo`; waiting for client messages");

    while let Some(message) = messages.message().await? {
        match message.action.as_str() {
            "$connect" | "$disconnect" => {
                println!(
                    "{} {} {}",
                    message.action, message.connection_id, message.json
                );
            }
            "echo" => {
                // `json` is the whole client message.
                let sent: serde_json::Value = serde_json::from_str(&message.json)?;
                let text = sent["text"].as_str().unwrap_or_default().to_uppercase();
                tx.send(HandleRequest {
                    kind: Some(Kind::Reply(Reply {
                        delivery_id: message.delivery_id,
                        status: 200,
                        headers: HashMap::from([("x-handled-by".into(), "example".into())]),
                        body_json: serde_json::json!({ "echo": text }).to_string(),
                    })),
                })
                .await?;
            }
            other => println!("unexpected action {other}"),
        }
    }
    Ok(())
}
