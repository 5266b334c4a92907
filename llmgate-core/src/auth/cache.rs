//! The key lookup on the request path: a short-lived cache over the [`KeyStore`].
//!
//! While the store is down (PostgreSQL unreachable), a key is judged by the store's
//! last answer about it: an outage must not refuse every client, since answering does
//! not need the database (usage waits in the recorder's queue). A revocation made
//! elsewhere during the outage cannot be seen then anyway; one made here is obeyed.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use chrono::{DateTime, Utc};
use http::HeaderMap;

use super::{presented_key, AuthError, KeyHash, KeyRecord, Secret};
use crate::storage::KeyStore;

/// How long a lookup is trusted. Another process (the `llmgate keys` CLI, a second
/// replica) that revokes a key is obeyed within this time.
pub const DEFAULT_KEY_TTL: Duration = Duration::from_millis(500);

/// How long a key lookup waits for the store before it is judged down (and the key by
/// the store's last answer).
pub const KEY_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most keys remembered (fresh, and last known).
const MAX_KEYS_CACHED: u64 = 100_000;

/// Looks keys up by hash, remembering answers (unknown keys too, so a flood of bad keys
/// does not reach the database) for a short time.
#[derive(Clone)]
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    entries: Cache<KeyHash, Option<Arc<KeyRecord>>>,
    /// The store's last answer for each key, past the time to live: used only when the
    /// store fails.
    last_known: Cache<KeyHash, Option<Arc<KeyRecord>>>,
    /// Counts changes made through this cache (a key created or revoked): a lookup that
    /// began before one does not store what it read, which may predate the change.
    changes: Arc<std::sync::atomic::AtomicU64>,
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
            .max_capacity(MAX_KEYS_CACHED)
            .time_to_live(ttl)
            .build();
        Self {
            store,
            entries,
            last_known: Cache::builder()
                .max_capacity(MAX_KEYS_CACHED)
                .support_invalidation_closures()
                .build(),
            changes: Arc::default(),
        }
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
        let changes_before = self.changes.load(std::sync::atomic::Ordering::Acquire);
        // A store that hangs (a partitioned database keeps its connections open) is a
        // store that is down: the request must not wait on it for minutes.
        let asked =
            tokio::time::timeout(KEY_STORE_TIMEOUT, Box::pin(self.store.key_by_hash(&hash)))
                .await
                .unwrap_or_else(|_| {
                    Err(crate::storage::StorageError::Database(
                        format!("no answer within {KEY_STORE_TIMEOUT:?}").into(),
                    ))
                });
        let found = match asked {
            Ok(found) => found.map(Arc::new),
            Err(err) => {
                let Some(known) = self.last_known.get(&hash) else {
                    return Err(AuthError::Storage(err));
                };
                // Trusted for another time to live, so that an outage costs the store
                // one try per key and TTL, not one per request.
                self.entries.insert(hash, known.clone());
                return Ok(known);
            }
        };
        // Stored only if nothing changed meanwhile: a revocation made here while the
        // store was being asked must not be undone by the answer it gave before.
        if self.changes.load(std::sync::atomic::Ordering::Acquire) == changes_before {
            self.entries.insert(hash, found.clone());
            self.last_known.insert(hash, found.clone());
        }
        Ok(found)
    }

    /// The key a request presents, if it is known and usable at `at`; otherwise why not.
    /// What both [`RequireKeyLayer`](super::RequireKeyLayer) and the metering middleware
    /// check before anything else.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        at: DateTime<Utc>,
    ) -> Result<Arc<KeyRecord>, AuthError> {
        let presented = presented_key(headers).ok_or(AuthError::Missing)?;
        let key = match self.lookup_hash(KeyHash::of(presented)).await {
            Ok(Some(key)) => key,
            Ok(None) => return Err(AuthError::Unknown),
            Err(err) => {
                tracing::error!(error = %err, "key lookup failed");
                return Err(err);
            }
        };
        if key.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if !key.is_active(at) {
            return Err(AuthError::Expired);
        }
        Ok(key)
    }

    /// Forgets everything, so that a change made through this process (a revocation)
    /// holds from the very next request.
    pub fn invalidate_all(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.entries.invalidate_all();
        self.last_known.invalidate_all();
    }

    /// Forgets what is known of the key with this hash: a key just created through this
    /// process is found from the very next request. What is known of other keys stays,
    /// to be used if the store goes down.
    pub fn forget_hash(&self, hash: &KeyHash) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.entries.invalidate(hash);
        self.last_known.invalidate(hash);
    }

    /// Forgets what is known of the key with this id: a key revoked through this process
    /// is refused from the very next request, even if the store goes down before it is
    /// looked up again. What is known of other keys stays.
    pub fn forget_key(&self, id: &str) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.entries.invalidate_all();
        let id = id.to_owned();
        let forgotten = self.last_known.invalidate_entries_if(move |_, known| {
            known.as_ref().is_some_and(|record| record.id == id)
        });
        if forgotten.is_err() {
            // Only if closures were not enabled: forget everything instead.
            self.last_known.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    use crate::auth::{now_millis, Role};
    use crate::storage::{KeyUpdate, MemoryStore, StorageError};

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

    /// A key store that can be taken down.
    #[derive(Default)]
    struct Flaky {
        keys: MemoryStore,
        down: std::sync::atomic::AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StorageError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                Err(StorageError::Database("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait::async_trait]
    impl KeyStore for Flaky {
        async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
            self.check()?;
            self.keys.insert_key(record, hash).await
        }
        async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
            self.check()?;
            self.keys.key_by_hash(hash).await
        }
        async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
            self.check()?;
            self.keys.list_keys().await
        }
        async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
            self.check()?;
            self.keys.revoke_key(id, at).await
        }
        async fn update_key(
            &self,
            id: &str,
            update: &KeyUpdate,
        ) -> Result<Option<KeyRecord>, StorageError> {
            self.check()?;
            self.keys.update_key(id, update).await
        }
        async fn rotate_key(
            &self,
            id: &str,
            hash: &KeyHash,
            prefix: &str,
            until: DateTime<Utc>,
        ) -> Result<bool, StorageError> {
            self.check()?;
            self.keys.rotate_key(id, hash, prefix, until).await
        }
    }

    /// A store whose lookups read at once but answer only when let go: a lookup that
    /// read a key just before it was revoked.
    #[derive(Default)]
    struct Slow {
        inner: MemoryStore,
        go: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl KeyStore for Slow {
        async fn insert_key(&self, r: &KeyRecord, h: &KeyHash) -> Result<(), StorageError> {
            self.inner.insert_key(r, h).await
        }
        async fn key_by_hash(&self, h: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
            let read = self.inner.key_by_hash(h).await;
            self.go.notified().await;
            read
        }
        async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
            self.inner.list_keys().await
        }
        async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
            self.inner.revoke_key(id, at).await
        }
        async fn update_key(
            &self,
            id: &str,
            update: &KeyUpdate,
        ) -> Result<Option<KeyRecord>, StorageError> {
            self.inner.update_key(id, update).await
        }
        async fn rotate_key(
            &self,
            id: &str,
            hash: &KeyHash,
            prefix: &str,
            until: DateTime<Utc>,
        ) -> Result<bool, StorageError> {
            self.inner.rotate_key(id, hash, prefix, until).await
        }
    }

    #[tokio::test]
    async fn a_lookup_that_read_a_key_before_its_revocation_does_not_undo_it() {
        let store = Arc::new(Slow::default());
        let secret = Secret::generate();
        let record = KeyRecord::new("a", Role::User, &secret);
        store.insert_key(&record, &secret.hash()).await.unwrap();
        let cache = KeyCache::with_ttl(store.clone(), Duration::from_secs(60));
        let lookup = tokio::spawn({
            let (cache, secret) = (cache.clone(), secret.clone());
            async move { cache.lookup(&secret).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await; // it has read the key
        store.revoke_key(&record.id, now_millis()).await.unwrap();
        cache.forget_key(&record.id);
        store.go.notify_one();
        let stale = lookup.await.unwrap().unwrap().unwrap();
        assert!(stale.revoked_at.is_none(), "it read before the revocation");
        // The next lookup asks the store again instead of trusting that stale answer.
        let next = tokio::spawn({
            let (cache, secret) = (cache.clone(), secret.clone());
            async move { cache.lookup(&secret).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.go.notify_one();
        let fresh = next.await.unwrap().unwrap().unwrap();
        assert!(
            fresh.revoked_at.is_some(),
            "revoked from the next request on"
        );
    }

    #[tokio::test]
    async fn a_store_outage_is_answered_with_the_last_known_key_not_a_refusal() {
        let store = Arc::new(Flaky::default());
        let (secret, revoked, unknown, unseen) = (
            Secret::generate(),
            Secret::generate(),
            Secret::generate(),
            Secret::generate(),
        );
        let record = KeyRecord::new("a", Role::User, &secret);
        store.insert_key(&record, &secret.hash()).await.unwrap();
        let gone = KeyRecord::new("b", Role::User, &revoked);
        store.insert_key(&gone, &revoked.hash()).await.unwrap();
        store.revoke_key(&gone.id, now_millis()).await.unwrap();
        let cache = KeyCache::with_ttl(store.clone(), Duration::from_millis(50));
        for s in [&secret, &revoked, &unknown] {
            cache.lookup(s).await.unwrap();
        }

        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Past the TTL, as the store last said: active, revoked, unknown.
        assert_eq!(cache.lookup(&secret).await.unwrap().unwrap().id, record.id);
        assert!(cache
            .lookup(&revoked)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some());
        assert!(cache.lookup(&unknown).await.unwrap().is_none());
        // A key the store never answered for cannot be judged.
        assert!(matches!(
            cache.lookup(&unseen).await,
            Err(AuthError::Storage(_))
        ));
        // A revocation made here is obeyed even before the store answers again; other
        // keys are still judged as the store last said.
        cache.forget_key(&record.id);
        assert!(matches!(
            cache.lookup(&secret).await,
            Err(AuthError::Storage(_))
        ));
        assert!(cache.lookup(&revoked).await.unwrap().is_some());
        cache.forget_hash(&unknown.hash());
        assert!(matches!(
            cache.lookup(&unknown).await,
            Err(AuthError::Storage(_))
        ));
        assert!(cache.lookup(&revoked).await.unwrap().is_some());
    }
}
