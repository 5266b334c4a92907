//! PostgreSQL, for several gateway replicas sharing keys and usage. Each replica keeps
//! its own key cache, so a revocation on one reaches the others within the cache's
//! time to live (500 ms by default).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

use super::sql::{
    bind_request, count, key_from_row, millis, request_from_row, to_i64, totals_from_row,
    RequestInserts, TotalsUpserts, KEY_COLUMNS, REQUEST_COLUMNS,
};
use super::{
    normalized_batch, Context, KeyStore, RequestRecord, Storage, StorageError, UsageStore,
    UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// Keys and usage in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects (e.g. `postgres://user@host/llmgate`) and applies migrations; several
    /// replicas may do so at once.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| {
                StorageError::Database(Context::boxed("cannot connect to PostgreSQL", e))
            })?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StorageError::Database(Context::boxed("migration failed", e)))?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Storage for PostgresStore {
    async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        ))
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(millis(at))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[async_trait]
impl UsageStore for PostgresStore {
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = &*normalized_batch(batch);
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
            sqlx::query(&upserts().totals)
                .bind(key_id)
                .bind(to_i64(t.requests))
                .bind(to_i64(t.prompt_tokens))
                .bind(to_i64(t.completion_tokens))
                .bind(to_i64(t.requests_without_usage))
                .bind(t.last_request_at.map(millis))
                .execute(&mut *tx)
                .await?;
            for (path, n) in &t.endpoints {
                sqlx::query(&upserts().endpoints)
                    .bind(key_id)
                    .bind(path)
                    .bind(to_i64(*n))
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
                t.endpoints
                    .insert(row.try_get("path")?, count(row.try_get("requests")?));
            }
        }
        Ok(all)
    }

    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        let row = sqlx::query(
            "SELECT requests, prompt_tokens, completion_tokens, requests_without_usage, last_request_at \
             FROM usage_totals WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(UsageTotals::default());
        };
        let mut totals = totals_from_row(&row)?;
        let rows = sqlx::query("SELECT path, requests FROM usage_endpoints WHERE key_id = $1")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            totals
                .endpoints
                .insert(row.try_get("path")?, count(row.try_get("requests")?));
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
             FROM usage_requests WHERE key_id = $1 AND at >= $2 ORDER BY at DESC, id DESC LIMIT $3"
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
    INSERTS.get_or_init(|| RequestInserts::new(|n| format!("${n}")))
}

/// The running totals' upserts in this backend's syntax.
fn upserts() -> &'static TotalsUpserts {
    static UPSERTS: std::sync::OnceLock<TotalsUpserts> = std::sync::OnceLock::new();
    UPSERTS.get_or_init(|| TotalsUpserts::new(|n| format!("${n}"), "GREATEST"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::Role;

    /// The server the tests use: `LLMGATE_TEST_POSTGRES`, else the local one (trust auth).
    fn server_url() -> String {
        std::env::var("LLMGATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
    }

    /// A fresh, uniquely named database for one test, dropped when the guard goes.
    pub(crate) struct TestDatabase {
        pub(crate) url: String,
        name: String,
    }

    impl TestDatabase {
        pub(crate) async fn create() -> Self {
            let name = format!("llmgate_test_{}", rand::random::<u64>());
            let admin = PgPool::connect(&server_url()).await.expect(
                "PostgreSQL for the tests (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432, database test)",
            );
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            let base = server_url();
            let url = format!(
                "{}/{name}",
                base.rsplit_once('/').expect("a database in the URL").0
            );
            Self { url, name }
        }
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let name = self.name.clone();
            // Best effort, from a thread of its own: Drop cannot await.
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(admin) = PgPool::connect(&server_url()).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&admin)
                                .await;
                    }
                });
            })
            .join()
            .ok();
        }
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn keys_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::keys(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn usage_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::usage(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn hostile_values_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::hostile_values(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn replicas_sharing_a_database_see_each_others_keys_and_usage() {
        let db = TestDatabase::create().await;
        // Two replicas start at once; both migrate.
        let (a, b) = tokio::join!(
            PostgresStore::connect(&db.url),
            PostgresStore::connect(&db.url)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let secret = crate::auth::Secret::generate();
        let key = KeyRecord::new("shared", Role::User, &secret);
        a.insert_key(&key, &secret.hash()).await.unwrap();
        assert_eq!(
            b.key_by_hash(&secret.hash()).await.unwrap(),
            Some(key.clone())
        );
        let row = |n: i64| RequestRecord {
            at: DateTime::from_timestamp_millis(n).unwrap(),
            key_id: key.id.clone(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: None,
            status: 200,
            prompt_tokens: Some(2),
            completion_tokens: Some(3),
            latency_ms: 1,
            first_byte_ms: None,
        };
        let batch_a: Vec<_> = (0..50).map(row).collect();
        let batch_b: Vec<_> = (50..100).map(row).collect();
        let (ra, rb) = tokio::join!(a.record(&batch_a), b.record(&batch_b));
        ra.unwrap();
        rb.unwrap();
        let totals = a.totals_for_key(&key.id).await.unwrap();
        assert_eq!((totals.requests, totals.total_tokens()), (100, 500));
        assert_eq!(totals.last_request_at.unwrap().timestamp_millis(), 99);
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn totals_stop_at_the_largest_bigint_instead_of_failing() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        let row = |at: i64| RequestRecord {
            at: DateTime::from_timestamp_millis(at).unwrap(),
            key_id: "k".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: None,
            status: 200,
            prompt_tokens: Some(10),
            completion_tokens: Some(1),
            latency_ms: 1,
            first_byte_ms: None,
        };
        store.record(&[row(1)]).await.unwrap();
        sqlx::query("UPDATE usage_totals SET prompt_tokens = 9223372036854775800")
            .execute(&store.pool)
            .await
            .unwrap();
        store.record(&[row(2)]).await.unwrap();
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!(
            (
                totals.requests,
                totals.prompt_tokens,
                totals.completion_tokens
            ),
            (2, i64::MAX as u64, 2)
        );
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn a_refused_value_is_told_apart_from_a_failing_database() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        for refused in [
            "INSERT INTO usage_totals VALUES (E'a\\x00', 1, 1, 1, 1, NULL)",
            "INSERT INTO usage_totals VALUES ('k', 99999999999999999999, 1, 1, 1, NULL)",
            "INSERT INTO usage_totals VALUES ('k', NULL, 1, 1, 1, NULL)",
        ] {
            let err =
                StorageError::from(sqlx::query(refused).execute(&store.pool).await.unwrap_err());
            assert!(err.refuses_content(), "{refused}: {err:?}");
        }
        let err = StorageError::from(
            sqlx::query("INSERT INTO usage_totals VALUES ($1, 1, 1, 1, 1, NULL)")
                .bind("a\0b")
                .execute(&store.pool)
                .await
                .unwrap_err(),
        );
        assert!(err.refuses_content(), "NUL: {err:?}");
        store.close().await;
        let err = store.totals().await.unwrap_err();
        assert!(!err.refuses_content(), "{err:?}");
    }
}
