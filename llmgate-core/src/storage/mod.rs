//! Where keys, usage and model settings live.
//!
//! Three small object-safe traits, [`KeyStore`], [`UsageStore`] and [`ModelStore`], used
//! as `Arc<dyn …>`; [`Storage`] is a backend that keeps all three. Each backend is one
//! file:
//!
//! - [`MemoryStore`]: in memory, nothing survives a restart. For tests, and for services
//!   that embed the layer and keep usage elsewhere.
//! - [`SqliteStore`]: one SQLite file, the `llmgate` binary's default. One gateway (and
//!   the CLI beside it) on one machine.
//! - [`PostgresStore`]: a PostgreSQL database, for several gateway replicas sharing keys
//!   and usage.
//!
//! The SQL backends share their logic and their schema shape (request rows name their
//! key, method, path and model by id, with the view `usage_requests` for people reading
//! the database); only their SQL differs. A backend of your own implements the three
//! traits and runs the `contract` tests (feature `test-util`).

#[cfg(any(test, feature = "test-util"))]
pub mod contract;
mod endpoint;
mod limits_patch;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
// Shared by both SQL stores; with one of them, part of it has no user.
#[cfg_attr(not(all(feature = "sqlite", feature = "postgres")), allow(dead_code))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use endpoint::{endpoint_label, OTHER_ENDPOINT};
pub use limits_patch::{LimitField, LimitsPatch};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteStore;

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::auth::{KeyHash, KeyRecord};

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The item does not exist.
    #[error("not found")]
    NotFound,
    /// The change would break a uniqueness rule; the message says which.
    #[error("{0}")]
    Conflict(String),
    /// The database failed; the source is the driver's or the file system's error.
    #[error("database error: {0}")]
    Database(#[source] BoxError),
    /// The stored data cannot be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database refused the data itself (a value it cannot hold, a broken rule):
    /// the same data would be refused again, unlike after a [`Database`](Self::Database)
    /// failure, which may pass on a retry.
    #[error("the database refused the data: {0}")]
    Rejected(#[source] BoxError),
}

/// The failure a [`StorageError`] wraps: a driver's error, or a message
/// (`StorageError::Database("timed out".into())`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error with what was being done when it happened; its source is the error itself.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(crate) struct Context {
    what: String,
    source: BoxError,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl Context {
    /// `source`, as failing to do `what`.
    pub(crate) fn boxed(what: impl Into<String>, source: impl Into<BoxError>) -> BoxError {
        Box::new(Self {
            what: what.into(),
            source: source.into(),
        })
    }
}

impl StorageError {
    /// The data was refused for what it holds: retrying it cannot succeed.
    pub fn refuses_content(&self) -> bool {
        matches!(self, Self::Rejected(_) | Self::Conflict(_))
    }
}

/// Keys, found by the hash of their secret.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a new key. Fails with [`StorageError::Conflict`] when an active key already
    /// has this name.
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError>;
    /// The key with this hash, revoked or not.
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError>;
    /// Every key, oldest first, revoked ones included.
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError>;
    /// Marks a key revoked. `Ok(false)` when no active key has this id.
    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError>;
    /// Changes what `update` sets on the active key with this id and returns the key as
    /// it now is; `Ok(None)` when no active key has this id. Fails with
    /// [`StorageError::Conflict`] when another active key has the new name.
    ///
    /// The change is atomic: its [`limits`](KeyUpdate::limits) patch applies to the
    /// limits the key has when it is written, so updates made at the same time, through
    /// this store or another one on the same data (a second replica, the CLI), each keep
    /// the limits they set.
    async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError>;
    /// Gives the active key with this id a new secret (its hash and public prefix),
    /// keeping its id, settings and usage. The previous secret keeps working until
    /// `old_valid_until` (one at or before now stops it at once): [`key_by_hash`] finds
    /// the key by it, with an `expires_at` no later than that. One previous secret is
    /// kept; rotating again replaces it. `Ok(false)` when no active key has this id.
    ///
    /// [`key_by_hash`]: Self::key_by_hash
    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError>;
}

/// What [`KeyStore::update_key`] changes: the name and expiry when they are `Some`, and
/// the limits the patch names; everything else stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    /// The new name; unique among active keys.
    pub name: Option<String>,
    /// The new expiry: `Some(None)` makes the key never expire.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// The key's own limits to unset or set; the default changes none
    /// ([`LimitsPatch::replacing`] replaces them all).
    pub limits: LimitsPatch,
}

impl KeyUpdate {
    /// Applies the update to `key`. A backend applies it to the key as stored, in one
    /// step with writing it back (under its lock, or in one transaction).
    pub fn apply(&self, key: &mut KeyRecord) {
        if let Some(name) = &self.name {
            key.name.clone_from(name);
        }
        if let Some(expires_at) = self.expires_at {
            key.expires_at = expires_at;
        }
        self.limits.apply(&mut key.limits);
    }
}

/// The most tokens one request may count, prompt or completion; a count above it is
/// taken as unknown. The largest context windows hold about 10 million tokens, so no real
/// answer comes near it, while it keeps any running total far from overflowing 64 bits:
/// a key reaches `i64::MAX` only after 9.2 billion requests at this bound.
pub const MAX_TOKENS_PER_REQUEST: u64 = 1_000_000_000;
/// The longest latency kept, in milliseconds (a year); longer ones are cut to it.
pub const MAX_LATENCY_MS: u64 = 365 * 24 * 3600 * 1000;
/// The longest key id kept, in bytes (ids llmgate makes are far shorter).
pub const MAX_KEY_ID_BYTES: usize = 128;
/// The longest HTTP method kept, in bytes.
pub const MAX_METHOD_BYTES: usize = 32;
/// The longest path kept, in bytes; longer ones are cut at a character boundary.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest model name kept, in bytes; longer ones are cut at a character boundary.
pub const MAX_MODEL_BYTES: usize = 256;

/// The longest model settings kept, in bytes. A model's configuration as JSON takes a
/// few hundred; the bound keeps one admin call from storing megabytes that every replica
/// then reads at start.
pub const MAX_MODEL_SETTINGS_BYTES: usize = 64 * 1024;
/// How many models a key's per-model totals keep apart. Clients name the model, so
/// without a bound one key could add a totals row per made-up name; past it, requests
/// for models the key has not used yet count under [`OTHER_MODEL`]. Replicas writing at
/// once may each add a few past it.
pub const MAX_MODELS_PER_KEY: usize = 100;
/// The per-model label of requests that named no model (or an empty one). A model
/// named `none` counts with them.
pub const NO_MODEL: &str = "none";
/// The per-model label of requests for models past [`MAX_MODELS_PER_KEY`]. A model
/// named `other` counts with them.
pub const OTHER_MODEL: &str = "other";
/// The longest end user name kept, in bytes; longer ones are cut at a character
/// boundary.
pub const MAX_END_USER_BYTES: usize = 256;
/// How many end users a key's per-user totals keep apart. Clients name the end user,
/// so without a bound one key could add a totals row per made-up name; past it, end
/// users the key has not had yet count under [`OTHER_END_USER`]. Replicas writing at
/// once may each add a few past it.
pub const MAX_END_USERS_PER_KEY: usize = 1000;
/// The per-user label of requests of end users past [`MAX_END_USERS_PER_KEY`]. An end
/// user named `other` counts with them.
pub const OTHER_END_USER: &str = "other";

/// What a NUL character in a name becomes: PostgreSQL text cannot hold NUL.
const NUL_REPLACEMENT: &str = "\u{FFFD}";

/// One finished request, as the usage recorder hands it to storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When the request arrived.
    pub at: DateTime<Utc>,
    /// The key that made it.
    pub key_id: String,
    /// HTTP method.
    pub method: String,
    /// Path without the query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The model named in the request or the response.
    pub model: Option<String>,
    /// Status sent to the client; 499 when the client went away before the answer.
    pub status: u16,
    /// Prompt tokens; `None` when unknown.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens; `None` when unknown.
    pub completion_tokens: Option<u64>,
    /// From arrival to the last byte of the answer (or the client leaving).
    pub latency_ms: u64,
    /// From arrival to the upstream's response headers; `None` when none came.
    pub first_byte_ms: Option<u64>,
    /// Who the request was for, when the client said so (OpenAI's `user` field, or a
    /// front-end's header): one of the people sharing a key. `None` when unsaid (an
    /// empty name is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
}

impl RequestRecord {
    /// The record as every backend keeps it: token counts above
    /// [`MAX_TOKENS_PER_REQUEST`] unknown, latencies cut to [`MAX_LATENCY_MS`], names
    /// without NUL (replaced by U+FFFD) and cut to their `MAX_*_BYTES` at a character
    /// boundary. Whatever a client or an upstream sends, storage can then hold it.
    pub fn normalized(mut self) -> Self {
        self.normalize();
        self
    }

    /// [`normalized`](Self::normalized) in place.
    pub fn normalize(&mut self) {
        if self.is_normal() {
            return;
        }
        for count in [&mut self.prompt_tokens, &mut self.completion_tokens] {
            if count.is_some_and(|n| n > MAX_TOKENS_PER_REQUEST) {
                *count = None;
            }
        }
        self.latency_ms = self.latency_ms.min(MAX_LATENCY_MS);
        self.first_byte_ms = self.first_byte_ms.map(|ms| ms.min(MAX_LATENCY_MS));
        normalize_name(&mut self.key_id, MAX_KEY_ID_BYTES);
        normalize_name(&mut self.method, MAX_METHOD_BYTES);
        normalize_name(&mut self.path, MAX_PATH_BYTES);
        if let Some(model) = &mut self.model {
            normalize_name(model, MAX_MODEL_BYTES);
        }
        if self.end_user.as_deref() == Some("") {
            self.end_user = None;
        }
        if let Some(end_user) = &mut self.end_user {
            normalize_name(end_user, MAX_END_USER_BYTES);
        }
    }

    /// Whether [`normalize`](Self::normalize) would leave it as it is.
    pub fn is_normal(&self) -> bool {
        let count_ok = |n: Option<u64>| n.is_none_or(|n| n <= MAX_TOKENS_PER_REQUEST);
        // Bytes, not chars: memchr, where a char search costs a pattern searcher per field.
        let name_ok = |name: &str, max: usize| name.len() <= max && !name.as_bytes().contains(&0);
        count_ok(self.prompt_tokens)
            && count_ok(self.completion_tokens)
            && self.latency_ms <= MAX_LATENCY_MS
            && self.first_byte_ms.is_none_or(|ms| ms <= MAX_LATENCY_MS)
            && name_ok(&self.key_id, MAX_KEY_ID_BYTES)
            && name_ok(&self.method, MAX_METHOD_BYTES)
            && name_ok(&self.path, MAX_PATH_BYTES)
            && self
                .model
                .as_deref()
                .is_none_or(|m| name_ok(m, MAX_MODEL_BYTES))
            && self
                .end_user
                .as_deref()
                .is_none_or(|u| !u.is_empty() && name_ok(u, MAX_END_USER_BYTES))
    }
}

/// An end user's name as storage keeps it ([`RequestRecord::normalize`]): what a
/// lookup by end user compares with.
fn stored_end_user(name: &str) -> Cow<'_, str> {
    if name.len() <= MAX_END_USER_BYTES && !name.as_bytes().contains(&0) {
        return Cow::Borrowed(name);
    }
    let mut name = name.to_owned();
    normalize_name(&mut name, MAX_END_USER_BYTES);
    Cow::Owned(name)
}

fn normalize_name(name: &mut String, max: usize) {
    if name.as_bytes().contains(&0) {
        *name = name.replace('\0', NUL_REPLACEMENT);
    }
    if name.len() > max {
        let mut end = max;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
}

/// A batch as storage keeps it ([`RequestRecord::normalized`]): borrowed when every
/// record is normal already (the recorder normalizes before it writes), else copied.
/// Every backend's `record` passes its batch through this.
pub fn normalized_batch(batch: &[RequestRecord]) -> Cow<'_, [RequestRecord]> {
    if batch.iter().all(RequestRecord::is_normal) {
        Cow::Borrowed(batch)
    } else {
        Cow::Owned(
            batch
                .iter()
                .cloned()
                .map(RequestRecord::normalized)
                .collect(),
        )
    }
}

/// One model's share of a key's usage totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModelUsage {
    /// Requests made.
    pub requests: u64,
    /// Prompt tokens over the requests whose count is known.
    pub prompt_tokens: u64,
    /// Completion tokens over the requests whose count is known.
    pub completion_tokens: u64,
    /// Requests whose token counts are unknown.
    pub requests_without_usage: u64,
}

impl ModelUsage {
    /// Prompt plus completion tokens (at most `u64::MAX`).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Adds another share of usage (another batch's, another day's). Sums stop at
    /// `u64::MAX` rather than wrap.
    pub fn merge(&mut self, other: &ModelUsage) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.requests_without_usage = self
            .requests_without_usage
            .saturating_add(other.requests_without_usage);
    }

    /// Adds one request. Sums stop at `u64::MAX` rather than wrap.
    pub fn add(&mut self, record: &RequestRecord) {
        self.requests = self.requests.saturating_add(1);
        let (p, c) = (record.prompt_tokens, record.completion_tokens);
        self.prompt_tokens = self.prompt_tokens.saturating_add(p.unwrap_or(0));
        self.completion_tokens = self.completion_tokens.saturating_add(c.unwrap_or(0));
        if p.is_none() || c.is_none() {
            self.requests_without_usage = self.requests_without_usage.saturating_add(1);
        }
    }
}

/// A key's usage totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    /// Requests made.
    pub requests: u64,
    /// Prompt tokens over all requests whose count is known.
    pub prompt_tokens: u64,
    /// Completion tokens over all requests whose count is known.
    pub completion_tokens: u64,
    /// Requests whose token counts are unknown (e.g. a stream whose upstream sent no usage).
    pub requests_without_usage: u64,
    /// When the last request arrived.
    pub last_request_at: Option<DateTime<Utc>>,
    /// Requests per endpoint: a known OpenAI path (ids folded, `/v1/models/{id}`) or
    /// `other` ([`endpoint_label`]), so made-up paths add
    /// no rows.
    pub endpoints: BTreeMap<String, u64>,
    /// Usage per model, by the name requests gave ([`NO_MODEL`] when none), at most
    /// [`MAX_MODELS_PER_KEY`] of them and [`OTHER_MODEL`] for the rest.
    pub models: BTreeMap<String, ModelUsage>,
    /// Usage per end user ([`RequestRecord::end_user`]), at most
    /// [`MAX_END_USERS_PER_KEY`] of them and [`OTHER_END_USER`] for the rest. Requests
    /// that named no end user are not in it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, ModelUsage>,
}

impl UsageTotals {
    /// Prompt plus completion tokens (at most `u64::MAX`).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Adds one request to the totals. Sums stop at `u64::MAX` rather than wrap.
    pub fn add(&mut self, record: &RequestRecord) {
        self.requests = self.requests.saturating_add(1);
        let (p, c) = (record.prompt_tokens, record.completion_tokens);
        self.prompt_tokens = self.prompt_tokens.saturating_add(p.unwrap_or(0));
        self.completion_tokens = self.completion_tokens.saturating_add(c.unwrap_or(0));
        if p.is_none() || c.is_none() {
            self.requests_without_usage = self.requests_without_usage.saturating_add(1);
        }
        self.last_request_at = self.last_request_at.max(Some(record.at));
        let endpoint = endpoint_label(&record.path);
        match self.endpoints.get_mut(endpoint) {
            Some(count) => *count = count.saturating_add(1),
            None => {
                self.endpoints.insert(endpoint.to_owned(), 1);
            }
        }
        let model = self.model_label(record.model.as_deref());
        match self.models.get_mut(model) {
            Some(usage) => usage.add(record),
            None => self.models.entry(model.to_owned()).or_default().add(record),
        }
        if let Some(user) = self.end_user_label(record.end_user.as_deref()) {
            match self.users.get_mut(user) {
                Some(usage) => usage.add(record),
                None => self.users.entry(user.to_owned()).or_default().add(record),
            }
        }
    }

    /// The label a request of `end_user` counts under in [`users`](Self::users): its
    /// name, or [`OTHER_END_USER`] when it is new and these totals already keep
    /// [`MAX_END_USERS_PER_KEY`] end users apart; `None` (not counted per user) for no
    /// end user or an empty name.
    pub fn end_user_label<'a>(&self, end_user: Option<&'a str>) -> Option<&'a str> {
        let user = end_user.filter(|u| !u.is_empty())?;
        if self.users.len() >= MAX_END_USERS_PER_KEY && !self.users.contains_key(user) {
            Some(OTHER_END_USER)
        } else {
            Some(user)
        }
    }

    /// The label a request for `model` counts under here: its name, [`NO_MODEL`] for
    /// none (or an empty name), or [`OTHER_MODEL`] when it is new and these totals already keep
    /// [`MAX_MODELS_PER_KEY`] models apart.
    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        let model = model.filter(|m| !m.is_empty()).unwrap_or(NO_MODEL);
        if self.models.len() >= MAX_MODELS_PER_KEY && !self.models.contains_key(model) {
            OTHER_MODEL
        } else {
            model
        }
    }
}

/// Usage: one row per request, and running totals per key.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Stores a batch of finished requests and adds them to the totals, atomically.
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError>;
    /// Totals of every key that made a request, by key id.
    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError>;
    /// Totals of one key; default (zero) when it made no request.
    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError>;
    /// A key's requests at or after `since`, newest first, at most `limit`.
    async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError>;
    /// Prompt plus completion tokens of the key's requests at or after `since` (only
    /// those of `end_user` when given; requests without a known count add nothing):
    /// where a token quota's counter starts.
    ///
    /// The default reads every such request through [`requests`](Self::requests); the
    /// backends in this crate sum them in the database.
    async fn tokens_since(
        &self,
        key_id: &str,
        end_user: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let rows = self.requests(key_id, Some(since), u32::MAX).await?;
        Ok(tokens_of(&rows, end_user))
    }
}

/// The tokens of `rows` ([`UsageStore::tokens_since`]), of `end_user`'s only when given.
fn tokens_of<'r>(rows: impl IntoIterator<Item = &'r RequestRecord>, end_user: Option<&str>) -> u64 {
    let end_user = end_user.map(stored_end_user);
    let end_user = end_user.as_deref();
    rows.into_iter()
        .filter(|r| end_user.is_none_or(|u| r.end_user.as_deref() == Some(u)))
        .map(|r| {
            let known = |n: Option<u64>| n.filter(|&n| n <= MAX_TOKENS_PER_REQUEST).unwrap_or(0);
            known(r.prompt_tokens) + known(r.completion_tokens)
        })
        .fold(0u64, u64::saturating_add)
}

/// A model's settings as the admin API last set them.
///
/// Models added, changed or removed at run time are kept here, so that the change
/// survives a restart and every replica sharing the database sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredModel {
    /// The model's name, what clients send as `model`.
    pub name: String,
    /// The model's configuration as JSON text; `None` when an admin removed the model: a
    /// tombstone, so that a model from the configuration file stays removed after a
    /// restart.
    pub settings: Option<String>,
    /// When an admin last changed it (kept to the millisecond).
    pub updated_at: DateTime<Utc>,
}

/// Why a backend refuses to store a [`StoredModel`] (the source of
/// [`StorageError::Rejected`]). Names are never cut, unlike a request's model name:
/// two long names sharing a prefix would then overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusedModel {
    /// The name is empty.
    #[error("a model needs a name")]
    EmptyName,
    /// The name is longer than [`MAX_MODEL_BYTES`].
    #[error("a model name may have at most {max} bytes, not {len}")]
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
        /// [`MAX_MODEL_BYTES`].
        max: usize,
    },
    /// The settings are longer than [`MAX_MODEL_SETTINGS_BYTES`].
    #[error("a model's settings may have at most {max} bytes, not {len}")]
    SettingsTooLarge {
        /// The settings' length in bytes.
        len: usize,
        /// [`MAX_MODEL_SETTINGS_BYTES`].
        max: usize,
    },
}

impl StoredModel {
    /// The model as every backend keeps it: NUL characters in the name and settings
    /// replaced by U+FFFD (as in request records: PostgreSQL text cannot hold NUL), the
    /// time cut to the millisecond. Refused ([`StorageError::Rejected`] with a
    /// [`RefusedModel`]) when the name is empty or either text is over its bound.
    pub fn normalized(&self) -> Result<Cow<'_, StoredModel>, StorageError> {
        let refuse = |why: RefusedModel| StorageError::Rejected(Box::new(why));
        let mut model = Cow::Borrowed(self);
        let millis = self.updated_at.timestamp_millis();
        if !self
            .updated_at
            .timestamp_subsec_nanos()
            .is_multiple_of(1_000_000)
        {
            model.to_mut().updated_at =
                DateTime::from_timestamp_millis(millis).expect("a time cut to the millisecond");
        }
        if self.name.as_bytes().contains(&0) {
            let name = self.name.replace('\0', NUL_REPLACEMENT);
            model.to_mut().name = name;
        }
        if let Some(settings) = self.settings.as_deref() {
            if settings.as_bytes().contains(&0) {
                let settings = settings.replace('\0', NUL_REPLACEMENT);
                model.to_mut().settings = Some(settings);
            }
        }
        let len = model.name.len();
        if len == 0 {
            return Err(refuse(RefusedModel::EmptyName));
        }
        if len > MAX_MODEL_BYTES {
            let max = MAX_MODEL_BYTES;
            return Err(refuse(RefusedModel::NameTooLong { len, max }));
        }
        let len = model.settings.as_ref().map_or(0, String::len);
        if len > MAX_MODEL_SETTINGS_BYTES {
            let max = MAX_MODEL_SETTINGS_BYTES;
            return Err(refuse(RefusedModel::SettingsTooLarge { len, max }));
        }
        Ok(model)
    }
}

/// Model settings changed at run time: what the admin API's model changes write, and
/// what a starting gateway reads over its configuration file.
#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Every stored model, tombstones included, by name (byte order).
    async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError>;
    /// Stores `model` ([`StoredModel::normalized`]), replacing what was stored under its
    /// name.
    async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError>;
}

/// A backend that keeps keys, usage and model settings: what the `llmgate` binary opens.
#[async_trait]
pub trait Storage: KeyStore + UsageStore + ModelStore {
    /// Closes connections, waiting for them to finish.
    async fn close(&self) {}
}

impl std::fmt::Debug for dyn Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Storage")
    }
}

impl std::fmt::Debug for dyn KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn KeyStore")
    }
}

impl std::fmt::Debug for dyn ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn ModelStore")
    }
}

impl std::fmt::Debug for dyn UsageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn UsageStore")
    }
}
