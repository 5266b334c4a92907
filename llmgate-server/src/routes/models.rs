//! `/admin/models`: the running model, and running or stopping one.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use llmgate_core::error::ApiError;
use llmgate_core::runner::Backend;
use serde::Deserialize;

use super::HandlerError;
use crate::app::AppState;
use crate::models::{ModelError, ModelView};

/// `GET /admin/models`: model, backend, state, progress and recent log lines.
pub async fn view(State(state): State<AppState>) -> Json<ModelView> {
    Json(state.models.view())
}

/// The body of `POST /admin/models/run`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunModel {
    /// A GGUF path or Hugging Face repo id; `default` or absent for the default model.
    model: Option<String>,
    /// `cpu`, `cuda`, `metal` or `openblas`.
    backend: Option<String>,
}

/// `POST /admin/models/run`: starts set-up in the background and answers at once (202);
/// follow it with `GET /admin/models`.
pub async fn run(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ModelView>), HandlerError> {
    let request: RunModel = if body.is_empty() {
        RunModel {
            model: None,
            backend: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "The body must be JSON like {{\"model\": \"owner/name\", \"backend\": \"cpu\"}}: {e}"
            ))
        })?
    };
    let backend = request
        .backend
        .as_deref()
        .map(str::parse::<Backend>)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let model = Some(
        request
            .model
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| crate::settings::DEFAULT_MODEL.to_owned()),
    );
    match state.models.run(model, backend) {
        Ok(view) => Ok((StatusCode::ACCEPTED, Json(view))),
        Err(err @ ModelError::Busy) => Err(ApiError::conflict(err.to_string()).into()),
        Err(err) => Err(ApiError::bad_request(crate::error_chain(&err)).into()),
    }
}

/// `POST /admin/models/stop`.
pub async fn stop(State(state): State<AppState>) -> Json<ModelView> {
    Json(state.models.stop().await)
}
