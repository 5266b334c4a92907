//! The embedded default: one SQLite file in the data directory, in WAL mode so the
//! `llmgate` CLI can read and write it while a server runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::sql::{
    count, key_from_row, millis, request_from_row, to_i64, totals_from_row, RequestInserts,
    TotalsUpserts, KEY_COLUMNS, REQUEST_COLUMNS,
};
use super::{
    normalized_batch, Context, KeyStore, RequestRecord, Storage, StorageError, UsageStore,
    UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// The totals as [`totals_from_row`] reads them. A total that once overflowed into a
/// floating-point number (before sums were made to saturate) reads back as the nearest
/// integer, `i64::MAX` at most, instead of failing every read of usage.
const TOTALS_COLUMNS: &str = "CAST(requests AS INTEGER) AS requests, \
     CAST(prompt_tokens AS INTEGER) AS prompt_tokens, \
     CAST(completion_tokens AS INTEGER) AS completion_tokens, \
     CAST(requests_without_usage AS INTEGER) AS requests_without_usage, last_request_at";

/// How many names' ids a store keeps in memory before it starts over.
const MAX_REMEMBERED_NAMES: usize = 10_000;

/// Keys and usage in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The ids of names (key ids, methods, paths, models) in `usage_names` that this
    /// process has seen committed. Names are never renumbered or removed.
    names: Arc<Mutex<HashMap<String, i64>>>,
    /// At most this many are kept ([`MAX_REMEMBERED_NAMES`]; smaller in tests).
    names_limit: usize,
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
            pool,
            names: Arc::default(),
            names_limit: MAX_REMEMBERED_NAMES,
        })
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
        let batch = &*normalized_batch(batch);
        // Fold the batch per key first: one totals upsert per key, not per request.
        let mut per_key: BTreeMap<&str, UsageTotals> = BTreeMap::new();
        for record in batch {
            per_key.entry(&record.key_id).or_default().add(record);
        }
        let mut tx = self.pool.begin().await?;
        let (mut ids, fresh) = self.name_ids(&mut tx, batch).await?;
        // Multi-row inserts of fixed sizes, each statement parsed once (see RequestInserts).
        for (sql, rows) in inserts().runs(batch) {
            let query = rows.iter().fold(sqlx::query(sql), |query, r| {
                // Every name of the batch has an id (`name_ids`).
                let [key, method, path, model] = row_names(r).map(|(column, name)| {
                    name.map(|name| ids.get(column, name).unwrap_or_default())
                });
                query
                    .bind(millis(r.at))
                    .bind(key)
                    .bind(method)
                    .bind(path)
                    .bind(model)
                    .bind(i64::from(r.status))
                    .bind(r.prompt_tokens.map(to_i64))
                    .bind(r.completion_tokens.map(to_i64))
                    .bind(to_i64(r.latency_ms))
                    .bind(r.first_byte_ms.map(to_i64))
            });
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
        // Only committed ids are remembered: a rolled-back name may get another id.
        let mut names = self.names.lock().expect("names lock");
        if names.len() + fresh.len() > self.names_limit {
            // Clients can make up paths without end; forgotten ids are read again.
            names.clear();
        }
        names.extend(fresh);
        Ok(())
    }

    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        let mut all = BTreeMap::new();
        let rows = sqlx::query(&format!(
            "SELECT key_id, {TOTALS_COLUMNS} FROM usage_totals"
        ))
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            all.insert(row.try_get::<String, _>("key_id")?, totals_from_row(row)?);
        }
        let rows = sqlx::query(
            "SELECT key_id, path, CAST(requests AS INTEGER) AS requests FROM usage_endpoints",
        )
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
        let row = sqlx::query(&format!(
            "SELECT {TOTALS_COLUMNS} FROM usage_totals WHERE key_id = ?"
        ))
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(UsageTotals::default());
        };
        let mut totals = totals_from_row(&row)?;
        let rows = sqlx::query(
            "SELECT path, CAST(requests AS INTEGER) AS requests FROM usage_endpoints WHERE key_id = ?",
        )
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
        // The view joins the names back in; its plan searches `usage_rows_key_at`.
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

impl SqliteStore {
    /// The id of every name the batch uses, and those of them this process had not seen
    /// (to remember once the transaction commits). A name new to the database is added.
    async fn name_ids<'b>(
        &self,
        tx: &mut sqlx::SqliteConnection,
        batch: &'b [RequestRecord],
    ) -> Result<(NameIds<'b>, Vec<(String, i64)>), StorageError> {
        let mut ids = NameIds::default();
        let mut missing = HashSet::new();
        {
            let known = self.names.lock().expect("names lock");
            for (column, name) in batch.iter().flat_map(row_names) {
                let Some(name) = name else { continue };
                if ids.get(column, name).is_none() {
                    match known.get(name) {
                        Some(&id) => ids.insert(name, id),
                        None => {
                            missing.insert(name);
                        }
                    }
                }
            }
        }
        let mut fresh = Vec::with_capacity(missing.len());
        for name in missing {
            sqlx::query("INSERT INTO usage_names (name) VALUES (?) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let id: i64 = sqlx::query_scalar("SELECT id FROM usage_names WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            ids.insert(name, id);
            fresh.push((name.to_owned(), id));
        }
        Ok((ids, fresh))
    }
}

/// A request row's names, by column of `usage_rows`: key, method, path, model.
fn row_names(r: &RequestRecord) -> [(usize, Option<&str>); 4] {
    [
        (0, Some(r.key_id.as_str())),
        (1, Some(r.method.as_str())),
        (2, Some(r.path.as_str())),
        (3, r.model.as_deref()),
    ]
}

/// The ids of a batch's names. Consecutive rows mostly repeat a column's name, so each
/// column remembers its last one before looking in the map.
#[derive(Default)]
struct NameIds<'b> {
    all: HashMap<&'b str, i64>,
    last: [Option<(&'b str, i64)>; 4],
}

impl<'b> NameIds<'b> {
    fn get(&mut self, column: usize, name: &'b str) -> Option<i64> {
        match self.last[column] {
            Some((last, id)) if last == name => Some(id),
            _ => {
                let id = *self.all.get(name)?;
                self.last[column] = Some((name, id));
                Some(id)
            }
        }
    }

    fn insert(&mut self, name: &'b str, id: i64) {
        self.all.insert(name, id);
    }
}

/// The request-row inserts (into `usage_rows`, names by id).
fn inserts() -> &'static RequestInserts {
    static INSERTS: std::sync::OnceLock<RequestInserts> = std::sync::OnceLock::new();
    INSERTS.get_or_init(|| {
        RequestInserts::for_table(
            "usage_rows",
            "at, key, method, path, model, status, prompt_tokens, completion_tokens, latency_ms, first_byte_ms",
            |_| "?".to_owned(),
        )
    })
}

/// The running totals' upserts in this backend's syntax.
fn upserts() -> &'static TotalsUpserts {
    static UPSERTS: std::sync::OnceLock<TotalsUpserts> = std::sync::OnceLock::new();
    UPSERTS.get_or_init(|| TotalsUpserts::new(|_| "?".to_owned(), "MAX"))
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
        }
    }

    #[tokio::test]
    async fn rows_written_before_names_were_numbered_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmgate.db");
        {
            // The database as the first two migrations left it, with rows in the old table.
            let pool = SqlitePoolOptions::new()
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true),
                )
                .await
                .unwrap();
            let mut old = sqlx::migrate!("./migrations/sqlite");
            old.migrations = old
                .migrations
                .iter()
                .filter(|m| m.version <= 2)
                .cloned()
                .collect::<Vec<_>>()
                .into();
            old.run(&pool).await.unwrap();
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
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(names, 7, "k1, k2, k3, POST, the path, m and n, each once");
        let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT key_id, model, at FROM usage_requests WHERE key_id = 'k2' ORDER BY at",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                ("k2".into(), None, 2_000),
                ("k2".into(), Some("m".into()), 4_000)
            ]
        );
    }

    #[tokio::test]
    async fn names_beyond_the_limit_are_forgotten_and_read_again() {
        let mut store = SqliteStore::in_memory().await.unwrap();
        store.names_limit = 4;
        for i in 0..6 {
            let mut r = request("k", Some("m"), 1_000 + i);
            r.path = format!("/v1/made-up/{i}");
            store.record(&[r]).await.unwrap();
            assert!(store.names.lock().unwrap().len() <= 4);
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
            .fetch_one(&store.pool)
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
        .execute(&store.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE usage_rows SET prompt_tokens = -1")
            .execute(&store.pool)
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
                .fetch_one(&store.pool)
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
                .execute(&store.pool)
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
