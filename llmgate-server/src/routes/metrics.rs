//! `GET /metrics`: Prometheus exposition, in the text format 0.0.4 unless the scraper's
//! `Accept` asks for OpenMetrics.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use llmgate_core::error::ApiError;

use super::HandlerError;
use crate::app::AppState;
use crate::metrics::Format;

/// Every metric, with the system gauges sampled now.
pub async fn render(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HandlerError> {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let pid = state.models.servers().first().and_then(|(_, m)| m.pid());
    let monitor = state.system.clone();
    let system = tokio::task::spawn_blocking(move || monitor.report(pid))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "system report failed");
            ApiError::internal()
        })?;
    let body = state.metrics.render(&system, format);
    Ok(([(header::CONTENT_TYPE, format.content_type())], body))
}
