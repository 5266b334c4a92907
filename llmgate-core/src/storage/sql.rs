//! What the SQL backends share: error mapping and how times and counts are stored
//! (milliseconds and tokens as 64-bit integers).

use chrono::{DateTime, Utc};

use super::StorageError;

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
