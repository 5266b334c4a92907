//! Who is calling: API keys, their cache, reading a key from a request's headers, and
//! the [`RequireKeyLayer`] for routes that need a key but are not metered.
//!
//! The metering middleware, [`AuthUsageLayer`](crate::AuthUsageLayer), lives in
//! [`auth_usage`](crate::auth_usage) and is named at the crate root.
//!
//! ```
//! use std::sync::Arc;
//! use llmgate_core::auth::{KeyCache, RequireKeyLayer};
//! use llmgate_core::storage::MemoryStore;
//!
//! let keys = KeyCache::new(Arc::new(MemoryStore::new()));
//! // Any valid key for one group of routes, an admin key for another:
//! let any_key = RequireKeyLayer::new(keys.clone());
//! let admin_only = RequireKeyLayer::admin(keys);
//! // ServiceBuilder::new().layer(admin_only).service(your_admin_api) …
//! # drop((any_key, admin_only));
//! ```

mod cache;
pub(crate) mod error;
mod header;
mod key;
pub mod require_key;

pub use cache::{KeyCache, DEFAULT_KEY_TTL, KEY_STORE_TIMEOUT};
pub use error::AuthError;
pub use header::key_from_headers;
pub use key::{now_millis, Caller, KeyHash, KeyRecord, Role, Secret, KEY_PREFIX, KEY_RANDOM_LEN};
pub use require_key::{RequireKey, RequireKeyLayer};

pub(crate) use header::presented_key;
