//! The embedded default: one SQLite file in the data directory, in WAL mode so the
//! `llmgate` CLI can read and write it while a server runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::sql::{
    bind_request, key_from_row, millis, request_from_row, totals_from_row, RequestInserts,
    KEY_COLUMNS, REQUEST_COLUMNS,
};
use super::{KeyStore, RequestRecord, Storage, StorageError, UsageStore, UsageTotals};
use crate::auth::{KeyHash, KeyRecord};

/// Keys and usage in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StorageError::Database(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        Self::connect(options, 4).await
    }

    /// A private in-memory database, for tests.
    pub async fn in_memory() -> Result<Self, StorageError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: each in-memory connection would be its own database.
        Self::connect(options, 1).await
    }

    async fn connect(options: SqliteConnectOptions, max: u32) -> Result<Self, StorageError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| StorageError::Database(format!("migration failed: {e}")))?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Storage for SqliteStore {
    async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&record.id)
        .bind(&record.name)
        .bind(record.role.as_str())
        .bind(&record.prefix)
        .bind(&hash.0[..])
        .bind(millis(record.created_at))
        .bind(record.expires_at.map(millis))
        .bind(record.revoked_at.map(millis))
        .execute(&self.pool)
        .await
        .map_err(|e| match StorageError::from(e) {
            StorageError::Conflict(_) => StorageError::Conflict(format!(
                "an active key named '{}' already exists",
                record.name
            )),
            other => other,
        })?;
        Ok(())
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"
        ))
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, rowid"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(millis(at))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Fold the batch per key first: one totals upsert per key, not per request.
        let mut per_key: BTreeMap<&str, UsageTotals> = BTreeMap::new();
        for record in batch {
            per_key.entry(&record.key_id).or_default().add(record);
        }
        let mut tx = self.pool.begin().await?;
        // Multi-row inserts of fixed sizes, each statement parsed once (see RequestInserts).
        for (sql, rows) in inserts().runs(batch) {
            let query = rows.iter().fold(sqlx::query(sql), bind_request);
            query.execute(&mut *tx).await?;
        }
        for (key_id, t) in &per_key {
            sqlx::query(
                "INSERT INTO usage_totals \
                 (key_id, requests, prompt_tokens, completion_tokens, requests_without_usage, last_request_at) \
                 VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (key_id) DO UPDATE SET \
                   requests = requests + excluded.requests, \
                   prompt_tokens = prompt_tokens + excluded.prompt_tokens, \
                   completion_tokens = completion_tokens + excluded.completion_tokens, \
                   requests_without_usage = requests_without_usage + excluded.requests_without_usage, \
                   last_request_at = MAX(COALESCE(last_request_at, 0), excluded.last_request_at)",
            )
            .bind(key_id)
            .bind(t.requests as i64)
            .bind(t.prompt_tokens as i64)
            .bind(t.completion_tokens as i64)
            .bind(t.requests_without_usage as i64)
            .bind(t.last_request_at.map(millis))
            .execute(&mut *tx)
            .await?;
            for (path, n) in &t.endpoints {
                sqlx::query(
                    "INSERT INTO usage_endpoints (key_id, path, requests) VALUES (?, ?, ?) \
                     ON CONFLICT (key_id, path) DO UPDATE SET requests = requests + excluded.requests",
                )
                .bind(key_id)
                .bind(path)
                .bind(*n as i64)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        let mut all = BTreeMap::new();
        let rows = sqlx::query(
            "SELECT key_id, requests, prompt_tokens, completion_tokens, requests_without_usage, last_request_at \
             FROM usage_totals",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            all.insert(row.try_get::<String, _>("key_id")?, totals_from_row(row)?);
        }
        let rows = sqlx::query("SELECT key_id, path, requests FROM usage_endpoints")
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let key_id: String = row.try_get("key_id")?;
            if let Some(t) = all.get_mut(&key_id) {
                t.endpoints.insert(
                    row.try_get("path")?,
                    row.try_get::<i64, _>("requests")? as u64,
                );
            }
        }
        Ok(all)
    }

    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        let row = sqlx::query(
            "SELECT requests, prompt_tokens, completion_tokens, requests_without_usage, last_request_at \
             FROM usage_totals WHERE key_id = ?",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(UsageTotals::default());
        };
        let mut totals = totals_from_row(&row)?;
        let rows = sqlx::query("SELECT path, requests FROM usage_endpoints WHERE key_id = ?")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            totals.endpoints.insert(
                row.try_get("path")?,
                row.try_get::<i64, _>("requests")? as u64,
            );
        }
        Ok(totals)
    }

    async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} \
             FROM usage_requests WHERE key_id = ? AND at >= ? ORDER BY at DESC, id DESC LIMIT ?"
        ))
        .bind(key_id)
        .bind(since.map(millis).unwrap_or(i64::MIN))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(request_from_row).collect()
    }
}

/// The request-row inserts in this backend's parameter syntax.
fn inserts() -> &'static RequestInserts {
    static INSERTS: std::sync::OnceLock<RequestInserts> = std::sync::OnceLock::new();
    INSERTS.get_or_init(|| RequestInserts::new(|_| "?".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, Secret};

    #[tokio::test]
    async fn keys_contract() {
        super::super::contract::keys(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn usage_contract() {
        super::super::contract::usage(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/llmgate.db");
        let secret = Secret::generate();
        let record = KeyRecord::new("bob", Role::Admin, &secret);
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.insert_key(&record, &secret.hash()).await.unwrap();
            store.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            store.key_by_hash(&secret.hash()).await.unwrap(),
            Some(record)
        );
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
