//! Where keys and usage live.
//!
//! Two small object-safe traits, [`KeyStore`] and [`UsageStore`], used as
//! `Arc<dyn …>`. Each backend is one file: [`MemoryStore`] for tests and embedding,
//! [`SqliteStore`] as the embedded default. A backend for several gateway replicas
//! (PostgreSQL) implements the same two traits.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
// Shared by both SQL stores; with one of them, part of it has no user.
#[cfg_attr(not(all(feature = "sqlite", feature = "postgres")), allow(dead_code))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::auth::{KeyHash, KeyRecord};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteStore;

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The item does not exist.
    #[error("not found")]
    NotFound,
    /// The change would break a uniqueness rule; the message says which.
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// The stored data cannot be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database refused the data itself (a value it cannot hold, a broken rule):
    /// the same data would be refused again, unlike after a [`Database`](Self::Database)
    /// failure, which may pass on a retry.
    #[error("the database refused the data: {0}")]
    Rejected(String),
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
    }
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
    /// `other` ([`endpoint_label`](crate::usage::endpoint_label)), so made-up paths add
    /// no rows.
    pub endpoints: BTreeMap<String, u64>,
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
        let endpoint = crate::usage::endpoint_label(&record.path);
        match self.endpoints.get_mut(endpoint) {
            Some(count) => *count = count.saturating_add(1),
            None => {
                self.endpoints.insert(endpoint.to_owned(), 1);
            }
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
}

/// A backend that keeps both keys and usage: what the `llmgate` binary opens.
#[async_trait]
pub trait Storage: KeyStore + UsageStore {
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

impl std::fmt::Debug for dyn UsageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn UsageStore")
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every backend must show; each backend's tests call these.

    use super::*;
    use crate::auth::{now_millis, Role, Secret};

    pub async fn keys(store: &dyn KeyStore) {
        let secret = Secret::generate();
        let record = KeyRecord::new("alice", Role::User, &secret);
        store.insert_key(&record, &secret.hash()).await.unwrap();

        let found = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
        assert_eq!(found, record);
        assert!(store
            .key_by_hash(&Secret::generate().hash())
            .await
            .unwrap()
            .is_none());

        let other = Secret::generate();
        let clash = KeyRecord::new("alice", Role::Admin, &other);
        assert!(matches!(
            store.insert_key(&clash, &other.hash()).await,
            Err(StorageError::Conflict(_))
        ));

        assert!(store.revoke_key(&record.id, now_millis()).await.unwrap());
        assert!(!store.revoke_key(&record.id, now_millis()).await.unwrap());
        let revoked = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
        assert!(revoked.revoked_at.is_some());
        // The name is free again once its key is revoked.
        store.insert_key(&clash, &other.hash()).await.unwrap();
        let names: Vec<_> = store
            .list_keys()
            .await
            .unwrap()
            .into_iter()
            .map(|k| (k.name, k.role))
            .collect();
        assert_eq!(
            names,
            [
                ("alice".to_string(), Role::User),
                ("alice".to_string(), Role::Admin)
            ]
        );
    }

    fn row(key: &str, path: &str, at_ms: i64, tokens: Option<(u64, u64)>) -> RequestRecord {
        RequestRecord {
            at: DateTime::from_timestamp_millis(at_ms).unwrap(),
            key_id: key.into(),
            method: "POST".into(),
            path: path.into(),
            model: Some("m".into()),
            status: 200,
            prompt_tokens: tokens.map(|t| t.0),
            completion_tokens: tokens.map(|t| t.1),
            latency_ms: 5,
            first_byte_ms: Some(2),
        }
    }

    pub async fn usage(store: &dyn UsageStore) {
        let chat = "/v1/chat/completions";
        store
            .record(&[
                row("k1", chat, 1_000, Some((10, 5))),
                row("k1", chat, 2_000, Some((3, 4))),
                row("k1", "/v1/completions", 3_000, None),
                row("k2", chat, 1_500, Some((1, 1))),
            ])
            .await
            .unwrap();
        store
            .record(&[row("k1", chat, 4_000, Some((1, 0)))])
            .await
            .unwrap();

        let k1 = store.totals_for_key("k1").await.unwrap();
        assert_eq!(k1.requests, 4);
        assert_eq!(k1.prompt_tokens, 14);
        assert_eq!(k1.completion_tokens, 9);
        assert_eq!(k1.total_tokens(), 23);
        assert_eq!(k1.requests_without_usage, 1);
        assert_eq!(k1.last_request_at.unwrap().timestamp_millis(), 4_000);
        assert_eq!(k1.endpoints[chat], 3);
        assert_eq!(k1.endpoints["/v1/completions"], 1);

        // Made-up paths count under one endpoint, whatever their number; the request
        // rows keep the path as sent.
        let made_up: Vec<RequestRecord> = (0..50)
            .map(|i| row("k9", &format!("/v1/made-up-{i}"), 5_000 + i, None))
            .collect();
        store.record(&made_up).await.unwrap();
        let k9 = store.totals_for_key("k9").await.unwrap();
        assert_eq!(k9.endpoints.len(), 1, "{:?}", k9.endpoints);
        assert_eq!(k9.endpoints[crate::usage::OTHER_ENDPOINT], 50);
        let rows = store.requests("k9", None, 100).await.unwrap();
        assert!(rows.iter().any(|r| r.path == "/v1/made-up-7"));

        let all = store.totals().await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all["k2"].requests, 1);
        assert_eq!(
            store.totals_for_key("nobody").await.unwrap(),
            UsageTotals::default()
        );

        let rows = store.requests("k1", None, 10).await.unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].at.timestamp_millis(), 4_000, "newest first");
        assert_eq!(rows[1].prompt_tokens, None);
        let since = store
            .requests("k1", DateTime::from_timestamp_millis(2_000), 10)
            .await
            .unwrap();
        assert_eq!(since.len(), 3);
        assert_eq!(store.requests("k1", None, 2).await.unwrap().len(), 2);

        // A large batch (written in several multi-row statements) keeps every row.
        let many: Vec<_> = (0..150)
            .map(|i| row("k3", chat, 10_000 + i, Some((i as u64, 1))))
            .collect();
        store.record(&many).await.unwrap();
        let k3 = store.totals_for_key("k3").await.unwrap();
        assert_eq!(k3.requests, 150);
        assert_eq!(k3.prompt_tokens, (0..150).sum::<u64>());
        let rows = store.requests("k3", None, 1000).await.unwrap();
        assert_eq!(rows.len(), 150);
        assert_eq!(rows[0].at.timestamp_millis(), 10_149);
        assert_eq!(rows[149].prompt_tokens, Some(0));

        // A mixed batch of keys, endpoints and models: every row keeps its own values.
        let paths = [chat, "/v1/completions"];
        let models = [Some("m"), None, Some("n")];
        let mixed: Vec<_> = (0..120usize)
            .map(|i| RequestRecord {
                model: models[i % 3].map(Into::into),
                ..row(
                    ["k4", "k5"][i % 2],
                    paths[(i / 2) % 2],
                    20_000 + i as i64,
                    Some((i as u64, i as u64 + 1)),
                )
            })
            .collect();
        store.record(&mixed).await.unwrap();
        for key in ["k4", "k5"] {
            let rows = store.requests(key, None, 1000).await.unwrap();
            assert_eq!(rows.len(), 60, "{key}");
            for r in rows {
                let i = (r.at.timestamp_millis() - 20_000) as usize;
                assert_eq!(r, mixed[i], "{key}, row {i}");
            }
        }
    }

    /// Values no real request has, but that a client or an upstream can send: every
    /// backend takes them (normalized, see [`RequestRecord::normalized`]), and totals,
    /// rows, keys and the usage report still read back sane and consistent numbers.
    pub async fn hostile_values(store: &dyn Storage) {
        let secret = Secret::generate();
        let key = KeyRecord::new("mallory", Role::User, &secret);
        store.insert_key(&key, &secret.hash()).await.unwrap();
        let id = key.id.as_str();
        let chat = "/v1/chat/completions";
        let tokens = |at: i64, p: u64, c: u64| RequestRecord {
            prompt_tokens: Some(p),
            completion_tokens: Some(c),
            ..row(id, chat, at, None)
        };
        let named = |at: i64, method: &str, path: &str, model: Option<&str>| RequestRecord {
            method: method.into(),
            path: path.into(),
            model: model.map(Into::into),
            ..row(id, chat, at, Some((1, 1)))
        };
        let crabs = "\u{1F980}".repeat(100);
        let big_model = "m".repeat(1 << 20);
        let big_path = format!("/v1/{}", "p".repeat(1 << 20));
        let hostile = |base: i64| {
            vec![
                tokens(base, u64::MAX, u64::MAX),
                tokens(base + 1, i64::MAX as u64, i64::MAX as u64),
                tokens(base + 2, i64::MAX as u64 + 1, 1),
                tokens(base + 3, MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST),
                tokens(base + 4, MAX_TOKENS_PER_REQUEST + 1, 3),
                named(base + 5, "POST", "/v1/chat\0/completions", Some("a\0b")),
                named(base + 6, "POST", &big_path, Some(&big_model)),
                named(base + 7, "P\u{f6}ST", "/v1/\u{6a21}\u{578b}", Some(&crabs)),
                named(base + 8, "", "", Some("")),
                named(base + 9, "GET", chat, None),
                RequestRecord {
                    latency_ms: u64::MAX,
                    first_byte_ms: Some(u64::MAX),
                    ..row(id, chat, base + 10, Some((2, 2)))
                },
            ]
        };
        // Once as one batch, once a record at a time.
        let mut sent = hostile(1_000);
        store.record(&sent).await.unwrap();
        for record in hostile(2_000) {
            store.record(std::slice::from_ref(&record)).await.unwrap();
            sent.push(record);
        }
        // Many requests on one key, each at the bound.
        for batch in 0..2 {
            let at_bound: Vec<_> = (0..1_000)
                .map(|i| {
                    let at = 10_000 + batch * 1_000 + i;
                    tokens(at, MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST)
                })
                .collect();
            store.record(&at_bound).await.unwrap();
            sent.extend(at_bound);
        }

        let mut expected = UsageTotals::default();
        for record in &sent {
            expected.add(&record.clone().normalized());
        }
        let totals = store.totals_for_key(id).await.unwrap();
        assert_eq!(totals, expected);
        assert_eq!(totals.requests, 2_022);
        assert_eq!(
            totals.requests_without_usage, 8,
            "counts beyond the bound are unknown, not huge"
        );
        assert_eq!(totals.prompt_tokens, 2_002 * MAX_TOKENS_PER_REQUEST + 14);
        assert!(totals.total_tokens() < i64::MAX as u64);
        assert_eq!(store.totals().await.unwrap()[id], totals);

        let rows = store.requests(id, None, 10_000).await.unwrap();
        assert_eq!(rows.len(), sent.len());
        for row in &rows {
            let at = row.at.timestamp_millis();
            let original = sent.iter().find(|r| r.at.timestamp_millis() == at).unwrap();
            assert_eq!(*row, original.clone().normalized(), "the row at {at}");
            assert!(row.is_normal());
        }
        let at = |ms: i64| rows.iter().find(|r| r.at.timestamp_millis() == ms).unwrap();
        assert_eq!(at(1_000).prompt_tokens, None);
        assert_eq!(at(1_003).prompt_tokens, Some(MAX_TOKENS_PER_REQUEST));
        assert_eq!(at(1_004).completion_tokens, Some(3));
        assert_eq!(at(1_005).model.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(at(1_005).path, "/v1/chat\u{FFFD}/completions");
        assert_eq!(at(1_006).model.as_ref().unwrap().len(), MAX_MODEL_BYTES);
        assert_eq!(at(1_006).path.len(), MAX_PATH_BYTES);
        assert_eq!(at(1_007).model.as_deref(), Some(&crabs[..MAX_MODEL_BYTES]));
        assert_eq!(at(1_007).method, "P\u{f6}ST");
        assert_eq!(at(1_008).model.as_deref(), Some(""));
        assert_eq!(at(1_010).latency_ms, MAX_LATENCY_MS);

        let keys = store.list_keys().await.unwrap();
        assert!(keys.iter().any(|k| k.id == id));
        let report = crate::usage::usage_report(store, store).await.unwrap();
        let mine = report.iter().find(|u| u.key_id == id).unwrap();
        assert_eq!(mine.requests, 2_022);
    }
}
