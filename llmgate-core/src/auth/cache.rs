//! The key lookup on the request path: a short-lived cache over the [`KeyStore`].

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use super::{AuthError, KeyHash, KeyRecord, Secret};
use crate::storage::KeyStore;

/// How long a lookup is trusted. Another process (the `llmgate keys` CLI, a second
/// replica) that revokes a key is obeyed within this time.
pub const DEFAULT_KEY_TTL: Duration = Duration::from_millis(500);

/// Looks keys up by hash, remembering answers (unknown keys too, so a flood of bad keys
/// does not reach the database) for a short time.
#[derive(Clone)]
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    entries: Cache<KeyHash, Option<Arc<KeyRecord>>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl KeyCache {
    /// A cache with the default time to live.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self::with_ttl(store, DEFAULT_KEY_TTL)
    }

    /// A cache whose answers live for `ttl`.
    pub fn with_ttl(store: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        let entries = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(ttl)
            .build();
        Self { store, entries }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The record of the key, active or not; `None` when there is no such key.
    pub async fn lookup(&self, secret: &Secret) -> Result<Option<Arc<KeyRecord>>, AuthError> {
        self.lookup_hash(secret.hash()).await
    }

    /// The record of the key with this hash (see [`lookup`](Self::lookup)).
    pub async fn lookup_hash(&self, hash: KeyHash) -> Result<Option<Arc<KeyRecord>>, AuthError> {
        // The common case, a key seen within the TTL: a synchronous read, so a request's
        // future holds no state for the cache.
        if let Some(known) = self.entries.get(&hash) {
            return Ok(known);
        }
        // Boxed: only a miss pays for the store's future. Concurrent misses of one key
        // each ask the store (once per key and TTL, at most one per request in flight).
        let found = Box::pin(self.store.key_by_hash(&hash))
            .await
            .map_err(|err| AuthError::Storage(err.to_string()))?
            .map(Arc::new);
        self.entries.insert(hash, found.clone());
        Ok(found)
    }

    /// Forgets everything, so that a change made through this process (a revocation)
    /// holds from the very next request.
    pub fn invalidate_all(&self) {
        self.entries.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{now_millis, Role};
    use crate::storage::MemoryStore;

    #[tokio::test]
    async fn revocation_elsewhere_is_seen_after_the_ttl_and_here_at_once() {
        let store = Arc::new(MemoryStore::new());
        let secret = Secret::generate();
        let record = KeyRecord::new("a", Role::User, &secret);
        store.insert_key(&record, &secret.hash()).await.unwrap();
        let cache = KeyCache::with_ttl(store.clone(), Duration::from_millis(100));
        assert!(cache
            .lookup(&secret)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none());

        store.revoke_key(&record.id, now_millis()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(cache
            .lookup(&secret)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some());

        let other = Secret::generate();
        let second = KeyRecord::new("b", Role::User, &other);
        assert!(cache.lookup(&other).await.unwrap().is_none());
        store.insert_key(&second, &other.hash()).await.unwrap();
        cache.invalidate_all();
        assert!(cache.lookup(&other).await.unwrap().is_some());
    }
}
