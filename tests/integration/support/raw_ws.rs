//! A WebSocket client at the frame level, for what tungstenite cannot do: offer
//! permessage-deflate, read compressed frames (RSV1) as they came, and send compressed,
//! fragmented or hostile frames.

use flate2::{Decompress, FlushDecompress};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Creds, PATIENCE};

/// What a browser offers (Chromium's header).
pub const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The response head of the upgrade.
    pub head: String,
    /// Bytes read from the node so far, after the head (frame headers included).
    pub wire: usize,
}

/// One frame from the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The text of a text frame, inflated when it came compressed.
    pub fn text(&self) -> String {
        assert_eq!(self.opcode, 1, "a text frame");
        let bytes = if self.rsv1 {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).expect("UTF-8")
    }

    /// A close frame's code.
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, 8, "a close frame: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

/// A message compressed as RFC 7692 says (raw deflate, the sync tail left off).
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(payload.len() * 8 + 64);
    loop {
        let before = d.total_in() as usize;
        d.decompress_vec(&input[before..], &mut out, FlushDecompress::Sync)
            .expect("inflates");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// `text` deflated as a client compresses a message.
pub fn deflate(text: &[u8], level: u32) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(text.len() + 64);
    loop {
        let before = c.total_in() as usize;
        c.compress_vec(&text[before..], &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == text.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity() + 4096);
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

impl RawWs {
    /// Upgrades at `http` with `creds`, `query` appended (`&delta=1`), offering `extensions`.
    pub async fn open(http: &str, creds: &Creds, query: &str, extensions: Option<&str>) -> Self {
        let mut stream = TcpStream::connect(http).await.unwrap();
        let offer = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /ws?socket_connection_id={}&socket_key={}{query} HTTP/1.1\r\nHost: {http}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{offer}\r\n",
            creds.id, creds.key
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
                .await
                .expect("the upgrade answers")
                .unwrap();
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let wire = buf.len() - head_end;
        buf.drain(..head_end);
        Self {
            stream,
            buf,
            head,
            wire,
        }
    }

    /// The `Sec-WebSocket-Extensions` the node answered, if any.
    pub fn extensions(&self) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        })
    }

    /// The next frame (pings included), or `None` when the node closed the connection.
    pub async fn frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some(frame) = self.parse() {
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 << 10];
            let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .expect("a frame within PATIENCE")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.wire += n;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse(&mut self) -> Option<RawFrame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
            127 => (
                u64::from_be_bytes(b.get(2..10)?.try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if b.len() < at + len {
            return None;
        }
        let frame = RawFrame {
            rsv1: b[0] & 0x40 != 0,
            opcode: b[0] & 0x0f,
            payload: b[at..at + len].to_vec(),
        };
        self.buf.drain(..at + len);
        Some(frame)
    }

    /// The next text frame, pings skipped.
    pub async fn text_frame(&mut self) -> RawFrame {
        loop {
            let frame = self.frame().await.expect("a frame, not the end");
            if frame.opcode == 1 {
                return frame;
            }
            assert_eq!(frame.opcode, 9, "a text frame or a ping: {frame:?}");
        }
    }

    /// The next text frame's JSON.
    pub async fn json(&mut self) -> serde_json::Value {
        serde_json::from_str(&self.text_frame().await.text()).unwrap()
    }

    /// Sends one frame (masked) whose first byte is `first` (FIN, RSV1, opcode).
    pub async fn send(&mut self, first: u8, payload: &[u8]) {
        let _ = self.stream.write_all(&encode(first, payload)).await;
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The close frame that ends the socket (pings and text frames before it skipped).
    pub async fn close_frame(&mut self) -> RawFrame {
        loop {
            match self.frame().await {
                Some(frame) if frame.opcode == 8 => return frame,
                Some(_) => {}
                None => panic!("the connection ended without a close frame"),
            }
        }
    }
}

/// A client frame: masked with a fixed key.
pub fn encode(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    match payload.len() {
        0..=125 => out.push(0x80 | payload.len() as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
