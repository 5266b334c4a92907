//! What the SQL backends share: error mapping, how times and counts are stored
//! (milliseconds and tokens as 64-bit integers), and reading rows back. Only the SQL
//! text differs between SQLite and PostgreSQL.
//!
//! Counts go in as at most `i64::MAX` ([`to_i64`]), running totals stop there
//! ([`saturating_sum`]) rather than overflow, and whatever is read back is clamped, so
//! one odd value cannot make every read of usage fail.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::{ColumnIndex, Database, Decode, Encode, Row, Type};

use super::{RequestRecord, StorageError, UsageTotals, MAX_TOKENS_PER_REQUEST};
use crate::auth::{KeyRecord, Role};

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
pub(super) const KEY_COLUMNS: &str = "id, name, role, prefix, created_at, expires_at, revoked_at";

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
    })
}

/// From `requests, prompt_tokens, completion_tokens, requests_without_usage,
/// last_request_at`; endpoints are read separately.
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
    })
}

/// The columns [`request_from_row`] reads, in the order [`bind_request`] binds them.
pub(super) const REQUEST_COLUMNS: &str =
    "at, key_id, method, path, model, status, prompt_tokens, completion_tokens, latency_ms, first_byte_ms";

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
    })
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StorageError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StorageError::Conflict("an active key with this name already exists".into())
            }
            sqlx::Error::Database(db) if refuses_content(db.as_ref()) => {
                StorageError::Rejected(err.to_string())
            }
            sqlx::Error::Encode(_) => StorageError::Rejected(err.to_string()),
            // Connections, I/O, timeouts, a busy or closed database: may pass on a retry.
            _ => StorageError::Database(err.to_string()),
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
        Self { totals, endpoints }
    }
}

/// Rows per multi-row insert of request rows. Only these sizes, so that each statement
/// is parsed once and then found in the connection's statement cache: a batch of any
/// other size would be parsed anew, which costs more than writing its rows.
const INSERT_SIZES: [usize; 4] = [64, 16, 4, 1];

/// The multi-row inserts of request rows for one backend, built once.
pub(super) struct RequestInserts([String; INSERT_SIZES.len()]);

impl RequestInserts {
    /// Inserts into `usage_requests` (`REQUEST_COLUMNS`); `placeholder(n)` writes the
    /// n-th (from 1) parameter: `?` or `$n`.
    pub(super) fn new(placeholder: impl Fn(usize) -> String) -> Self {
        Self::for_table("usage_requests", REQUEST_COLUMNS, placeholder)
    }

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

/// Binds one request row's values, in the order of `REQUEST_COLUMNS`.
pub(super) fn bind_request<'q, DB>(
    query: Query<'q, DB, <DB as Database>::Arguments<'q>>,
    r: &'q RequestRecord,
) -> Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
{
    query
        .bind(millis(r.at))
        .bind(r.key_id.as_str())
        .bind(r.method.as_str())
        .bind(r.path.as_str())
        .bind(r.model.as_deref())
        .bind(i64::from(r.status))
        .bind(r.prompt_tokens.map(to_i64))
        .bind(r.completion_tokens.map(to_i64))
        .bind(to_i64(r.latency_ms))
        .bind(r.first_byte_ms.map(to_i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_written_in_runs_of_the_fixed_sizes() {
        let inserts = RequestInserts::new(|n| format!("${n}"));
        let rows: Vec<u32> = (0..150).collect();
        let runs: Vec<usize> = inserts.runs(&rows).map(|(_, run)| run.len()).collect();
        assert_eq!(runs, [64, 64, 16, 4, 1, 1]);
        assert_eq!(runs.iter().sum::<usize>(), 150);
        let (sql, _) = inserts.runs(&rows[..1]).next().unwrap();
        assert_eq!(
            sql,
            "INSERT INTO usage_requests (at, key_id, method, path, model, status, prompt_tokens, \
             completion_tokens, latency_ms, first_byte_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        );
        let (sql, _) = inserts.runs(&rows[..4]).next().unwrap();
        assert!(sql.ends_with("($31, $32, $33, $34, $35, $36, $37, $38, $39, $40)"));
    }
}
