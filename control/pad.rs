//! No DATA frame under 512 bytes: a gRPC message whose frame would be smaller carries a filler
//! field that every protobuf decoder skips.
//!
//! Why: Rust clients on h2 0.4.16 and later (tonic, hyper) charge each DATA frame under 256
//! bytes that they hold unread against a per-connection budget (256 minus the frame's size
//! each, out of `max(window / 2, 25,600)` since 0.4.19; a frame of 256 bytes or more gives its
//! excess back), and tear their own connection down when it runs out (`GOAWAY
//! ENHANCE_YOUR_CALM "too_many_data_frames"`), failing every call in flight on it. A unary reply
//! is one small DATA frame (a `Subscribe` reply is 7 bytes), so a client with a 64 KiB window
//! (`http2_adaptive_window`) that reads its replies a little slower than the node answers them
//! lost its connection with a few hundred calls in flight (40-88% of the calls failed).
//!
//! Why 512 and not 256: once such a client's window is used up, flow control cuts frames at
//! whatever the client's next WINDOW_UPDATE allows, often into a piece of a few bytes and the
//! rest. A frame of at least 512 bytes cut in two leaves one piece of at least 256 bytes, which
//! gives back what the small piece costs; a frame of 256 cut in two costs a whole frame's
//! budget, and the cuts repeat. Measured (`channelgate-bench --scenario calls
//! --adaptive-window`, 20,000 requests): 256 still lost the connection at 5,000 in flight; 512
//! lost none at 500, 5,000 or 20,000 in flight. How much of the budget the cuts use grows with
//! the streams waiting for window at once, which `grpc-max-streams` bounds (see the README).
//!
//! How: a DATA frame of the response body that holds whole, uncompressed gRPC messages and is
//! under [`MIN_FRAME`] bytes gets its last message extended by an unknown length-delimited
//! field ([`FILLER_FIELD`]) of zeros, and that message's length prefix rewritten. Protobuf
//! decoders skip unknown fields (proto3 keeps them aside at most), so clients in any language
//! see the same message. Frames already large enough, and anything that is not whole messages,
//! pass untouched. Cost: at most 512 bytes on the wire per small frame, and one small copy.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tower::{Layer, Service};

/// DATA frames smaller than this are padded up to it (see the module's documentation).
pub(crate) const MIN_FRAME: usize = 512;

/// The filler's field number: the largest a protobuf field may have, which no message of the
/// control plane (or of health and reflection) uses.
pub(crate) const FILLER_FIELD: u32 = (1 << 29) - 1;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Pads the response bodies of the services below it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PadLayer;

impl<S> Layer<S> for PadLayer {
    type Service = Pad<S>;
    fn layer(&self, inner: S) -> Pad<S> {
        Pad { inner }
    }
}

/// The service of [`PadLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Pad<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Pad<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| tonic::body::Body::new(Padded { body })))
        })
    }
}

/// A response body whose small DATA frames are padded.
struct Padded {
    body: tonic::body::Body,
}

impl http_body::Body for Padded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_data() {
                Ok(data) => Frame::data(pad(data)),
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Padding changes the size: only the lower bound holds.
        let mut hint = SizeHint::new();
        hint.set_lower(self.body.size_hint().lower());
        hint
    }
}

/// `data` (whole gRPC messages), padded to [`MIN_FRAME`] bytes when smaller; anything else as
/// it is.
pub(crate) fn pad(data: Bytes) -> Bytes {
    if data.len() >= MIN_FRAME {
        return data;
    }
    // The start of the last message, when `data` is whole uncompressed messages.
    let mut at = 0;
    let mut last = None;
    while at < data.len() {
        let Some(prefix) = data.get(at..at + PREFIX) else {
            return data;
        };
        if prefix[0] != 0 {
            return data;
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        last = Some(at);
        at += PREFIX + len;
    }
    let (Some(last), true) = (last, at == data.len()) else {
        return data;
    };
    let content = filler_content(MIN_FRAME - data.len());
    let filler = filler_len(content);
    let len = data.len() - last - PREFIX + filler;
    let Ok(len) = u32::try_from(len) else {
        return data;
    };
    let mut out = BytesMut::with_capacity(data.len() + filler);
    out.put_slice(&data[..last]);
    out.put_u8(0);
    out.put_u32(len);
    out.put_slice(&data[last + PREFIX..]);
    put_filler(&mut out, content);
    out.freeze()
}

/// `message` as one gRPC frame (uncompressed), padded to [`MIN_FRAME`] bytes when smaller: what
/// [`pad`] makes of the frame, built in one allocation (the unary fast path's replies).
pub(crate) fn frame(message: &impl prost::Message) -> Result<Bytes, prost::EncodeError> {
    let len = message.encoded_len();
    let content = (PREFIX + len < MIN_FRAME).then(|| filler_content(MIN_FRAME - PREFIX - len));
    let filler = content.map_or(0, filler_len);
    let mut out = BytesMut::with_capacity(PREFIX + len + filler);
    out.put_u8(0);
    out.put_u32((len + filler) as u32);
    message.encode(&mut out)?;
    if let Some(content) = content {
        put_filler(&mut out, content);
    }
    Ok(out.freeze())
}

/// The filler field's tag: field [`FILLER_FIELD`], length-delimited.
const FILLER_TAG: u64 = (FILLER_FIELD as u64) << 3 | 2;

/// How many zeros a filler field of at least `at_least` bytes in all (and at least its tag and
/// length) carries.
fn filler_content(at_least: usize) -> usize {
    let tag = varint_len(FILLER_TAG);
    let mut content = at_least.saturating_sub(tag + 1);
    while tag + varint_len(content as u64) + content < at_least {
        content += 1;
    }
    content
}

/// A filler field's length in all, for `content` zeros.
fn filler_len(content: usize) -> usize {
    varint_len(FILLER_TAG) + varint_len(content as u64) + content
}

/// Appends a filler field of `content` zeros.
fn put_filler(out: &mut BytesMut, content: usize) {
    put_varint(out, FILLER_TAG);
    put_varint(out, content as u64);
    out.put_bytes(0, content);
}

/// An encoded filler field of at least `at_least` bytes (tests).
#[cfg(test)]
fn filler(at_least: usize) -> BytesMut {
    let mut out = BytesMut::new();
    put_filler(&mut out, filler_content(at_least));
    out
}

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// A message with the control plane's shape: a few fields, decoded by prost.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Reply {
        #[prost(bool, tag = "1")]
        live: bool,
        #[prost(string, tag = "2")]
        text: String,
    }

    fn framed(messages: &[Reply]) -> Bytes {
        let mut out = BytesMut::new();
        for m in messages {
            let body = m.encode_to_vec();
            out.put_u8(0);
            out.put_u32(body.len() as u32);
            out.put_slice(&body);
        }
        out.freeze()
    }

    fn unframe(mut data: &[u8]) -> Vec<Reply> {
        let mut out = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0);
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            out.push(Reply::decode(&data[PREFIX..PREFIX + len]).expect("decodes"));
            data = &data[PREFIX + len..];
        }
        out
    }

    #[test]
    fn small_frames_are_padded_and_decode_to_the_same_messages() {
        for messages in [
            vec![Reply::default()],
            vec![Reply {
                live: true,
                text: "x".repeat(120),
            }],
            vec![
                Reply {
                    live: true,
                    text: "a".into(),
                },
                Reply {
                    live: false,
                    text: "b".repeat(200),
                },
            ],
            vec![Reply {
                live: true,
                text: "y".repeat(500),
            }],
            vec![Reply {
                live: true,
                text: "z".repeat(600),
            }],
        ] {
            let data = framed(&messages);
            let padded = pad(data.clone());
            if data.len() < MIN_FRAME {
                assert!(
                    padded.len() >= MIN_FRAME,
                    "{} -> {}",
                    data.len(),
                    padded.len()
                );
                // At most one byte over, or the filler's smallest form (a tag and a length).
                let most = MIN_FRAME.max(data.len() + 6) + 1;
                assert!(padded.len() <= most, "{} -> {}", data.len(), padded.len());
            } else {
                assert_eq!(padded, data);
            }
            assert_eq!(unframe(&padded), messages);
        }
    }

    #[test]
    fn what_is_not_whole_uncompressed_messages_passes_untouched() {
        let whole = framed(&[Reply::default()]);
        for data in [
            Bytes::new(),
            whole.slice(..3),
            whole.slice(..whole.len() - 1),
            Bytes::from_static(&[1, 0, 0, 0, 0]),
            Bytes::from_static(&[0, 0, 0, 0, 9, 1]),
        ] {
            assert_eq!(pad(data.clone()), data);
        }
    }

    #[test]
    fn the_filler_is_as_long_as_asked() {
        for at_least in 0..700 {
            let field = filler(at_least);
            assert!(
                field.len() >= at_least.max(6),
                "{at_least}: {}",
                field.len()
            );
            assert!(
                field.len() <= at_least.max(6) + 1,
                "{at_least}: {}",
                field.len()
            );
        }
    }

    #[test]
    fn a_framed_message_is_what_pad_makes_of_it() {
        for text in [0, 1, 120, 490, 500, 506, 507, 600] {
            let message = Reply {
                live: true,
                text: "t".repeat(text),
            };
            let unpadded = framed(std::slice::from_ref(&message));
            assert_eq!(frame(&message).unwrap(), pad(unpadded), "{text}");
        }
    }

    #[test]
    fn varint_lengths_are_the_encodings_lengths() {
        for value in [0, 1, 127, 128, 16_383, 16_384, FILLER_TAG, u64::MAX] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(varint_len(value), out.len(), "{value}");
        }
    }
}
