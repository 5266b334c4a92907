//! [`ProxyError`]: why a request could not be forwarded.

use std::time::Duration;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached or broke off; the source says how.
    #[error("upstream unreachable")]
    Unreachable(#[source] crate::BoxError),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The upstream's settings cannot make an upstream request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request's path cannot be put under the upstream's base path.
    #[error("invalid upstream URI")]
    InvalidUri(#[source] http::Error),
    /// No upstream is set (no model is running).
    #[error("no upstream")]
    NoUpstream,
    /// The path could lead the upstream somewhere else than it says (see
    /// [`is_plain_path`](super::is_plain_path)).
    #[error("path with dot-segments or encoded separators")]
    UnsafePath,
}

/// A connection to the upstream that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {address}")]
pub(crate) struct ConnectError {
    pub(crate) address: String,
    #[source]
    pub(crate) source: std::io::Error,
}

/// An error and its sources on one line, `a: b: c`, for the log.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
