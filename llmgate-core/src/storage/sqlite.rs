//! The embedded default: one SQLite file in the data directory, in WAL mode so the
//! `llmgate` CLI can read and write it while a server runs. The logic is
//! [`SqlStore`]'s; here are the SQLite dialect and how the file is opened.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Sqlite;

use super::sql::{Dialect, SqlStore, Statements};
use super::{
    Context, KeyStore, KeyUpdate, ModelStore, RequestRecord, Storage, StorageError, StoredModel,
    UsageStore, UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// SQLite's SQL.
fn statements() -> &'static Statements {
    static STATEMENTS: OnceLock<Statements> = OnceLock::new();
    STATEMENTS.get_or_init(|| {
        Statements::new(&Dialect {
            placeholder: |_| "?".to_owned(),
            greatest: "MAX",
            // A total that once overflowed into a floating-point number (before sums
            // were made to saturate) reads back as the nearest integer, `i64::MAX` at
            // most, instead of failing every read of usage.
            totals_columns: "CAST(requests AS INTEGER) AS requests, \
                 CAST(prompt_tokens AS INTEGER) AS prompt_tokens, \
                 CAST(completion_tokens AS INTEGER) AS completion_tokens, \
                 CAST(requests_without_usage AS INTEGER) AS requests_without_usage, \
                 last_request_at",
            endpoint_requests: "CAST(requests AS INTEGER)",
            key_tiebreak: "rowid",
        })
    })
}

/// Keys, usage and model settings in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: SqlStore<Sqlite>,
}

/// Creates the database's directory (mode 0700) and file (mode 0600) if missing, and
/// takes group and other access away from an existing file: it holds key names and every
/// request's path, model and tokens. SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
fn private_file(path: &Path) -> Result<(), StorageError> {
    let failed = |what: &Path, e: std::io::Error| {
        StorageError::Database(Context::boxed(
            format!("cannot create {}", what.display()),
            e,
        ))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| failed(dir, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path).map_err(|e| failed(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(|e| failed(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| failed(path, e))?;
            for suffix in ["-wal", "-shm"] {
                let mut side = path.as_os_str().to_owned();
                side.push(suffix);
                let _ = std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StorageError> {
        private_file(path)?;
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
            .map_err(|e| StorageError::Database(Context::boxed("migration failed", e)))?;
        Ok(Self {
            inner: SqlStore::new(pool, statements()),
        })
    }
}

#[async_trait]
impl Storage for SqliteStore {
    async fn close(&self) {
        self.inner.pool.close().await;
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
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
impl ModelStore for SqliteStore {
    async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError> {
        self.inner.stored_models().await
    }

    async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError> {
        self.inner.store_model(model).await
    }
}

#[async_trait]
impl UsageStore for SqliteStore {
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
mod tests {
    use super::*;
    use crate::auth::{Role, Secret};

    #[tokio::test]
    async fn keys_contract() {
        crate::storage::contract::keys(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn usage_contract() {
        crate::storage::contract::usage(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn hostile_values_contract() {
        crate::storage::contract::hostile_values(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn usage_per_model_contract() {
        crate::storage::contract::usage_per_model(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn key_changes_contract() {
        crate::storage::contract::key_changes(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn limit_changes_at_once_contract() {
        let store = SqliteStore::in_memory().await.unwrap();
        crate::storage::contract::limit_changes_at_once(&store, &store).await;
    }

    /// On a file, as the gateway and the CLI beside it share one: two stores, several
    /// connections each, so the changes really race.
    #[tokio::test]
    async fn limit_changes_at_once_through_two_stores_on_one_file_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        let gateway = SqliteStore::open(&path).await.unwrap();
        let cli = SqliteStore::open(&path).await.unwrap();
        crate::storage::contract::limit_changes_at_once(&gateway, &cli).await;
        gateway.close().await;
        cli.close().await;
    }

    #[tokio::test]
    async fn end_users_contract() {
        crate::storage::contract::end_users(&SqliteStore::in_memory().await.unwrap()).await;
    }

    #[tokio::test]
    async fn models_contract() {
        crate::storage::contract::models(&SqliteStore::in_memory().await.unwrap()).await;
    }

    /// A database file as the migrations up to `version` left it.
    async fn migrated_up_to(path: &std::path::Path, version: i64) -> sqlx::SqlitePool {
        let pool = SqlitePoolOptions::new()
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        let mut old = sqlx::migrate!("./migrations/sqlite");
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

    #[tokio::test]
    async fn a_database_made_before_names_were_numbered_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        let secret = Secret::generate();
        let key = KeyRecord::new("old", Role::Admin, &secret);
        {
            // The database as the first two migrations left it, with rows in the old table.
            let pool = migrated_up_to(&path, 2).await;
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
                 VALUES (?, ?, 'admin', ?, ?, ?, NULL, NULL)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.prefix)
            .bind(&secret.hash().0[..])
            .bind(key.created_at.timestamp_millis())
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO usage_totals VALUES ('k1', 2, 6, 0, 2, 3000), ('k2', 1, 3, 0, 1, 2000)")
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
                ("k1", Some("m"), 1_000),
                ("k2", None, 2_000),
                ("k1", None, 3_000),
            ] {
                sqlx::query(
                    "INSERT INTO usage_requests (at, key_id, method, path, model, status, \
                     prompt_tokens, completion_tokens, latency_ms, first_byte_ms) \
                     VALUES (?, ?, 'POST', '/v1/chat/completions', ?, 200, 3, NULL, 7, 2)",
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
        let store = SqliteStore::open(&path).await.unwrap();
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
        // New rows reuse the names already there, and the old table's name still answers SQL.
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
        let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT key_id, model, at FROM usage_requests WHERE key_id = 'k2' ORDER BY at",
        )
        .fetch_all(&store.inner.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                ("k2".into(), None, 2_000),
                ("k2".into(), Some("m".into()), 4_000)
            ]
        );
        assert_eq!(store.totals_for_key("k2").await.unwrap().requests, 2);
    }

    #[tokio::test]
    async fn an_upgraded_database_shows_its_past_usage_per_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        {
            let pool = migrated_up_to(&path, 3).await;
            for sql in crate::storage::sql::before_usage_models::statements() {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        crate::storage::sql::before_usage_models::check(&store).await;
    }

    #[tokio::test]
    async fn a_database_made_before_fair_use_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        let secret = Secret::generate();
        let key = KeyRecord::new("old", Role::User, &secret);
        {
            let pool = migrated_up_to(&path, 4).await;
            sqlx::query(
                "INSERT INTO api_keys (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at) \
                 VALUES (?, ?, 'user', ?, ?, ?, NULL, NULL)",
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
        let store = SqliteStore::open(&path).await.unwrap();
        crate::storage::sql::before_fair_use::check(&store, &secret, &key).await;
    }

    #[tokio::test]
    async fn key_and_quota_lookups_search_an_index() {
        let store = SqliteStore::in_memory().await.unwrap();
        for (sql, index) in [
            (&statements().key_by_hash, "api_keys_previous_hash"),
            (&statements().tokens_since, "usage_rows_key_at"),
            (
                &statements().user_tokens_since,
                "usage_rows_key_end_user_at",
            ),
        ] {
            let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&store.inner.pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let plan: Vec<String> = rows
                .iter()
                .map(|row| sqlx::Row::get::<String, _>(row, "detail"))
                .collect();
            let plan = plan.join("\n");
            assert!(
                plan.contains(&format!("USING INDEX {index}")),
                "{sql}:\n{plan}"
            );
            assert!(!plan.contains("SCAN"), "{sql}:\n{plan}");
        }
    }

    #[tokio::test]
    async fn names_beyond_the_limit_are_forgotten_and_read_again() {
        let mut store = SqliteStore::in_memory().await.unwrap();
        store.inner.names_limit = 4;
        for i in 0..6 {
            let mut r = request("k", Some("m"), 1_000 + i);
            r.path = format!("/v1/made-up/{i}");
            store.record(&[r]).await.unwrap();
            assert!(store.inner.names.lock().unwrap().len() <= 4);
        }
        let rows = store.requests("k", None, 10).await.unwrap();
        let paths: Vec<_> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            (0..6)
                .rev()
                .map(|i| format!("/v1/made-up/{i}"))
                .collect::<Vec<_>>()
        );
        assert!(rows
            .iter()
            .all(|r| r.key_id == "k" && r.model.as_deref() == Some("m")));
    }

    #[tokio::test]
    async fn two_stores_on_one_file_agree_on_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        let a = SqliteStore::open(&path).await.unwrap();
        let b = SqliteStore::open(&path).await.unwrap();
        a.record(&[request("k", Some("m"), 1_000)]).await.unwrap();
        b.record(&[
            request("k", Some("m"), 2_000),
            request("k", Some("x"), 3_000),
        ])
        .await
        .unwrap();
        a.record(&[request("k", Some("x"), 4_000)]).await.unwrap();
        let models: Vec<_> = b
            .requests("k", None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.model)
            .collect();
        assert_eq!(
            models,
            [
                Some("x".into()),
                Some("x".into()),
                Some("m".into()),
                Some("m".into())
            ]
        );
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
            .fetch_one(&store.inner.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn totals_an_overflow_left_read_back_clamped_and_heal_on_the_next_write() {
        let store = SqliteStore::in_memory().await.unwrap();
        store.record(&[request("k", None, 1_000)]).await.unwrap();
        // What two answers near i64::MAX left before sums saturated: a REAL total, and
        // a u64::MAX count stored as -1.
        sqlx::query(
            "UPDATE usage_totals SET prompt_tokens = 1.8e19, completion_tokens = -1 WHERE key_id = 'k'",
        )
        .execute(&store.inner.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE usage_rows SET prompt_tokens = -1")
            .execute(&store.inner.pool)
            .await
            .unwrap();
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!(totals.prompt_tokens, i64::MAX as u64);
        assert_eq!(totals.completion_tokens, 0);
        assert_eq!(store.totals().await.unwrap()["k"], totals);
        let rows = store.requests("k", None, 10).await.unwrap();
        assert_eq!(
            rows[0].prompt_tokens, None,
            "a count no request can have is unknown"
        );

        store.record(&[request("k", None, 2_000)]).await.unwrap();
        let kind: String =
            sqlx::query_scalar("SELECT typeof(prompt_tokens) FROM usage_totals WHERE key_id = 'k'")
                .fetch_one(&store.inner.pool)
                .await
                .unwrap();
        assert_eq!(kind, "integer");
        let totals = store.totals_for_key("k").await.unwrap();
        assert_eq!(
            (totals.requests, totals.prompt_tokens),
            (2, i64::MAX as u64)
        );
    }

    #[tokio::test]
    async fn a_refused_value_is_told_apart_from_a_failing_database() {
        let store = SqliteStore::in_memory().await.unwrap();
        let err = StorageError::from(
            sqlx::query("INSERT INTO usage_totals (key_id, requests) VALUES ('k', NULL)")
                .execute(&store.inner.pool)
                .await
                .unwrap_err(),
        );
        assert!(err.refuses_content(), "{err:?}");
        store.close().await;
        let err = store.totals().await.unwrap_err();
        assert!(matches!(err, StorageError::Database(_)), "{err:?}");
        assert!(!err.refuses_content());
        // The driver's error stays reachable for logs and for an embedder's own handling.
        let source = std::error::Error::source(&err).expect("a source");
        assert!(matches!(
            source.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolClosed)
        ));
    }
}
