//! What the SQL backends share: the store itself ([`SqlStore`], generic over the
//! driver), the schema's shape, error mapping, how times and counts are stored
//! (milliseconds and tokens as 64-bit integers), and reading rows back. Only the SQL
//! text ([`Dialect`]) and the driver differ between SQLite and PostgreSQL.
//!
//! Counts go in as at most `i64::MAX` ([`to_i64`]), running totals stop there
//! ([`saturating_sum`]) rather than overflow, and whatever is read back is clamped, so
//! one odd value cannot make every read of usage fail.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

use super::{
    normalized_batch, stored_end_user, KeyUpdate, ModelUsage, RequestRecord, StorageError,
    StoredModel, UsageTotals, MAX_END_USERS_PER_KEY, MAX_MODELS_PER_KEY, MAX_TOKENS_PER_REQUEST,
    OTHER_END_USER, OTHER_MODEL,
};
use crate::auth::{KeyHash, KeyRecord, Role};
use crate::limits::KeyLimits;

fn get<R, T>(row: &R, column: &str) -> Result<T, StorageError>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> T: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(row.try_get::<T, _>(column)?)
}

fn required_time(ms: i64) -> Result<DateTime<Utc>, StorageError> {
    Ok(time(Some(ms))?.expect("some in, some out"))
}

/// A count or a total read back: never negative.
pub(super) fn count(value: i64) -> u64 {
    value.max(0) as u64
}

/// A count as stored: 64-bit signed, so at most `i64::MAX`.
pub(super) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `current + added`, stopping at `i64::MAX` instead of failing (PostgreSQL: "bigint out
/// of range") or turning into a floating-point number (SQLite). `added` is never negative.
pub(super) fn saturating_sum(current: &str, added: &str) -> String {
    format!(
        "CASE WHEN {current} > {max} - {added} THEN {max} ELSE {current} + {added} END",
        max = i64::MAX
    )
}

/// The columns [`key_from_row`] reads.
pub(super) const KEY_COLUMNS: &str =
    "id, name, role, prefix, created_at, expires_at, revoked_at, limits";

pub(super) fn key_from_row<R: Row>(row: &R) -> Result<KeyRecord, StorageError>
where
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    String: Type<R::Database>,
    i64: Type<R::Database>,
{
    let role: String = get(row, "role")?;
    Ok(KeyRecord {
        id: get(row, "id")?,
        name: get(row, "name")?,
        role: Role::from_str(&role).map_err(StorageError::Corrupt)?,
        prefix: get(row, "prefix")?,
        created_at: required_time(get(row, "created_at")?)?,
        expires_at: time(get(row, "expires_at")?)?,
        revoked_at: time(get(row, "revoked_at")?)?,
        limits: limits_from_text(get(row, "limits")?)?,
    })
}

/// A key's limits as the `limits` column keeps them: JSON, `None` (NULL) when it sets
/// none.
fn limits_text(limits: &KeyLimits) -> Option<String> {
    (!limits.is_empty()).then(|| serde_json::to_string(limits).expect("limits serialize to JSON"))
}

fn limits_from_text(text: Option<String>) -> Result<KeyLimits, StorageError> {
    match text {
        None => Ok(KeyLimits::default()),
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StorageError::Corrupt(format!("a key's limits: {e}"))),
    }
}

/// From `requests, prompt_tokens, completion_tokens, requests_without_usage,
/// last_request_at`; endpoints and models are read separately.
pub(super) fn totals_from_row<R: Row>(row: &R) -> Result<UsageTotals, StorageError>
where
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    String: Type<R::Database>,
    i64: Type<R::Database>,
{
    Ok(UsageTotals {
        requests: count(get(row, "requests")?),
        prompt_tokens: count(get(row, "prompt_tokens")?),
        completion_tokens: count(get(row, "completion_tokens")?),
        requests_without_usage: count(get(row, "requests_without_usage")?),
        last_request_at: time(get(row, "last_request_at")?)?,
        endpoints: BTreeMap::new(),
        models: BTreeMap::new(),
        users: BTreeMap::new(),
    })
}

/// A `usage_models` (or `usage_end_users`) row's label and counts (the columns of
/// [`MODEL_COLUMNS`], or [`END_USER_COLUMNS`] with the end user as `model`).
fn model_from_row<R: Row>(row: &R) -> Result<(String, ModelUsage), StorageError>
where
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    String: Type<R::Database>,
    i64: Type<R::Database>,
{
    Ok((
        get(row, "model")?,
        ModelUsage {
            requests: count(get(row, "requests")?),
            prompt_tokens: count(get(row, "prompt_tokens")?),
            completion_tokens: count(get(row, "completion_tokens")?),
            requests_without_usage: count(get(row, "requests_without_usage")?),
        },
    ))
}

/// The columns of `usage_models` that [`model_from_row`] reads.
const MODEL_COLUMNS: &str =
    "model, requests, prompt_tokens, completion_tokens, requests_without_usage";
/// The columns of `usage_end_users` that [`model_from_row`] reads.
const END_USER_COLUMNS: &str =
    "end_user AS model, requests, prompt_tokens, completion_tokens, requests_without_usage";

/// A `model_settings` row.
fn stored_model_from_row<R: Row>(row: &R) -> Result<StoredModel, StorageError>
where
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    String: Type<R::Database>,
    i64: Type<R::Database>,
{
    Ok(StoredModel {
        name: get(row, "name")?,
        settings: get(row, "settings")?,
        updated_at: required_time(get(row, "updated_at")?)?,
    })
}

/// The columns [`request_from_row`] reads (from the view `usage_requests`).
pub(super) const REQUEST_COLUMNS: &str =
    "at, key_id, method, path, model, status, prompt_tokens, completion_tokens, latency_ms, \
     first_byte_ms, end_user";

pub(super) fn request_from_row<R: Row>(row: &R) -> Result<RequestRecord, StorageError>
where
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database>,
    for<'r> i64: Decode<'r, R::Database>,
    String: Type<R::Database>,
    i64: Type<R::Database>,
{
    Ok(RequestRecord {
        at: required_time(get(row, "at")?)?,
        key_id: get(row, "key_id")?,
        method: get(row, "method")?,
        path: get(row, "path")?,
        model: get(row, "model")?,
        status: u16::try_from(get::<_, i64>(row, "status")?).unwrap_or(0),
        prompt_tokens: tokens(get(row, "prompt_tokens")?),
        completion_tokens: tokens(get(row, "completion_tokens")?),
        latency_ms: count(get(row, "latency_ms")?),
        first_byte_ms: get::<_, Option<i64>>(row, "first_byte_ms")?.map(count),
        end_user: get(row, "end_user")?,
    })
}

/// `err`, with a clash of names told as the name `name` being taken.
fn name_conflict(err: sqlx::Error, name: &str) -> StorageError {
    match StorageError::from(err) {
        StorageError::Conflict(_) => {
            StorageError::Conflict(format!("an active key named '{name}' already exists"))
        }
        other => other,
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StorageError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StorageError::Conflict("an active key with this name already exists".into())
            }
            sqlx::Error::Database(db) if refuses_content(db.as_ref()) => {
                StorageError::Rejected(err.into())
            }
            sqlx::Error::Encode(_) => StorageError::Rejected(err.into()),
            // Connections, I/O, timeouts, a busy or closed database: may pass on a retry.
            _ => StorageError::Database(err.into()),
        }
    }
}

/// Whether the database refused a statement for the values it carries, which no retry
/// changes: PostgreSQL's SQLSTATE classes 22 (data exception: a NUL in text, a number
/// out of range), 23 (integrity constraint) and 54 (program limit: e.g. a value too big
/// for an index); SQLite's TOOBIG, CONSTRAINT and MISMATCH.
fn refuses_content(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return ["22", "23", "54"]
            .iter()
            .any(|class| pg.code().starts_with(class));
    }
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        const TOOBIG: i32 = 18;
        const CONSTRAINT: i32 = 19;
        const MISMATCH: i32 = 20;
        // The extended result code; its low byte is the primary one.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(TOOBIG | CONSTRAINT | MISMATCH));
    }
    false
}

pub(super) fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(super) fn time(ms: Option<i64>) -> Result<Option<DateTime<Utc>>, StorageError> {
    ms.map(|ms| {
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| StorageError::Corrupt(format!("timestamp {ms} out of range")))
    })
    .transpose()
}

/// A token count read back; one no request can have (negative, as a count beyond
/// `i64::MAX` was once stored, or beyond [`MAX_TOKENS_PER_REQUEST`]) is unknown.
pub(super) fn tokens(value: Option<i64>) -> Option<u64> {
    value
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v <= MAX_TOKENS_PER_REQUEST)
}

/// The upserts that add a batch to a key's running totals, in one backend's syntax.
pub(super) struct TotalsUpserts {
    /// Adds `(key_id, requests, prompt_tokens, completion_tokens, requests_without_usage,
    /// last_request_at)` to `usage_totals`.
    pub(super) totals: String,
    /// Adds `(key_id, path, requests)` to `usage_endpoints`.
    pub(super) endpoints: String,
    /// Adds `(key_id, model, requests, prompt_tokens, completion_tokens,
    /// requests_without_usage)` to `usage_models`.
    pub(super) models: String,
    /// Adds `(key_id, end_user, requests, prompt_tokens, completion_tokens,
    /// requests_without_usage)` to `usage_end_users`.
    pub(super) users: String,
}

impl TotalsUpserts {
    /// `placeholder(n)` writes the n-th (from 1) parameter; `greatest` names the
    /// function that picks the larger of two values (`MAX`, `GREATEST`).
    pub(super) fn new(placeholder: impl Fn(usize) -> String, greatest: &str) -> Self {
        let sum = |table: &str, column: &str| {
            format!(
                "{column} = {}",
                saturating_sum(&format!("{table}.{column}"), &format!("excluded.{column}"))
            )
        };
        let params = |n: usize| (1..=n).map(&placeholder).collect::<Vec<_>>().join(", ");
        let totals = format!(
            "INSERT INTO usage_totals \
             (key_id, requests, prompt_tokens, completion_tokens, requests_without_usage, last_request_at) \
             VALUES ({}) ON CONFLICT (key_id) DO UPDATE SET {}, \
             last_request_at = {greatest}(COALESCE(usage_totals.last_request_at, 0), excluded.last_request_at)",
            params(6),
            ["requests", "prompt_tokens", "completion_tokens", "requests_without_usage"]
                .map(|column| sum("usage_totals", column))
                .join(", "),
        );
        let endpoints = format!(
            "INSERT INTO usage_endpoints (key_id, path, requests) VALUES ({}) \
             ON CONFLICT (key_id, path) DO UPDATE SET {}",
            params(3),
            sum("usage_endpoints", "requests"),
        );
        let per = |table: &str, label: &str| {
            format!(
                "INSERT INTO {table} \
                 (key_id, {label}, requests, prompt_tokens, completion_tokens, requests_without_usage) \
                 VALUES ({}) ON CONFLICT (key_id, {label}) DO UPDATE SET {}",
                params(6),
                [
                    "requests",
                    "prompt_tokens",
                    "completion_tokens",
                    "requests_without_usage"
                ]
                .map(|column| sum(table, column))
                .join(", "),
            )
        };
        Self {
            totals,
            endpoints,
            models: per("usage_models", "model"),
            users: per("usage_end_users", "end_user"),
        }
    }
}

/// Rows per multi-row insert of request rows. Only these sizes, so that each statement
/// is parsed once and then found in the connection's statement cache: a batch of any
/// other size would be parsed anew, which costs more than writing its rows.
const INSERT_SIZES: [usize; 4] = [64, 16, 4, 1];

/// The multi-row inserts of request rows for one backend, built once.
pub(super) struct RequestInserts([String; INSERT_SIZES.len()]);

impl RequestInserts {
    /// Inserts into `table`, naming `column_list` (comma-separated).
    pub(super) fn for_table(
        table: &str,
        column_list: &str,
        placeholder: impl Fn(usize) -> String,
    ) -> Self {
        let columns = column_list.split(',').count();
        Self(INSERT_SIZES.map(|rows| {
            let values = (0..rows)
                .map(|row| {
                    let params = (1..=columns)
                        .map(|column| placeholder(row * columns + column))
                        .collect::<Vec<_>>();
                    format!("({})", params.join(", "))
                })
                .collect::<Vec<_>>();
            format!(
                "INSERT INTO {table} ({column_list}) VALUES {}",
                values.join(", ")
            )
        }))
    }

    /// Splits a batch into runs of the fixed sizes, each with its statement.
    pub(super) fn runs<'a, T>(
        &'a self,
        mut rows: &'a [T],
    ) -> impl Iterator<Item = (&'a str, &'a [T])> + 'a {
        std::iter::from_fn(move || {
            let i = INSERT_SIZES.iter().position(|&size| size <= rows.len())?;
            let (run, rest) = rows.split_at(INSERT_SIZES[i]);
            rows = rest;
            Some((self.0[i].as_str(), run))
        })
    }
}

/// What differs between the SQL backends, apart from the driver: a few pieces of SQL.
/// Statements are written once, with `?` parameters, and numbered where the dialect
/// wants it.
pub(super) struct Dialect {
    /// Writes the n-th (from 1) parameter: `?` or `$n`.
    pub(super) placeholder: fn(usize) -> String,
    /// The function that picks the larger of two values (`MAX`, `GREATEST`).
    pub(super) greatest: &'static str,
    /// The columns of `usage_totals` as [`totals_from_row`] reads them.
    pub(super) totals_columns: &'static str,
    /// `usage_endpoints.requests`, as read back (named `requests`).
    pub(super) endpoint_requests: &'static str,
    /// What orders keys created in the same millisecond.
    pub(super) key_tiebreak: &'static str,
}

/// The columns of `usage_rows`, in the order [`SqlStore::record`] binds them: names by
/// their id in `usage_names`.
const ROW_COLUMNS: &str =
    "at, key, method, path, model, status, prompt_tokens, completion_tokens, latency_ms, \
     first_byte_ms, end_user";

/// How many times [`SqlStore::update_key`] reads and writes a key's limits before it
/// gives up: it loses a try only to another writer of the same key's limits.
const MAX_LIMITS_TRIES: usize = 100;

/// Every statement a SQL store runs, in one dialect, built once per backend.
pub(super) struct Statements {
    insert_key: String,
    pub(super) key_by_hash: String,
    list_keys: String,
    revoke_key: String,
    key_limits: String,
    update_key: String,
    rotate_key: String,
    insert_name: String,
    name_id: String,
    all_totals: String,
    all_endpoints: String,
    key_totals: String,
    key_endpoints: String,
    all_models: String,
    key_models: String,
    key_model_names: String,
    all_users: String,
    key_users: String,
    key_user_names: String,
    pub(super) tokens_since: String,
    pub(super) user_tokens_since: String,
    stored_models: String,
    store_model: String,
    requests: String,
    inserts: RequestInserts,
    upserts: TotalsUpserts,
}

impl Statements {
    pub(super) fn new(dialect: &Dialect) -> Self {
        let numbered = |sql: String| {
            let mut parts = sql.split('?');
            let mut out = parts.next().unwrap_or_default().to_owned();
            for (n, part) in parts.enumerate() {
                out.push_str(&(dialect.placeholder)(n + 1));
                out.push_str(part);
            }
            out
        };
        let Dialect {
            placeholder,
            greatest,
            totals_columns,
            endpoint_requests,
            key_tiebreak,
        } = *dialect;
        Self {
            insert_key: numbered(
                "INSERT INTO api_keys \
                 (id, name, role, prefix, key_hash, created_at, expires_at, revoked_at, limits) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    .into(),
            ),
            // Found by its secret, or by the one it had before its last rotation: then
            // with when that one stops working.
            key_by_hash: numbered(format!(
                "SELECT {KEY_COLUMNS}, \
                 CASE WHEN key_hash = ? THEN NULL ELSE previous_valid_until END AS previous_valid_until \
                 FROM api_keys WHERE key_hash = ? OR previous_hash = ?"
            )),
            list_keys: format!(
                "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, {key_tiebreak}"
            ),
            revoke_key: numbered(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING id"
                    .into(),
            ),
            key_limits: numbered(
                "SELECT limits FROM api_keys WHERE id = ? AND revoked_at IS NULL".into(),
            ),
            // Limits are written only over those the patch was applied to (the text read
            // by `key_limits`; limits are never stored as ''), else nothing is written.
            update_key: numbered(format!(
                "UPDATE api_keys SET name = COALESCE(?, name), \
                 expires_at = CASE WHEN ? = 1 THEN ? ELSE expires_at END, \
                 limits = CASE WHEN ? = 1 THEN ? ELSE limits END \
                 WHERE id = ? AND revoked_at IS NULL \
                 AND (? = 0 OR COALESCE(limits, '') = COALESCE(?, '')) RETURNING {KEY_COLUMNS}"
            )),
            // The right-hand sides read the row as it was: the current hash becomes the
            // previous one.
            rotate_key: numbered(
                "UPDATE api_keys SET previous_hash = key_hash, previous_valid_until = ?, \
                 key_hash = ?, prefix = ? WHERE id = ? AND revoked_at IS NULL RETURNING id"
                    .into(),
            ),
            insert_name: numbered(
                "INSERT INTO usage_names (name) VALUES (?) ON CONFLICT (name) DO NOTHING".into(),
            ),
            name_id: numbered("SELECT id FROM usage_names WHERE name = ?".into()),
            all_totals: format!("SELECT key_id, {totals_columns} FROM usage_totals"),
            all_endpoints: format!(
                "SELECT key_id, path, {endpoint_requests} AS requests FROM usage_endpoints"
            ),
            key_totals: numbered(format!(
                "SELECT {totals_columns} FROM usage_totals WHERE key_id = ?"
            )),
            key_endpoints: numbered(format!(
                "SELECT path, {endpoint_requests} AS requests FROM usage_endpoints WHERE key_id = ?"
            )),
            all_models: format!("SELECT key_id, {MODEL_COLUMNS} FROM usage_models"),
            key_models: numbered(format!(
                "SELECT {MODEL_COLUMNS} FROM usage_models WHERE key_id = ?"
            )),
            key_model_names: numbered("SELECT model FROM usage_models WHERE key_id = ?".into()),
            all_users: format!("SELECT key_id, {END_USER_COLUMNS} FROM usage_end_users"),
            key_users: numbered(format!(
                "SELECT {END_USER_COLUMNS} FROM usage_end_users WHERE key_id = ?"
            )),
            key_user_names: numbered(
                "SELECT end_user AS model FROM usage_end_users WHERE key_id = ?".into(),
            ),
            tokens_since: numbered(tokens_since(false)),
            user_tokens_since: numbered(tokens_since(true)),
            stored_models: "SELECT name, settings, updated_at FROM model_settings".into(),
            store_model: numbered(
                "INSERT INTO model_settings (name, settings, updated_at) VALUES (?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET settings = excluded.settings, \
                 updated_at = excluded.updated_at"
                    .into(),
            ),
            // The view joins the names back in; its plan searches `usage_rows_key_at`.
            requests: numbered(format!(
                "SELECT {REQUEST_COLUMNS} FROM usage_requests \
                 WHERE key_id = ? AND at >= ? ORDER BY at DESC, id DESC LIMIT ?"
            )),
            inserts: RequestInserts::for_table("usage_rows", ROW_COLUMNS, placeholder),
            upserts: TotalsUpserts::new(placeholder, greatest),
        }
    }
}

/// The sum of a key's tokens since a time (and of one end user's), from the rows:
/// through `usage_rows_key_at` (or `usage_rows_key_end_user_at`). A count no request can
/// have is unknown, as when rows are read back.
fn tokens_since(of_end_user: bool) -> String {
    let known = |column: &str| {
        format!(
            "CASE WHEN {column} BETWEEN 0 AND {MAX_TOKENS_PER_REQUEST} THEN {column} ELSE 0 END"
        )
    };
    let name_id = "(SELECT id FROM usage_names WHERE name = ?)";
    format!(
        "SELECT CAST(COALESCE(SUM({} + {}), 0) AS BIGINT) AS tokens FROM usage_rows \
         WHERE key = {name_id} AND at >= ?{}",
        known("prompt_tokens"),
        known("completion_tokens"),
        if of_end_user {
            format!(" AND end_user = {name_id}")
        } else {
            String::new()
        }
    )
}

/// How many names' ids a store keeps in memory before it starts over.
const MAX_REMEMBERED_NAMES: usize = 10_000;
/// How many per-model labels a store keeps in memory (over all keys) before it starts
/// over: of up to 256 bytes each, so a few tens of MiB at worst.
const MAX_REMEMBERED_MODEL_LABELS: usize = 100_000;
/// How many per-user labels a store keeps in memory (over all keys) before it starts
/// over; as many keys' end users as that many models.
const MAX_REMEMBERED_USER_LABELS: usize = 100_000;

/// One breakdown of a key's totals by a label the client chooses (per model, per end
/// user), kept within a bound: what differs between them.
struct Breakdown {
    /// How many labels one key keeps apart.
    max_per_key: usize,
    /// The label of the rest.
    other: &'static str,
}

const PER_MODEL: Breakdown = Breakdown {
    max_per_key: MAX_MODELS_PER_KEY,
    other: OTHER_MODEL,
};
const PER_END_USER: Breakdown = Breakdown {
    max_per_key: MAX_END_USERS_PER_KEY,
    other: OTHER_END_USER,
};

/// Per key, the labels of one breakdown this process has seen committed: a batch naming
/// only these adds no label, so it needs no look at the table to keep within the
/// bound. Labels are never removed, so they stay true.
#[derive(Debug)]
struct KnownLabels {
    per_key: HashMap<String, HashSet<String>>,
    /// Labels over all keys.
    count: usize,
    /// At most this many are kept; past it, all are forgotten and read again.
    limit: usize,
}

impl KnownLabels {
    fn new(limit: usize) -> Self {
        Self {
            per_key: HashMap::new(),
            count: 0,
            limit,
        }
    }

    fn knows_all<'l>(&self, key_id: &str, mut labels: impl Iterator<Item = &'l String>) -> bool {
        self.per_key
            .get(key_id)
            .is_some_and(|known| labels.all(|l| known.contains(l)))
    }

    fn remember(&mut self, key_id: &str, labels: HashSet<String>) {
        let before = self.per_key.get(key_id).map_or(0, HashSet::len);
        if self.count - before + labels.len() > self.limit {
            self.per_key.clear();
            self.count = 0;
        } else {
            self.count -= before;
        }
        self.count += labels.len();
        self.per_key.insert(key_id.to_owned(), labels);
    }
}

/// Keys, usage and model settings in a SQL database, whichever the driver: the logic
/// both SQL backends share. Request rows name their key, method, path and model by id, from the table
/// `usage_names`: a row and its index entry are a fraction of the size, and writing a row
/// binds no text.
pub(super) struct SqlStore<DB: Database> {
    pub(super) pool: Pool<DB>,
    sql: &'static Statements,
    /// The ids of names in `usage_names` that this process has seen committed. Names are
    /// never renumbered or removed, so an id stays true for every process sharing the
    /// database.
    pub(super) names: Arc<Mutex<HashMap<String, i64>>>,
    /// At most this many are kept ([`MAX_REMEMBERED_NAMES`]; smaller in tests).
    pub(super) names_limit: usize,
    /// The labels of `usage_models` this process has seen committed.
    model_labels: Arc<Mutex<KnownLabels>>,
    /// The labels of `usage_end_users` this process has seen committed.
    user_labels: Arc<Mutex<KnownLabels>>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            sql: self.sql,
            names: self.names.clone(),
            names_limit: self.names_limit,
            model_labels: self.model_labels.clone(),
            user_labels: self.user_labels.clone(),
        }
    }
}

impl<DB: Database> std::fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl<DB> SqlStore<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> &'r str: ColumnIndex<DB::Row>,
{
    /// A store on a migrated database.
    pub(super) fn new(pool: Pool<DB>, sql: &'static Statements) -> Self {
        Self {
            pool,
            sql,
            names: Arc::default(),
            names_limit: MAX_REMEMBERED_NAMES,
            model_labels: Arc::new(Mutex::new(KnownLabels::new(MAX_REMEMBERED_MODEL_LABELS))),
            user_labels: Arc::new(Mutex::new(KnownLabels::new(MAX_REMEMBERED_USER_LABELS))),
        }
    }

    pub(super) async fn insert_key(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
    ) -> Result<(), StorageError> {
        sqlx::query(&self.sql.insert_key)
            .bind(record.id.as_str())
            .bind(record.name.as_str())
            .bind(record.role.as_str())
            .bind(record.prefix.as_str())
            .bind(&hash.0[..])
            .bind(millis(record.created_at))
            .bind(record.expires_at.map(millis))
            .bind(record.revoked_at.map(millis))
            .bind(limits_text(&record.limits).as_deref())
            .execute(&self.pool)
            .await
            .map_err(|e| name_conflict(e, &record.name))?;
        Ok(())
    }

    pub(super) async fn key_by_hash(
        &self,
        hash: &KeyHash,
    ) -> Result<Option<KeyRecord>, StorageError> {
        let row = sqlx::query(&self.sql.key_by_hash)
            .bind(&hash.0[..])
            .bind(&hash.0[..])
            .bind(&hash.0[..])
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut key = key_from_row(&row)?;
        // Found by its previous secret: that one works until its grace ends.
        if let Some(until) = time(get(&row, "previous_valid_until")?)? {
            key.expires_at = Some(key.expires_at.map_or(until, |at| at.min(until)));
        }
        Ok(Some(key))
    }

    /// A compare-and-swap on the key's limits, so that it holds between processes
    /// sharing the database as well: each try reads the limits, applies the patch and
    /// writes only if they are still what it read; when another writer changed them in
    /// between, it tries again on theirs. A try is lost only to another writer's
    /// success, so it gives up only when [`MAX_LIMITS_TRIES`] other changes of the key's
    /// limits land while it tries.
    pub(super) async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError> {
        let flag = |set: bool| i64::from(set);
        let patches_limits = !update.limits.is_empty();
        for _ in 0..MAX_LIMITS_TRIES {
            let (before, after) = if patches_limits {
                let row = sqlx::query(&self.sql.key_limits)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                let before: Option<String> = get(&row, "limits")?;
                let mut limits = limits_from_text(before.clone())?;
                update.limits.apply(&mut limits);
                (before, limits_text(&limits))
            } else {
                (None, None)
            };
            let row = sqlx::query(&self.sql.update_key)
                .bind(update.name.as_deref())
                .bind(flag(update.expires_at.is_some()))
                .bind(update.expires_at.flatten().map(millis))
                .bind(flag(patches_limits))
                .bind(after.as_deref())
                .bind(id)
                .bind(flag(patches_limits))
                .bind(before.as_deref())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| name_conflict(e, update.name.as_deref().unwrap_or_default()))?;
            match row {
                Some(row) => return key_from_row(&row).map(Some),
                // No active key with this id.
                None if !patches_limits => return Ok(None),
                // Revoked, or its limits changed since they were read: read again.
                None => continue,
            }
        }
        Err(StorageError::Database(
            format!("the limits of key {id} changed under {MAX_LIMITS_TRIES} tries to change them")
                .into(),
        ))
    }

    pub(super) async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let rotated = sqlx::query(&self.sql.rotate_key)
            .bind(millis(old_valid_until))
            .bind(&new_hash.0[..])
            .bind(new_prefix)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(rotated.is_some())
    }

    pub(super) async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        let rows = sqlx::query(&self.sql.list_keys)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub(super) async fn revoke_key(
        &self,
        id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let revoked = sqlx::query(&self.sql.revoke_key)
            .bind(millis(at))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(revoked.is_some())
    }

    pub(super) async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
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
        for (sql, rows) in self.sql.inserts.runs(batch) {
            let query = rows.iter().fold(sqlx::query(sql), |query, r| {
                // Every name of the batch has an id (`name_ids`).
                let [key, method, path, model, end_user] = row_names(r).map(|(column, name)| {
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
                    .bind(end_user)
            });
            query.execute(&mut *tx).await?;
        }
        // Keys in order (a BTreeMap), so that two writers never wait on each other's rows.
        let (mut new_models, mut new_users) = (Vec::new(), Vec::new());
        for (key_id, t) in &per_key {
            sqlx::query(&self.sql.upserts.totals)
                .bind(*key_id)
                .bind(to_i64(t.requests))
                .bind(to_i64(t.prompt_tokens))
                .bind(to_i64(t.completion_tokens))
                .bind(to_i64(t.requests_without_usage))
                .bind(t.last_request_at.map(millis))
                .execute(&mut *tx)
                .await?;
            for (path, n) in &t.endpoints {
                sqlx::query(&self.sql.upserts.endpoints)
                    .bind(*key_id)
                    .bind(path.as_str())
                    .bind(to_i64(*n))
                    .execute(&mut *tx)
                    .await?;
            }
            for (breakdown, known, upsert, names, batch, new) in [
                (
                    &PER_MODEL,
                    &self.model_labels,
                    &self.sql.upserts.models,
                    &self.sql.key_model_names,
                    &t.models,
                    &mut new_models,
                ),
                (
                    &PER_END_USER,
                    &self.user_labels,
                    &self.sql.upserts.users,
                    &self.sql.key_user_names,
                    &t.users,
                    &mut new_users,
                ),
            ] {
                if batch.is_empty() {
                    continue;
                }
                let (shares, labels) = self
                    .key_labels(&mut tx, key_id, batch, breakdown, known, names)
                    .await?;
                for (label, usage) in &shares {
                    sqlx::query(upsert)
                        .bind(*key_id)
                        .bind(*label)
                        .bind(to_i64(usage.requests))
                        .bind(to_i64(usage.prompt_tokens))
                        .bind(to_i64(usage.completion_tokens))
                        .bind(to_i64(usage.requests_without_usage))
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(labels) = labels {
                    new.push((*key_id, labels));
                }
            }
        }
        tx.commit().await?;
        for (known, new) in [
            (&self.model_labels, new_models),
            (&self.user_labels, new_users),
        ] {
            if !new.is_empty() {
                let mut known = known.lock().expect("labels lock");
                for (key_id, labels) in new {
                    known.remember(key_id, labels);
                }
            }
        }
        // Only committed ids are remembered: a rolled-back name may get another id.
        let mut names = self.names.lock().expect("names lock");
        if names.len() + fresh.len() > self.names_limit {
            // Clients can make up paths without end; forgotten ids are read again.
            names.clear();
        }
        names.extend(fresh);
        Ok(())
    }

    /// A batch's usage per label (model, end user) for one key, as it is to be added to
    /// its table: labels the key has not used yet count under the breakdown's `other`
    /// once it has as many as the bound (as [`UsageTotals::add`] does). With the key's
    /// labels after the batch when they had to be read (`names` reads them; to
    /// remember once the transaction commits).
    async fn key_labels<'m>(
        &self,
        tx: &mut DB::Connection,
        key_id: &str,
        batch: &'m BTreeMap<String, ModelUsage>,
        breakdown: &Breakdown,
        known: &Mutex<KnownLabels>,
        names: &str,
    ) -> Result<(BTreeMap<&'m str, ModelUsage>, Option<HashSet<String>>), StorageError> {
        if known
            .lock()
            .expect("labels lock")
            .knows_all(key_id, batch.keys())
        {
            return Ok((batch.iter().map(|(m, u)| (m.as_str(), *u)).collect(), None));
        }
        let rows = sqlx::query(names).bind(key_id).fetch_all(&mut *tx).await?;
        let mut labels = rows
            .iter()
            .map(|row| get::<_, String>(row, "model"))
            .collect::<Result<HashSet<_>, _>>()?;
        let mut shares: BTreeMap<&str, ModelUsage> = BTreeMap::new();
        for (label, usage) in batch {
            let label = if labels.len() >= breakdown.max_per_key && !labels.contains(label) {
                breakdown.other
            } else {
                label.as_str()
            };
            labels.insert(label.to_owned());
            shares.entry(label).or_default().merge(usage);
        }
        Ok((shares, Some(labels)))
    }

    /// The id of every name the batch uses, and those of them this process had not seen
    /// (to remember once the transaction commits). A name new to the database is added.
    async fn name_ids<'b>(
        &self,
        tx: &mut DB::Connection,
        batch: &'b [RequestRecord],
    ) -> Result<(NameIds<'b>, Vec<(String, i64)>), StorageError> {
        let mut ids = NameIds::default();
        let mut missing = BTreeSet::new();
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
        // In order (a BTreeSet): two writers adding the same new names never wait on
        // each other in a circle.
        for name in missing {
            sqlx::query(&self.sql.insert_name)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(&self.sql.name_id)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            let id: i64 = get(&row, "id")?;
            ids.insert(name, id);
            fresh.push((name.to_owned(), id));
        }
        Ok((ids, fresh))
    }

    pub(super) async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        let mut all = BTreeMap::new();
        let rows = sqlx::query(&self.sql.all_totals)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            all.insert(get::<_, String>(row, "key_id")?, totals_from_row(row)?);
        }
        let rows = sqlx::query(&self.sql.all_endpoints)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let key_id: String = get(row, "key_id")?;
            if let Some(t) = all.get_mut(&key_id) {
                t.endpoints
                    .insert(get(row, "path")?, count(get(row, "requests")?));
            }
        }
        let rows = sqlx::query(&self.sql.all_models)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let key_id: String = get(row, "key_id")?;
            if let Some(t) = all.get_mut(&key_id) {
                let (model, usage) = model_from_row(row)?;
                t.models.insert(model, usage);
            }
        }
        let rows = sqlx::query(&self.sql.all_users)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let key_id: String = get(row, "key_id")?;
            if let Some(t) = all.get_mut(&key_id) {
                let (user, usage) = model_from_row(row)?;
                t.users.insert(user, usage);
            }
        }
        Ok(all)
    }

    pub(super) async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        let row = sqlx::query(&self.sql.key_totals)
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(UsageTotals::default());
        };
        let mut totals = totals_from_row(&row)?;
        let rows = sqlx::query(&self.sql.key_endpoints)
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            totals
                .endpoints
                .insert(get(row, "path")?, count(get(row, "requests")?));
        }
        let rows = sqlx::query(&self.sql.key_models)
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let (model, usage) = model_from_row(row)?;
            totals.models.insert(model, usage);
        }
        let rows = sqlx::query(&self.sql.key_users)
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            let (user, usage) = model_from_row(row)?;
            totals.users.insert(user, usage);
        }
        Ok(totals)
    }

    pub(super) async fn tokens_since(
        &self,
        key_id: &str,
        end_user: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let sql = match end_user {
            None => &self.sql.tokens_since,
            Some(_) => &self.sql.user_tokens_since,
        };
        let end_user = end_user.map(stored_end_user);
        let mut query = sqlx::query(sql).bind(key_id).bind(millis(since));
        if let Some(end_user) = &end_user {
            query = query.bind(end_user.as_ref());
        }
        let row = query.fetch_one(&self.pool).await?;
        Ok(count(get(&row, "tokens")?))
    }

    pub(super) async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError> {
        let rows = sqlx::query(&self.sql.stored_models)
            .fetch_all(&self.pool)
            .await?;
        let mut models = rows
            .iter()
            .map(stored_model_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // In Rust, not SQL: PostgreSQL would order by the database's collation.
        models.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(models)
    }

    pub(super) async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError> {
        let model = model.normalized()?;
        sqlx::query(&self.sql.store_model)
            .bind(model.name.as_str())
            .bind(model.settings.as_deref())
            .bind(millis(model.updated_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError> {
        let rows = sqlx::query(&self.sql.requests)
            .bind(key_id)
            .bind(since.map(millis).unwrap_or(i64::MIN))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(request_from_row).collect()
    }
}

/// A request row's names, by column of `usage_rows`: key, method, path, model, end user.
fn row_names(r: &RequestRecord) -> [(usize, Option<&str>); 5] {
    [
        (0, Some(r.key_id.as_str())),
        (1, Some(r.method.as_str())),
        (2, Some(r.path.as_str())),
        (3, r.model.as_deref()),
        (4, r.end_user.as_deref()),
    ]
}

/// The ids of a batch's names. Consecutive rows mostly repeat a column's name, so each
/// column remembers its last one before looking in the map.
#[derive(Default)]
struct NameIds<'b> {
    all: HashMap<&'b str, i64>,
    last: [Option<(&'b str, i64)>; 5],
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

/// A database as an older llmgate left it, for the tests of the migration that fills
/// `usage_models` from the request rows: the same SQL for both backends.
#[cfg(test)]
pub(super) mod before_usage_models {
    use super::ModelUsage;

    /// A request row: key, model, prompt tokens, completion tokens (NULL as `None`).
    type Row = (&'static str, Option<String>, Option<i64>, Option<i64>);

    fn rows() -> Vec<Row> {
        let mut rows = vec![
            ("k1", Some("chat".to_owned()), Some(10), Some(5)),
            ("k1", Some("chat".to_owned()), None, Some(3)),
            // Counts no request can have, as an old overflow left them: unknown.
            ("k1", Some("chat".to_owned()), Some(-1), Some(2)),
            ("k1", Some("coder".to_owned()), Some(2_000_000_000), Some(4)),
            ("k1", None, Some(1), Some(1)),
            ("k1", Some(String::new()), Some(2), Some(2)),
            ("k2", Some("chat".to_owned()), Some(1), Some(1)),
        ];
        // 102 models on one key: the two least used count as `other`.
        for i in 0..102 {
            let times = if i < 100 { 2 } else { 1 };
            for _ in 0..times {
                rows.push(("k3", Some(format!("m{i:03}")), Some(1), Some(0)));
            }
        }
        rows
    }

    /// The statements that write the rows (and totals for their keys).
    pub(in crate::storage) fn statements() -> Vec<String> {
        let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let number = |n: Option<i64>| n.map_or("NULL".to_owned(), |n| n.to_string());
        let mut out = Vec::new();
        let mut names: Vec<String> = vec!["k1", "k2", "k3", "POST", "/v1/chat/completions"]
            .into_iter()
            .map(String::from)
            .collect();
        for (_, model, _, _) in rows() {
            if let Some(model) = model {
                if !names.contains(&model) {
                    names.push(model);
                }
            }
        }
        for name in &names {
            out.push(format!(
                "INSERT INTO usage_names (name) VALUES ({})",
                literal(name)
            ));
        }
        let id = |name: &str| {
            format!(
                "(SELECT id FROM usage_names WHERE name = {})",
                literal(name)
            )
        };
        for (i, (key, model, prompt, completion)) in rows().into_iter().enumerate() {
            out.push(format!(
                "INSERT INTO usage_rows (at, key, method, path, model, status, prompt_tokens, \
                 completion_tokens, latency_ms, first_byte_ms) \
                 VALUES ({}, {}, {}, {}, {}, 200, {}, {}, 5, NULL)",
                1_000 + i,
                id(key),
                id("POST"),
                id("/v1/chat/completions"),
                model.as_deref().map_or("NULL".to_owned(), id),
                number(prompt),
                number(completion),
            ));
        }
        for key in ["k1", "k2", "k3"] {
            out.push(format!(
                "INSERT INTO usage_totals VALUES ({}, 1, 1, 1, 0, 1000)",
                literal(key)
            ));
        }
        out
    }

    fn usage(requests: u64, prompt: u64, completion: u64, without: u64) -> ModelUsage {
        ModelUsage {
            requests,
            prompt_tokens: prompt,
            completion_tokens: completion,
            requests_without_usage: without,
        }
    }

    /// What an upgraded `store` must show: the rows above split by model as
    /// [`expected`] says, and new requests added to that (a key at the bound counting a new
    /// model under `other`). The same checks for every backend.
    pub(in crate::storage) async fn check(store: &dyn crate::storage::UsageStore) {
        let all = store.totals().await.unwrap();
        for (key, model, usage) in expected() {
            assert_eq!(all[key].models.get(model), Some(&usage), "{key} {model}");
        }
        assert_eq!(all["k1"].models.len(), 3);
        assert_eq!(all["k3"].models.len(), 101);
        assert_eq!(store.totals_for_key("k3").await.unwrap(), all["k3"]);
        let request = |key: &str, model: &str, at_ms: i64| crate::storage::RequestRecord {
            at: chrono::DateTime::from_timestamp_millis(at_ms).unwrap(),
            key_id: key.into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: Some(model.into()),
            status: 200,
            prompt_tokens: Some(3),
            completion_tokens: None,
            latency_ms: 7,
            first_byte_ms: Some(2),
            end_user: None,
        };
        store
            .record(&[request("k1", "chat", 9_000), request("k3", "new", 9_001)])
            .await
            .unwrap();
        let k1 = store.totals_for_key("k1").await.unwrap();
        assert_eq!(
            (k1.models["chat"].requests, k1.models["chat"].prompt_tokens),
            (4, 13)
        );
        let k3 = store.totals_for_key("k3").await.unwrap();
        assert_eq!(k3.models.len(), 101);
        assert_eq!(k3.models["other"].requests, 3);
    }

    /// What the migration makes of them: (key, model, usage), for a few.
    pub(in crate::storage) fn expected() -> Vec<(&'static str, &'static str, ModelUsage)> {
        vec![
            ("k1", "chat", usage(3, 10, 10, 2)),
            ("k1", "coder", usage(1, 0, 4, 1)),
            ("k1", "none", usage(2, 3, 3, 0)),
            ("k2", "chat", usage(1, 1, 1, 0)),
            ("k3", "m000", usage(2, 2, 0, 0)),
            ("k3", "m099", usage(2, 2, 0, 0)),
            ("k3", "other", usage(2, 2, 0, 0)),
        ]
    }
}

/// A database as llmgate left it before fair use (keys without limits or a previous
/// secret, request rows without end users), for the tests of its migration: the checks
/// every SQL backend's upgraded database must pass. The rows are
/// [`before_usage_models`]'s.
#[cfg(test)]
pub(super) mod before_fair_use {
    use chrono::{DateTime, Duration};

    use crate::auth::{now_millis, KeyRecord, Secret};
    use crate::limits::KeyLimits;
    use crate::storage::{KeyStore, KeyUpdate, LimitsPatch, RequestRecord, UsageStore};

    /// `key`, stored before the upgrade under `secret`, and the rows of
    /// [`before_usage_models`](super::before_usage_models) read back as they were,
    /// without end users, and work as new ones do.
    pub(in crate::storage) async fn check<S: KeyStore + UsageStore>(
        store: &S,
        secret: &Secret,
        key: &KeyRecord,
    ) {
        assert!(key.limits.is_empty());
        assert_eq!(
            store.key_by_hash(&secret.hash()).await.unwrap().as_ref(),
            Some(key)
        );
        assert_eq!(store.list_keys().await.unwrap(), std::slice::from_ref(key));
        let rows = store.requests("k1", None, 100).await.unwrap();
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r.end_user.is_none()));
        assert!(store
            .totals()
            .await
            .unwrap()
            .values()
            .all(|t| t.users.is_empty()));

        // Quota sums over the old rows: counts no request can have add nothing.
        let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap();
        assert_eq!(store.tokens_since("k1", None, at(0)).await.unwrap(), 30);
        assert_eq!(store.tokens_since("k1", None, at(1_003)).await.unwrap(), 10);
        assert_eq!(store.tokens_since("k3", None, at(0)).await.unwrap(), 202);
        assert_eq!(
            store
                .tokens_since("k1", Some("alice"), at(0))
                .await
                .unwrap(),
            0
        );

        // The old key takes limits and a new secret.
        let limits = KeyLimits {
            rpm: Some(5),
            ..KeyLimits::default()
        };
        let update = KeyUpdate {
            limits: LimitsPatch::replacing(limits.clone()),
            ..KeyUpdate::default()
        };
        let updated = store.update_key(&key.id, &update).await.unwrap().unwrap();
        assert_eq!(updated.limits, limits);
        let new = Secret::generate();
        let grace = now_millis() + Duration::minutes(1);
        assert!(store
            .rotate_key(&key.id, &new.hash(), &new.public_prefix(), grace)
            .await
            .unwrap());
        assert_eq!(
            store
                .key_by_hash(&new.hash())
                .await
                .unwrap()
                .unwrap()
                .limits,
            limits
        );
        let old = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
        assert_eq!(
            (old.id.as_str(), old.expires_at),
            (key.id.as_str(), Some(grace))
        );

        // New rows keep their end user beside the old ones.
        let request = RequestRecord {
            at: at(9_000),
            key_id: "k1".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: Some("chat".into()),
            status: 200,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            latency_ms: 7,
            first_byte_ms: None,
            end_user: Some("alice".into()),
        };
        store.record(std::slice::from_ref(&request)).await.unwrap();
        let k1 = store.totals_for_key("k1").await.unwrap();
        assert_eq!(k1.users["alice"].total_tokens(), 7);
        assert_eq!(k1.users.len(), 1);
        assert_eq!(
            store
                .tokens_since("k1", Some("alice"), at(0))
                .await
                .unwrap(),
            7
        );
        assert_eq!(store.tokens_since("k1", None, at(0)).await.unwrap(), 37);
        assert_eq!(store.requests("k1", None, 1).await.unwrap(), [request]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_in_runs_of_the_fixed_sizes() {
        let inserts = RequestInserts::for_table("usage_rows", ROW_COLUMNS, |n| format!("${n}"));
        let rows: Vec<u32> = (0..150).collect();
        let runs: Vec<usize> = inserts.runs(&rows).map(|(_, run)| run.len()).collect();
        assert_eq!(runs, [64, 64, 16, 4, 1, 1]);
        assert_eq!(runs.iter().sum::<usize>(), 150);
        let (sql, _) = inserts.runs(&rows[..1]).next().unwrap();
        assert_eq!(
            sql,
            "INSERT INTO usage_rows (at, key, method, path, model, status, prompt_tokens, \
             completion_tokens, latency_ms, first_byte_ms, end_user) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        let (sql, _) = inserts.runs(&rows[..4]).next().unwrap();
        assert!(sql.ends_with("($34, $35, $36, $37, $38, $39, $40, $41, $42, $43, $44)"));
    }
}
