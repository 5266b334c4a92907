//! [`AuthUsageLayer`]: the tower `Layer`.

use std::sync::Arc;

use tower::Layer;

use super::{AuthUsage, KeyCache, Role};
use crate::usage::UsageRecorder;

/// Default request body limit: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Checks the API key of every request, puts the [`Caller`](super::Caller) into the
/// request's extensions, and records the request's usage (requests, tokens, endpoint)
/// against the key.
///
/// A request without a valid key gets 401 with an OpenAI-shaped error. Keys are found
/// by hash through a [`KeyCache`]. Usage records go to a [`UsageRecorder`]'s queue.
#[derive(Clone, Debug)]
pub struct AuthUsageLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) keys: KeyCache,
    pub(crate) recorder: Option<UsageRecorder>,
    pub(crate) required_role: Option<Role>,
    pub(crate) max_body_bytes: usize,
}

impl AuthUsageLayer {
    /// Authenticates and records usage.
    pub fn new(keys: KeyCache, recorder: UsageRecorder) -> Self {
        Self::build(keys, Some(recorder))
    }

    /// Authenticates only (for routes whose use is not metered, such as an admin API).
    pub fn auth_only(keys: KeyCache) -> Self {
        Self::build(keys, None)
    }

    fn build(keys: KeyCache, recorder: Option<UsageRecorder>) -> Self {
        Self {
            shared: Arc::new(Shared {
                keys,
                recorder,
                required_role: None,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            }),
        }
    }

    /// Refuse (403) keys whose role is not `role`.
    pub fn require_role(self, role: Role) -> Self {
        self.with(|s| s.required_role = Some(role))
    }

    /// Refuse (413) request bodies over `bytes`.
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_body_bytes = bytes)
    }

    fn with(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.shared);
        change(&mut shared);
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
