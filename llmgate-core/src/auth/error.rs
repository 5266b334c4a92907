//! [`AuthError`]: why a request was refused.

use super::Role;

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
    BodyRead(#[source] crate::BoxError),
    /// The client stopped sending its request body.
    #[error("request body stalled for {0:?}")]
    BodyStalled(std::time::Duration),
    /// The key store failed.
    #[error("key store failed: {0}")]
    Storage(#[source] crate::storage::StorageError),
}
