//! `GET /admin/system`: CPU, memory and GPU.

use axum::extract::State;
use axum::Json;
use llmgate_core::error::ApiError;
use llmgate_core::system::SystemReport;

use super::HandlerError;
use crate::app::AppState;

/// The machine's state now (sampling may take a moment: off the async threads).
pub async fn report(State(state): State<AppState>) -> Result<Json<SystemReport>, HandlerError> {
    let pid = state.models.servers().first().and_then(|(_, m)| m.pid());
    let monitor = state.system.clone();
    let report = tokio::task::spawn_blocking(move || monitor.report(pid))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "system report failed");
            ApiError::internal()
        })?;
    Ok(Json(report))
}
