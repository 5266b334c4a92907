//! `GET /metrics`: Prometheus exposition (OpenMetrics text).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use llmgate_core::error::ApiError;

use super::HandlerError;
use crate::app::AppState;

/// Every metric, with the system gauges sampled now.
pub async fn render(State(state): State<AppState>) -> Result<impl IntoResponse, HandlerError> {
    let pid = state.models.runner().and_then(|m| m.pid());
    let monitor = state.system.clone();
    let system = tokio::task::spawn_blocking(move || monitor.report(pid))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "system report failed");
            ApiError::internal()
        })?;
    let status = state.models.runner().map(|m| m.status());
    let body = state.metrics.render(&system, status.as_ref());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    ))
}
