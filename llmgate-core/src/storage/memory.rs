//! An in-memory backend: for tests, and for services that embed the layer and keep
//! usage elsewhere. Nothing survives a restart, stored model settings included.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    normalized_batch, tokens_of, KeyStore, KeyUpdate, ModelStore, RequestRecord, Storage,
    StorageError, StoredModel, UsageStore, UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// Keys, usage and model settings in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    keys: Mutex<Vec<StoredKey>>,
    usage: Mutex<Usage>,
    models: Mutex<BTreeMap<String, StoredModel>>,
}

#[derive(Debug)]
struct StoredKey {
    hash: KeyHash,
    record: KeyRecord,
    /// The secret before the last rotation, and until when it still works.
    previous: Option<(KeyHash, DateTime<Utc>)>,
}

impl StoredKey {
    fn is_active_named(&self, name: &str) -> bool {
        self.record.revoked_at.is_none() && self.record.name == name
    }
}

#[derive(Debug, Default)]
struct Usage {
    rows: Vec<RequestRecord>,
    totals: HashMap<String, UsageTotals>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
        let mut keys = self.keys.lock().unwrap();
        if keys
            .iter()
            .any(|k| k.hash == *hash || k.previous.is_some_and(|(h, _)| h == *hash))
        {
            return Err(StorageError::Conflict("this key already exists".into()));
        }
        if keys.iter().any(|k| k.is_active_named(&record.name)) {
            return Err(name_taken(&record.name));
        }
        keys.push(StoredKey {
            hash: *hash,
            record: record.clone(),
            previous: None,
        });
        Ok(())
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
        let keys = self.keys.lock().unwrap();
        if let Some(key) = keys.iter().find(|k| k.hash == *hash) {
            return Ok(Some(key.record.clone()));
        }
        let previous = keys.iter().find_map(|k| match k.previous {
            Some((h, until)) if h == *hash => Some((k, until)),
            _ => None,
        });
        Ok(previous.map(|(k, until)| {
            let mut record = k.record.clone();
            record.expires_at = Some(record.expires_at.map_or(until, |at| at.min(until)));
            record
        }))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        Ok(self
            .keys
            .lock()
            .unwrap()
            .iter()
            .map(|k| k.record.clone())
            .collect())
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        let mut keys = self.keys.lock().unwrap();
        match active(&mut keys, id) {
            Some(key) => {
                key.record.revoked_at = Some(at);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError> {
        let mut keys = self.keys.lock().unwrap();
        if let Some(name) = &update.name {
            if keys
                .iter()
                .any(|k| k.record.id != id && k.is_active_named(name))
            {
                return Err(name_taken(name));
            }
        }
        Ok(active(&mut keys, id).map(|key| {
            update.apply(&mut key.record);
            key.record.clone()
        }))
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let mut keys = self.keys.lock().unwrap();
        let Some(key) = active(&mut keys, id) else {
            return Ok(false);
        };
        key.previous = Some((key.hash, old_valid_until));
        key.hash = *new_hash;
        key.record.prefix = new_prefix.to_owned();
        Ok(true)
    }
}

/// The active key with this id.
fn active<'k>(keys: &'k mut [StoredKey], id: &str) -> Option<&'k mut StoredKey> {
    keys.iter_mut()
        .find(|k| k.record.id == id && k.record.revoked_at.is_none())
}

fn name_taken(name: &str) -> StorageError {
    StorageError::Conflict(format!("an active key named '{name}' already exists"))
}

#[async_trait]
impl UsageStore for MemoryStore {
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
        let batch = normalized_batch(batch);
        let mut usage = self.usage.lock().unwrap();
        for record in batch.iter() {
            usage
                .totals
                .entry(record.key_id.clone())
                .or_default()
                .add(record);
            usage.rows.push(record.clone());
        }
        Ok(())
    }

    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        let usage = self.usage.lock().unwrap();
        Ok(usage
            .totals
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        Ok(self
            .usage
            .lock()
            .unwrap()
            .totals
            .get(key_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError> {
        let usage = self.usage.lock().unwrap();
        let mut rows: Vec<_> = usage
            .rows
            .iter()
            .rev() // newest first among equal timestamps, like the SQL backends
            .filter(|r| r.key_id == key_id && since.is_none_or(|s| r.at >= s))
            .cloned()
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.at));
        rows.truncate(limit as usize);
        Ok(rows)
    }

    async fn tokens_since(
        &self,
        key_id: &str,
        end_user: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let usage = self.usage.lock().unwrap();
        let rows = usage
            .rows
            .iter()
            .filter(|r| r.key_id == key_id && r.at >= since);
        Ok(tokens_of(rows, end_user))
    }
}

#[async_trait]
impl ModelStore for MemoryStore {
    async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError> {
        Ok(self.models.lock().unwrap().values().cloned().collect())
    }

    async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError> {
        let model = model.normalized()?.into_owned();
        self.models
            .lock()
            .unwrap()
            .insert(model.name.clone(), model);
        Ok(())
    }
}

impl Storage for MemoryStore {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_contract() {
        crate::storage::contract::keys(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn usage_contract() {
        crate::storage::contract::usage(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn hostile_values_contract() {
        crate::storage::contract::hostile_values(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn usage_per_model_contract() {
        crate::storage::contract::usage_per_model(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn key_changes_contract() {
        crate::storage::contract::key_changes(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn limit_changes_at_once_contract() {
        let store = MemoryStore::new();
        crate::storage::contract::limit_changes_at_once(&store, &store).await;
    }

    #[tokio::test]
    async fn end_users_contract() {
        crate::storage::contract::end_users(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn models_contract() {
        crate::storage::contract::models(&MemoryStore::new()).await;
    }
}
