//! permessage-deflate (RFC 7692): what the node agrees to, compressing a frame's text, and
//! inflating a client's message within the message size limit.
//!
//! The node always answers `permessage-deflate; server_no_context_takeover;
//! client_no_context_takeover`:
//! * no server context takeover: every message the node sends is compressed on its own, so a
//!   push is compressed once and the same bytes go to every socket that negotiated deflate;
//! * no client context takeover: every client message is compressed on its own, so a socket
//!   keeps no inflate window (32 KiB) between messages, and idle memory per socket is unchanged.
//!
//! Both use one compressor and one inflater per worker thread, reset per message. An offer that
//! limits the server's window below 15 bits is declined (the shared bytes are compressed with a
//! 32 KiB window), as is one with a parameter RFC 7692 does not define; the socket then runs
//! uncompressed.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` value the node answers an accepted offer with.
pub(crate) const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The last four bytes of a sync-flushed deflate stream, left off on the wire (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether the client's `Sec-WebSocket-Extensions` values hold an offer of permessage-deflate
/// the node can accept (the first one that is, wins; RFC 7692 5).
pub(crate) fn accepts<'a>(offers: impl IntoIterator<Item = &'a str>) -> bool {
    offers
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(acceptable)
}

/// One offer: `permessage-deflate` and parameters, each at most once, each one the node can
/// honour.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            // Only a window of 15 bits: the node's shared bytes use a 32 KiB window.
            "server_max_window_bits" if value == Some("15") => 2,
            // Any window the client uses fits the node's 15-bit inflater.
            "client_max_window_bits" if value.is_none_or(window_bits) => 3,
            _ => return false,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return false;
        }
    }
    true
}

fn window_bits(value: &str) -> bool {
    value
        .parse::<u8>()
        .is_ok_and(|bits| (8..=15).contains(&bits))
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// `text` compressed as one message's payload (raw deflate, sync-flushed, the tail left off),
/// or `None` when that would not be smaller.
pub fn compress(text: &[u8]) -> Option<Bytes> {
    COMPRESSOR.with(|cell| {
        let mut compressor = cell.borrow_mut();
        compressor.reset();
        let mut out = Vec::with_capacity(text.len() / 2 + 64);
        loop {
            let consumed = compressor.total_in() as usize;
            if let Err(err) =
                compressor.compress_vec(&text[consumed..], &mut out, FlushCompress::Sync)
            {
                tracing::warn!(%err, "deflate failed; sending the frame uncompressed");
                return None;
            }
            // Done once all input is in and the flush left room to spare.
            if compressor.total_in() as usize == text.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        (out.len() < text.len()).then(|| Bytes::from(out))
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the limit (the inflater stopped there).
    #[error("the message inflates past the limit")]
    TooLarge,
    /// It is not a deflate stream.
    #[error("the message is not a deflate stream")]
    Corrupt,
}

/// Inflates one message (its frames' payloads joined), refusing to produce more than `max`
/// bytes: a deflate bomb is stopped at `max`, whatever it would inflate to.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::new();
    inflate_into(compressed, max, &mut out)?;
    Ok(out)
}

/// [`inflate`] into `out` (emptied first, its buffer reused): for clients that inflate many
/// frames (the load generator).
pub fn inflate_into(compressed: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    let max = max.min(isize::MAX as usize - 1);
    out.clear();
    if out.capacity() == 0 {
        out.reserve_exact((compressed.len() * 4).clamp(64, max + 1));
    }
    INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        inflater.reset(false);
        for input in [compressed, &TAIL[..]] {
            let mut at = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(InflateError::TooLarge);
                    }
                    // Grow by doubling, never past one byte over the limit.
                    let room = out.capacity().min(max + 1 - out.len()).max(1);
                    out.reserve_exact(room);
                }
                let (before, produced) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&input[at..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                let consumed = (inflater.total_in() - before) as usize;
                at += consumed;
                if out.len() > max {
                    return Err(InflateError::TooLarge);
                }
                match status {
                    Status::StreamEnd => break,
                    _ if at == input.len() && out.len() < out.capacity() => break,
                    Status::BufError if at == input.len() => break,
                    // Room to write and input left, and nothing moved: never loop on it.
                    _ if consumed == 0 && out.len() == produced && out.len() < out.capacity() => {
                        return Err(InflateError::Corrupt)
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn offers_browsers_make_are_accepted() {
        assert!(accepts(["permessage-deflate; client_max_window_bits"]));
        assert!(accepts(["permessage-deflate"]));
        assert!(accepts([
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ]));
        assert!(accepts([
            "x-webkit-deflate-frame",
            "permessage-deflate; client_max_window_bits=\"12\"; server_no_context_takeover"
        ]));
    }

    #[test]
    fn offers_the_node_cannot_honour_are_declined() {
        assert!(!accepts(["permessage-deflate; server_max_window_bits=10"]));
        assert!(!accepts(["permessage-deflate; client_max_window_bits=7"]));
        assert!(!accepts(["permessage-deflate; unknown"]));
        assert!(!accepts([
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ]));
        assert!(!accepts(["x-webkit-deflate-frame"]));
        assert!(!accepts([]));
    }

    #[test]
    fn compressed_text_inflates_back() {
        let text =
            r#"{"channel":"room:1","payload":{"text":"hello hello hello hello"}}"#.repeat(20);
        let packed = compress(text.as_bytes()).expect("repetitive text compresses");
        assert!(packed.len() < text.len() / 5);
        assert_eq!(inflate(&packed, 1 << 20).unwrap(), text.as_bytes());
        // Incompressible input is left as it is.
        assert_eq!(compress(b"ab"), None);
    }

    /// `n` zeros, compressed as hard as deflate can (about 1,000 to 1).
    pub(crate) fn bomb(n: usize) -> Vec<u8> {
        let mut c = Compress::new(Compression::best(), false);
        let mut out = Vec::with_capacity(n / 900 + 64);
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..n >> 20 {
            c.compress_vec(&zeros, &mut out, FlushCompress::None)
                .unwrap();
            out.reserve(4096);
        }
        c.compress_vec(&[], &mut out, FlushCompress::Sync).unwrap();
        out
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = bomb(8 << 20);
        assert!(bomb.len() < 16 << 10, "{} B", bomb.len());
        assert_eq!(inflate(&bomb, 64 << 10), Err(InflateError::TooLarge));
        assert_eq!(inflate(&bomb, 8 << 20).unwrap().len(), 8 << 20);
        assert_eq!(inflate(&bomb, (8 << 20) - 1), Err(InflateError::TooLarge));
        assert_eq!(
            inflate(b"\xff\xff\xff\xff", 100),
            Err(InflateError::Corrupt)
        );
    }
}
