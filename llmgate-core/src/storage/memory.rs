//! An in-memory backend: for tests, and for services that embed the layer and keep
//! usage elsewhere. Nothing survives a restart, stored model settings included.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    normalized_batch, KeyStore, ModelStore, RequestRecord, Storage, StorageError, StoredModel,
    UsageStore, UsageTotals,
};
use crate::auth::{KeyHash, KeyRecord};

/// Keys, usage and model settings in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    keys: Mutex<Vec<(KeyHash, KeyRecord)>>,
    usage: Mutex<Usage>,
    models: Mutex<BTreeMap<String, StoredModel>>,
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
        if keys.iter().any(|(h, _)| h == hash) {
            return Err(StorageError::Conflict("this key already exists".into()));
        }
        if keys
            .iter()
            .any(|(_, k)| k.revoked_at.is_none() && k.name == record.name)
        {
            return Err(StorageError::Conflict(format!(
                "an active key named '{}' already exists",
                record.name
            )));
        }
        keys.push((*hash, record.clone()));
        Ok(())
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
        let keys = self.keys.lock().unwrap();
        Ok(keys.iter().find(|(h, _)| h == hash).map(|(_, k)| k.clone()))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        Ok(self
            .keys
            .lock()
            .unwrap()
            .iter()
            .map(|(_, k)| k.clone())
            .collect())
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        let mut keys = self.keys.lock().unwrap();
        match keys
            .iter_mut()
            .find(|(_, k)| k.id == id && k.revoked_at.is_none())
        {
            Some((_, key)) => {
                key.revoked_at = Some(at);
                Ok(true)
            }
            None => Ok(false),
        }
    }
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
    async fn models_contract() {
        crate::storage::contract::models(&MemoryStore::new()).await;
    }
}
