//! `/admin/models`: the models behind the gateway; adding, changing, removing, loading
//! and unloading them at run time.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use llmgate_core::config::ModelConfig;
use llmgate_core::error::ApiError;
use llmgate_core::storage::{RefusedModel, StorageError};
use serde_json::Value;

use super::HandlerError;
use crate::app::AppState;
use crate::models::{ChangeError, ModelView, ModelsView, Put};

impl From<ChangeError> for HandlerError {
    fn from(err: ChangeError) -> Self {
        let api = match &err {
            ChangeError::Unknown(_) => {
                let mut api = ApiError::not_found(err.to_string());
                api.code = Some("model_not_found");
                api
            }
            ChangeError::Invalid(_) => ApiError::bad_request(err.to_string()),
            ChangeError::Taken(_) => ApiError::conflict(err.to_string()),
            ChangeError::Route(route) => route.to_api().0,
            // Settings the store will not keep (too large): the admin's to fix.
            ChangeError::Store(StorageError::Rejected(why)) if why.is::<RefusedModel>() => {
                ApiError::bad_request(format!("Those settings cannot be kept: {why}."))
            }
            ChangeError::Store(_) => {
                tracing::error!(error = %crate::error_chain(&err), "storing a model change failed");
                ApiError::internal()
            }
        };
        Self(api)
    }
}

/// `GET /admin/models`: every model with its state, memory and requests.
pub async fn list(State(state): State<AppState>) -> Json<ModelsView> {
    Json(state.models.view())
}

/// `GET /admin/models/{name}`.
pub async fn one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, HandlerError> {
    Ok(Json(state.models.view_of(&name)?))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], example: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body must be JSON like {example}: {e}")))
}

/// `POST /admin/models`: adds a model (kept across restarts); 201.
pub async fn add(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ModelView>), HandlerError> {
    let model: ModelConfig = parse(
        &body,
        r#"{"name": "chat", "source": "owner/name:file.gguf"} or {"name": "gpt-4o", "upstream": "https://api.openai.com"}"#,
    )?;
    let slot = state.models.put(model, Put::New).await?;
    Ok((StatusCode::CREATED, Json(slot.view())))
}

/// `PATCH /admin/models/{name}`: changes some settings (a field set to `null` goes
/// back to its default). A running model stops once its requests end; it loads again
/// with the new settings on the next request.
pub async fn change(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ModelView>, HandlerError> {
    let current = state
        .models
        .config_of(&name)
        .ok_or_else(|| ChangeError::Unknown(name.clone()))?;
    let patch: Value = parse(&body, r#"{"ttl_secs": 600, "max_concurrency": 2}"#)?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::bad_request("The body must be a JSON object of settings.").into());
    };
    let mut merged = serde_json::to_value(&current).map_err(|_| ApiError::internal())?;
    let object = merged
        .as_object_mut()
        .expect("a model's settings are an object");
    for (key, value) in patch {
        if key == "name" && value.as_str() != Some(current.name.as_str()) {
            return Err(ApiError::bad_request(
                "A model cannot be renamed; add one under the new name and remove this one.",
            )
            .into());
        }
        if value.is_null() {
            object.remove(&key);
        } else {
            object.insert(key, value);
        }
    }
    let model: ModelConfig = serde_json::from_value(merged)
        .map_err(|e| ApiError::bad_request(format!("Those settings cannot work: {e}")))?;
    let slot = state.models.put(model, Put::Replace).await?;
    Ok(Json(slot.view()))
}

/// `DELETE /admin/models/{name}`: removes a model (also across restarts); its server
/// stops once its requests end.
pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, HandlerError> {
    state.models.remove(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// `POST /admin/models/{name}/load`: starts loading now; 202 (follow it with `GET`).
pub async fn load(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<ModelView>), HandlerError> {
    Ok((StatusCode::ACCEPTED, Json(state.models.load_now(&name)?)))
}

/// `POST /admin/models/{name}/unload`: stops the model once its requests in flight end.
pub async fn unload(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, HandlerError> {
    Ok(Json(state.models.unload_now(&name).await?))
}
