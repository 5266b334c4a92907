//! [`ProxyError`]: why a request could not be forwarded.

use std::time::Duration;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached or broke off.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be turned into an upstream request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No upstream is set (no model is running).
    #[error("no upstream")]
    NoUpstream,
    /// The path could lead the upstream somewhere else than it says (see
    /// [`is_plain_path`](super::is_plain_path)).
    #[error("path with dot-segments or encoded separators")]
    UnsafePath,
}
