//! `/admin/keys`: create, list, change, rotate, revoke; `/v1/me`: the caller's own key.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Duration, Utc};
use llmgate_core::auth::{now_millis, Caller, KeyRecord, Role, Secret};
use llmgate_core::error::ApiError;
use llmgate_core::limits::{KeyLimits, LimitStatus};
use llmgate_core::storage::{KeyUpdate, LimitField, LimitsPatch, MAX_END_USER_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::HandlerError;
use crate::app::AppState;

/// A key as listed (never with its secret), with its own limits as flat fields (those it
/// does not set fall back to `[key_defaults]` for a user key).
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
    #[serde(flatten)]
    limits: KeyLimits,
}

impl KeyView {
    fn new(key: KeyRecord, last_used_at: Option<DateTime<Utc>>) -> Self {
        Self {
            id: key.id,
            name: key.name,
            role: key.role,
            prefix: key.prefix,
            created_at: key.created_at,
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
            last_used_at,
            limits: key.limits,
        }
    }
}

/// `GET /admin/keys`
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<KeyView>>, HandlerError> {
    state.recorder.flush().await;
    let mut totals = state.usage.totals().await?;
    let keys = state.keys.store().list_keys().await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| {
                let last_used = totals.remove(&k.id).and_then(|t| t.last_request_at);
                KeyView::new(k, last_used)
            })
            .collect(),
    ))
}

/// The limit fields a key's body may have next to `name`, `role` and `expires_at`: every
/// field of [`KeyLimits`].
pub const LIMIT_FIELDS: [&str; 9] = [
    "models",
    "rpm",
    "tpm",
    "max_parallel",
    "quota_tokens",
    "quota_period",
    "weight",
    "per_user_rpm",
    "per_user_quota_tokens",
];

/// The fields of `POST /admin/keys` and `PATCH /admin/keys/{id}` besides the limits.
const KEY_FIELDS: [&str; 3] = ["name", "role", "expires_at"];

/// The body as a JSON object whose fields are all known (`allowed`), else a 400 naming
/// the others.
fn object_of(body: &[u8], example: &str, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body must be JSON like {example}: {e}")))?;
    let Value::Object(object) = value else {
        return Err(ApiError::bad_request(format!(
            "The body must be a JSON object like {example}."
        )));
    };
    let unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|field| !allowed.contains(field) && !LIMIT_FIELDS.contains(field))
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Unknown field{} {}; a key has {} and the limits {}.",
            if unknown.len() == 1 { "" } else { "s" },
            quoted(&unknown),
            quoted(allowed),
            quoted(&LIMIT_FIELDS),
        )));
    }
    Ok(object)
}

fn quoted(fields: &[&str]) -> String {
    fields
        .iter()
        .map(|f| format!("'{f}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The limit fields of `object` read as [`KeyLimits`] (a `null` is unset), checked.
fn limits_of(object: &Map<String, Value>) -> Result<KeyLimits, ApiError> {
    let fields: Map<String, Value> = object
        .iter()
        .filter(|(field, value)| LIMIT_FIELDS.contains(&field.as_str()) && !value.is_null())
        .map(|(field, value)| (field.clone(), value.clone()))
        .collect();
    let limits: KeyLimits = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("A limit has a wrong value: {e}.")))?;
    let problems = limits.problems("key");
    if problems.is_empty() {
        Ok(limits)
    } else {
        Err(ApiError::bad_request(format!("{}.", problems.join("; "))))
    }
}

fn field<T: serde::de::DeserializeOwned>(
    object: &Map<String, Value>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("{name} must be {what}."))),
    }
}

/// A new key, with its secret: shown this once (also what a rotation answers).
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    id: String,
    name: String,
    role: Role,
    prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    #[serde(flatten)]
    limits: KeyLimits,
    key: String,
}

impl CreatedKey {
    fn new(record: KeyRecord, secret: &Secret) -> Self {
        Self {
            id: record.id,
            name: record.name,
            role: record.role,
            prefix: record.prefix,
            created_at: record.created_at,
            expires_at: record.expires_at,
            limits: record.limits,
            key: secret.expose().to_owned(),
        }
    }
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

const CREATE_EXAMPLE: &str = r#"{"name": "alice", "role": "user", "rpm": 60}"#;

/// `POST /admin/keys`: a key with its limits as flat fields
/// (`{"name":"bob","rpm":60,"models":["gemma-*"]}`); 201 with its secret.
pub async fn create(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedKey>), HandlerError> {
    let object = object_of(&body, CREATE_EXAMPLE, &KEY_FIELDS)?;
    let name: String = field(&object, "name", "a string")?.ok_or_else(|| {
        ApiError::bad_request(format!("A key needs a name, like {CREATE_EXAMPLE}."))
    })?;
    validate_name(&name)?;
    let role: Role = field(&object, "role", "'user' or 'admin'")?.unwrap_or_default();
    let expires_at: Option<DateTime<Utc>> =
        field(&object, "expires_at", "a time like 2027-01-01T00:00:00Z")?;
    if expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(ApiError::bad_request("expires_at is in the past.").into());
    }
    let limits = limits_of(&object)?;
    let secret = Secret::generate();
    let mut record = KeyRecord::new(name, role, &secret);
    record.expires_at = expires_at;
    record.limits = limits;
    state
        .keys
        .store()
        .insert_key(&record, &secret.hash())
        .await?;
    // An unknown-key answer for this secret may be cached: forget it.
    state.keys.forget_hash(&secret.hash());
    tracing::info!(key_id = %record.id, name = %record.name, role = record.role.as_str(), "key created");
    Ok((StatusCode::CREATED, Json(CreatedKey::new(record, &secret))))
}

/// The active key `key_id`, else a 404.
async fn active_key(state: &AppState, key_id: &str) -> Result<KeyRecord, HandlerError> {
    let keys = state.keys.store().list_keys().await?;
    keys.into_iter()
        .find(|k| k.id == key_id && k.revoked_at.is_none())
        .ok_or_else(|| ApiError::not_found(format!("No active key with id '{key_id}'.")).into())
}

/// `PATCH /admin/keys/{key_id}`: a JSON merge patch of the key's name, expiry and
/// limits: a field present sets it, `null` clears it, a field left out stays. The store
/// applies it to the key as it is when it writes, so patches of different fields sent at
/// once (to this gateway or another replica) all hold.
pub async fn update(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
    body: Bytes,
) -> Result<Json<KeyView>, HandlerError> {
    let example = r#"{"rpm": 120, "tpm": null}"#;
    let patch = object_of(&body, example, &["name", "expires_at"])?;
    let mut update = KeyUpdate::default();
    if let Some(name) = patch.get("name") {
        let name: String = serde_json::from_value(name.clone())
            .map_err(|_| ApiError::bad_request("name must be a string (a key always has one)."))?;
        validate_name(&name)?;
        update.name = Some(name);
    }
    if patch.contains_key("expires_at") {
        let expires_at: Option<DateTime<Utc>> = field(
            &patch,
            "expires_at",
            "a time like 2027-01-01T00:00:00Z, or null",
        )?;
        if expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(ApiError::bad_request("expires_at is in the past.").into());
        }
        update.expires_at = Some(expires_at);
    }
    // Read and merged in the store, not here: limits read here could be stale by the
    // time they were written back, and the write would undo another patch's change.
    update.limits = LimitsPatch {
        clear: patch
            .iter()
            .filter(|(_, value)| value.is_null())
            .filter_map(|(field, _)| LimitField::from_name(field))
            .collect(),
        set: limits_of(&patch)?,
    };
    let updated = state
        .keys
        .store()
        .update_key(&key_id, &update)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No active key with id '{key_id}'.")))?;
    // Every request from now on sees the new settings.
    state.keys.forget_key(&key_id);
    tracing::info!(%key_id, fields = ?patch.keys().collect::<Vec<_>>(), "key changed");
    Ok(Json(KeyView::new(updated, None)))
}

/// The longest grace a rotated secret may keep working: 30 days.
pub const MAX_ROTATION_GRACE_SECS: u64 = 30 * 86_400;

/// `POST /admin/keys/{key_id}/rotate` with an optional `{"grace_secs": N}`: a new secret
/// for the same key (id, settings, usage); the old one keeps working for `grace_secs`
/// (default 0: it stops now). 200 with the new secret, shown this once.
pub async fn rotate(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
    body: Bytes,
) -> Result<Json<CreatedKey>, HandlerError> {
    let Rotation { grace_secs } = if body.iter().all(u8::is_ascii_whitespace) {
        Rotation::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                r#"The body must be empty or JSON like {{"grace_secs": 3600}}: {e}"#
            ))
        })?
    };
    if grace_secs > MAX_ROTATION_GRACE_SECS {
        return Err(ApiError::bad_request(format!(
            "grace_secs must be at most {MAX_ROTATION_GRACE_SECS} (30 days), not {grace_secs}."
        ))
        .into());
    }
    let secret = Secret::generate();
    let old_valid_until = now_millis() + Duration::seconds(grace_secs as i64);
    let rotated = state
        .keys
        .store()
        .rotate_key(
            &key_id,
            &secret.hash(),
            &secret.public_prefix(),
            old_valid_until,
        )
        .await?;
    if !rotated {
        return Err(ApiError::not_found(format!("No active key with id '{key_id}'.")).into());
    }
    state.keys.forget_key(&key_id);
    state.keys.forget_hash(&secret.hash());
    let record = active_key(&state, &key_id).await?;
    tracing::info!(%key_id, grace_secs, "key rotated");
    Ok(Json(CreatedKey::new(record, &secret)))
}

/// The body of `POST /admin/keys/{key_id}/rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    /// Seconds the old secret keeps working.
    #[serde(default)]
    grace_secs: u64,
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

/// Query of `GET /v1/me` and `/v1/me/usage`: an end user of the key, whose own limits to
/// show too.
#[derive(Debug, Default, Deserialize)]
pub struct MeQuery {
    user: Option<String>,
}

impl MeQuery {
    /// The end user asked about, cut to what the gateway records of one.
    pub fn end_user(&self) -> Option<&str> {
        let user = self.user.as_deref().filter(|u| !u.is_empty())?;
        let mut end = user.len().min(MAX_END_USER_BYTES);
        while !user.is_char_boundary(end) {
            end -= 1;
        }
        Some(&user[..end])
    }
}

/// What `GET /v1/me` answers: the caller's key and its limits, with what is left of each
/// and when it resets.
#[derive(Debug, Serialize)]
pub struct MeView {
    id: String,
    name: String,
    role: Role,
    prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    /// The effective limits, where the counters are kept, and what is left of each.
    #[serde(flatten)]
    status: LimitStatus,
}

/// The caller's key record.
pub async fn caller_key(state: &AppState, caller: &Caller) -> Result<KeyRecord, HandlerError> {
    active_key(state, &caller.key_id).await
}

/// `GET /v1/me[?user=NAME]`: the caller's key, its effective limits and what is left.
pub async fn me(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<MeQuery>,
) -> Result<Json<MeView>, HandlerError> {
    let key = caller_key(&state, &caller).await?;
    let status = state.limiter.status(&key, query.end_user()).await;
    Ok(Json(MeView {
        id: key.id,
        name: key.name,
        role: key.role,
        prefix: key.prefix,
        created_at: key.created_at,
        expires_at: key.expires_at,
        status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_fields_are_those_of_key_limits() {
        let full = KeyLimits {
            models: Some(vec![]),
            rpm: Some(1),
            tpm: Some(1),
            max_parallel: Some(1),
            quota_tokens: Some(1),
            quota_period: Some(llmgate_core::limits::QuotaPeriod::Day),
            weight: Some(1),
            per_user_rpm: Some(1),
            per_user_quota_tokens: Some(1),
        };
        let Value::Object(fields) = serde_json::to_value(full).unwrap() else {
            unreachable!()
        };
        let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
        let mut expected = LIMIT_FIELDS.to_vec();
        names.sort_unstable();
        expected.sort_unstable();
        assert_eq!(names, expected);
    }

    #[test]
    fn unknown_fields_are_named_and_limits_checked() {
        let err = object_of(br#"{"name":"a","rpmm":3,"colour":1}"#, "{}", &KEY_FIELDS).unwrap_err();
        assert!(err.message.contains("'rpmm', 'colour'"), "{}", err.message);
        let object = object_of(br#"{"name":"a","rpm":0}"#, "{}", &KEY_FIELDS).unwrap();
        let err = limits_of(&object).unwrap_err();
        assert!(err.message.contains("key.rpm"), "{}", err.message);
        let object = object_of(br#"{"rpm":"lots"}"#, "{}", &KEY_FIELDS).unwrap();
        assert!(limits_of(&object).is_err());
    }
}
