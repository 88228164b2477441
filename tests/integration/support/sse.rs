//! A Server-Sent Events client as a browser's `EventSource` behaves: one HTTP/1.1 `GET`, events
//! parsed as they arrive (`id`, `event`, `data` lines, comments skipped), and the last id kept
//! for the `Last-Event-ID` of a reconnect.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{Creds, PATIENCE};

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `event:` (`message` when absent).
    pub kind: String,
    /// The `id:` it carried, if any.
    pub id: Option<String>,
    /// `data:` lines joined with `\n`, parsed as JSON.
    pub data: Value,
}

pub struct Sse {
    reader: BufReader<TcpStream>,
    /// The last id seen, as `EventSource` keeps it.
    pub last_id: Option<String>,
    /// The response's head.
    pub head: String,
}

/// What opening a stream got: the stream, or the refusal's status and body (`200` and the
/// reason for a "come back later" answer, which a browser's EventSource retries).
pub async fn open_sse(
    http: SocketAddr,
    creds: &Creds,
    last_id: Option<&str>,
    extra: &[(&str, &str)],
) -> Result<Sse, (u16, String)> {
    open_sse_at(
        http,
        &format!("/sse?socket_connection_id={}", creds.id),
        &creds.key,
        last_id,
        extra,
    )
    .await
}

/// [`open_sse`] on any path and query.
pub async fn open_sse_at(
    http: SocketAddr,
    target: &str,
    key: &str,
    last_id: Option<&str>,
    extra: &[(&str, &str)],
) -> Result<Sse, (u16, String)> {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\nCookie: socket_key={key}\r\n"
    );
    if let Some(id) = last_id {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, reader.read_line(&mut line))
            .await
            .expect("an answer in time")
            .unwrap();
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status != 200 {
        let mut body = String::new();
        let _ = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut body),
        )
        .await;
        return Err((status, body));
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    // The stream's first block is its `retry`; a "come back later" answer says why beside it
    // and ends: that is `Err((200, why))`.
    let mut seen_retry = false;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, reader.read_line(&mut line))
            .await
            .expect("the stream's first block in time")
            .unwrap();
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(why) = line.strip_prefix(": not now: ") {
            return Err((200, why.to_owned()));
        }
        if n == 0 || (seen_retry && line.is_empty()) {
            break;
        }
        seen_retry |= line.starts_with("retry:");
    }
    Ok(Sse {
        reader,
        last_id: last_id.map(str::to_owned),
        head,
    })
}

impl Sse {
    /// The next event; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        let (mut kind, mut id, mut data): (Option<String>, Option<String>, Vec<String>) =
            (None, None, Vec::new());
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
                .await
                .expect("an event in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            // Chunked transfer coding: chunk sizes are lines of hex digits between events.
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                if id.is_some() {
                    self.last_id.clone_from(&id);
                }
                let text = data.join("\n");
                let data = serde_json::from_str(&text).unwrap_or(Value::String(text));
                return Some(Event {
                    kind: kind.unwrap_or_else(|| "message".into()),
                    id,
                    data,
                });
            }
            // The last chunk of a chunked body: the stream ended.
            if line == "0" && data.is_empty() {
                return None;
            }
            if line.starts_with(':') || line.starts_with("retry:") {
                continue;
            }
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.to_owned());
            } else if line.bytes().all(|b| b.is_ascii_hexdigit()) {
                // a chunk size
            } else {
                panic!("not an event-stream line: {line:?}");
            }
        }
    }

    /// The next event that is a push or a position frame (skips none).
    pub async fn data(&mut self) -> Value {
        self.next().await.expect("an event").data
    }
}
