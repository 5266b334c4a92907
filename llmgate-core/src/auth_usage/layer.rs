//! [`AuthUsageLayer`]: the tower `Layer`.

use std::sync::Arc;

use tower::Layer;

use super::AuthUsage;
use crate::auth::KeyCache;
use crate::limits::Limiter;
use crate::usage::UsageRecorder;

/// Default request body limit: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Checks the API key of every request, puts the [`Caller`](crate::auth::Caller) into
/// the request's extensions, and records the request's usage (requests, tokens,
/// endpoint) against the key.
///
/// A request without a valid key gets 401 with an OpenAI-shaped error. Keys are found
/// by hash through a [`KeyCache`]. Usage records go to a [`UsageRecorder`]'s queue.
/// Routes that need a key but are not metered (an admin API) use
/// [`RequireKeyLayer`](crate::auth::RequireKeyLayer) instead.
#[derive(Clone, Debug)]
pub struct AuthUsageLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) keys: KeyCache,
    pub(crate) recorder: UsageRecorder,
    pub(crate) max_body_bytes: usize,
    pub(crate) limiter: Option<Limiter>,
}

impl AuthUsageLayer {
    /// Authenticates and records usage.
    pub fn new(keys: KeyCache, recorder: UsageRecorder) -> Self {
        Self {
            shared: Arc::new(Shared {
                keys,
                recorder,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                limiter: None,
            }),
        }
    }

    /// Refuse (413) request bodies over `bytes`.
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        shared.max_body_bytes = bytes;
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Enforce every key's limits with `limiter` ([`crate::limits`]): a request over a
    /// limit gets 429 (`rate_limit_exceeded` or `insufficient_quota`) with `Retry-After`,
    /// a model the key may not use gets the 404 of an unknown model, and every answer
    /// to a key with `rpm` or `tpm` carries OpenAI's `x-ratelimit-*` headers. The
    /// key's effective limits go into the request's extensions as
    /// [`Effective`](crate::limits::Effective).
    pub fn limiter(self, limiter: Limiter) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        shared.limiter = Some(limiter);
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for AuthUsageLayer {
    type Service = AuthUsage<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthUsage::new(inner, self.shared.clone())
    }
}
