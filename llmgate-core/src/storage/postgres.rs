//! PostgreSQL, for several gateway replicas sharing keys and usage. Each replica keeps
//! its own key cache, so a revocation on one reaches the others within the cache's
//! time to live (500 ms by default). The logic is [`SqlStore`]'s; here are the
//! PostgreSQL dialect and how to connect.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::Postgres;

use super::sql::{Dialect, SqlStore, Statements};
use super::{
    Context, KeyStore, KeyUpdate, ModelStore, RequestRecord, Storage, StorageError, StoredModel,
    UsageStore, UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// PostgreSQL's SQL.
fn statements() -> &'static Statements {
    static STATEMENTS: OnceLock<Statements> = OnceLock::new();
    STATEMENTS.get_or_init(|| {
        Statements::new(&Dialect {
            placeholder: |n| format!("${n}"),
            greatest: "GREATEST",
            totals_columns: "requests, prompt_tokens, completion_tokens, \
                 requests_without_usage, last_request_at",
            endpoint_requests: "requests",
            key_tiebreak: "id",
        })
    })
}

/// Keys, usage and model settings in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: SqlStore<Postgres>,
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
        Ok(Self {
            inner: SqlStore::new(pool, statements()),
        })
    }
}

#[async_trait]
impl Storage for PostgresStore {
    async fn close(&self) {
        self.inner.pool.close().await;
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
        self.inner.insert_key(record, hash).await
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
        self.inner.key_by_hash(hash).await
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        self.inner.list_keys().await
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        self.inner.revoke_key(id, at).await
    }

    async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError> {
        self.inner.update_key(id, update).await
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        self.inner
            .rotate_key(id, new_hash, new_prefix, old_valid_until)
            .await
    }
}

#[async_trait]
impl ModelStore for PostgresStore {
    async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError> {
        self.inner.stored_models().await
    }

    async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError> {
        self.inner.store_model(model).await
    }
}

#[async_trait]
impl UsageStore for PostgresStore {
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
        self.inner.record(batch).await
    }

    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        self.inner.totals().await
    }

    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        self.inner.totals_for_key(key_id).await
    }

    async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError> {
        self.inner.requests(key_id, since, limit).await
    }

    async fn tokens_since(
        &self,
        key_id: &str,
        end_user: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        self.inner.tokens_since(key_id, end_user, since).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::Role;
    use sqlx::PgPool;

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
    async fn usage_per_model_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::usage_per_model(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn key_changes_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::key_changes(&store).await;
        store.close().await;
    }

    /// Two stores on one database: two replicas, whose changes race.
    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn limit_changes_at_once_on_two_replicas_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        let replica = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::limit_changes_at_once(&store, &replica).await;
        store.close().await;
        replica.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn end_users_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::end_users(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn models_contract() {
        let db = TestDatabase::create().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::contract::models(&store).await;
        store.close().await;
    }

    fn request(key: &str, model: Option<&str>, at_ms: i64) -> RequestRecord {
        RequestRecord {
            at: DateTime::from_timestamp_millis(at_ms).unwrap(),
            key_id: key.into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: model.map(Into::into),
            status: 200,
            prompt_tokens: Some(3),
            completion_tokens: None,
            latency_ms: 7,
            first_byte_ms: Some(2),
            end_user: None,
        }
    }

    /// A database as the migrations up to `version` left it (SQLite's tests have the
    /// same helper).
    async fn migrated_up_to(url: &str, version: i64) -> PgPool {
        let pool = PgPool::connect(url).await.unwrap();
        let mut old = sqlx::migrate!("./migrations/postgres");
        old.migrations = old
            .migrations
            .iter()
            .filter(|m| m.version <= version)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        old.run(&pool).await.unwrap();
        pool
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn a_database_made_before_names_were_numbered_reads_back_the_same() {
        let db = TestDatabase::create().await;
        let secret = crate::auth::Secret::generate();
        let key = KeyRecord::new("old", Role::Admin, &secret);
        {
            // The database as the first migration left it, with what the code then wrote.
            let pool = migrated_up_to(&db.url, 1).await;
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
                 VALUES ($1, $2, 'admin', $3, $4, $5, NULL, NULL)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&secret.hash().0[..])
            .bind(key.created_at.timestamp_millis())
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO usage_totals VALUES ('k1', 2, 6, 0, 2, 3000), ('k2', 1, 3, 0, 1, 2000)",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO usage_endpoints VALUES ('k1', '/v1/chat/completions', 2), \
                 ('k2', '/v1/chat/completions', 1)",
            )
            .execute(&pool)
            .await
            .unwrap();
            for (key, model, at) in [
                ("k1", Some("m"), 1_000i64),
                ("k2", None, 2_000),
                ("k1", None, 3_000),
            ] {
                sqlx::query(
                    "INSERT INTO usage_requests (at, key_id, method, path, model, status, \
                     prompt_tokens, completion_tokens, latency_ms, first_byte_ms) \
                     VALUES ($1, $2, 'POST', '/v1/chat/completions', $3, 200, 3, NULL, 7, 2)",
                )
                .bind(at)
                .bind(key)
                .bind(model)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let store = PostgresStore::connect(&db.url).await.unwrap();
        assert_eq!(store.list_keys().await.unwrap(), std::slice::from_ref(&key));
        assert_eq!(store.key_by_hash(&secret.hash()).await.unwrap(), Some(key));
        let k1 = store.totals_for_key("k1").await.unwrap();
        assert_eq!(
            (k1.requests, k1.prompt_tokens, k1.requests_without_usage),
            (2, 6, 2)
        );
        assert_eq!(k1.last_request_at.unwrap().timestamp_millis(), 3_000);
        assert_eq!(k1.endpoints["/v1/chat/completions"], 2);
        assert_eq!(store.totals().await.unwrap()["k1"], k1);
        assert_eq!(
            store.requests("k1", None, 10).await.unwrap(),
            [request("k1", None, 3_000), request("k1", Some("m"), 1_000)]
        );
        // New rows reuse the names already there, get ids after the old rows', and
        // read back through the view the old table's name became.
        store
            .record(&[
                request("k2", Some("m"), 4_000),
                request("k3", Some("n"), 5_000),
            ])
            .await
            .unwrap();
        let names: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_names")
            .fetch_one(&store.inner.pool)
            .await
            .unwrap();
        assert_eq!(names, 7, "k1, k2, k3, POST, the path, m and n, each once");
        let rows: Vec<(i64, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT id, key_id, model, at FROM usage_requests WHERE key_id = 'k2' ORDER BY at",
        )
        .fetch_all(&store.inner.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                (2, "k2".into(), None, 2_000),
                (4, "k2".into(), Some("m".into()), 4_000)
            ]
        );
        assert_eq!(store.totals_for_key("k2").await.unwrap().requests, 2);
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn an_upgraded_database_shows_its_past_usage_per_model() {
        let db = TestDatabase::create().await;
        {
            let pool = migrated_up_to(&db.url, 2).await;
            for sql in crate::storage::sql::before_usage_models::statements() {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::sql::before_usage_models::check(&store).await;
        store.close().await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432)"]
    async fn a_database_made_before_fair_use_upgrades() {
        let db = TestDatabase::create().await;
        let secret = crate::auth::Secret::generate();
        let key = KeyRecord::new("old", Role::User, &secret);
        {
            let pool = migrated_up_to(&db.url, 3).await;
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
                 VALUES ($1, $2, 'user', $3, $4, $5, NULL, NULL)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&secret.hash().0[..])
            .bind(key.created_at.timestamp_millis())
            .execute(&pool)
            .await
            .unwrap();
            for sql in crate::storage::sql::before_usage_models::statements() {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let store = PostgresStore::connect(&db.url).await.unwrap();
        crate::storage::sql::before_fair_use::check(&store, &secret, &key).await;
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
            end_user: None,
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
            end_user: None,
        };
        store.record(&[row(1)]).await.unwrap();
        sqlx::query("UPDATE usage_totals SET prompt_tokens = 9223372036854775800")
            .execute(&store.inner.pool)
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
            let err = StorageError::from(
                sqlx::query(refused)
                    .execute(&store.inner.pool)
                    .await
                    .unwrap_err(),
            );
            assert!(err.refuses_content(), "{refused}: {err:?}");
        }
        let err = StorageError::from(
            sqlx::query("INSERT INTO usage_totals VALUES ($1, 1, 1, 1, 1, NULL)")
                .bind("a\0b")
                .execute(&store.inner.pool)
                .await
                .unwrap_err(),
        );
        assert!(err.refuses_content(), "NUL: {err:?}");
        store.close().await;
        let err = store.totals().await.unwrap_err();
        assert!(!err.refuses_content(), "{err:?}");
    }
}
