//! What the SQL backends share: error mapping, how times and counts are stored
//! (milliseconds and tokens as 64-bit integers), and reading rows back. Only the SQL
//! text differs between SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{RequestRecord, StorageError, UsageTotals};
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

fn count(value: i64) -> u64 {
    value.max(0) as u64
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

/// The columns [`request_from_row`] reads.
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
        status: get::<_, i64>(row, "status")? as u16,
        prompt_tokens: tokens(get(row, "prompt_tokens")?),
        completion_tokens: tokens(get(row, "completion_tokens")?),
        latency_ms: count(get(row, "latency_ms")?),
        first_byte_ms: tokens(get(row, "first_byte_ms")?),
    })
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StorageError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StorageError::Conflict("an active key with this name already exists".into())
            }
            _ => StorageError::Database(err.to_string()),
        }
    }
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

pub(super) fn tokens(value: Option<i64>) -> Option<u64> {
    value.map(|v| v.max(0) as u64)
}
