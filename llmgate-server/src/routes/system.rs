//! `GET /admin/system`: CPU, memory and GPU, and each model server's process.

use axum::extract::State;
use axum::Json;
use llmgate_core::error::ApiError;
use serde_json::Value;

use super::HandlerError;
use crate::app::AppState;

/// The machine's state now (sampling may take a moment: off the async threads), with
/// `model_servers` naming the model each process serves.
pub async fn report(State(state): State<AppState>) -> Result<Json<Value>, HandlerError> {
    let servers: Vec<(String, u32)> = state
        .models
        .servers()
        .into_iter()
        .filter_map(|(name, runner)| runner.pid().map(|pid| (name, pid)))
        .collect();
    let pids: Vec<u32> = servers.iter().map(|(_, pid)| *pid).collect();
    let monitor = state.system.clone();
    let report = tokio::task::spawn_blocking(move || monitor.report_all(&pids))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "system report failed");
            ApiError::internal()
        })?;
    let mut json = serde_json::to_value(&report).map_err(|_| ApiError::internal())?;
    if let Some(list) = json["model_servers"].as_array_mut() {
        for process in list {
            let pid = process["pid"].as_u64();
            if let Some((name, _)) = servers.iter().find(|(_, p)| Some(u64::from(*p)) == pid) {
                process["model"] = Value::from(name.as_str());
            }
        }
    }
    Ok(Json(json))
}
