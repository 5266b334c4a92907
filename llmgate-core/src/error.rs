//! The one place where an error becomes an HTTP status and an OpenAI-shaped body.
//!
//! Every area has its own `thiserror` enum ([`AuthError`], [`ProxyError`],
//! [`StorageError`]); they meet here in [`ApiError`], which writes
//! `{"error":{"message","type","param","code"}}` so that the official OpenAI SDKs raise
//! the matching exception (`AuthenticationError` for 401, `PermissionDeniedError` for
//! 403, and so on). Internals (database messages, upstream addresses) never reach the
//! client: they are logged, and the client gets a plain sentence.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::auth::error::AuthError;
use crate::proxy::error::ProxyError;
use crate::storage::StorageError;

/// An error as an OpenAI-compatible client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// A sentence for a person.
    pub message: Cow<'static, str>,
    /// OpenAI's error `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// OpenAI's error `code`, e.g. `invalid_api_key`.
    pub code: Option<&'static str>,
    /// The request parameter at fault, if any.
    pub param: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A new error with the given status, type, code and message.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found"),
            message,
        )
    }

    /// 404 `model_not_found` (`param: "model"`), as OpenAI answers a model that does not
    /// exist. The router's answer for an unknown model and the limiter's for a model a
    /// key may not use are this one, so that a key cannot tell the two apart.
    pub fn model_not_found(model: &str) -> Self {
        let mut err = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        );
        err.param = Some("model");
        err
    }

    /// 409: the request conflicts with existing state.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            Some("conflict"),
            message,
        )
    }

    /// 500: something on our side failed; details are in the gateway's log.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The gateway hit an internal error; the details are in its log.",
        )
    }

    /// The JSON body, `{"error":{…}}`.
    pub fn body(&self) -> Bytes {
        let envelope = Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        Bytes::from(serde_json::to_vec(&envelope).expect("error envelope serializes"))
    }

    /// The whole HTTP response, with any body type that can be built from bytes.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let unauthorized = |message: &'static str| {
            Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                message,
            )
        };
        match err {
            AuthError::Missing => unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>', 'api-key: <key>' or 'x-api-key: <key>'.",
            ),
            AuthError::Unknown => unauthorized("Incorrect API key provided."),
            AuthError::Revoked => unauthorized("This API key has been revoked."),
            AuthError::Expired => unauthorized("This API key has expired."),
            AuthError::Forbidden { .. } => Self::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("insufficient_permissions"),
                "This API key is not allowed to use this endpoint: it needs an admin key.",
            ),
            AuthError::BodyTooLarge { limit } => Self {
                param: None,
                ..Self::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    Some("request_too_large"),
                    format!("The request body is larger than the gateway's limit of {limit} bytes."),
                )
            },
            AuthError::BodyRead(_) => Self::bad_request("The request body could not be read."),
            AuthError::BodyStalled(after) => Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                format!(
                    "The request body stopped arriving for {} s; send it again.",
                    after.as_secs()
                ),
            ),
            AuthError::Storage(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("key_store_unavailable"),
                "The gateway could not check the API key right now; try again shortly.",
            ),
        }
    }
}

impl From<ProxyError> for ApiError {
    fn from(err: ProxyError) -> Self {
        match err {
            ProxyError::Unreachable(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("upstream_unavailable"),
                "The model server could not be reached. Is it running?",
            ),
            ProxyError::Timeout(after) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                Some("upstream_timeout"),
                format!(
                    "The model server did not answer within {} s.",
                    after.as_secs_f64()
                ),
            ),
            ProxyError::BadRequest(_) | ProxyError::InvalidUri(_) => {
                Self::bad_request("The request could not be forwarded.")
            }
            ProxyError::UnsafePath => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_path"),
                "The path has a '.' or '..' segment or an encoded slash or backslash; send the endpoint's plain path, e.g. /v1/chat/completions.",
            ),
            ProxyError::NoUpstream => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_not_running"),
                "No model is running. An admin can start one in the console or with POST /admin/models/run.",
            ),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::NotFound => Self::not_found("No such item."),
            StorageError::Conflict(what) => Self::conflict(what),
            // Most often the database is down or locked: say so, and that nothing is lost.
            StorageError::Database(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("database_unavailable"),
                "The database cannot be read now; usage is queued and written when it is back. Try again shortly.",
            ),
            StorageError::Corrupt(_) | StorageError::Rejected(_) => Self::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_has_openai_shape_and_challenge() {
        let response: Response<Bytes> = ApiError::from(AuthError::Unknown).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(body["error"]["param"].is_null());
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key"));
    }

    #[test]
    fn storage_details_never_reach_the_client() {
        let err = ApiError::from(StorageError::Database(
            "disk I/O error at /secret/path".into(),
        ));
        let body = String::from_utf8(err.body().to_vec()).unwrap();
        assert!(!body.contains("/secret/path"));
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("database_unavailable"), "{body}");
        let err = ApiError::from(StorageError::Corrupt("row 7 at /secret/path".into()));
        assert!(!String::from_utf8(err.body().to_vec())
            .unwrap()
            .contains("/secret"));
        assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
