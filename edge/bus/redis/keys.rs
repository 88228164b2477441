//! Where each name lives: the partition (and so the Redis Cluster hash tag) of a digest, a
//! channel, a user, a node or a `Handle` group, and every key and topic name built on it, each
//! by a method of [`Keys`] (nothing else in the bus spells a key).
//!
//! On one Redis server there is one partition. On a Redis Cluster there are [`PARTITIONS`]:
//! a name belongs to the partition of its CRC16 slot (`slot / 128`), and partition `i`'s hash
//! tag is the first integer whose slot falls in `[128 i, 128 (i + 1))`. So every partition is one
//! slot, the partitions split the slot space evenly (and with it any contiguous assignment of
//! slots to shards), and a channel's keys, its topic and the per-partition indexes its scripts
//! write (the outbox, the vacating set) all share one slot: one script never crosses slots.

use crate::credentials::Digest;

/// One of a channel's keys.
#[derive(Debug, Clone, Copy)]
pub(super) enum ChannelKey<'a> {
    /// `m`: its epoch (`e`) and last offset (`o`).
    Meta,
    /// `l`: its log of pushes (a stream, ids `0-<offset>`).
    Log,
    /// `i:<key>`: the position a push with this idempotency key got.
    Idempotency(&'a str),
    /// `pr`: its presence (digest -> entry).
    Presence,
    /// `pu`: its members' count per user.
    PresenceUsers,
    /// `pn`: its members' nodes (digest -> node).
    PresenceNodes,
}

/// Partitions on a Redis Cluster (a divisor of the 16384 slots).
pub(super) const PARTITIONS: usize = 128;
const SLOTS: u16 = 16_384;

/// The CRC16 slot of `name`, as Redis Cluster computes it (a name without a hash tag).
pub(super) fn slot(name: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(name) % SLOTS
}

/// The slot of a key or topic as Redis Cluster computes it: its hash tag's (the text between
/// the first `{` and the next `}`, when not empty), else the whole name's.
pub(super) fn key_slot(key: &str) -> u16 {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return slot(&key.as_bytes()[open + 1..open + 1 + len]);
            }
        }
    }
    slot(key.as_bytes())
}

/// The names of one deployment (its prefix) and its partitions.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    /// `P:{tag}` for each partition.
    bases: Vec<String>,
}

impl Keys {
    pub(super) fn new(prefix: &str, cluster: bool) -> Self {
        let bases = if cluster {
            let width = SLOTS / PARTITIONS as u16;
            let mut tags: Vec<Option<u64>> = vec![None; PARTITIONS];
            let mut found = 0;
            let mut k = 0u64;
            while found < PARTITIONS {
                let p = usize::from(slot(k.to_string().as_bytes()) / width);
                if tags[p].is_none() {
                    tags[p] = Some(k);
                    found += 1;
                }
                k += 1;
            }
            tags.into_iter()
                .map(|t| format!("{prefix}:{{{}}}", t.unwrap_or_default()))
                .collect()
        } else {
            vec![format!("{prefix}:{{0}}")]
        };
        Self {
            prefix: prefix.to_owned(),
            bases,
        }
    }

    pub(super) fn partitions(&self) -> usize {
        self.bases.len()
    }

    /// The partition of `name` (a digest, channel, user, node or group name).
    pub(super) fn part(&self, name: &str) -> usize {
        if self.bases.len() == 1 {
            return 0;
        }
        usize::from(slot(name.as_bytes()) / (SLOTS / self.bases.len() as u16))
    }

    /// The slot of partition `p` (its tag's).
    pub(super) fn slot(&self, p: usize) -> u16 {
        key_slot(&self.bases[p])
    }

    /// `P:{tag}:rest` in partition `p`.
    fn at(&self, p: usize, rest: &str) -> String {
        format!("{}:{rest}", self.bases[p])
    }

    /// `P:{tag(name)}:kind:name`.
    fn of(&self, kind: &str, name: &str) -> String {
        self.at(self.part(name), &format!("{kind}:{name}"))
    }

    /// A digest's state: `s` (issued, live on a node, in grace until, dead), its connection
    /// id, user and info.
    pub(super) fn session(&self, digest: &Digest) -> String {
        self.of("s", &digest.to_string())
    }

    /// A digest's channels.
    pub(super) fn subscriptions(&self, digest: &Digest) -> String {
        self.of("subs", &digest.to_string())
    }

    /// The set of the digests issued for `user`.
    pub(super) fn user(&self, user: &str) -> String {
        self.of("u", user)
    }

    /// Partition `p`'s outbox: lifecycle events its scripts wrote, for the relay to the
    /// `Handle` groups (and, as a topic, the relays' wake-up call).
    pub(super) fn outbox(&self, p: usize) -> String {
        self.at(p, "out")
    }

    /// Partition `p`'s digests waiting for their grace to end (sorted by when it does).
    pub(super) fn ends(&self, p: usize) -> String {
        self.at(p, "ends")
    }

    /// Partition `p`'s digests live on `node`, for ending them should it die.
    pub(super) fn node_live(&self, p: usize, node: &str) -> String {
        self.at(p, &format!("nl:{node}"))
    }

    /// Partition `p`'s copy of the heartbeats (every node writes each partition's, so a
    /// digest's script reads its holder's on its own slot).
    pub(super) fn nodes(&self, p: usize) -> String {
        self.at(p, "nodes")
    }

    /// Partition `p`'s channels whose last member left, by when `vacated` is due.
    pub(super) fn vacating(&self, p: usize) -> String {
        self.at(p, "vacating")
    }

    /// The nodes whose connections were taken out of presence for silence.
    pub(super) fn presence_gone(&self) -> String {
        self.at(0, "presence-gone")
    }

    /// The pub/sub topic of `channel`'s pushes and presence changes.
    pub(super) fn channel_topic(&self, channel: &str) -> String {
        self.of("ch", channel)
    }

    /// One of `channel`'s keys (in its topic's partition).
    pub(super) fn channel(&self, channel: &str, key: ChannelKey<'_>) -> String {
        let suffix = match key {
            ChannelKey::Meta => "m".into(),
            ChannelKey::Log => "l".into(),
            ChannelKey::Idempotency(k) => format!("i:{k}"),
            ChannelKey::Presence => "pr".into(),
            ChannelKey::PresenceUsers => "pu".into(),
            ChannelKey::PresenceNodes => "pn".into(),
        };
        format!("{}:{suffix}", self.channel_topic(channel))
    }

    /// The topic of commands to `node`.
    pub(super) fn node_topic(&self, node: &str) -> String {
        self.of("node", node)
    }

    /// The `Handle` groups that take `action`, by how long their advertisement lasts.
    pub(super) fn action(&self, action: &str) -> String {
        self.of("act", action)
    }

    /// `group`'s queue of client messages and lifecycle events.
    pub(super) fn queue(&self, group: &str) -> String {
        self.of("q", group)
    }

    /// The channel name in a channel topic (`P:{tag}:ch:<channel>`), if it is one.
    pub(super) fn channel_of_topic<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        let (_, rest) = rest.split_once('}')?;
        rest.strip_prefix(":ch:")
    }

    /// The partition of an outbox wake-up topic (`P:{tag}:out`), if it is one.
    pub(super) fn outbox_of_topic(&self, topic: &str) -> Option<usize> {
        let base = topic.strip_suffix(":out")?;
        self.bases.iter().position(|b| b == base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_is_one_slot_in_its_range() {
        let keys = Keys::new("P", true);
        assert_eq!(keys.partitions(), PARTITIONS);
        for p in 0..PARTITIONS {
            let base = keys.at(p, "x");
            let tag = &base[base.find('{').unwrap() + 1..base.find('}').unwrap()];
            assert_eq!(usize::from(slot(tag.as_bytes()) / 128), p);
        }
    }

    #[test]
    fn channels_spread_evenly_over_three_shards() {
        // Three masters as `redis-cli --cluster create` splits the slots.
        let keys = Keys::new("P", true);
        let mut shards = [0u32; 3];
        for i in 0..30_000 {
            let p = keys.part(&format!("room-{i}"));
            let tag_slot = usize::from(slot(
                keys.at(p, "")
                    .trim_start_matches("P:{")
                    .trim_end_matches("}:")
                    .as_bytes(),
            ));
            shards[(tag_slot * 3 / 16_384).min(2)] += 1;
        }
        for n in shards {
            assert!((9_500..=10_500).contains(&n), "{shards:?}");
        }
    }

    #[test]
    fn topics_parse_back() {
        for cluster in [false, true] {
            let keys = Keys::new("cg", cluster);
            let topic = keys.of("ch", "a}b:c");
            assert_eq!(keys.channel_of_topic(&topic), Some("a}b:c"));
            assert_eq!(keys.channel_of_topic("cg:node:x"), None);
            let out = keys.at(keys.partitions() - 1, "out");
            assert_eq!(keys.outbox_of_topic(&out), Some(keys.partitions() - 1));
        }
    }
}
