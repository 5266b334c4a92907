//! API keys: the secret a client holds, and what storage keeps of it.

use std::fmt;

use chrono::{DateTime, Timelike, Utc};
use rand::distributions::{Alphanumeric, DistString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::KeyLimits;

/// Every key llmgate issues starts with this.
pub const KEY_PREFIX: &str = "sk-lg-";
/// Random base62 characters after [`KEY_PREFIX`].
pub const KEY_RANDOM_LEN: usize = 40;
/// How many characters of a key are kept in storage to recognise it (`sk-lg-AbCd`).
pub const PUBLIC_PREFIX_LEN: usize = KEY_PREFIX.len() + 4;

/// An API key in clear text. Its `Debug` and `Display` show only the public prefix,
/// so it can never leak through a log line or a panic message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key a client presented or an operator configured.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// A fresh key: `sk-lg-` and 40 base62 characters from the OS random source
    /// (about 238 bits of entropy).
    pub fn generate() -> Self {
        let random = Alphanumeric.sample_string(&mut rand::rngs::OsRng, KEY_RANDOM_LEN);
        Self(format!("{KEY_PREFIX}{random}"))
    }

    /// The key itself. Call only to hand it to its owner, once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the key has llmgate's shape: `sk-lg-` and at least 32 base62 characters.
    pub fn is_well_formed(&self) -> bool {
        self.0
            .strip_prefix(KEY_PREFIX)
            .is_some_and(|rest| rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
    }

    /// The SHA-256 hash under which storage knows this key.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// The short public prefix shown in listings.
    pub fn public_prefix(&self) -> String {
        self.0.chars().take(PUBLIC_PREFIX_LEN).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}…)", self.public_prefix())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", self.public_prefix())
    }
}

/// SHA-256 of a key: the only form in which storage sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The hash of a key in clear text (what [`Secret::hash`] gives), without copying it.
    pub(crate) fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Lower-case hex, for stores that keep text.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Calls the model API and reads its own usage.
    #[default]
    User,
    /// Also manages keys and reads everyone's usage.
    Admin,
}

impl Role {
    /// `"user"` or `"admin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role '{other}': expected 'user' or 'admin'"
            )),
        }
    }
}

/// A key as storage keeps it: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Stable id, `key_…`.
    pub id: String,
    /// Who or what the key is for; unique among active keys.
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// The first characters of the key, e.g. `sk-lg-AbCd`.
    pub prefix: String,
    /// When the key was created.
    pub created_at: DateTime<Utc>,
    /// After this instant the key is refused.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the key was revoked; a revoked key is refused.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key's own limits (unset fields fall back to the configured defaults).
    #[serde(default, skip_serializing_if = "KeyLimits::is_empty")]
    pub limits: KeyLimits,
}

impl KeyRecord {
    /// A record for a new key, with a fresh id.
    pub fn new(name: impl Into<String>, role: Role, secret: &Secret) -> Self {
        Self {
            id: format!(
                "key_{}",
                Alphanumeric.sample_string(&mut rand::thread_rng(), 16)
            ),
            name: name.into(),
            role,
            prefix: secret.public_prefix(),
            created_at: now_millis(),
            expires_at: None,
            revoked_at: None,
            limits: KeyLimits::default(),
        }
    }

    /// Whether the key may be used at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The current time at millisecond precision, the precision storage keeps.
pub fn now_millis() -> DateTime<Utc> {
    // Truncated in place: converting to milliseconds and back costs two more date
    // computations, on every request.
    let now = Utc::now();
    now.with_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}

/// The authenticated caller, put into the request's extensions by
/// [`RequireKeyLayer`](super::RequireKeyLayer) and by the metering middleware
/// (`AuthUsageLayer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id.
    pub key_id: String,
    /// The key's name.
    pub name: String,
    /// The key's role.
    pub role: Role,
    /// The key's share of a busy model against other keys waiting for it (its
    /// [`KeyLimits::weight`], or the default's when the metering layer has limits).
    pub weight: u32,
}

impl From<&KeyRecord> for Caller {
    fn from(key: &KeyRecord) -> Self {
        Self {
            key_id: key.id.clone(),
            name: key.name.clone(),
            role: key.role,
            weight: key.limits.weight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_kept_to_the_millisecond() {
        let before = Utc::now();
        let now = now_millis();
        assert_eq!(now.timestamp_subsec_nanos() % 1_000_000, 0, "{now:?}");
        assert!(now <= Utc::now() && before - now < chrono::TimeDelta::milliseconds(1));
    }

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert!(a.is_well_formed(), "{a:?}");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), KEY_PREFIX.len() + KEY_RANDOM_LEN);
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn debug_and_display_never_show_the_key() {
        let key = Secret::generate();
        let random_tail = &key.expose()[PUBLIC_PREFIX_LEN..];
        for shown in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{:?}", key.hash()),
        ] {
            assert!(!shown.contains(random_tail), "{shown}");
        }
        assert!(format!("{key}").starts_with("sk-lg-"));
    }

    #[test]
    fn malformed_keys_are_recognised() {
        assert!(!Secret::new("sk-lg-short").is_well_formed());
        assert!(!Secret::new(format!("sk-xx-{}", "a".repeat(40))).is_well_formed());
        assert!(!Secret::new(format!("sk-lg-{}!", "a".repeat(40))).is_well_formed());
        assert!(Secret::new(format!("sk-lg-{}", "a".repeat(32))).is_well_formed());
    }

    #[test]
    fn hash_is_sha256_of_the_key() {
        let key = Secret::new("abc");
        assert_eq!(
            key.hash().to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
