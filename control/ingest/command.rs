//! The commands a consumer applies: a method and its JSON (an outbox row's `method` and
//! `payload`, or a JetStream message's body), checked into a [`Command`] and applied through
//! the [`Gateway`]. Every state-changing Control call has a method:
//!
//! | method | JSON |
//! | --- | --- |
//! | `push` | `{"channels": ["a", "b"], "data": {...}, "idempotency_key": "k"}` (or `"channel": "a"`; the key defaults to the source's id) |
//! | `send` | `{"digest": "..."` or `"user": "..."`, `"channel": "c", "data": {...}}` |
//! | `disconnect` | `{"digest": "..."` or `"user": "..."`, `"code": 4000, "reason": "..."}` (code and reason optional) |
//! | `subscribe`, `unsubscribe` | `{"digest": "...", "channels": ["a"]}` |
//!
//! A failure is either [`Failure::Poison`] (the command can never apply: it goes aside with its
//! reason) or [`Failure::Transient`] (the cluster's state is unavailable, the node is draining:
//! retried with back-off, never skipped).

use serde::Deserialize;
use serde_json::value::RawValue;

use edge::{
    domain::Channel,
    error::{Close, Error},
    gateway::Digest,
    Gateway,
};

use crate::convert;

/// One command, checked.
#[derive(Debug)]
pub(crate) enum Command {
    /// `push`.
    Push {
        channels: Vec<Channel>,
        json: String,
        key: Option<String>,
    },
    /// `send`.
    Send {
        to: To,
        channel: Channel,
        json: String,
    },
    /// `disconnect`.
    Disconnect { to: To, close: Close },
    /// `subscribe` (`on`) or `unsubscribe`.
    Subscribe {
        digest: Digest,
        channels: Vec<Channel>,
        on: bool,
    },
}

/// Whom a `send` or `disconnect` addresses.
#[derive(Debug)]
pub(crate) enum To {
    Digest(Digest),
    User(String),
}

/// Why a command did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// It never will: moved aside (dead-letter table, JetStream `term`) with this reason.
    #[error("{message}")]
    Poison {
        /// A short label for the metric (`bad_json`, `unknown_method`, `bad_channel`, ...).
        reason: &'static str,
        /// What is wrong, for the dead-letter row and the log.
        message: String,
    },
    /// It may later: retried with back-off.
    #[error("{0}")]
    Transient(Error),
}

impl Failure {
    fn poison(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Poison {
            reason,
            message: message.into(),
        }
    }

    /// The metric's label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Poison { reason, .. } => reason,
            Self::Transient(_) => "transient",
        }
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        let reason = match &err {
            Error::Unavailable(_) | Error::ShuttingDown | Error::TooManyIdempotencyKeys { .. } => {
                return Self::Transient(err)
            }
            Error::BadChannel(_) | Error::NoChannels | Error::TooManyChannels { .. } => {
                "bad_channel"
            }
            Error::BadDigest(_) | Error::UnknownDigest => "unknown_digest",
            Error::BadJson(_) => "bad_json",
            Error::PayloadTooLarge { .. } => "too_large",
            _ => "invalid",
        };
        Self::poison(reason, err.to_string())
    }
}

/// The fields of every method; which ones a method takes is checked by [`Command::parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    reason: Option<String>,
}

impl Command {
    /// Checks `method` and its JSON.
    pub(crate) fn parse(method: &str, json: &str) -> Result<Self, Failure> {
        let f: Fields<'_> = serde_json::from_str(json)
            .map_err(|e| Failure::poison("bad_json", format!("payload: {e}")))?;
        let refuse = |fields: &[(&str, bool)]| match fields.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(Failure::poison(
                "bad_json",
                format!("`{name}` is not a field of `{method}`"),
            )),
            None => Ok(()),
        };
        let data = |data: Option<&RawValue>| {
            data.map(|d| d.get().to_owned())
                .ok_or_else(|| Failure::poison("bad_json", format!("`{method}` needs `data`")))
        };
        let digest = |text: &str| -> Result<Digest, Failure> {
            text.parse()
                .map_err(|e: edge::gateway::BadDigest| Error::from(e).into())
        };
        let to = |digest_text: Option<String>, user: Option<String>| match (digest_text, user) {
            (Some(d), None) => Ok(To::Digest(digest(&d)?)),
            (None, Some(u)) => Ok(To::User(u)),
            _ => Err(Failure::from(Error::DigestOrUser)),
        };
        let channel = |name: &str| Channel::new(name).map_err(|e| Failure::from(Error::from(e)));
        let channels = |one: Option<String>, many: Option<Vec<String>>| -> Result<_, Failure> {
            let names = match (one, many) {
                (Some(one), None) => vec![one],
                (None, Some(many)) => many,
                (None, None) => return Err(Error::NoChannels.into()),
                (Some(_), Some(_)) => {
                    return Err(Failure::poison("bad_json", "give `channel` or `channels`"))
                }
            };
            names.iter().map(|n| channel(n)).collect()
        };
        match method {
            "push" => {
                refuse(&[
                    ("digest", f.digest.is_some()),
                    ("user", f.user.is_some()),
                    ("code", f.code.is_some()),
                    ("reason", f.reason.is_some()),
                ])?;
                Ok(Self::Push {
                    channels: channels(f.channel, f.channels)?,
                    json: data(f.data)?,
                    key: f.idempotency_key,
                })
            }
            "send" => {
                refuse(&[
                    ("channels", f.channels.is_some()),
                    ("idempotency_key", f.idempotency_key.is_some()),
                    ("code", f.code.is_some()),
                    ("reason", f.reason.is_some()),
                ])?;
                let name = f
                    .channel
                    .ok_or_else(|| Failure::poison("bad_json", "`send` needs `channel`"))?;
                Ok(Self::Send {
                    to: to(f.digest, f.user)?,
                    channel: channel(&name)?,
                    json: data(f.data)?,
                })
            }
            "disconnect" => {
                refuse(&[
                    ("channel", f.channel.is_some()),
                    ("channels", f.channels.is_some()),
                    ("data", f.data.is_some()),
                    ("idempotency_key", f.idempotency_key.is_some()),
                ])?;
                Ok(Self::Disconnect {
                    to: to(f.digest, f.user)?,
                    close: convert::checked_close(
                        f.code.unwrap_or(0),
                        f.reason.unwrap_or_default(),
                    )?,
                })
            }
            "subscribe" | "unsubscribe" => {
                refuse(&[
                    ("user", f.user.is_some()),
                    ("data", f.data.is_some()),
                    ("idempotency_key", f.idempotency_key.is_some()),
                    ("code", f.code.is_some()),
                    ("reason", f.reason.is_some()),
                ])?;
                let text = f.digest.ok_or_else(|| {
                    Failure::poison("bad_json", format!("`{method}` needs `digest`"))
                })?;
                Ok(Self::Subscribe {
                    digest: digest(&text)?,
                    channels: channels(f.channel, f.channels)?,
                    on: method == "subscribe",
                })
            }
            other => Err(Failure::poison(
                "unknown_method",
                format!(
                    "unknown method {other:?}: push, send, disconnect, subscribe or unsubscribe"
                ),
            )),
        }
    }

    /// Applies the command through `gateway`; a push without its own idempotency key takes
    /// `default_key` (the source's id for it, when the consumer keys its pushes). A send or
    /// disconnect that finds no live socket has applied: there was nothing to do.
    pub(crate) async fn apply(
        &self,
        gateway: &Gateway,
        default_key: Option<&str>,
    ) -> Result<(), Failure> {
        match self {
            Self::Push {
                channels,
                json,
                key,
            } => {
                gateway
                    .push(channels, json, key.as_deref().or(default_key))
                    .await?;
            }
            Self::Send { to, channel, json } => match to {
                To::Digest(d) => match gateway.send(d, channel, json).await {
                    Ok(_) | Err(Error::UnknownDigest) => {}
                    Err(err) => return Err(err.into()),
                },
                To::User(user) => {
                    gateway.send_user(user, channel, json).await?;
                }
            },
            Self::Disconnect { to, close } => match to {
                To::Digest(d) => match gateway.disconnect(d, close.clone()).await {
                    Ok(_) | Err(Error::UnknownDigest) => {}
                    Err(err) => return Err(err.into()),
                },
                To::User(user) => {
                    gateway.disconnect_user(user, close.clone()).await?;
                }
            },
            Self::Subscribe {
                digest,
                channels,
                on: true,
            } => {
                gateway.subscribe(digest, channels).await?;
            }
            Self::Subscribe {
                digest, channels, ..
            } => {
                gateway.unsubscribe(digest, channels).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn every_method_parses_from_its_json() {
        let push = Command::parse("push", r#"{"channel":"room:1","data":{"b":1, "a":[2]}}"#);
        let Ok(Command::Push {
            channels,
            json,
            key,
        }) = push
        else {
            panic!("{push:?}")
        };
        assert_eq!(channels.len(), 1);
        // The payload's own text, not re-encoded.
        assert_eq!(json, r#"{"b":1, "a":[2]}"#);
        assert_eq!(key, None);
        assert!(matches!(
            Command::parse("push", r#"{"channels":["a","b"],"data":1,"idempotency_key":"k"}"#),
            Ok(Command::Push { ref channels, ref key, .. }) if channels.len() == 2 && key.as_deref() == Some("k")
        ));
        assert!(matches!(
            Command::parse(
                "send",
                &format!(r#"{{"digest":"{DIGEST}","channel":"c","data":{{}}}}"#)
            ),
            Ok(Command::Send {
                to: To::Digest(_),
                ..
            })
        ));
        assert!(matches!(
            Command::parse("send", r#"{"user":"ann","channel":"c","data":"hi"}"#),
            Ok(Command::Send {
                to: To::User(_),
                ..
            })
        ));
        assert!(matches!(
            Command::parse("disconnect", r#"{"user":"ann","code":4001}"#),
            Ok(Command::Disconnect { .. })
        ));
        assert!(matches!(
            Command::parse(
                "unsubscribe",
                &format!(r#"{{"digest":"{DIGEST}","channels":["a"]}}"#)
            ),
            Ok(Command::Subscribe { on: false, .. })
        ));
    }

    #[test]
    fn commands_that_can_never_apply_are_poison_with_a_reason() {
        for (method, json, reason) in [
            ("push", "{not json", "bad_json"),
            ("push", r#"{"channel":"a"}"#, "bad_json"),
            (
                "push",
                r#"{"channel":"a","data":1,"colour":"red"}"#,
                "bad_json",
            ),
            (
                "push",
                r#"{"channel":"bad channel!","data":1}"#,
                "bad_channel",
            ),
            ("push", r#"{"data":1}"#, "bad_channel"),
            (
                "push",
                r#"{"channel":"a","digest":"x","data":1}"#,
                "bad_json",
            ),
            ("teleport", r#"{}"#, "unknown_method"),
            (
                "send",
                r#"{"digest":"nope","channel":"c","data":1}"#,
                "unknown_digest",
            ),
            ("send", r#"{"channel":"c","data":1}"#, "invalid"),
            ("disconnect", r#"{"user":"ann","code":1000}"#, "invalid"),
            ("subscribe", r#"{"channels":["a"]}"#, "bad_json"),
        ] {
            match Command::parse(method, json) {
                Err(f @ Failure::Poison { .. }) => {
                    assert_eq!(f.reason(), reason, "{method} {json}: {f}")
                }
                other => panic!("{method} {json}: {other:?}"),
            }
        }
    }

    proptest::proptest! {
        /// Whatever a row or a message holds, parsing it refuses clearly (a poison failure
        /// with a reason) or gives a command; it never panics and never says "retry".
        #[test]
        fn any_row_parses_or_is_poison(
            method in proptest::sample::select(vec!["push", "send", "disconnect", "subscribe", "unsubscribe", "x", ""]),
            json in "\\PC{0,200}",
        ) {
            check(method, &json);
        }

        /// The same with objects built from the methods' own fields and odd values.
        #[test]
        fn any_object_of_known_fields_parses_or_is_poison(
            method in proptest::sample::select(vec!["push", "send", "disconnect", "subscribe", "unsubscribe"]),
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["channel", "channels", "data", "idempotency_key", "digest", "user", "code", "reason"]),
                    proptest::sample::select(vec!["\"a\"", "[\"a\",\"b c\"]", "[]", "1", "-1", "4001", "null", "{}", "\"\"", "true", "\"\\u0000\""]),
                ),
                0..6,
            ),
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            check(method, &format!("{{{}}}", body.join(",")));
        }
    }

    fn check(method: &str, json: &str) {
        match Command::parse(method, json) {
            Ok(_) => {}
            Err(Failure::Poison { reason, message }) => {
                assert!(!reason.is_empty() && !message.is_empty(), "{method} {json}");
            }
            Err(Failure::Transient(err)) => panic!("{method} {json}: transient {err}"),
        }
    }

    #[test]
    fn unavailable_and_draining_are_transient_and_the_rest_poison() {
        let transient = Failure::from(Error::ShuttingDown);
        assert!(matches!(transient, Failure::Transient(_)));
        assert_eq!(transient.reason(), "transient");
        let too_large = Failure::from(Error::PayloadTooLarge { len: 9, max: 1 });
        assert_eq!(too_large.reason(), "too_large");
    }
}
