//! An event stream's ids: what a stream has delivered per channel, said in each event's `id`
//! (an anchor saved with the credentials' state, and the advances since), and read back from a
//! `Last-Event-ID` on any node (see the parent module).

use std::{collections::HashMap, fmt::Write as _};

use bytes::{BufMut, BytesMut};
use serde::Deserialize;

use crate::{
    credentials::Digest,
    domain::{valid_epoch, Channel, Position},
    node::NodeState,
    protocol::Recover,
};

/// Longest `Last-Event-ID` read, in bytes; a longer one is ignored.
const MAX_ID_LEN: usize = 1024;

/// Entries an id holds before the node saves a new anchor.
pub(crate) const MAX_ENTRIES: usize = 16;

/// The positions a `Last-Event-ID` header stands for, and its anchor's number, from the
/// digest's own anchor; `None` when the id does not parse, its anchor is not kept, or it does
/// not fit that anchor.
pub(super) async fn resume(
    node: &NodeState,
    digest: &Digest,
    last_id: &http::HeaderValue,
) -> Option<(Recover, u64)> {
    let id = EventId::parse(last_id.to_str().ok()?)?;
    let positions = match node.bus.load_anchor(digest, id.anchor).await {
        Ok(positions) => positions?,
        Err(err) => {
            tracing::debug!(%err, "anchor not read");
            return None;
        }
    };
    let mut map = Recover::parse(&positions).ok()?.seen;
    let mut order: Vec<Channel> = map.keys().cloned().collect();
    order.sort();
    for &(index, advance) in &id.entries {
        let position = map.get_mut(order.get(index)?)?;
        position.offset = position.offset.checked_add(advance)?;
    }
    Some((Recover::of(map), id.anchor))
}

/// A parsed `Last-Event-ID`: `<anchor>` then `.<index>-<advance>` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventId {
    anchor: u64,
    entries: Vec<(usize, u64)>,
}

impl EventId {
    /// Reads an id this node's kind wrote; `None` for anything else.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        if text.len() > MAX_ID_LEN {
            return None;
        }
        let mut parts = text.split('.');
        let anchor = parts.next()?.parse().ok()?;
        let mut entries = Vec::new();
        for part in parts {
            let (index, advance) = part.split_once('-')?;
            entries.push((index.parse().ok()?, advance.parse().ok()?));
            if entries.len() > 4 * MAX_ENTRIES {
                return None;
            }
        }
        Some(Self { anchor, entries })
    }
}

/// What the stream has delivered, per channel, and the id that says it. A push costs a lookup
/// of its channel's name as the frame spells it and an entry's update: no allocation.
pub(super) struct Ids {
    /// The anchor the id names (0: none saved yet).
    anchor: u64,
    /// The anchor's positions, by channel name.
    base: Vec<(Channel, Position)>,
    /// Each base channel's index, by its name as frames spell it (a JSON string).
    spelled: HashMap<Box<[u8]>, usize>,
    /// `(index in base, pushes since the anchor)`, in the order channels first moved.
    entries: Vec<(usize, u64)>,
    /// Positions the id cannot say until the next anchor: channels the anchor lacks, and base
    /// channels in another epoch (their pushes update them here).
    pending: HashMap<Channel, Position>,
    /// The id moved since it was last written.
    moved: bool,
}

/// How a frame moves the stream's positions.
enum Moves<'a> {
    /// Not at all (a reply, a `Send`, join and leave).
    None,
    /// A push: its channel's name as the frame spells it (a JSON string), and its offset.
    Offset(&'a [u8], u64),
    /// The channels' positions, as the frame says them (`connected`, position and gap frames).
    Positions(Vec<(Channel, Position)>),
}

impl Ids {
    pub(super) fn new(anchor: u64) -> Self {
        Self {
            anchor,
            base: Vec::new(),
            spelled: HashMap::new(),
            entries: Vec::new(),
            pending: HashMap::new(),
            moved: false,
        }
    }

    /// Takes `frame` into account; saves a new anchor when the id could not say the frame
    /// otherwise. On a failed save the id stays what it was: a resume from it replays this
    /// frame (a duplicate), never skips one.
    pub(super) async fn frame(&mut self, frame: &str, digest: &Digest, node: &NodeState) {
        let reanchor = match moves(frame) {
            Moves::None => return,
            Moves::Offset(spelled, offset) => match self.spelled.get(spelled) {
                Some(&index) => {
                    let (channel, base) = &self.base[index];
                    match self.pending.get_mut(channel) {
                        // In another epoch than the anchor's: said by the next anchor.
                        Some(position) => position.offset = offset,
                        None if offset >= base.offset => {
                            let by = offset - base.offset;
                            match self.entries.iter_mut().find(|(i, _)| *i == index) {
                                Some(entry) => entry.1 = by,
                                None => self.entries.push((index, by)),
                            }
                            self.moved = true;
                            if self.entries.len() <= MAX_ENTRIES {
                                return;
                            }
                        }
                        None => {
                            let position = Position {
                                epoch: base.epoch.clone(),
                                offset,
                            };
                            self.pending.insert(channel.clone(), position);
                        }
                    }
                    true
                }
                None => {
                    let Some(channel) = serde_json::from_slice::<String>(spelled)
                        .ok()
                        .and_then(|name| Channel::new(&name).ok())
                    else {
                        return;
                    };
                    match self.pending.get_mut(&channel) {
                        Some(position) => position.offset = offset,
                        // A push of a channel the stream has no epoch for: nothing to say.
                        None => return,
                    }
                    true
                }
            },
            Moves::Positions(changes) => {
                let mut reanchor = false;
                for (channel, position) in changes {
                    let index = self.base.binary_search_by(|(c, _)| c.cmp(&channel)).ok();
                    match index {
                        Some(i)
                            if self.base[i].1.epoch == position.epoch
                                && position.offset >= self.base[i].1.offset
                                && !self.pending.contains_key(&channel) =>
                        {
                            let by = position.offset - self.base[i].1.offset;
                            match self.entries.iter_mut().find(|(e, _)| *e == i) {
                                Some(entry) => entry.1 = by,
                                None => self.entries.push((i, by)),
                            }
                            self.moved = true;
                        }
                        _ => {
                            self.pending.insert(channel, position);
                            reanchor = true;
                        }
                    }
                }
                reanchor || self.entries.len() > MAX_ENTRIES
            }
        };
        if reanchor {
            self.reanchor(digest, node).await;
        }
    }

    /// Every position the stream has delivered.
    fn positions(&self) -> Vec<(Channel, Position)> {
        let mut all = self.base.clone();
        for &(index, by) in &self.entries {
            all[index].1.offset += by;
        }
        for (channel, position) in &self.pending {
            match all.binary_search_by(|(c, _)| c.cmp(channel)) {
                Ok(i) => all[i].1 = position.clone(),
                Err(i) => all.insert(i, (channel.clone(), position.clone())),
            }
        }
        all
    }

    /// Saves every position as the next anchor and starts from it.
    async fn reanchor(&mut self, digest: &Digest, node: &NodeState) {
        let all = self.positions();
        let positions = Recover::of(all.iter().cloned().collect()).to_json();
        // An id's number is the client's to send: never overflow on it.
        let number = self.anchor.checked_add(1).unwrap_or(1);
        match node.bus.save_anchor(digest, number, &positions).await {
            Ok(()) => {
                self.anchor = number;
                self.spelled = all
                    .iter()
                    .enumerate()
                    .map(|(i, (channel, _))| (spell(channel), i))
                    .collect();
                self.base = all;
                self.pending.clear();
                self.entries.clear();
                self.moved = true;
            }
            Err(err) => {
                // The positions stay pending and the next save takes them along.
                tracing::debug!(%err, "event stream anchor not saved; its id stays behind");
            }
        }
    }

    /// Writes the `id` line before an event, when the id moved since the last one written.
    pub(super) fn write_line(&mut self, out: &mut BytesMut) {
        if !self.moved || self.anchor == 0 {
            return;
        }
        self.moved = false;
        let _ = write!(out, "id: {}", self.anchor);
        for (index, advance) in &self.entries {
            let _ = write!(out, ".{index}-{advance}");
        }
        out.put_u8(b'\n');
    }
}

/// A channel's name as frames spell it: a JSON string.
fn spell(channel: &Channel) -> Box<[u8]> {
    serde_json::to_vec(channel.as_str())
        .unwrap_or_default()
        .into_boxed_slice()
}

/// Reads where a frame moves positions, from the frames' fixed shapes (`protocol`): pushes by
/// their head alone (the payload is not read), the rare position frames whole.
fn moves(frame: &str) -> Moves<'_> {
    #[derive(Deserialize)]
    struct Head {
        channel: String,
        epoch: Option<String>,
        offset: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Connected {
        connected: ConnectedChannels,
    }
    #[derive(Deserialize)]
    struct ConnectedChannels {
        channels: HashMap<String, At>,
    }
    #[derive(Deserialize)]
    struct At {
        epoch: String,
        offset: u64,
    }
    if frame.starts_with(r#"{"connected":"#) {
        let Ok(c) = serde_json::from_str::<Connected>(frame) else {
            return Moves::None;
        };
        return Moves::Positions(
            c.connected
                .channels
                .into_iter()
                .filter_map(|(name, at)| {
                    let channel = Channel::new(&name).ok()?;
                    Some((channel, position(&at.epoch, at.offset)?))
                })
                .collect(),
        );
    }
    let Some(rest) = frame.strip_prefix(r#"{"channel":"#) else {
        return Moves::None;
    };
    // The channel's JSON string: to its closing quote (a backslash escapes the next byte).
    let bytes = rest.as_bytes();
    let mut end = 1;
    while end < bytes.len() && bytes[end] != b'"' {
        end += if bytes[end] == b'\\' { 2 } else { 1 };
    }
    let Some(after) = rest.get(end + 1..) else {
        return Moves::None;
    };
    if let Some(digits) = after.strip_prefix(r#","offset":"#) {
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        return match digits[..len].parse() {
            Ok(offset) => Moves::Offset(&bytes[..=end], offset),
            Err(_) => Moves::None,
        };
    }
    if !(after.starts_with(r#","epoch":"#) || after.starts_with(r#","recovered":"#)) {
        return Moves::None;
    }
    match serde_json::from_str::<Head>(frame) {
        Ok(Head {
            channel,
            epoch: Some(epoch),
            offset: Some(offset),
        }) => match (Channel::new(&channel), position(&epoch, offset)) {
            (Ok(channel), Some(position)) => Moves::Positions(vec![(channel, position)]),
            _ => Moves::None,
        },
        _ => Moves::None,
    }
}

/// A position whose epoch is well formed.
fn position(epoch: &str, offset: u64) -> Option<Position> {
    valid_epoch(epoch).then(|| Position {
        epoch: epoch.into(),
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(frame: &str) -> Option<(String, u64)> {
        match moves(frame) {
            Moves::Offset(spelled, o) => Some((serde_json::from_slice(spelled).unwrap(), o)),
            _ => None,
        }
    }

    #[test]
    fn pushes_are_read_by_their_head_and_other_frames_whole() {
        assert_eq!(
            offset(r#"{"channel":"a:b","offset":17,"payload":{"offset":1}}"#),
            Some(("a:b".into(), 17))
        );
        assert_eq!(
            offset(r#"{"channel":"q\"\\","offset":2,"payload":null}"#),
            Some(("q\"\\".into(), 2))
        );
        assert!(offset(r#"{"channel":"a","payload":1}"#).is_none());
        assert!(matches!(
            moves(r#"{"channel":"a","join":{"connection_id":"x","user":null,"info":null}}"#),
            Moves::None
        ));
        match moves(r#"{"channel":"c","recovered":false,"epoch":"e1","offset":7}"#) {
            Moves::Positions(p) => assert_eq!(p[0].1.offset, 7),
            _ => panic!("a gap frame moves its channel"),
        }
        match moves(
            r#"{"connected":{"resumed":false,"channels":{"a":{"epoch":"e1","offset":3},"b":{"epoch":"e2","offset":0}}}}"#,
        ) {
            Moves::Positions(p) => assert_eq!(p.len(), 2),
            _ => panic!("connected says every channel"),
        }
        assert!(matches!(moves(r#"{"id":1,"status":200}"#), Moves::None));
    }

    #[test]
    fn ids_parse_back_and_anything_else_is_ignored() {
        assert_eq!(
            EventId::parse("3.0-2.5-10"),
            Some(EventId {
                anchor: 3,
                entries: vec![(0, 2), (5, 10)]
            })
        );
        assert_eq!(
            EventId::parse("7"),
            Some(EventId {
                anchor: 7,
                entries: vec![]
            })
        );
        for bad in ["", "x", "1.", "1.2", "1.a-1", "1.1-", &"1".repeat(2000)] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }

    /// What README's table says an id and an anchor cost, at 1, 100 and 1,024 channels: the
    /// longest id (a full set of entries, the highest indexes, advances of up to 9,999 pushes
    /// since the anchor) and the anchor saved (channel names like `chat:room-0001`, 16-digit
    /// epochs, 6-digit offsets). `--nocapture` prints them.
    #[test]
    fn ids_and_anchors_stay_within_what_the_readme_says() {
        for (channels, id_at_most, anchor_at_most) in
            [(1usize, 8, 64), (100, 130, 6_300), (1_024, 162, 64_000)]
        {
            let base: Vec<(Channel, Position)> = (0..channels)
                .map(|i| {
                    let channel = Channel::new(&format!("chat:room-{i:04}")).unwrap();
                    let position = Position {
                        epoch: "9f0c2a71d4e3b856".into(),
                        offset: 123_456,
                    };
                    (channel, position)
                })
                .collect();
            let mut ids = Ids::new(7);
            ids.entries = (channels.saturating_sub(MAX_ENTRIES)..channels)
                .map(|index| (index, 9_999))
                .collect();
            ids.base = base.clone();
            ids.moved = true;
            let mut line = BytesMut::new();
            ids.write_line(&mut line);
            let id = line.len() - "id: \n".len();
            let anchor = Recover::of(base.into_iter().collect()).to_json().len();
            println!("{channels} channels: id {id} B, anchor {anchor} B");
            assert!(id <= id_at_most, "{channels}: id of {id} B");
            assert!(anchor <= anchor_at_most, "{channels}: anchor of {anchor} B");
        }
    }
}
