//! `/admin/keys`: create, list, revoke.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use llmgate_core::auth::{now_millis, KeyRecord, Role, Secret};
use llmgate_core::error::ApiError;
use serde::{Deserialize, Serialize};

use super::HandlerError;
use crate::app::AppState;

/// A key as listed (never with its secret).
#[derive(Debug, Serialize)]
pub struct KeyView {
    id: String,
    name: String,
    role: Role,
    prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

/// `GET /admin/keys`
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<KeyView>>, HandlerError> {
    state.recorder.flush().await;
    let mut totals = state.usage.totals().await?;
    let keys = state.keys.store().list_keys().await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| KeyView {
                last_used_at: totals.remove(&k.id).and_then(|t| t.last_request_at),
                id: k.id,
                name: k.name,
                role: k.role,
                prefix: k.prefix,
                created_at: k.created_at,
                expires_at: k.expires_at,
                revoked_at: k.revoked_at,
            })
            .collect(),
    ))
}

/// The body of `POST /admin/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    #[serde(default)]
    role: Role,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// A new key, with its secret: shown this once.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    id: String,
    name: String,
    role: Role,
    prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    key: String,
}

/// Checks a key name: what people type to find a key again.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ' '))
        && !name.starts_with("key_")
        && name.trim() == name;
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "A key name is 1 to 64 letters, digits, spaces or - _ . @, without spaces at either end, and does not start with 'key_'.",
        ))
    }
}

/// `POST /admin/keys`
pub async fn create(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedKey>), HandlerError> {
    let request: CreateKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "The body must be JSON like {{\"name\": \"alice\", \"role\": \"user\"}}: {e}"
        ))
    })?;
    validate_name(&request.name)?;
    if request.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(ApiError::bad_request("expires_at is in the past.").into());
    }
    let secret = Secret::generate();
    let mut record = KeyRecord::new(request.name, request.role, &secret);
    record.expires_at = request.expires_at;
    state
        .keys
        .store()
        .insert_key(&record, &secret.hash())
        .await?;
    // An unknown-key answer for this secret may be cached: forget it.
    state.keys.forget_hash(&secret.hash());
    tracing::info!(key_id = %record.id, name = %record.name, role = record.role.as_str(), "key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: record.id,
            name: record.name,
            role: record.role,
            prefix: record.prefix,
            created_at: record.created_at,
            expires_at: record.expires_at,
            key: secret.expose().to_owned(),
        }),
    ))
}

/// `DELETE /admin/keys/{key_id}`: revokes; refused from the very next request.
pub async fn revoke(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<serde_json::Value>, HandlerError> {
    let revoked = state.keys.store().revoke_key(&key_id, now_millis()).await?;
    state.keys.forget_key(&key_id);
    if !revoked {
        return Err(ApiError::not_found(format!("No active key with id '{key_id}'.")).into());
    }
    tracing::info!(%key_id, "key revoked");
    Ok(Json(serde_json::json!({"id": key_id, "revoked": true})))
}
