//! A raw HTTP/2 client for the tests that must break the rules real clients follow: open more
//! streams than the server allows, reset them at once (rapid reset), never send a body, never
//! answer a ping. Frames are written by hand (RFC 9113 section 4) and request headers encoded
//! as HPACK literals without indexing (RFC 7541 6.2.2), so no table state is needed to send;
//! what the server sends is read as frames, not decoded.

#![allow(dead_code)]

use std::{collections::HashMap, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::mpsc,
};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame the server sent.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// A connection to an HTTP/2 server that has sent its preface and SETTINGS.
pub struct RawH2 {
    write: OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Frame>,
    /// The server's SETTINGS (identifier -> value).
    pub settings: HashMap<u16, u32>,
    next_stream: u32,
    authority: String,
}

/// Encodes one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal (no Huffman); `s` shorter than 127 bytes.
fn literal(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The header block of a gRPC call to `path`.
fn request_headers(path: &str, authority: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    block.push(0x04); // :path, literal without indexing, indexed name 4
    literal(&mut block, path);
    block.push(0x01); // :authority, indexed name 1
    literal(&mut block, authority);
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        block.push(0x00); // literal without indexing, new name
        literal(&mut block, name);
        literal(&mut block, value);
    }
    block
}

async fn read_frames(mut read: OwnedReadHalf, tx: mpsc::UnboundedSender<Frame>) {
    let mut head = [0u8; 9];
    loop {
        if read.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        if read.read_exact(&mut payload).await.is_err() {
            return;
        }
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        };
        if tx.send(frame).is_err() {
            return;
        }
    }
}

impl RawH2 {
    /// Connects, sends the preface and empty SETTINGS plus a large connection window, and
    /// waits for the server's SETTINGS (which it acknowledges).
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (read, mut write) = stream.into_split();
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(read_frames(read, tx));
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        hello.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()));
        write.write_all(&hello).await.unwrap();
        let mut conn = Self {
            write,
            frames,
            settings: HashMap::new(),
            next_stream: 1,
            authority: addr.to_string(),
        };
        loop {
            let f = conn.next().await.expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                for pair in f.payload.chunks(6) {
                    let id = u16::from_be_bytes([pair[0], pair[1]]);
                    let value = u32::from_be_bytes(pair[2..6].try_into().unwrap());
                    conn.settings.insert(id, value);
                }
                conn.write
                    .write_all(&frame(SETTINGS, ACK, 0, &[]))
                    .await
                    .unwrap();
                return conn;
            }
        }
    }

    /// The next frame, or `None` once the server closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        self.frames.recv().await
    }

    /// The frames already received, without waiting.
    pub fn received(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Ok(f) = self.frames.try_recv() {
            out.push(f);
        }
        out
    }

    /// The HEADERS of a new call to `path` (no body follows: END_STREAM is not set).
    pub fn open_frame(&mut self, path: &str) -> (u32, Vec<u8>) {
        let id = self.next_stream;
        self.next_stream += 2;
        let block = request_headers(path, &self.authority);
        (id, frame(HEADERS, END_HEADERS, id, &block))
    }

    /// Opens a call to `path` whose body never comes; returns its stream id.
    pub async fn open(&mut self, path: &str) -> u32 {
        let (id, bytes) = self.open_frame(path);
        self.send(&bytes).await;
        id
    }

    /// Writes raw bytes (frames); `false` when the server has closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.write.write_all(bytes).await.is_ok()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }
}

/// A RST_STREAM frame for `stream` with `code`.
pub fn reset(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}
