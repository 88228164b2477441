//! A WebSocket client of the node, with helpers for frames, replies and closes.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    MaybeTlsStream, WebSocketStream,
};

use super::PATIENCE;

/// A WebSocket client.
pub struct Ws {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// The next message that is not a ping or pong.
    pub async fn next_message(&mut self) -> Option<Message> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Some(m),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("a message in time")
    }

    /// The next text frame, parsed.
    pub async fn recv_json(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).expect("JSON text frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame's payload, for a push: `(channel, payload)`.
    pub async fn recv_push(&mut self) -> (String, Value) {
        let v = self.recv_json().await;
        assert!(v.get("id").is_none(), "expected a push, got a reply: {v}");
        (
            v["channel"].as_str().unwrap().to_owned(),
            v["payload"].clone(),
        )
    }

    /// The first frame of a socket that asked for positions: `{"connected":{..}}`'s inside.
    pub async fn connected(&mut self) -> Value {
        let v = self.recv_json().await;
        assert!(
            v.get("connected").is_some(),
            "expected the connected frame, got {v}"
        );
        v["connected"].clone()
    }

    /// The next push: `(offset, payload)`; panics on anything else.
    pub async fn recv_offset(&mut self) -> (u64, Value) {
        let v = self.recv_json().await;
        let offset = v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("expected a push with an offset, got {v}"));
        (offset, v["payload"].clone())
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a client message and returns the reply.
    pub async fn request(&mut self, message: Value) -> Value {
        self.send_text(&message.to_string()).await;
        self.recv_json().await
    }

    /// Reads until the server's close frame, skipping anything before it, and completes the
    /// closing handshake as a browser would.
    pub async fn expect_close(&mut self) -> CloseFrame {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        // Polling on sends tungstenite's reply and sees the end of the stream.
                        while let Some(Ok(_)) = self.ws.next().await {}
                        return frame;
                    }
                    Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                    Some(Ok(_)) => continue,
                    other => panic!("stream ended without a close frame: {other:?}"),
                }
            }
        })
        .await
        .expect("a close frame in time")
    }

    /// Closes cleanly (close frame, then wait for the server's).
    pub async fn close(self) {
        self.close_with(1000).await;
    }

    /// Closes cleanly with `code`.
    pub async fn close_with(mut self, code: u16) {
        self.ws
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "bye".into(),
            }))
            .await
            .expect("close");
        while let Some(Ok(_)) = self.ws.next().await {}
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_unclean(self) {
        drop(self.ws);
    }
}

pub fn code(frame: &CloseFrame) -> u16 {
    u16::from(frame.code)
}
