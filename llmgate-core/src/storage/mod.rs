//! Where keys and usage live.
//!
//! Two small object-safe traits, [`KeyStore`] and [`UsageStore`], used as
//! `Arc<dyn …>`. Each backend is one file: [`MemoryStore`] for tests and embedding,
//! [`SqliteStore`] as the embedded default. A backend for several gateway replicas
//! (PostgreSQL) implements the same two traits.

mod memory;
mod postgres;
mod sql;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::{KeyHash, KeyRecord};

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
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

/// One finished request, as the usage recorder hands it to storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// Requests per endpoint path.
    pub endpoints: BTreeMap<String, u64>,
}

impl UsageTotals {
    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Adds one request to the totals.
    pub fn add(&mut self, record: &RequestRecord) {
        self.requests += 1;
        match (record.prompt_tokens, record.completion_tokens) {
            (Some(p), Some(c)) => {
                self.prompt_tokens += p;
                self.completion_tokens += c;
            }
            (p, c) => {
                self.prompt_tokens += p.unwrap_or(0);
                self.completion_tokens += c.unwrap_or(0);
                self.requests_without_usage += 1;
            }
        }
        self.last_request_at = self.last_request_at.max(Some(record.at));
        match self.endpoints.get_mut(&record.path) {
            Some(count) => *count += 1,
            None => {
                self.endpoints.insert(record.path.clone(), 1);
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

        let all = store.totals().await.unwrap();
        assert_eq!(all.len(), 2);
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
}
