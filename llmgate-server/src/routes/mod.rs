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

/// Unknown routes, in the OpenAI error shape.
pub async fn not_found(uri: axum::http::Uri) -> HandlerError {
    HandlerError(ApiError::not_found(format!("No route for {}.", uri.path())))
}
