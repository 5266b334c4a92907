//! Who is calling: API keys, their cache, and the [`AuthUsageLayer`] middleware.
//!
//! ```
//! use std::sync::Arc;
//! use llmgate_core::auth::{AuthUsageLayer, KeyCache};
//! use llmgate_core::storage::MemoryStore;
//! use llmgate_core::usage::UsageRecorder;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = Arc::new(MemoryStore::new());
//! let (recorder, writer) = UsageRecorder::start(store.clone());
//! let layer = AuthUsageLayer::new(KeyCache::new(store), recorder);
//! // ServiceBuilder::new().layer(layer).service(your_service) …
//! # drop(layer); writer.shutdown().await; }
//! ```

mod cache;
mod future;
mod key;
mod layer;
mod service;

use http::HeaderMap;

pub use cache::{KeyCache, KEY_STORE_TIMEOUT};
pub use future::ResponseFuture;
pub use key::{now_millis, KeyHash, KeyRecord, Role, Secret, KEY_PREFIX, KEY_RANDOM_LEN};
pub use layer::AuthUsageLayer;
pub use service::{AuthUsage, BODY_STALL_TIMEOUT};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No key in any of the accepted headers.
    #[error("no API key")]
    Missing,
    /// No such key.
    #[error("unknown API key")]
    Unknown,
    /// The key was revoked.
    #[error("revoked API key")]
    Revoked,
    /// The key is past its expiry.
    #[error("expired API key")]
    Expired,
    /// The key's role may not use this route.
    #[error("key role {role:?} may not use this route")]
    Forbidden {
        /// The caller's role.
        role: Role,
    },
    /// The request body is over the limit.
    #[error("request body over {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request body could not be read.
    #[error("request body unreadable: {0}")]
    BodyRead(String),
    /// The client stopped sending its request body.
    #[error("request body stalled for {0:?}")]
    BodyStalled(std::time::Duration),
    /// The key store failed.
    #[error("key store failed: {0}")]
    Storage(String),
}

/// The authenticated caller, put into the request's extensions by [`AuthUsageLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id.
    pub key_id: String,
    /// The key's name.
    pub name: String,
    /// The key's role.
    pub role: Role,
}

/// The key a request presents: `Authorization: Bearer <key>`, `api-key: <key>` (Azure
/// OpenAI's header) or `x-api-key: <key>`, in that order.
pub fn key_from_headers(headers: &HeaderMap) -> Option<Secret> {
    presented_key(headers).map(Secret::new)
}

/// The key text a request presents (see [`key_from_headers`]), borrowed from its headers.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    let plain = |name: &str| {
        headers
            .get(name)
            .and_then(|v| ascii(v.as_bytes().trim_ascii()))
    };
    bearer
        .or_else(|| plain("api-key"))
        .or_else(|| plain("x-api-key"))
        .filter(|key| !key.is_empty())
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case, spaces
/// around the token ignored); `None` for any other scheme. Read as bytes: this runs on
/// every request.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = value.trim_ascii_start().split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    ascii(rest.trim_ascii())
}

/// The text of header bytes that are all ASCII (a key never has other bytes).
fn ascii(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn reads_all_three_header_forms() {
        let expect = Some(Secret::new("sk-lg-abc"));
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer sk-lg-abc")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "bearer  sk-lg-abc ")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("api-key", "sk-lg-abc")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("x-api-key", "sk-lg-abc")])),
            expect
        );
    }

    #[test]
    fn ignores_other_schemes_and_empty_values() {
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])),
            None
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(key_from_headers(&headers(&[("api-key", "")])), None);
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearersk-lg-abc")])),
            None
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer\tsk-lg-abc")])),
            None
        );
        // Another scheme falls through to the other headers.
        assert_eq!(
            key_from_headers(&headers(&[
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("x-api-key", " sk-lg-abc ")
            ])),
            Some(Secret::new("sk-lg-abc"))
        );
        assert_eq!(key_from_headers(&HeaderMap::new()), None);
    }
}
