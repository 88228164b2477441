//! The client wire protocol: JSON text frames between the edge and a WebSocket client.
//!
//! Server to client:
//! * push: `{"channel":"<name>","offset":<n>,"payload":<json>}`; the payload is the
//!   application's JSON text, byte for byte, and `offset` its place in the channel's stream.
//!   A `Send` to one socket is `{"channel":"<name>","payload":<json>}` (no offset).
//! * reply: `{"id":<client id>,"status":<int>,"headers":{..},"body":<json>}`; clients tell replies
//!   from pushes by the `id` key (`null` when the message's id could not be read).
//! * positions, only to sockets that asked for them (the handshake's `recover` parameter):
//!   `{"connected":{"resumed":<bool>,"channels":{"<name>":{"epoch":..,"offset":..,"recovered":..}}}}`
//!   first, `{"channel":"<name>","epoch":"<e>","offset":<n>}` when a live socket is subscribed,
//!   and `{"channel":"<name>","recovered":false,"epoch":"<e>","offset":<n>}` when the node could
//!   not deliver everything before that position. In all three, the next push on the channel has
//!   offset `n + 1`.
//! * join and leave, to sockets subscribed to a channel whose namespace says `join-leave`:
//!   `{"channel":"<name>","join":{"connection_id":"<id>","user":"<user>"|null,"info":<json>|null}}`,
//!   and the same with `"leave"`.
//!
//! Client to server: `{"action":"<name>","id":<number or string>, ..fields}`.
//!
//! This module owns encoding and decoding only. A push is encoded once into a [`Frame`], which
//! is cheap to clone (a reference-counted buffer), so every subscriber shares the same bytes.

use std::{
    fmt,
    ops::Deref,
    sync::{Arc, OnceLock},
};

use crate::{
    domain::{valid_epoch, Channel, Json, Position, MAX_CHANNELS_PER_CALL},
    fossil,
};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// An encoded text frame. Cloning shares its bytes (reference-counted), so a push is encoded
/// once for all its recipients; a frame made for many ([`Frame::shared`]) also shares its
/// compressed form and, on a delta channel, its delta, each computed once, by the first writer
/// that needs it.
///
/// As small as the bytes it holds (32 B): a queue entry and a kept push pay nothing for the
/// shared forms.
#[derive(Clone)]
pub(crate) enum Frame {
    /// For one recipient.
    Own(Utf8Bytes),
    /// For many.
    Shared(Arc<Shared>),
}

/// A frame for many recipients, and what they compute once between them.
#[derive(Debug)]
pub(crate) struct Shared {
    text: Utf8Bytes,
    /// The text deflated (`None` inside: it would not be smaller).
    deflated: OnceLock<Option<Bytes>>,
    /// A push on a channel whose namespace has `delta = true`.
    delta: Option<DeltaOf>,
}

/// A push on a delta channel: what a socket needs to tell whether it may get the push as a
/// delta, and the delta itself, built once.
#[derive(Debug)]
pub(crate) struct DeltaOf {
    /// The push's channel.
    pub(crate) channel: Channel,
    /// This push's number among the node's delta pushes.
    pub(crate) serial: u64,
    /// The serial of the push the delta is against (the channel's previous push here), if any.
    pub(crate) base: Option<u64>,
    offset: u64,
    payload_at: u32,
    built: Mutex<Built>,
}

#[derive(Debug)]
enum Built {
    /// Not built yet: the previous push's frame and where its payload starts.
    Pending(Utf8Bytes, u32),
    /// Built (`None`: no base, or the delta would not be smaller than the payload).
    Done(Option<Frame>),
}

/// The base a delta push is made against: the channel's previous push here.
#[derive(Debug, Clone)]
pub(crate) struct DeltaBase {
    /// Its serial.
    pub(crate) serial: u64,
    /// Its frame.
    pub(crate) frame: Utf8Bytes,
    /// Where its payload starts in the frame.
    pub(crate) payload_at: u32,
}

impl Frame {
    /// A frame for many recipients: its compressed form is shared.
    pub(crate) fn shared(text: String) -> Self {
        Self::Shared(Arc::new(Shared {
            text: text.into(),
            deflated: OnceLock::new(),
            delta: None,
        }))
    }

    /// The push frame `self` (at `offset`, payload at `payload_at`) on a delta channel, number
    /// `serial`, against `base`.
    pub(crate) fn with_delta(
        self,
        channel: &Channel,
        offset: u64,
        payload_at: usize,
        serial: u64,
        base: Option<DeltaBase>,
    ) -> Self {
        let (base, built) = match base {
            Some(b) => (Some(b.serial), Built::Pending(b.frame, b.payload_at)),
            None => (None, Built::Done(None)),
        };
        // The text moves over (a just-encoded push has no other owner): no copy, no promotion
        // of its bytes to a shared buffer.
        let text = match self {
            Self::Own(text) => text,
            Self::Shared(shared) => Arc::try_unwrap(shared)
                .map(|shared| shared.text)
                .unwrap_or_else(|shared| shared.text.clone()),
        };
        Self::Shared(Arc::new(Shared {
            text,
            deflated: OnceLock::new(),
            delta: Some(DeltaOf {
                channel: channel.clone(),
                serial,
                base,
                offset,
                payload_at: payload_at as u32,
                built: Mutex::new(built),
            }),
        }))
    }

    /// The frame's text.
    pub(crate) fn as_str(&self) -> &str {
        self.text().as_str()
    }

    /// The frame's text as bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }

    /// The frame's text, shared.
    pub(crate) fn text(&self) -> &Utf8Bytes {
        match self {
            Self::Own(text) => text,
            Self::Shared(shared) => &shared.text,
        }
    }

    /// The frame compressed by `compress` when it is at least `min` bytes long and that makes it
    /// smaller; computed once for a shared frame.
    pub(crate) fn deflated(
        &self,
        min: usize,
        compress: impl FnOnce(&[u8]) -> Option<Bytes>,
    ) -> Option<Bytes> {
        if self.len() < min {
            return None;
        }
        match self {
            Self::Shared(shared) => shared
                .deflated
                .get_or_init(|| compress(self.as_bytes()))
                .clone(),
            Self::Own(text) => compress(text.as_bytes()),
        }
    }

    /// What makes this push a delta candidate, if it is one.
    pub(crate) fn delta_of(&self) -> Option<&DeltaOf> {
        match self {
            Self::Shared(shared) => shared.delta.as_ref(),
            Self::Own(_) => None,
        }
    }

    /// This push as a delta against its base: `{"channel":"<name>","offset":<n>,"delta":"<fossil
    /// delta>"}`, built once for all sockets; `None` when it is no delta push, has no base, or
    /// the delta would not be smaller than the payload.
    pub(crate) fn as_delta(&self) -> Option<Frame> {
        match self {
            Self::Shared(shared) => shared.delta.as_ref()?.delta(shared.text.as_str()),
            Self::Own(_) => None,
        }
    }

    /// This push (its frame, where its payload starts) as the base of the channel's next one.
    pub(crate) fn as_base(&self, serial: u64, payload_at: usize) -> DeltaBase {
        DeltaBase {
            serial,
            frame: self.text().clone(),
            payload_at: payload_at as u32,
        }
    }
}

impl DeltaOf {
    /// See [`Frame::as_delta`]; `text` is the push's own frame.
    fn delta(&self, text: &str) -> Option<Frame> {
        let mut built = self.built.lock();
        if let Built::Pending(base, base_at) = &*built {
            let source = &base.as_str()[*base_at as usize..base.len() - 1];
            let target = &text[self.payload_at as usize..text.len() - 1];
            let delta = fossil::encode(source.as_bytes(), target);
            let frame = (delta.len() < target.len()).then(|| {
                let mut out = String::with_capacity(48 + self.channel.len() + delta.len() * 9 / 8);
                out.push_str(r#"{"channel":"#);
                push_json_string(&mut out, &self.channel);
                out.push_str(r#","offset":"#);
                push_u64(&mut out, self.offset);
                out.push_str(r#","delta":"#);
                push_json_text_string(&mut out, &delta);
                out.push('}');
                Frame::shared(out)
            });
            *built = Built::Done(frame);
        }
        match &*built {
            Built::Done(frame) => frame.clone(),
            Built::Pending(..) => None,
        }
    }
}

impl Deref for Frame {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Eq for Frame {}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self::Own(text.into())
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Self {
        Self::from(text.to_owned())
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(text: Utf8Bytes) -> Self {
        Self::Own(text)
    }
}

/// Encodes a `Send` envelope: `{"channel":"<name>","payload":<json>}` (no offset: a message
/// to one socket is not part of the channel's stream).
pub(crate) fn send_frame(channel: &Channel, payload: &Json) -> Frame {
    let payload = payload.as_str();
    let mut out = String::with_capacity(32 + channel.len() + payload.len());
    out.push_str(r#"{"channel":"#);
    push_json_string(&mut out, channel);
    out.push_str(r#","payload":"#);
    out.push_str(payload);
    out.push('}');
    Frame::shared(out)
}

/// Encodes a join (`join`) or leave event for the sockets of `channel`:
/// `{"channel":"<name>","join":{"connection_id":"<id>","user":<user or null>,"info":<json or null>}}`.
/// `user` and `info` are empty for none; `info` must be JSON text (checked when issued).
pub(crate) fn presence_frame(
    channel: &Channel,
    join: bool,
    connection_id: &str,
    user: &str,
    info: &str,
) -> Frame {
    let mut out = String::with_capacity(80 + channel.len() + user.len() + info.len());
    out.push_str(r#"{"channel":"#);
    push_json_string(&mut out, channel);
    out.push_str(if join {
        r#","join":{"connection_id":"#
    } else {
        r#","leave":{"connection_id":"#
    });
    push_json_string(&mut out, connection_id);
    out.push_str(r#","user":"#);
    if user.is_empty() {
        out.push_str("null");
    } else {
        push_json_string(&mut out, user);
    }
    out.push_str(r#","info":"#);
    out.push_str(if info.is_empty() { "null" } else { info });
    out.push_str("}}");
    Frame::shared(out)
}

/// Encodes a push once: `{"channel":"<name>","offset":<n>,"payload":<json>}`. Returns the frame
/// and where the payload starts in it (it ends one byte before the frame does). `payload` must
/// be JSON text (checked by the caller: [`Json`], or bytes another node checked).
pub(crate) fn push_frame(channel: &Channel, offset: u64, payload: &str) -> (Frame, usize) {
    let mut out = String::with_capacity(48 + channel.len() + payload.len());
    out.push_str(r#"{"channel":"#);
    push_json_string(&mut out, channel);
    out.push_str(r#","offset":"#);
    push_u64(&mut out, offset);
    out.push_str(r#","payload":"#);
    let payload_at = out.len();
    out.push_str(payload);
    out.push('}');
    (Frame::shared(out), payload_at)
}

fn push_u64(out: &mut String, n: u64) {
    use std::fmt::Write as _;
    let _ = write!(out, "{n}");
}

/// `{"channel":"<name>","epoch":"<e>","offset":<n>}`: a live socket was subscribed at this
/// position.
pub(crate) fn position_frame(channel: &Channel, position: &Position) -> Frame {
    let mut out = String::with_capacity(64 + channel.len());
    out.push_str(r#"{"channel":"#);
    push_json_string(&mut out, channel);
    push_position(&mut out, position);
    out.push('}');
    Frame::from(out)
}

/// `{"channel":"<name>","recovered":false,"epoch":"<e>","offset":<n>}`: what came before this
/// position could not all be delivered; the next push has offset `n + 1`.
pub(crate) fn gap_frame(channel: &Channel, position: &Position) -> Frame {
    let mut out = String::with_capacity(80 + channel.len());
    out.push_str(r#"{"channel":"#);
    push_json_string(&mut out, channel);
    out.push_str(r#","recovered":false"#);
    push_position(&mut out, position);
    out.push('}');
    Frame::from(out)
}

fn push_position(out: &mut String, position: &Position) {
    out.push_str(r#","epoch":""#);
    out.push_str(&position.epoch);
    out.push_str(r#"","offset":"#);
    push_u64(out, position.offset);
}

/// A channel's state when a socket connected, for the `connected` frame: where its stream
/// continues from, and (when the client asked to recover it) whether every push it missed is
/// in the frames that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joined {
    /// The channel.
    pub channel: Channel,
    /// The next push on it has offset `position.offset + 1`.
    pub position: Position,
    /// `None` when the client did not ask to recover this channel.
    pub recovered: Option<bool>,
}

/// The first frame of a socket that asked for positions:
/// `{"connected":{"resumed":<bool>,"channels":{"<name>":{"epoch":"<e>","offset":<n>[,"recovered":<bool>]}}}}`.
pub(crate) fn connected_frame(resumed: bool, joined: &[Joined]) -> Frame {
    let mut out = String::with_capacity(48 + joined.len() * 64);
    out.push_str(r#"{"connected":{"resumed":"#);
    out.push_str(if resumed { "true" } else { "false" });
    out.push_str(r#","channels":{"#);
    for (i, j) in joined.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, &j.channel);
        out.push_str(r#":{"epoch":""#);
        out.push_str(&j.position.epoch);
        out.push_str(r#"","offset":"#);
        push_u64(&mut out, j.position.offset);
        if let Some(recovered) = j.recovered {
            out.push_str(r#","recovered":"#);
            out.push_str(if recovered { "true" } else { "false" });
        }
        out.push('}');
    }
    out.push_str("}}}");
    Frame::from(out)
}

/// What a reconnecting client last saw, per channel: the handshake's `recover` parameter, a
/// JSON object `{"<channel>":{"epoch":"<e>","offset":<n>}, ...}` (`{}` when it has nothing yet).
/// A socket that sends one, even empty, gets position frames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Recover {
    /// Per channel, the position of the last push the client saw.
    pub(crate) seen: std::collections::HashMap<Channel, Position>,
    /// The client saw pushes the node cannot name (an event stream's `Last-Event-ID` it cannot
    /// resume from): every channel not in `seen` is a gap, `recovered:false`, not a fresh start.
    pub(crate) lost: bool,
}

/// Longest `recover` parameter, in bytes (after URL decoding).
pub(crate) const MAX_RECOVER_LEN: usize = 64 << 10;

impl Recover {
    /// `seen`, as a client said it.
    pub(crate) fn of(seen: std::collections::HashMap<Channel, Position>) -> Self {
        Self { seen, lost: false }
    }

    /// A client whose positions are lost: every channel is a gap.
    pub(crate) fn lost() -> Self {
        Self {
            seen: Default::default(),
            lost: true,
        }
    }

    /// These positions as a `recover` parameter (what [`Recover::parse`] reads back), in
    /// channel order.
    pub(crate) fn to_json(&self) -> String {
        let mut channels: Vec<_> = self.seen.iter().collect();
        channels.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::with_capacity(2 + channels.len() * 48);
        out.push('{');
        for (i, (channel, position)) in channels.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, channel);
            out.push_str(r#":{"epoch":"#);
            push_json_string(&mut out, &position.epoch);
            out.push_str(r#","offset":"#);
            push_u64(&mut out, position.offset);
            out.push('}');
        }
        out.push('}');
        out
    }

    /// Parses the `recover` parameter; the error says what is wrong, for the 400 answer.
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Seen<'a> {
            #[serde(borrow)]
            epoch: std::borrow::Cow<'a, str>,
            offset: u64,
        }
        if text.len() > MAX_RECOVER_LEN {
            return Err("recover parameter too long");
        }
        let map: std::collections::HashMap<std::borrow::Cow<'_, str>, Seen<'_>> =
            serde_json::from_str(text).map_err(|_| {
                "recover must be a JSON object of {\"<channel>\":{\"epoch\":\"..\",\"offset\":n}}"
            })?;
        if map.len() > MAX_CHANNELS_PER_CALL {
            return Err("recover names too many channels");
        }
        let mut out = std::collections::HashMap::with_capacity(map.len());
        for (channel, seen) in map {
            let channel = Channel::new(&channel).map_err(|_| "recover names an invalid channel")?;
            if !valid_epoch(&seen.epoch) {
                return Err("recover carries an invalid epoch");
            }
            out.insert(
                channel,
                Position {
                    epoch: seen.epoch.as_ref().into(),
                    offset: seen.offset,
                },
            );
        }
        Ok(Self::of(out))
    }
}

/// Any text as a JSON string (RFC 8259 7: quotes, backslashes and control characters escaped).
fn push_json_text_string(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        plain = i + 1;
        if escaped.is_empty() {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

fn push_json_string(out: &mut String, s: &str) {
    // Channel names are printable ASCII, so only `"` and `\` need escaping.
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A reply to one client message.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// The client's id as JSON text (`null` when it could not be read).
    pub id: Option<Box<RawValue>>,
    /// An HTTP-like status.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body: JSON, or a string.
    pub body: Body,
}

/// A reply body.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// JSON text, sent as is.
    Json(Json),
    /// Text, sent as a JSON string.
    Text(String),
}

impl Reply {
    /// A reply with no headers and a text body.
    pub(crate) fn text(id: Option<Box<RawValue>>, status: u16, body: impl Into<String>) -> Self {
        Self {
            id,
            status,
            headers: Vec::new(),
            body: Body::Text(body.into()),
        }
    }

    /// Encodes the reply into a frame.
    pub(crate) fn encode(&self) -> Frame {
        let mut out = String::with_capacity(64);
        out.push_str(r#"{"id":"#);
        out.push_str(self.id.as_deref().map_or("null", RawValue::get));
        out.push_str(r#","status":"#);
        out.push_str(&self.status.to_string());
        out.push_str(r#","headers":{"#);
        for (i, (name, value)) in self.headers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&json_string(name));
            out.push(':');
            out.push_str(&json_string(value));
        }
        out.push_str(r#"},"body":"#);
        match &self.body {
            Body::Json(json) => out.push_str(json.as_str()),
            Body::Text(text) => out.push_str(&json_string(text)),
        }
        out.push('}');
        Frame::from(out)
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// One client message, parsed. Borrows the frame's text.
#[derive(Debug)]
pub(crate) struct ClientMessage<'a> {
    /// The action name.
    pub action: &'a str,
    /// The client's id (a number or a string), as JSON text.
    pub id: Option<&'a RawValue>,
}

/// Why a client message was refused, with the id when one could be read.
#[derive(Debug)]
pub(crate) struct BadMessage {
    /// The client's id, when it could be read.
    pub id: Option<Box<RawValue>>,
    /// What is wrong, for the reply body.
    pub reason: &'static str,
}

impl BadMessage {
    /// The error reply (status 400).
    pub(crate) fn reply(self) -> Reply {
        Reply::text(self.id, 400, self.reason)
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    action: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// Parses a client text frame: a JSON object with a string `action` and an optional `id`
/// that is a number or a string.
pub(crate) fn parse_inbound(text: &str) -> Result<ClientMessage<'_>, BadMessage> {
    let bad = |id: Option<&RawValue>, reason| BadMessage {
        id: id.map(RawValue::to_owned),
        reason,
    };
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return Err(match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => bad(None, "a client message must be a JSON object"),
            Err(_) => bad(None, "malformed JSON"),
        });
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|_| bad(None, "malformed JSON"))?;
    let id = match env.id {
        Some(id) if is_number_or_string(id) => Some(id),
        Some(_) => return Err(bad(None, "id must be a number or a string")),
        None => None,
    };
    let Some(action) = env.action else {
        return Err(bad(id, "missing action"));
    };
    // A string without escapes borrows from the frame; actions are plain names.
    let action: &str = match serde_json::from_str(action.get()) {
        Ok(action) => action,
        Err(_) => return Err(bad(id, "action must be a string of plain characters")),
    };
    Ok(ClientMessage { action, id })
}

fn is_number_or_string(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

/// What must hold for any client message: no panic; an accepted one has a plain action from
/// the text and an id that re-encodes as JSON; a refused one gets a JSON 400 reply.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_client_message(input: &[u8]) {
    // Text frames are UTF-8 (tungstenite closes with 1007 otherwise).
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match parse_inbound(text) {
        Ok(message) => {
            assert!(text.contains(message.action), "{text:?}");
            let reply = Reply::text(message.id.map(RawValue::to_owned), 200, "ok").encode();
            // JSON text (numbers past f64 are still JSON: the id is echoed as sent).
            serde_json::from_str::<&RawValue>(&reply).unwrap_or_else(|e| panic!("{reply}: {e}"));
        }
        Err(bad) => {
            let reply = bad.reply();
            assert_eq!(reply.status, 400);
            let reply = reply.encode();
            serde_json::from_str::<&RawValue>(&reply).unwrap_or_else(|e| panic!("{reply}: {e}"));
        }
    }
}

/// A `recover` parameter never panics the parser; a well-formed one reads back exactly.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_recover(input: &[u8]) {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = Recover::parse(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(Channel::new("foo_channel").is_ok());
        assert!(Channel::new("a:b/c.d-e~!\"\\").is_ok());
        assert!(Channel::new(&"x".repeat(255)).is_ok());
        for bad in ["", "a b", "tab\t", "é", "\u{7f}", &"x".repeat(256)] {
            assert!(Channel::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn push_frame_is_channel_offset_and_payload_unchanged() {
        let ch = Channel::new("room:1").unwrap();
        let payload = Json::parse(r#" {"b": 1,  "a":[1.50,"x"]} "#).unwrap();
        let (frame, at) = push_frame(&ch, 17, payload.as_str());
        assert_eq!(
            frame.as_str(),
            r#"{"channel":"room:1","offset":17,"payload":{"b": 1,  "a":[1.50,"x"]}}"#
        );
        assert_eq!(&frame[at..frame.len() - 1], payload.as_str());
        let ch = Channel::new(r#"q"\"#).unwrap();
        let (frame, _) = push_frame(&ch, 1, "null");
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(v["channel"], r#"q"\"#);
        assert_eq!(
            send_frame(&ch, &Json::null()).as_str(),
            r#"{"channel":"q\"\\","payload":null}"#
        );
    }

    #[test]
    fn presence_frames_are_json_with_user_and_info_or_null() {
        let ch = Channel::new("chat:1").unwrap();
        let frame = presence_frame(&ch, true, "id1", "al\"ice", r#"{"name":"A"}"#);
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"chat:1","join":{"connection_id":"id1","user":"al\"ice","info":{"name":"A"}}})
        );
        assert_eq!(
            presence_frame(&ch, false, "id2", "", "").as_str(),
            r#"{"channel":"chat:1","leave":{"connection_id":"id2","user":null,"info":null}}"#
        );
    }

    #[test]
    fn position_frames_are_json_and_recover_parameters_are_checked() {
        let ch = Channel::new("c").unwrap();
        let at = Position {
            epoch: "e1".into(),
            offset: 7,
        };
        assert_eq!(
            position_frame(&ch, &at).as_str(),
            r#"{"channel":"c","epoch":"e1","offset":7}"#
        );
        assert_eq!(
            gap_frame(&ch, &at).as_str(),
            r#"{"channel":"c","recovered":false,"epoch":"e1","offset":7}"#
        );
        let joined = [
            Joined {
                channel: ch.clone(),
                position: at.clone(),
                recovered: Some(true),
            },
            Joined {
                channel: Channel::new("d").unwrap(),
                position: at.clone(),
                recovered: None,
            },
        ];
        let v: serde_json::Value =
            serde_json::from_str(connected_frame(true, &joined).as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"connected":{"resumed":true,"channels":{
                "c":{"epoch":"e1","offset":7,"recovered":true},"d":{"epoch":"e1","offset":7}}}})
        );
        let r = Recover::parse(r#"{"c":{"epoch":"e1","offset":7}}"#).unwrap();
        assert_eq!(r.seen.get(&ch), Some(&at));
        assert_eq!(Recover::parse("{}").unwrap(), Recover::default());
        for bad in [
            "",
            "[]",
            r#"{"c":{"epoch":"e1"}}"#,
            r#"{"c":{"epoch":"e\"1","offset":7}}"#,
            r#"{"c":{"epoch":"","offset":7}}"#,
            r#"{"bad name":{"epoch":"e1","offset":7}}"#,
            r#"{"c":{"epoch":"e1","offset":-1}}"#,
            r#"{"c":{"epoch":"e1","offset":1,"x":2}}"#,
        ] {
            assert!(Recover::parse(bad).is_err(), "{bad}");
        }
        assert!(Recover::parse(&"x".repeat(MAX_RECOVER_LEN + 1)).is_err());
    }

    #[test]
    fn invalid_json_is_refused() {
        for bad in ["", "{", "{\"a\":}", "1 2", "nul", "[1,]"] {
            assert!(Json::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_encode_as_json() {
        let id = Some(RawValue::from_string("7".into()).unwrap());
        let reply = Reply {
            id,
            status: 200,
            headers: vec![("content-type".into(), "a\"b".into())],
            body: Body::Json(Json::parse(r#"{"ok":true}"#).unwrap()),
        };
        let v: serde_json::Value = serde_json::from_str(reply.encode().as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":7,"status":200,"headers":{"content-type":"a\"b"},"body":{"ok":true}})
        );
        let v: serde_json::Value =
            serde_json::from_str(Reply::text(None, 404, "no \"x\"").encode().as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":null,"status":404,"headers":{},"body":"no \"x\""})
        );
    }

    #[test]
    fn inbound_messages_parse() {
        let m = parse_inbound(r#"{"action":"ping","id":"a-1","x":[1]}"#).unwrap();
        assert_eq!(m.action, "ping");
        assert_eq!(m.id.unwrap().get(), r#""a-1""#);
        let m = parse_inbound(r#" {"id": 3, "action":"call-route"}"#).unwrap();
        assert_eq!(m.action, "call-route");
        assert_eq!(m.id.unwrap().get(), "3");
        assert!(parse_inbound(r#"{"action":"x"}"#).unwrap().id.is_none());
    }

    #[test]
    fn bad_inbound_messages_say_why_and_keep_the_id() {
        let cases = [
            ("not json", None, "malformed JSON"),
            ("[1,2]", None, "a client message must be a JSON object"),
            ("\"ping\"", None, "a client message must be a JSON object"),
            (r#"{"action":"ping""#, None, "malformed JSON"),
            (r#"{"id":5}"#, Some("5"), "missing action"),
            (
                r#"{"id":5,"action":7}"#,
                Some("5"),
                "action must be a string of plain characters",
            ),
            (
                r#"{"id":{"x":1},"action":"ping"}"#,
                None,
                "id must be a number or a string",
            ),
        ];
        for (text, id, reason) in cases {
            let err = parse_inbound(text).unwrap_err();
            assert_eq!(err.id.as_deref().map(RawValue::get), id, "{text}");
            assert_eq!(err.reason, reason, "{text}");
            assert_eq!(err.reply().status, 400);
        }
    }

    fn json_message() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let id = prop_oneof![
            Just(String::new()),
            "-?[0-9]{1,25}(\\.[0-9]{1,5})?([eE][-+]?[0-9]{1,4})?",
            "\"[^\"\\\\]{0,12}\"",
            Just("null".to_owned()),
            Just("{}".to_owned()),
            Just("[1]".to_owned()),
            Just("true".to_owned()),
        ];
        let action = prop_oneof![
            "[a-z.$-]{0,12}",
            Just("p\\u0069ng".to_owned()),
            Just("7".to_owned())
        ];
        (action, id, "[ -~]{0,20}").prop_map(|(action, id, rest)| {
            let id = if id.is_empty() {
                String::new()
            } else {
                format!(r#","id":{id}"#)
            };
            format!(r#"{{"action":"{action}"{id}{rest}}}"#)
        })
    }

    #[test]
    fn fuzz_client_messages() {
        use proptest::prelude::*;
        crate::fuzz::replay("client_message", check_client_message);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        let inputs = prop_oneof![
            any::<Vec<u8>>(),
            any::<String>().prop_map(String::into_bytes),
            json_message().prop_map(String::into_bytes),
        ];
        runner
            .run(&inputs, |input| {
                check_client_message(&input);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn fuzz_recover_parameters() {
        use proptest::prelude::*;
        crate::fuzz::replay("recover", check_recover);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        runner
            .run(&any::<String>(), |text| {
                check_recover(text.as_bytes());
                Ok(())
            })
            .unwrap();
        let positions = proptest::collection::hash_map(
            "[!-~]{1,20}",
            ("[0-9a-zA-Z_-]{1,64}", any::<u64>()),
            0..8,
        );
        runner
            .run(&positions, |map| {
                let json: serde_json::Map<String, serde_json::Value> = map
                    .iter()
                    .map(|(c, (e, o))| (c.clone(), serde_json::json!({"epoch": e, "offset": o})))
                    .collect();
                let parsed = Recover::parse(&serde_json::Value::Object(json).to_string()).unwrap();
                assert_eq!(parsed.seen.len(), map.len());
                for (channel, (epoch, offset)) in &map {
                    let at = &parsed.seen[&Channel::new(channel).unwrap()];
                    assert_eq!((&*at.epoch, at.offset), (epoch.as_str(), *offset));
                }
                Ok(())
            })
            .unwrap();
    }
}
