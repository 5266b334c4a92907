//! Usage: `/admin/usage…` for admins, `/v1/me/usage` for any key.

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use llmgate_core::auth::Caller;
use llmgate_core::error::ApiError;
use llmgate_core::limits::LimitStatus;
use llmgate_core::storage::RequestRecord;
use llmgate_core::usage::{usage_report, KeyUsage, RejectedRecord};
use serde::{Deserialize, Serialize};

use super::keys::{caller_key, MeQuery};
use super::HandlerError;
use crate::app::AppState;

/// `GET /admin/usage`: every key's totals.
pub async fn all(State(state): State<AppState>) -> Result<Json<Vec<KeyUsage>>, HandlerError> {
    state.recorder.flush().await;
    Ok(Json(
        usage_report(state.keys.store().as_ref(), state.usage.as_ref()).await?,
    ))
}

async fn usage_of(state: &AppState, key_id: &str) -> Result<KeyUsage, HandlerError> {
    state.recorder.flush().await;
    let keys = state.keys.store().list_keys().await?;
    let key = keys
        .iter()
        .find(|k| k.id == key_id)
        .ok_or_else(|| ApiError::not_found(format!("No key with id '{key_id}'.")))?;
    Ok(KeyUsage::new(
        key,
        state.usage.totals_for_key(key_id).await?,
    ))
}

/// `GET /admin/usage/{key_id}`
pub async fn one(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<KeyUsage>, HandlerError> {
    Ok(Json(usage_of(&state, &key_id).await?))
}

/// What `GET /v1/me/usage` answers: the key's totals and its limits, with what is left.
#[derive(Debug, Serialize)]
pub struct MeUsage {
    #[serde(flatten)]
    usage: KeyUsage,
    limits: LimitStatus,
}

/// `GET /v1/me/usage[?user=NAME]`: the caller's own totals, and its limits.
pub async fn me(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<MeQuery>,
) -> Result<Json<MeUsage>, HandlerError> {
    let usage = usage_of(&state, &caller.key_id).await?;
    let key = caller_key(&state, &caller).await?;
    let limits = state.limiter.status(&key, query.end_user()).await;
    Ok(Json(MeUsage { usage, limits }))
}

/// Query of `GET /admin/usage/{key_id}/requests`.
#[derive(Debug, Deserialize)]
pub struct RequestsQuery {
    since: Option<String>,
    limit: Option<String>,
}

/// `GET /admin/usage/{key_id}/requests?since=&limit=`: one row per request, newest first.
pub async fn requests(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
    Query(query): Query<RequestsQuery>,
) -> Result<Json<Vec<RequestRecord>>, HandlerError> {
    let since = query.since.as_deref().map(parse_since).transpose()?;
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("limit must be a whole number from 1 to 10000.")
            })?,
    };
    usage_of(&state, &key_id).await?;
    Ok(Json(state.usage.requests(&key_id, since, limit).await?))
}

/// `GET /admin/usage/rejected`: usage records the database refused for what they hold
/// (newest last, at most `MAX_REJECTED_SHOWN`), each with the database's reason. They
/// are in no total.
pub async fn rejected(
    State(state): State<AppState>,
) -> Result<Json<Vec<RejectedRecord>>, HandlerError> {
    state.recorder.flush().await;
    let rejected = state.recorder.rejected().await.map_err(|err| {
        tracing::error!(error = %err, "cannot read the rejected usage records");
        ApiError::internal()
    })?;
    Ok(Json(rejected))
}

/// Why a `since` parameter was refused; its text is the 400's message.
#[derive(Debug, thiserror::Error)]
enum SinceError {
    /// Unix seconds outside the times chrono can hold.
    #[error("since={0} is out of range.")]
    OutOfRange(String),
    /// Neither Unix seconds nor RFC 3339.
    #[error("since must be a time like 2026-11-26T10:00:00Z or Unix seconds, not '{raw}'.")]
    NotATime {
        raw: String,
        #[source]
        source: chrono::ParseError,
    },
}

impl From<SinceError> for HandlerError {
    fn from(err: SinceError) -> Self {
        Self(ApiError::bad_request(err.to_string()))
    }
}

/// `since` as RFC 3339 (`2026-11-26T10:00:00Z`) or Unix seconds.
fn parse_since(raw: &str) -> Result<DateTime<Utc>, SinceError> {
    if let Ok(secs) = raw.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| SinceError::OutOfRange(raw.to_owned()));
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|source| SinceError::NotATime {
            raw: raw.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_and_unix_seconds() {
        assert_eq!(
            parse_since("1700000000").unwrap().timestamp(),
            1_700_000_000
        );
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z").unwrap().timestamp(),
            1_700_000_000
        );
        let not_a_time = parse_since("yesterday").unwrap_err();
        assert!(matches!(not_a_time, SinceError::NotATime { .. }));
        assert_eq!(
            not_a_time.to_string(),
            "since must be a time like 2026-11-26T10:00:00Z or Unix seconds, not 'yesterday'."
        );
        let out_of_range = parse_since("99999999999999999").unwrap_err();
        assert!(matches!(out_of_range, SinceError::OutOfRange(_)));
        assert_eq!(
            out_of_range.to_string(),
            "since=99999999999999999 is out of range."
        );
    }
}
