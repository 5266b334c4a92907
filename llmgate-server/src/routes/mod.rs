//! HTTP handlers, one file per endpoint group, and the error they answer with.

pub mod health;
pub mod keys;
pub mod metrics;
pub mod models;
pub mod system;
pub mod usage;

use axum::response::{IntoResponse, Response};
use llmgate_core::error::ApiError;
use llmgate_core::storage::StorageError;

/// A handler's error: an OpenAI-shaped response.
#[derive(Debug)]
pub struct HandlerError(pub ApiError);

impl IntoResponse for HandlerError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

impl From<ApiError> for HandlerError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

impl From<StorageError> for HandlerError {
    fn from(err: StorageError) -> Self {
        if matches!(
            err,
            StorageError::Database(_) | StorageError::Corrupt(_) | StorageError::Rejected(_)
        ) {
            tracing::error!(error = %err, "storage failed");
        }
        Self(err.into())
    }
}

/// How long an admin or usage read may take: the database behind it may hang (a
/// partition keeps its connections open) and a client must get an answer.
pub const ADMIN_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers 503 `database_unavailable` when the handler takes longer than
/// [`ADMIN_ANSWER_TIMEOUT`] (what it waits on is the database).
pub async fn answer_within(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(ADMIN_ANSWER_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(after = ?ADMIN_ANSWER_TIMEOUT, "an admin request got no answer from the database in time");
            HandlerError(StorageError::Database("timed out".into()).into()).into_response()
        }
    }
}

/// Unknown routes, in the OpenAI error shape.
pub async fn not_found(uri: axum::http::Uri) -> HandlerError {
    HandlerError(ApiError::not_found(format!("No route for {}.", uri.path())))
}
