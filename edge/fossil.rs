//! Fossil deltas (the format of the Fossil SCM's `delta.c`, as Centrifugo and Sockudo send them):
//! [`encode`] a push's payload against the channel's previous one, `apply` one (tests, fuzzing
//! and the reference for `clients/js`), and Fossil's 32-bit [`checksum`] that ends every delta.
//!
//! Format: the target's length, `\n`, then commands: `<n>@<offset>,` copies `n` bytes of the
//! source from `offset`; `<n>:<bytes>` inserts `n` literal bytes; `<checksum>;` ends the delta.
//! Numbers are written in Fossil's base 64, most significant digit first.
//!
//! One addition to Fossil's encoder, for the JSON wire: every copy starts and ends on a UTF-8
//! character boundary of the target, so every literal is whole characters and the delta of UTF-8
//! text is UTF-8 text, which a JSON string can carry (escaped) without base64. Appliers need no
//! change: the format is Fossil's. Written here rather than taken from a crate because the one
//! Rust port (`fossil-delta`) is unmaintained and splits characters.

/// Fossil's base-64 digits.
const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// The block size the encoder indexes the source by (Fossil's `NHASH`).
const BLOCK: usize = 16;

/// Candidate blocks tried per target position (Fossil tries up to 250 too).
const MAX_CANDIDATES: usize = 250;

/// Fossil's checksum of `data`: the sum of its big-endian 32-bit words, the last one padded
/// with zeros, modulo 2^32.
pub fn checksum(data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(4);
    let mut sum = 0u32;
    for word in &mut chunks {
        sum = sum.wrapping_add(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 4];
        word[..rest.len()].copy_from_slice(rest);
        sum = sum.wrapping_add(u32::from_be_bytes(word));
    }
    sum
}

fn put_int(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 11];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n & 63) as usize];
        n >>= 6;
        if n == 0 {
            break;
        }
    }
    // The digits are ASCII.
    out.extend(buf[i..].iter().map(|&b| b as char));
}

fn int_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 64 {
        n >>= 6;
        len += 1;
    }
    len
}

/// Fossil's rolling hash of a [`BLOCK`]-byte window.
struct Rolling {
    a: u16,
    b: u16,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let (mut a, mut b) = (0u16, 0u16);
        for (i, &c) in window.iter().enumerate() {
            a = a.wrapping_add(u16::from(c));
            b = b.wrapping_add(((BLOCK - i) as u16).wrapping_mul(u16::from(c)));
        }
        Self { a, b }
    }

    /// Slides the window one byte: `old` leaves, `new` enters.
    fn roll(&mut self, old: u8, new: u8) {
        self.a = self
            .a
            .wrapping_sub(u16::from(old))
            .wrapping_add(u16::from(new));
        self.b = self
            .b
            .wrapping_sub((BLOCK as u16).wrapping_mul(u16::from(old)))
            .wrapping_add(self.a);
    }

    fn value(&self) -> u32 {
        u32::from(self.a) | (u32::from(self.b) << 16)
    }
}

/// A delta that turns `source` into `target`, UTF-8 when `target` is (always, here).
pub fn encode(source: &[u8], target: &str) -> String {
    let t = target.as_bytes();
    let mut out = String::with_capacity(t.len() / 8 + 32);
    put_int(&mut out, t.len() as u64);
    out.push('\n');
    // Target bytes before `literal` are written; `base` is where the hash window starts.
    let mut literal = 0;
    if source.len() > BLOCK && t.len() > BLOCK {
        let blocks = source.len() / BLOCK;
        // Source blocks by hash: the head of each bucket, and the next block in it.
        let mut heads = vec![u32::MAX; blocks];
        let mut next = vec![u32::MAX; blocks];
        for i in 0..blocks {
            let h = Rolling::new(&source[i * BLOCK..][..BLOCK]).value() as usize % blocks;
            next[i] = heads[h];
            heads[h] = i as u32;
        }
        let mut base = 0;
        let mut hash = Rolling::new(&t[..BLOCK]);
        while base + BLOCK <= t.len() {
            let mut best: Option<(usize, usize, usize)> = None;
            let mut candidate = heads[hash.value() as usize % blocks];
            let mut tried = 0;
            while candidate != u32::MAX && tried < MAX_CANDIDATES {
                tried += 1;
                let from = candidate as usize * BLOCK;
                candidate = next[candidate as usize];
                let ahead = common_prefix(&source[from..], &t[base..]);
                if ahead < BLOCK / 2 {
                    continue;
                }
                let behind = common_suffix(&source[..from], &t[literal..base]);
                let (start, offset, len) =
                    on_boundaries(target, base - behind, from - behind, behind + ahead);
                // Worth a copy when it is longer than the command and the insert it splits.
                let cost = int_len(len) + int_len(offset) + int_len(start - literal) + 3;
                if len > cost && best.is_none_or(|(_, _, l)| len > l) {
                    best = Some((start, offset, len));
                }
            }
            match best {
                Some((start, offset, len)) => {
                    if start > literal {
                        insert(&mut out, &target[literal..start]);
                    }
                    put_int(&mut out, len as u64);
                    out.push('@');
                    put_int(&mut out, offset as u64);
                    out.push(',');
                    literal = start + len;
                    base = literal;
                    if base + BLOCK > t.len() {
                        break;
                    }
                    hash = Rolling::new(&t[base..][..BLOCK]);
                }
                None => {
                    if base + BLOCK >= t.len() {
                        break;
                    }
                    hash.roll(t[base], t[base + BLOCK]);
                    base += 1;
                }
            }
        }
    }
    if literal < t.len() {
        insert(&mut out, &target[literal..]);
    }
    put_int(&mut out, u64::from(checksum(t)));
    out.push(';');
    out
}

fn insert(out: &mut String, literal: &str) {
    put_int(out, literal.len() as u64);
    out.push(':');
    out.push_str(literal);
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Narrows a copy of `len` bytes to `target[start..]` from `offset` so that both of its ends are
/// character boundaries of `target`.
fn on_boundaries(
    target: &str,
    mut start: usize,
    mut offset: usize,
    mut len: usize,
) -> (usize, usize, usize) {
    while len > 0 && !target.is_char_boundary(start) {
        start += 1;
        offset += 1;
        len -= 1;
    }
    while len > 0 && !target.is_char_boundary(start + len) {
        len -= 1;
    }
    (start, offset, len)
}

/// Why [`apply`] refused a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadDelta {
    /// It does not follow the format.
    #[error("malformed delta")]
    Malformed,
    /// A copy reaches outside the source, or the output outgrows what the header said.
    #[error("delta does not fit its source")]
    OutOfBounds,
    /// The output's size or checksum is not the one the delta ends with.
    #[error("delta checksum mismatch")]
    Checksum,
    /// The target would be larger than the caller allows.
    #[error("delta target too large")]
    TooLarge,
}

/// `source` with `delta` applied; refuses targets over `max` bytes before building them. The
/// node never applies deltas (clients do): this is for Rust clients (the CLI's `connect`, the
/// load generator, the tests) and the reference `clients/js` follows.
pub fn apply(source: &[u8], delta: &[u8], max: usize) -> Result<Vec<u8>, BadDelta> {
    let mut at = 0;
    let size = read_int(delta, &mut at)?;
    if delta.get(at) != Some(&b'\n') {
        return Err(BadDelta::Malformed);
    }
    at += 1;
    let size = usize::try_from(size).map_err(|_| BadDelta::TooLarge)?;
    if size > max {
        return Err(BadDelta::TooLarge);
    }
    let mut out = Vec::with_capacity(size);
    loop {
        let n = read_int(delta, &mut at)?;
        let op = *delta.get(at).ok_or(BadDelta::Malformed)?;
        at += 1;
        match op {
            b'@' => {
                let offset = read_int(delta, &mut at)?;
                if delta.get(at) != Some(&b',') {
                    return Err(BadDelta::Malformed);
                }
                at += 1;
                let piece = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(n).ok())
                    .and_then(|(o, n)| source.get(o..o.checked_add(n)?))
                    .ok_or(BadDelta::OutOfBounds)?;
                if out.len() + piece.len() > size {
                    return Err(BadDelta::OutOfBounds);
                }
                out.extend_from_slice(piece);
            }
            b':' => {
                let piece = usize::try_from(n)
                    .ok()
                    .and_then(|n| delta.get(at..at.checked_add(n)?))
                    .ok_or(BadDelta::Malformed)?;
                if out.len() + piece.len() > size {
                    return Err(BadDelta::OutOfBounds);
                }
                at += piece.len();
                out.extend_from_slice(piece);
            }
            b';' => {
                if out.len() != size || u64::from(checksum(&out)) != n {
                    return Err(BadDelta::Checksum);
                }
                return Ok(out);
            }
            _ => return Err(BadDelta::Malformed),
        }
    }
}

fn read_int(delta: &[u8], at: &mut usize) -> Result<u64, BadDelta> {
    let start = *at;
    let mut n = 0u64;
    while let Some(digit) = delta
        .get(*at)
        .and_then(|c| DIGITS.iter().position(|d| d == c))
    {
        n = n
            .checked_mul(64)
            .map(|n| n + digit as u64)
            .ok_or(BadDelta::Malformed)?;
        *at += 1;
    }
    if *at == start {
        return Err(BadDelta::Malformed);
    }
    Ok(n)
}

/// The fuzz target's check: [`apply`] never panics on any source and delta, and what it
/// builds fits its bound.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_apply(input: &[u8]) {
    let split = input
        .first()
        .map_or(0, |&b| usize::from(b))
        .min(input.len());
    let (source, delta) = input.split_at(split);
    if let Ok(out) = apply(source, delta, 1 << 16) {
        assert!(out.len() <= 1 << 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(score: u32, clock: &str) -> String {
        let players: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    r#"{{"id":{i},"name":"player-{i}","x":{},"y":{}}}"#,
                    i * 7,
                    i * 3
                )
            })
            .collect();
        format!(
            r#"{{"match":"final","score":{score},"clock":"{clock}","players":[{}]}}"#,
            players.join(",")
        )
    }

    #[test]
    fn a_small_change_to_a_large_document_is_a_small_delta() {
        let (a, b) = (state(1, "12:00"), state(2, "12:01"));
        let d = encode(a.as_bytes(), &b);
        assert!(
            d.len() < b.len() / 20,
            "delta {} B for a {} B target",
            d.len(),
            b.len()
        );
        assert_eq!(
            apply(a.as_bytes(), d.as_bytes(), 1 << 20).unwrap(),
            b.as_bytes()
        );
    }

    #[test]
    fn checksum_is_fossils() {
        // Big-endian words, the tail padded: "abcd" + "e\0\0\0".
        let expected = u32::from_be_bytes(*b"abcd").wrapping_add(u32::from_be_bytes(*b"e\0\0\0"));
        assert_eq!(checksum(b"abcde"), expected);
        assert_eq!(checksum(b""), 0);
    }

    #[test]
    fn a_delta_from_fossils_own_encoder_applies() {
        // Written by hand in Fossil's format: copy 5 bytes from 0, insert "!", checksum.
        let target = b"hello!";
        let mut d = String::from("6\n5@0,1:!");
        put_int(&mut d, u64::from(checksum(target)));
        d.push(';');
        assert_eq!(apply(b"hello world", d.as_bytes(), 100).unwrap(), target);
    }

    #[test]
    fn bad_deltas_are_refused() {
        let src = b"0123456789abcdef0123456789abcdef";
        let good = encode(src, "0123456789abcdef0123456789abcdeX");
        let mut wrong = good.clone().into_bytes();
        let last = wrong.len() - 2;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(apply(src, &wrong, 100), Err(BadDelta::Checksum));
        assert_eq!(apply(src, b"5\n5@99,0;", 100), Err(BadDelta::OutOfBounds));
        assert_eq!(apply(src, b"", 100), Err(BadDelta::Malformed));
        assert_eq!(apply(src, b"zzzz\n", 100), Err(BadDelta::TooLarge));
        assert_eq!(apply(src, good.as_bytes(), 4), Err(BadDelta::TooLarge));
    }

    proptest! {
        #[test]
        fn deltas_round_trip_and_are_utf8(
            a in "(\\PC|é|€|😀){0,300}",
            edits in proptest::collection::vec((0usize..400, "(\\PC|é|€){0,6}"), 0..6),
        ) {
            let mut b = a.clone();
            for (at, text) in edits {
                let mut at = at.min(b.len());
                while !b.is_char_boundary(at) { at -= 1; }
                b.insert_str(at, &text);
            }
            let d = encode(a.as_bytes(), &b);
            // A String: UTF-8 by construction; apply must give the target back.
            prop_assert_eq!(apply(a.as_bytes(), d.as_bytes(), 1 << 20).unwrap(), b.into_bytes());
        }

        #[test]
        fn apply_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            check_apply(&input);
        }
    }

    #[test]
    fn the_fuzz_corpus_holds() {
        crate::fuzz::replay("fossil_apply", check_apply);
    }

    proptest! {}
}
