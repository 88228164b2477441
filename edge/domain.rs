//! The domain's types, on the ground floor of the edge: every room (the wire protocol, the
//! registry, the bus, the handlers) and the control plane use them, and this module imports
//! nothing of the crate. Each type checks what it holds when it is made, so a value of it is
//! valid wherever it goes: a channel name, JSON text, a channel's epoch and position, the user
//! credentials belong to.

use std::{fmt, ops::Deref, sync::Arc};

use serde_json::value::RawValue;

/// Most channels one call names (`Subscribe`, `Unsubscribe`, `Push`, `IssueConnection`,
/// `Listen`, a `recover` parameter).
pub const MAX_CHANNELS_PER_CALL: usize = 1024;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// A valid channel name: 1 to 255 bytes of printable ASCII without spaces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

/// A channel name outside the rules of [`Channel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel name {0:?}: 1 to 255 bytes of printable ASCII without spaces")]
pub struct BadChannel(pub String);

impl Channel {
    /// Checks `name` and makes a channel of it.
    pub fn new(name: &str) -> Result<Self, BadChannel> {
        let ok = !name.is_empty()
            && name.len() <= MAX_CHANNEL_LEN
            && name.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(name.into()))
        } else {
            let mut shown: String = name.chars().take(64).collect();
            if shown.len() < name.len() {
                shown.push('…');
            }
            Err(BadChannel(shown))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Channel {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// JSON text that parses. Holds the application's text unchanged (surrounding whitespace
/// trimmed), so a payload reaches clients byte for byte.
#[derive(Debug, Clone)]
pub struct Json(Box<RawValue>);

/// Text that is not one JSON value.
#[derive(Debug, thiserror::Error)]
#[error("invalid JSON: {0}")]
pub struct BadJson(#[from] serde_json::Error);

impl Json {
    /// Parses `text` as one JSON value.
    pub fn parse(text: &str) -> Result<Self, BadJson> {
        Ok(Self(RawValue::from_string(text.trim().to_owned())?))
    }

    /// `null`.
    pub fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

/// A channel's epoch: an opaque name for one unbroken history of the channel. It changes
/// whenever the store lost the channel's past (a single node restarted, a Redis that came back
/// empty, a position kept past `position-ttl`). 1 to [`MAX_EPOCH_LEN`] characters of `[0-9a-zA-Z_-]`.
pub type Epoch = Arc<str>;

/// Longest epoch accepted from a client or from Redis.
pub const MAX_EPOCH_LEN: usize = 64;

/// Checks an epoch's characters; epochs are written into frames unescaped.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= MAX_EPOCH_LEN
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new random epoch (16 hex digits).
pub fn new_epoch() -> Epoch {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes).into()
}

/// Where a channel's stream stands: its epoch and the offset of its last push (0: none yet).
/// The next push has offset `offset + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The channel's epoch.
    pub epoch: Epoch,
    /// The offset of its last push.
    pub offset: u64,
}

/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 256;
/// Largest `info` JSON bound to credentials, in bytes.
pub const MAX_INFO_LEN: usize = 2048;

/// Who a set of credentials belongs to, as the application said when it issued them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The application's user name.
    pub name: Arc<str>,
    /// Checked JSON text the application attached (shown in presence), if any.
    pub info: Option<Arc<str>>,
}

impl User {
    /// Checks a user name (1 to [`MAX_USER_LEN`] bytes, no control characters) and its info
    /// (JSON, at most [`MAX_INFO_LEN`] bytes; empty for none).
    pub fn new(name: &str, info: &str) -> Result<Self, BadUser> {
        check_user(name)?;
        let info = if info.is_empty() {
            None
        } else {
            if info.len() > MAX_INFO_LEN {
                return Err(BadUser::InfoTooLarge);
            }
            Json::parse(info).map_err(BadUser::InfoNotJson)?;
            Some(info.into())
        };
        Ok(Self {
            name: name.into(),
            info,
        })
    }

    /// The user stored as `name` and `info` text (`None` when `name` is empty); the inverse
    /// of [`User::texts`]. Unchecked: the text was checked when the credentials were issued.
    pub fn from_texts(name: &str, info: &str) -> Option<Self> {
        (!name.is_empty()).then(|| Self {
            name: name.into(),
            info: (!info.is_empty()).then(|| info.into()),
        })
    }

    /// `(name, info)` of `user` as text, `("", "")` for none: how the Redis bus stores them.
    pub fn texts(user: Option<&Self>) -> (&str, &str) {
        user.map_or(("", ""), |u| (&*u.name, u.info.as_deref().unwrap_or("")))
    }
}

/// Checks a user name: 1 to [`MAX_USER_LEN`] bytes without control characters.
pub fn check_user(name: &str) -> Result<(), BadUser> {
    if name.is_empty() || name.len() > MAX_USER_LEN || name.chars().any(char::is_control) {
        return Err(BadUser::Name);
    }
    Ok(())
}

/// A user or its info outside the rules of [`User`].
#[derive(Debug, thiserror::Error)]
pub enum BadUser {
    /// The name: empty, too long, or with control characters.
    #[error("a user is 1 to {MAX_USER_LEN} bytes without control characters")]
    Name,
    /// The info: larger than [`MAX_INFO_LEN`].
    #[error("user info is JSON of at most {MAX_INFO_LEN} bytes")]
    InfoTooLarge,
    /// The info: not JSON.
    #[error(transparent)]
    InfoNotJson(BadJson),
}
