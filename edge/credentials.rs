//! Connection credentials: minting and checking connection ids, socket keys and digests.
//!
//! A connection id is public and self-describing. It is the URL-safe base64 (no padding) of
//!
//! ```text
//! version (1 byte, = 1) | expires_at_unix_ms (8 bytes, big-endian) | key_commit (16) | tag (16)
//! ```
//!
//! * `key_commit` = the first 16 bytes of SHA-256("channelgate/key/v1" || socket_key): the id
//!   commits to its key, so a wrong key is refused at the handshake, not merely starved.
//! * `tag` = the first 16 bytes of HMAC-SHA256(deployment secret, "channelgate/id/v1" || the
//!   first 25 bytes): any edge holding the secret checks an id with no shared state.
//!
//! The socket key is 32 random bytes (URL-safe base64). The digest is
//! `hex(HMAC-SHA256(key = socket_key, message = connection_id))`, as in Pakyow.
//!
//! This module is pure: no I/O, no clock (callers pass `now`). Every comparison of secret
//! material is constant-time. Nothing here logs, and `Debug` never prints a key or a secret.

use std::{fmt, str::FromStr};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const COMMIT_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Bytes covered by the tag: version, expiry, key commitment.
const SIGNED_LEN: usize = 1 + 8 + COMMIT_LEN;
const ID_LEN: usize = SIGNED_LEN + TAG_LEN;
/// Length of an encoded connection id (base64 of [`ID_LEN`] bytes, no padding).
pub(crate) const ENCODED_ID_LEN: usize = (ID_LEN * 4).div_ceil(3);
/// Random bytes in a socket key: 256 bits.
const KEY_BYTES: usize = 32;
/// Keys longer than this are refused before any hashing.
const MAX_KEY_LEN: usize = 256;
/// Minimum length of a deployment secret, in bytes.
pub(crate) const MIN_SECRET_LEN: usize = 16;

const KEY_DOMAIN: &[u8] = b"channelgate/key/v1";
const ID_DOMAIN: &[u8] = b"channelgate/id/v1";

/// Why a presented id or key was refused. Each of these is a `403` at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CredentialError {
    /// Not base64, wrong length or unknown version: not an id this gateway mints.
    #[error("malformed connection id")]
    Malformed,
    /// The tag does not verify under the current or the previous secret.
    #[error("connection id not signed by this deployment")]
    BadSignature,
    /// The key does not match the key the id commits to.
    #[error("socket key does not belong to the connection id")]
    WrongKey,
}

/// A deployment secret, current and previous (for rotation).
#[derive(Clone)]
pub(crate) struct Secrets {
    current: HmacSha256,
    previous: Option<HmacSha256>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// The secret is shorter than [`MIN_SECRET_LEN`].
#[derive(Debug, thiserror::Error)]
#[error("a deployment secret must be at least {MIN_SECRET_LEN} bytes")]
pub struct WeakSecret;

impl Secrets {
    /// Secrets signing new ids with `current` and also accepting ids signed by `previous`.
    pub(crate) fn new(current: &[u8], previous: Option<&[u8]>) -> Result<Self, WeakSecret> {
        let mac = |secret: &[u8]| {
            if secret.len() < MIN_SECRET_LEN {
                return Err(WeakSecret);
            }
            Ok(HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length"))
        };
        Ok(Self {
            current: mac(current)?,
            previous: previous.map(mac).transpose()?,
        })
    }

    /// A random 256-bit secret, rendered as hex, for a single node started without one.
    pub(crate) fn generate_secret() -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        hex::encode(bytes)
    }

    /// Mints credentials that must be used before `expires_at_ms`.
    pub(crate) fn issue(&self, expires_at_ms: u64) -> Credentials {
        let mut key_bytes = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut key_bytes);
        let socket_key = URL_SAFE_NO_PAD.encode(key_bytes);

        let mut raw = [0u8; ID_LEN];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&expires_at_ms.to_be_bytes());
        raw[9..SIGNED_LEN].copy_from_slice(&key_commit(&socket_key));
        let tag = tag(&self.current, &raw[..SIGNED_LEN]);
        raw[SIGNED_LEN..].copy_from_slice(&tag);
        let connection_id = URL_SAFE_NO_PAD.encode(raw);
        let digest = Digest::compute(&socket_key, &connection_id);
        Credentials {
            connection_id,
            socket_key,
            digest,
            expires_at_ms,
        }
    }

    /// Checks that `connection_id` was signed by this deployment and that `socket_key` is its
    /// key. Expiry is left to the caller: a socket resuming within its reconnect grace may
    /// present an id whose first-use deadline has passed.
    pub(crate) fn verify(
        &self,
        connection_id: &str,
        socket_key: &str,
    ) -> Result<Verified, CredentialError> {
        if connection_id.len() != ENCODED_ID_LEN || socket_key.len() > MAX_KEY_LEN {
            return Err(CredentialError::Malformed);
        }
        let mut raw = [0u8; ID_LEN];
        match URL_SAFE_NO_PAD.decode_slice(connection_id, &mut raw) {
            Ok(ID_LEN) => {}
            _ => return Err(CredentialError::Malformed),
        }
        if raw[0] != VERSION {
            return Err(CredentialError::Malformed);
        }
        let presented = &raw[SIGNED_LEN..];
        let signed = &raw[..SIGNED_LEN];
        let mut ok = tag(&self.current, signed).ct_eq(presented);
        if let Some(previous) = &self.previous {
            ok |= tag(previous, signed).ct_eq(presented);
        }
        if !bool::from(ok) {
            return Err(CredentialError::BadSignature);
        }
        if !bool::from(key_commit(socket_key).ct_eq(&raw[9..SIGNED_LEN])) {
            return Err(CredentialError::WrongKey);
        }
        let expires_at_ms = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
        Ok(Verified {
            digest: Digest::compute(socket_key, connection_id),
            expires_at_ms,
        })
    }
}

fn key_commit(socket_key: &str) -> [u8; COMMIT_LEN] {
    let hash = Sha256::new()
        .chain_update(KEY_DOMAIN)
        .chain_update(socket_key.as_bytes())
        .finalize();
    hash[..COMMIT_LEN].try_into().expect("SHA-256 is 32 bytes")
}

fn tag(secret: &HmacSha256, signed: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = secret.clone();
    mac.update(ID_DOMAIN);
    mac.update(signed);
    mac.finalize().into_bytes()[..TAG_LEN]
        .try_into()
        .expect("HMAC-SHA256 is 32 bytes")
}

/// One set of connection credentials, as `IssueConnection` returns them.
#[derive(Clone)]
pub struct Credentials {
    /// Public id, rendered into the page.
    pub connection_id: String,
    /// Secret key; the application keeps it (session or `HttpOnly` cookie).
    pub socket_key: String,
    /// `hex(HMAC-SHA256(socket_key, connection_id))`: how the application addresses the socket.
    pub digest: Digest,
    /// Deadline for the first use, in Unix milliseconds.
    pub expires_at_ms: u64,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("connection_id", &self.connection_id)
            .field("digest", &self.digest)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// What a successful [`Secrets::verify`] proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verified {
    /// The digest of the presented id and key.
    pub digest: Digest,
    /// The id's first-use deadline, in Unix milliseconds.
    pub expires_at_ms: u64,
}

/// A socket's digest: 32 bytes, written as 64 lowercase hex digits on every wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// `HMAC-SHA256(key = socket_key, message = connection_id)`.
    pub fn compute(socket_key: &str, connection_id: &str) -> Self {
        let mut mac = HmacSha256::new_from_slice(socket_key.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(connection_id.as_bytes());
        Self(mac.finalize().into_bytes().into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A digest that is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a digest is 64 hex digits")]
pub struct BadDigest;

impl FromStr for Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| BadDigest)?;
        Ok(Self(bytes))
    }
}

/// `<id>\0<key>`: any id and key that were not issued together by this deployment are
/// refused, without a panic.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_connection_id(input: &[u8]) {
    let secrets = Secrets::new(b"fuzz test secret 0123456789abcdef", None).unwrap();
    let text = String::from_utf8_lossy(input);
    let (id, key) = text.split_once('\0').unwrap_or((&text, ""));
    assert!(secrets.verify(id, key).is_err(), "{id:?} {key:?} verified");
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn secrets() -> Secrets {
        Secrets::new(b"0123456789abcdef0123456789abcdef", None).unwrap()
    }

    #[test]
    fn issued_credentials_verify() {
        let s = secrets();
        let c = s.issue(NOW + 60_000);
        assert_eq!(c.connection_id.len(), ENCODED_ID_LEN);
        let v = s.verify(&c.connection_id, &c.socket_key).unwrap();
        assert_eq!(v.digest, c.digest);
        assert_eq!(v.expires_at_ms, NOW + 60_000);
    }

    #[test]
    fn digest_is_hmac_of_id_under_key() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let d = Digest::compute("Jefe", "what do ya want for nothing?");
        assert_eq!(
            d.to_string(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn digest_differs_per_key_and_id_is_reproducible_and_contains_neither() {
        let s = secrets();
        let a = s.issue(NOW);
        let b = s.issue(NOW);
        assert_ne!(a.digest, b.digest);
        assert_ne!(
            Digest::compute(&a.socket_key, &a.connection_id),
            Digest::compute(&b.socket_key, &a.connection_id)
        );
        assert_ne!(
            Digest::compute(&a.socket_key, &a.connection_id),
            Digest::compute(&a.socket_key, &b.connection_id)
        );
        assert_eq!(a.digest, Digest::compute(&a.socket_key, &a.connection_id));
        let hex = a.digest.to_string();
        assert!(!hex.contains(&a.socket_key));
        assert!(!hex.contains(&a.connection_id));
        assert_eq!(hex.parse::<Digest>().unwrap(), a.digest);
    }

    #[test]
    fn wrong_key_is_refused() {
        let s = secrets();
        let a = s.issue(NOW);
        let b = s.issue(NOW);
        assert_eq!(
            s.verify(&a.connection_id, &b.socket_key),
            Err(CredentialError::WrongKey)
        );
        assert_eq!(
            s.verify(&a.connection_id, ""),
            Err(CredentialError::WrongKey)
        );
    }

    #[test]
    fn tampering_any_byte_of_an_id_is_refused() {
        let s = secrets();
        let c = s.issue(NOW);
        let raw = URL_SAFE_NO_PAD.decode(&c.connection_id).unwrap();
        for i in 0..raw.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut forged = raw.clone();
                forged[i] ^= flip;
                let id = URL_SAFE_NO_PAD.encode(&forged);
                let err = s.verify(&id, &c.socket_key).unwrap_err();
                assert!(
                    matches!(
                        err,
                        CredentialError::Malformed | CredentialError::BadSignature
                    ),
                    "byte {i} flip {flip:#x}: {err:?}"
                );
            }
        }
        // Every character of the text form, too.
        for i in 0..c.connection_id.len() {
            let mut id = c.connection_id.clone().into_bytes();
            id[i] = if id[i] == b'A' { b'B' } else { b'A' };
            let id = String::from_utf8(id).unwrap();
            assert!(s.verify(&id, &c.socket_key).is_err(), "char {i}");
        }
    }

    #[test]
    fn malformed_ids_are_refused() {
        let s = secrets();
        let c = s.issue(NOW);
        for id in [
            "",
            "x",
            &c.connection_id[1..],
            &format!("{}A", c.connection_id),
            "!".repeat(ENCODED_ID_LEN).as_str(),
        ] {
            assert_eq!(
                s.verify(id, &c.socket_key),
                Err(CredentialError::Malformed),
                "{id:?}"
            );
        }
        assert_eq!(
            s.verify(&c.connection_id, &"k".repeat(MAX_KEY_LEN + 1)),
            Err(CredentialError::Malformed)
        );
    }

    #[test]
    fn ids_of_another_deployment_are_refused() {
        let other = Secrets::new(b"another deployment secret!!", None).unwrap();
        let c = other.issue(NOW);
        assert_eq!(
            secrets().verify(&c.connection_id, &c.socket_key),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn previous_secret_is_accepted_during_rotation() {
        let old = b"the old deployment secret".as_slice();
        let new = b"the new deployment secret".as_slice();
        let c = Secrets::new(old, None).unwrap().issue(NOW);
        let rotated = Secrets::new(new, Some(old)).unwrap();
        assert!(rotated.verify(&c.connection_id, &c.socket_key).is_ok());
        let after = Secrets::new(new, None).unwrap();
        assert_eq!(
            after.verify(&c.connection_id, &c.socket_key),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn weak_secrets_are_refused_and_debug_hides_secrets() {
        assert!(Secrets::new(b"short", None).is_err());
        let s = secrets();
        let c = s.issue(NOW);
        assert!(!format!("{c:?}").contains(&c.socket_key));
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_digests_are_refused() {
        assert!("".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
        assert!("ab".repeat(31).parse::<Digest>().is_err());
    }

    #[test]
    fn fuzz_connection_ids() {
        use proptest::prelude::*;
        crate::fuzz::replay("connection_id", check_connection_id);
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzz::config());
        runner
            .run(&any::<Vec<u8>>(), |input| {
                check_connection_id(&input);
                Ok(())
            })
            .unwrap();
        // A real id with one character changed, or its key with one changed, is refused.
        let secrets = Secrets::new(b"fuzz test secret 0123456789abcdef", None).unwrap();
        let creds = secrets.issue(u64::MAX / 2);
        let alphabet: Vec<char> = ('A'..='Z')
            .chain('a'..='z')
            .chain('0'..='9')
            .chain(['-', '_'])
            .collect();
        let edits = (
            0..creds.connection_id.len(),
            0..alphabet.len(),
            any::<bool>(),
        );
        runner
            .run(&edits, |(at, with, in_key)| {
                let (mut id, mut key) = (creds.connection_id.clone(), creds.socket_key.clone());
                let target = if in_key { &mut key } else { &mut id };
                let at = at % target.len();
                let replacement = alphabet[with];
                if target.as_bytes()[at] as char == replacement {
                    return Ok(());
                }
                target.replace_range(at..at + 1, &replacement.to_string());
                prop_assert!(secrets.verify(&id, &key).is_err(), "{id} {key}");
                Ok(())
            })
            .unwrap();
    }
}
