//! The server side of the WebSocket protocol (RFC 6455) after the handshake: reading client
//! frames into messages ([`Reader`]) and writing the node's frames ([`Writer`]), with
//! permessage-deflate (RFC 7692, [`deflate`]).
//!
//! Owned here rather than left to tungstenite, which refuses frames with RSV1 (every message a
//! browser compresses) and cannot write the bytes of a push compressed once for all its
//! subscribers. What this side holds per socket: a read buffer only while a frame is partly
//! read (an idle socket waits for its next bytes with none: they land in a buffer on the
//! stack and are copied into one sized for them), a message being reassembled only while one
//! is, and a write buffer only while a batch is being written.
//!
//! Rules enforced on what clients send (each a close with its code, see [`ReadError`]): frames
//! masked; RSV2/RSV3 clear, RSV1 only on a message's first frame and only with deflate;
//! control frames final and at most 125 bytes; continuation frames only inside a fragmented
//! message; a message (inflated, when compressed) at most the node's `max-message-size`; text
//! valid UTF-8; close codes ones a peer may send.

pub mod deflate;

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Bytes a read asks the kernel for at least, into a buffer that holds part of a frame.
pub(crate) const READ_CHUNK: usize = 256;

/// The stack buffer an idle socket's next bytes land in: most client messages fit whole.
const IDLE_READ: usize = 2048;

/// A batch is written out once its buffer holds this much, so a burst never buffers more.
pub(crate) const WRITE_CHUNK: usize = 64 << 10;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A whole message from the client.
#[derive(Debug)]
pub(crate) enum Message {
    /// A text message, valid UTF-8.
    Text(Utf8Bytes),
    /// A binary message (the node takes none: it is answered with an error and dropped).
    Binary,
    /// A ping, with its payload (answered with a pong).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why the client's side of a socket cannot be read any more.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream ended (no close frame first).
    Ended,
    /// The transport failed.
    Io(io::Error),
    /// A message over the limit (1009).
    TooLarge,
    /// A text message (or close reason) that is not UTF-8 (1007).
    NotUtf8,
    /// A frame against RFC 6455 or the negotiated extensions (1002).
    Protocol(&'static str),
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    opcode: u8,
    compressed: bool,
    data: BytesMut,
}

/// Reads the client's frames into messages.
#[derive(Debug)]
pub(crate) struct Reader<R> {
    io: R,
    buf: BytesMut,
    partial: Option<Box<Partial>>,
    /// Most bytes a message may have, inflated.
    max: usize,
    /// permessage-deflate was negotiated.
    deflate: bool,
}

/// One frame's header.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    size: usize,
    /// Payload length.
    len: usize,
}

/// Parses a client frame's header from the start of `buf`: `Ok(None)` while incomplete.
fn head(buf: &[u8], max: usize) -> Result<Option<Head>, ReadError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(ReadError::Protocol("reserved bits RSV2/RSV3 set"));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let opcode = b0 & 0x0f;
    let head = Head {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        size: at + 4,
        len: usize::try_from(len).unwrap_or(usize::MAX),
    };
    if opcode >= 0x8 {
        if opcode > PONG {
            return Err(ReadError::Protocol("reserved opcode"));
        }
        if !head.fin {
            return Err(ReadError::Protocol("fragmented control frame"));
        }
        if head.len > 125 {
            return Err(ReadError::Protocol("control frame over 125 bytes"));
        }
        if head.rsv1 {
            return Err(ReadError::Protocol("RSV1 on a control frame"));
        }
    } else if opcode > BINARY {
        return Err(ReadError::Protocol("reserved opcode"));
    } else if head.len > max {
        return Err(ReadError::TooLarge);
    }
    Ok(Some(head))
}

/// XORs `data` with the frame's mask.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= m;
    }
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader over `io`, which already delivered `pre_read`.
    pub(crate) fn new(io: R, pre_read: BytesMut, max: usize, deflate: bool) -> Self {
        Self {
            io,
            buf: pre_read,
            partial: None,
            max,
            deflate,
        }
    }

    /// The next whole message.
    pub(crate) async fn next(&mut self) -> Result<Message, ReadError> {
        loop {
            if let Some(message) = self.parse()? {
                if self.buf.is_empty() {
                    // Nothing left to parse: hold no buffer while waiting for the next bytes.
                    self.buf = BytesMut::new();
                }
                return Ok(message);
            }
            if self.buf.is_empty() {
                self.fill_idle().await?;
            } else {
                self.fill().await?;
            }
        }
    }

    /// Reads more bytes: at least what the frame in the buffer still needs.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let needed = match head(&self.buf, self.max)? {
            Some(head) => (head.size + head.len).saturating_sub(self.buf.len()),
            None => 14usize.saturating_sub(self.buf.len()),
        };
        self.buf.reserve(needed.max(READ_CHUNK));
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadError::Ended),
            Ok(_) => Ok(()),
            Err(err) => Err(ReadError::Io(err)),
        }
    }

    /// Waits for bytes with no buffer of the socket's own: they are read into a buffer on the
    /// stack (alive only while the read is polled, not in the socket's future) and copied into
    /// a buffer of their size.
    async fn fill_idle(&mut self) -> Result<(), ReadError> {
        let Self { io, buf, .. } = self;
        poll_fn(|cx| {
            let mut stack = [0u8; IDLE_READ];
            let mut read = tokio::io::ReadBuf::new(&mut stack);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut read)).map_err(ReadError::Io)?;
            if read.filled().is_empty() {
                return Poll::Ready(Err(ReadError::Ended));
            }
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Takes whole frames from the buffer until one completes a message.
    fn parse(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(head) = head(&self.buf, self.max)? else {
                return Ok(None);
            };
            if self.buf.len() < head.size + head.len {
                return Ok(None);
            }
            self.buf.advance(head.size);
            let mut payload = self.buf.split_to(head.len);
            unmask(&mut payload, head.mask);
            if let Some(message) = self.frame(head, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// One unmasked frame: a message when it completes one.
    fn frame(&mut self, head: Head, payload: BytesMut) -> Result<Option<Message>, ReadError> {
        match head.opcode {
            CLOSE => close(&payload).map(|c| Some(Message::Close(c))),
            PING => Ok(Some(Message::Ping(payload.freeze()))),
            PONG => Ok(Some(Message::Pong)),
            CONTINUATION => {
                if head.rsv1 {
                    return Err(ReadError::Protocol("RSV1 on a continuation frame"));
                }
                let Some(partial) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation frame outside a message"));
                };
                if partial.data.len() + payload.len() > self.max {
                    return Err(ReadError::TooLarge);
                }
                partial.data.extend_from_slice(&payload);
                if !head.fin {
                    return Ok(None);
                }
                let Partial {
                    opcode,
                    compressed,
                    data,
                } = *self.partial.take().expect("checked above");
                self.message(opcode, compressed, data).map(Some)
            }
            opcode => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                if head.rsv1 && !self.deflate {
                    return Err(ReadError::Protocol("RSV1 set without permessage-deflate"));
                }
                if head.fin {
                    return self.message(opcode, head.rsv1, payload).map(Some);
                }
                self.partial = Some(Box::new(Partial {
                    opcode,
                    compressed: head.rsv1,
                    data: payload,
                }));
                Ok(None)
            }
        }
    }

    fn message(&self, opcode: u8, compressed: bool, data: BytesMut) -> Result<Message, ReadError> {
        let data = if compressed {
            match deflate::inflate(&data, self.max) {
                Ok(inflated) => Bytes::from(inflated),
                Err(deflate::InflateError::TooLarge) => return Err(ReadError::TooLarge),
                Err(deflate::InflateError::Corrupt) => {
                    return Err(ReadError::Protocol("compressed message does not inflate"))
                }
            }
        } else {
            data.freeze()
        };
        if opcode == BINARY {
            return Ok(Message::Binary);
        }
        Utf8Bytes::try_from(data)
            .map(Message::Text)
            .map_err(|_| ReadError::NotUtf8)
    }
}

/// A close frame's code and reason (RFC 6455 5.5.1, 7.4).
fn close(payload: &[u8]) -> Result<Option<(u16, String)>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(ReadError::Protocol("close code a peer may not send"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ReadError::NotUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Writes the node's frames: text frames (compressed when the socket negotiated deflate and
/// the frame is at least the node's threshold), pings, pongs and the close frame.
#[derive(Debug)]
pub(crate) struct Writer<W> {
    io: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// `Some(threshold)`: deflate was negotiated; frames of at least this many bytes go
    /// compressed.
    deflate: Option<usize>,
    /// Bytes handed to the kernel so far (headers included).
    pub(crate) written: u64,
}

/// A frame's header for a server frame of `len` payload bytes (unmasked).
fn encode_head(out: &mut Vec<u8>, opcode: u8, rsv1: bool, len: usize) {
    out.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// A writer over `io`; `deflate` as in [`Writer::deflate`].
    pub(crate) fn new(io: W, deflate: Option<usize>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            sent: 0,
            deflate,
            written: 0,
        }
    }

    /// Whether the batch holds [`WRITE_CHUNK`] bytes: time to [`flush`](Self::flush) it before
    /// adding more.
    pub(crate) fn is_full(&self) -> bool {
        self.buf.len() >= WRITE_CHUNK
    }

    /// Queues a text frame. `compressed` gives the frame's text compressed (shared by every
    /// socket that writes it), given the node's threshold.
    pub(crate) fn text(&mut self, text: &[u8], compressed: impl FnOnce(usize) -> Option<Bytes>) {
        match self.deflate.and_then(compressed) {
            Some(packed) => {
                encode_head(&mut self.buf, TEXT, true, packed.len());
                self.buf.extend_from_slice(&packed);
            }
            None => {
                encode_head(&mut self.buf, TEXT, false, text.len());
                self.buf.extend_from_slice(text);
            }
        }
    }

    /// Queues a control frame (ping, pong or close; payload at most 125 bytes).
    fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let payload = &payload[..payload.len().min(125)];
        encode_head(&mut self.buf, opcode, false, payload.len());
        self.buf.extend_from_slice(payload);
    }

    /// Queues a pong answering a client's ping (its payload), and a ping when `ping`.
    pub(crate) fn control(&mut self, ping: bool, pong: Option<Bytes>) {
        if let Some(payload) = pong {
            self.frame(PONG, &payload);
        }
        if ping {
            self.frame(PING, &[]);
        }
    }

    /// Queues a close frame with `code` and `reason` (none for `None`).
    pub(crate) fn close(&mut self, close: Option<(u16, &str)>) {
        let mut payload = Vec::with_capacity(125);
        if let Some((code, reason)) = close {
            payload.extend_from_slice(&code.to_be_bytes());
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
        }
        self.frame(CLOSE, &payload);
    }

    /// Writes what is queued and flushes it; gives back a large buffer. Cancel-safe: what was
    /// not written yet stays queued.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        // A poll function rather than nested futures: the state an idle socket's task holds
        // for its writer is this one reference.
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.written += n as u64;
        }
        self.sent = 0;
        if self.buf.capacity() > WRITE_CHUNK / 16 {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Shuts the write side down (after the close frame).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

/// The fuzz target's check: whatever bytes a client sends, the reader ends with a message or a
/// clear error, never panics, and hands out only messages within the limit (text as UTF-8).
#[cfg(any(test, fuzzing))]
pub(crate) fn check_frames(input: &[u8]) {
    use std::{future::Future, task::Waker};
    const MAX: usize = 4096;
    let deflate = input.first().is_some_and(|b| b & 1 == 1);
    let mut reader = Reader::new(
        input.get(1..).unwrap_or_default(),
        BytesMut::new(),
        MAX,
        deflate,
    );
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        // Reading a slice never waits: one poll decides.
        let next = std::pin::pin!(reader.next());
        match next.poll(&mut cx) {
            Poll::Ready(Ok(Message::Text(text))) => assert!(text.len() <= MAX),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(_)) => return,
            Poll::Pending => unreachable!("a slice is always ready"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, with `first` as its first byte.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
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
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend(body);
        out
    }

    async fn read_all(bytes: Vec<u8>, deflate: bool) -> Vec<Result<Message, ReadError>> {
        let mut reader = Reader::new(&bytes[..], BytesMut::new(), 1 << 16, deflate);
        let mut out = Vec::new();
        loop {
            let next = reader.next().await;
            let end = next.is_err();
            out.push(next);
            if end {
                return out;
            }
        }
    }

    /// An idle reader holds no buffer: after a whole message (and after a message that came in
    /// two reads), it waits for the next bytes with none of its own.
    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut reader = Reader::new(server, BytesMut::new(), 1 << 16, false);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(&client_frame(0x80 | TEXT, b"one"))
            .await
            .unwrap();
        assert!(matches!(reader.next().await, Ok(Message::Text(t)) if t.as_str() == "one"));
        assert_eq!(reader.buf.capacity(), 0);
        // A frame split across two reads: a buffer while it is partial, none once it is whole.
        let frame = client_frame(0x80 | TEXT, &[b'x'; 600]);
        let (head, tail) = frame.split_at(100);
        client.write_all(head).await.unwrap();
        let mut next = Box::pin(reader.next());
        // One poll takes the head and waits for the rest.
        let pending =
            poll_fn(|cx| Poll::Ready(std::future::Future::poll(next.as_mut(), cx).is_pending()))
                .await;
        assert!(pending);
        client.write_all(tail).await.unwrap();
        assert!(matches!(next.await, Ok(Message::Text(t)) if t.len() == 600));
        assert_eq!(reader.buf.capacity(), 0);
    }

    #[test]
    fn the_fuzz_corpus_holds() {
        crate::fuzz::replay("ws_frames", check_frames);
    }

    #[tokio::test]
    async fn fragmented_and_compressed_messages_are_reassembled() {
        let packed = deflate::compress(&b"hello ".repeat(30)).unwrap();
        let mut wire = client_frame(0x80 | TEXT, b"one");
        wire.extend(client_frame(TEXT, b"tw"));
        wire.extend(client_frame(0x80 | PING, b"p"));
        wire.extend(client_frame(0x80 | CONTINUATION, b"o"));
        wire.extend(client_frame(0xC0 | TEXT, &packed));
        wire.extend(client_frame(0x80 | CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']));
        let got = read_all(wire, true).await;
        let texts: Vec<String> = got
            .iter()
            .filter_map(|m| match m {
                Ok(Message::Text(t)) => Some(t.as_str().to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["one", "two", &"hello ".repeat(30)]);
        assert!(matches!(got[1], Ok(Message::Ping(ref p)) if &p[..] == b"p"));
        assert!(matches!(got[4], Ok(Message::Close(Some((1000, ref r)))) if r == "bye"));
        assert!(matches!(got[5], Err(ReadError::Ended)));
    }

    #[tokio::test]
    async fn frames_against_the_rules_are_refused() {
        let cases: [(Vec<u8>, bool); 8] = [
            (vec![0x81, 0x01, b'x'], false),                 // unmasked
            (client_frame(0xC1, b"x"), false),               // RSV1 without deflate
            (client_frame(0xA1, b"x"), true),                // RSV2
            (client_frame(0x83, b"x"), true),                // reserved opcode
            (client_frame(0x09, b""), true),                 // fragmented ping
            (client_frame(0x80, b"x"), true),                // stray continuation
            (client_frame(0x88, &[0x03, 0xed]), true),       // close code 1005
            (client_frame(0xC1, b"\xff\xff\xff\xff"), true), // does not inflate
        ];
        for (wire, deflate) in cases {
            let got = read_all(wire.clone(), deflate).await;
            assert!(
                matches!(got.last(), Some(Err(ReadError::Protocol(_)))),
                "{wire:?}: {got:?}"
            );
        }
        let bad_utf8 = read_all(client_frame(0x81, b"\xff"), false).await;
        assert!(matches!(bad_utf8[0], Err(ReadError::NotUtf8)));
        let big = read_all(client_frame(0x81, &vec![b'a'; 70_000]), false).await;
        assert!(matches!(big[0], Err(ReadError::TooLarge)));
    }

    #[tokio::test]
    async fn a_deflate_bomb_is_too_large_at_the_limit() {
        let bomb = deflate::tests::bomb(4 << 20);
        let got = read_all(client_frame(0xC1, &bomb), true).await;
        assert!(matches!(got[0], Err(ReadError::TooLarge)), "{got:?}");
    }

    #[tokio::test]
    async fn the_writer_compresses_above_its_threshold() {
        let mut out = Vec::new();
        let mut writer = Writer::new(&mut out, Some(64));
        let long = b"x".repeat(200);
        writer.text(b"short", |_| None);
        writer.text(&long, |_| deflate::compress(&long));
        writer.close(Some((1000, "done")));
        writer.flush().await.unwrap();
        let written = writer.written;
        assert_eq!(&out[..7], b"\x81\x05short");
        assert_eq!(out[7], 0xC1, "RSV1 and text on the compressed frame");
        let len = out[8] as usize;
        assert_eq!(deflate::inflate(&out[9..9 + len], 1000).unwrap(), long);
        assert_eq!(&out[9 + len..], b"\x88\x06\x03\xe8done");
        assert_eq!(written as usize, out.len());
    }
}
