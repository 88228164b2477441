//! A minimal WebSocket client (or, with `--transport sse`, event-stream client) for the load
//! generator's receiving side: its own HTTP upgrade and
//! frame parsing over a plain `TcpStream`, so reading a million small frames a second costs the
//! generator little more than the kernel's receive work. Server frames only (unmasked); pings
//! are answered so the node's idle timeout never fires; with `deflate`, it offers
//! permessage-deflate as a browser does and inflates compressed frames with the node's own
//! inflater (`edge::ws::deflate`). Not a general client: the node under test is the only peer.

use anyhow::{bail, Context as _};
use channelgate::edge::ws::deflate;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const BUFFER: usize = 64 << 10;

/// A client socket after the upgrade.
pub(crate) struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// An event stream: frames are the `data:` lines.
    sse: bool,
    /// permessage-deflate was negotiated.
    pub(crate) deflate: bool,
    /// Bytes read from the node after the response head (frame headers included).
    pub(crate) wire: u64,
    /// A compressed frame, inflated.
    inflated: Vec<u8>,
}

/// What one read delivered.
pub(crate) enum Read {
    /// Zero or more frames were handled; keep reading.
    More,
    /// The node closed the socket (close frame or end of stream).
    Closed,
}

impl RawWs {
    /// Opens a socket: a WebSocket upgrade of `path` (`/ws?...`), or with `sse` an event
    /// stream of the same query on `/sse`.
    pub(crate) async fn open(
        stream: TcpStream,
        host: &str,
        path: &str,
        sse: bool,
        deflate: bool,
    ) -> anyhow::Result<Self> {
        if !sse {
            return Self::handshake(stream, host, path, deflate).await;
        }
        let path = match path.strip_prefix("/ws") {
            Some(query) => format!("/sse{query}"),
            None => path.to_owned(),
        };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
        let mut raw = Self::request(stream, &request, "HTTP/1.1 200").await?;
        raw.sse = true;
        Ok(raw)
    }

    /// Upgrades `stream` with a GET of `path` (path and query) on `host`.
    pub(crate) async fn handshake(
        stream: TcpStream,
        host: &str,
        path: &str,
        deflate: bool,
    ) -> anyhow::Result<Self> {
        // What Chromium offers.
        let offer = if deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        Self::request(stream, &request, "HTTP/1.1 101").await
    }

    /// Sends `request` and reads the response head, which must start with `expected`.
    async fn request(mut stream: TcpStream, request: &str, expected: &str) -> anyhow::Result<Self> {
        stream.set_nodelay(true)?;
        stream.write_all(request.as_bytes()).await?;
        let mut buf = vec![0u8; BUFFER];
        let mut end = 0;
        let header_end = loop {
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                bail!("connection closed during the upgrade");
            }
            end += n;
            if let Some(at) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if end == buf.len() {
                bail!("upgrade response too long");
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]);
        if !head.starts_with(expected) {
            let status = head.lines().next().unwrap_or_default().to_owned();
            bail!("refused: {status}");
        }
        let deflate = head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate");
        Ok(Self {
            stream,
            buf,
            start: header_end,
            end,
            sse: false,
            deflate,
            wire: (end - header_end) as u64,
            inflated: Vec::new(),
        })
    }

    /// Handles every complete frame already buffered, then reads once more (waiting for data).
    /// Text frames go to `on_text`; pings are answered.
    pub(crate) async fn read(&mut self, mut on_text: impl FnMut(&[u8])) -> anyhow::Result<Read> {
        self.read_until(|text| {
            on_text(text);
            false
        })
        .await
    }

    /// As [`read`](Self::read), but returns as soon as `on_text` says it has what it waits for
    /// (`true`), without waiting for more data.
    pub(crate) async fn read_until(
        &mut self,
        mut on_text: impl FnMut(&[u8]) -> bool,
    ) -> anyhow::Result<Read> {
        if self.sse {
            // Whole lines only; `data: ` lines are the frames (chunk sizes, ids and comments
            // are not).
            while let Some(nl) = self.buf[self.start..self.end]
                .iter()
                .position(|b| *b == b'\n')
            {
                let line = self.start..self.start + nl;
                self.start += nl + 1;
                if self.buf[line.clone()].starts_with(b"data: ") {
                    let text = line.start + 6..line.end;
                    if on_text(&self.buf[text]) {
                        return Ok(Read::More);
                    }
                }
            }
        }
        while let Some((first, range)) = self.next_frame().context("bad frame from the node")? {
            let opcode = first & 0x0f;
            if opcode == 0x1 && first & 0x40 != 0 {
                // The node's own inflater (one per thread, the buffer reused), its limit far.
                deflate::inflate_into(&self.buf[range], 1 << 30, &mut self.inflated)
                    .context("a frame that does not inflate")?;
                if on_text(&self.inflated) {
                    return Ok(Read::More);
                }
                continue;
            }
            match opcode {
                0x1 if on_text(&self.buf[range.clone()]) => return Ok(Read::More),
                0x8 => return Ok(Read::Closed),
                0x9 => {
                    let payload = self.buf[range].to_vec();
                    self.pong(&payload).await?;
                }
                _ => {}
            }
        }
        // Make room: move the partial frame to the front.
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Ok(Read::Closed);
        }
        self.end += n;
        self.wire += n as u64;
        Ok(Read::More)
    }

    /// The next complete frame's first byte (FIN, RSV1, opcode) and payload range, consuming it.
    fn next_frame(&mut self) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
        if self.sse {
            return Ok(None);
        }
        let data = &self.buf[self.start..self.end];
        if data.len() < 2 {
            return Ok(None);
        }
        if data[1] & 0x80 != 0 {
            bail!("masked frame from the server");
        }
        let (len, header) = match data[1] & 0x7f {
            126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
            127 if data.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&data[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if data.len() < header + len {
            return Ok(None);
        }
        let first = data[0];
        let payload = self.start + header..self.start + header + len;
        self.start += header + len;
        Ok(Some((first, payload)))
    }

    /// Closes cleanly as a client would: a close frame with code 1000 (masked, key zero), then
    /// waits (briefly) for the node's close.
    pub(crate) async fn close(mut self) -> anyhow::Result<()> {
        if self.sse {
            // An event stream ends with its connection.
            return Ok(());
        }
        self.stream
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
            .await?;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while matches!(self.read(|_| {}).await, Ok(Read::More)) {}
        })
        .await;
        Ok(())
    }

    /// A masked pong (mask key zero: the payload goes as is).
    async fn pong(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await?;
        Ok(())
    }
}
