//! A storage backend of your own behind llmgate's `AuthUsageLayer`: keys and usage in
//! memory, with usage kept per key *and per day*, so a service can bill or limit by day.
//!
//! A backend implements three traits, `KeyStore`, `UsageStore` and `ModelStore` (and
//! `Storage` to be all three); its tests run llmgate's storage contract (`llmgate_core::storage::contract`,
//! feature `test-util`), as `tests/custom_storage.rs` does for this one.
//!
//! ```text
//! cargo run -p llmgate-examples --bin custom_storage
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Bytes;
use llmgate_core::auth::{KeyCache, KeyHash, KeyRecord, Role, Secret};
use llmgate_core::storage::{
    normalized_batch, KeyStore, KeyUpdate, ModelStore, RequestRecord, Storage, StorageError,
    StoredModel, UsageStore, UsageTotals,
};
use llmgate_core::usage::UsageRecorder;
use llmgate_core::AuthUsageLayer;
use tower::{ServiceBuilder, ServiceExt};

/// Keys and usage in memory; usage totals per key and per day (UTC).
#[derive(Debug, Default)]
pub struct DailyStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Oldest first, as `list_keys` answers.
    keys: Vec<(KeyHash, KeyRecord)>,
    /// By key id, the secret a key had before its last rotation, and until when it works.
    previous: BTreeMap<String, (KeyHash, DateTime<Utc>)>,
    rows: Vec<RequestRecord>,
    days: BTreeMap<(String, NaiveDate), UsageTotals>,
    /// Model settings changed at run time, by name.
    models: BTreeMap<String, StoredModel>,
}

impl DailyStore {
    /// A key's usage, day by day.
    pub fn daily(&self, key_id: &str) -> BTreeMap<NaiveDate, UsageTotals> {
        let state = self.state.lock().unwrap();
        state
            .days
            .iter()
            .filter(|((key, _), _)| key == key_id)
            .map(|((_, day), totals)| (*day, totals.clone()))
            .collect()
    }
}

/// Adds one day's totals to a running sum; sums stop at `u64::MAX` like llmgate's own.
fn add_day(sum: &mut UsageTotals, day: &UsageTotals) {
    sum.requests = sum.requests.saturating_add(day.requests);
    sum.prompt_tokens = sum.prompt_tokens.saturating_add(day.prompt_tokens);
    sum.completion_tokens = sum.completion_tokens.saturating_add(day.completion_tokens);
    sum.requests_without_usage = sum
        .requests_without_usage
        .saturating_add(day.requests_without_usage);
    sum.last_request_at = sum.last_request_at.max(day.last_request_at);
    for (endpoint, n) in &day.endpoints {
        let count = sum.endpoints.entry(endpoint.clone()).or_default();
        *count = count.saturating_add(*n);
    }
    for (model, usage) in &day.models {
        sum.models.entry(model.clone()).or_default().merge(usage);
    }
    for (user, usage) in &day.users {
        sum.users.entry(user.clone()).or_default().merge(usage);
    }
}

#[async_trait]
impl KeyStore for DailyStore {
    async fn insert_key(&self, record: &KeyRecord, hash: &KeyHash) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        if state
            .keys
            .iter()
            .any(|(h, k)| h == hash || (k.revoked_at.is_none() && k.name == record.name))
        {
            return Err(StorageError::Conflict(format!(
                "an active key named '{}' already exists",
                record.name
            )));
        }
        state.keys.push((*hash, record.clone()));
        Ok(())
    }

    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StorageError> {
        let state = self.state.lock().unwrap();
        if let Some((_, key)) = state.keys.iter().find(|(h, _)| h == hash) {
            return Ok(Some(key.clone()));
        }
        // A previous secret works until its grace ends: the key expires then for it.
        let Some((id, until)) = state
            .previous
            .iter()
            .find_map(|(id, (h, until))| (h == hash).then_some((id, *until)))
        else {
            return Ok(None);
        };
        Ok(state.keys.iter().find(|(_, k)| &k.id == id).map(|(_, k)| {
            let mut key = k.clone();
            key.expires_at = Some(key.expires_at.map_or(until, |at| at.min(until)));
            key
        }))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StorageError> {
        let state = self.state.lock().unwrap();
        Ok(state.keys.iter().map(|(_, k)| k.clone()).collect())
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        let active = state
            .keys
            .iter_mut()
            .find(|(_, k)| k.id == id && k.revoked_at.is_none());
        Ok(active.map(|(_, k)| k.revoked_at = Some(at)).is_some())
    }

    async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError> {
        let mut state = self.state.lock().unwrap();
        if let Some(name) = &update.name {
            if state
                .keys
                .iter()
                .any(|(_, k)| k.id != id && k.revoked_at.is_none() && &k.name == name)
            {
                return Err(StorageError::Conflict(format!(
                    "an active key named '{name}' already exists"
                )));
            }
        }
        let active = state
            .keys
            .iter_mut()
            .find(|(_, k)| k.id == id && k.revoked_at.is_none());
        // Applied under the lock, to the key as it is: two updates at once of different
        // limits both hold (the contract's `limit_changes_at_once` checks it).
        Ok(active.map(|(_, k)| {
            update.apply(k);
            k.clone()
        }))
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        let Some((hash, key)) = state
            .keys
            .iter_mut()
            .find(|(_, k)| k.id == id && k.revoked_at.is_none())
        else {
            return Ok(false);
        };
        let old = std::mem::replace(hash, *new_hash);
        key.prefix = new_prefix.to_owned();
        state.previous.insert(id.to_owned(), (old, old_valid_until));
        Ok(true)
    }
}

#[async_trait]
impl UsageStore for DailyStore {
    async fn record(&self, batch: &[RequestRecord]) -> Result<(), StorageError> {
        // What every backend keeps: counts, latencies and names within llmgate's bounds.
        let batch = normalized_batch(batch);
        let mut state = self.state.lock().unwrap();
        for record in batch.iter() {
            let day = (record.key_id.clone(), record.at.date_naive());
            state.days.entry(day).or_default().add(record);
            state.rows.push(record.clone());
        }
        Ok(())
    }

    async fn totals(&self) -> Result<BTreeMap<String, UsageTotals>, StorageError> {
        let state = self.state.lock().unwrap();
        let mut all = BTreeMap::<String, UsageTotals>::new();
        for ((key_id, _), day) in &state.days {
            add_day(all.entry(key_id.clone()).or_default(), day);
        }
        Ok(all)
    }

    async fn totals_for_key(&self, key_id: &str) -> Result<UsageTotals, StorageError> {
        let mut sum = UsageTotals::default();
        for day in self.daily(key_id).values() {
            add_day(&mut sum, day);
        }
        Ok(sum)
    }

    async fn requests(
        &self,
        key_id: &str,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StorageError> {
        let state = self.state.lock().unwrap();
        // Newest first; of two at the same time, the one recorded last.
        let mut rows: Vec<RequestRecord> = state
            .rows
            .iter()
            .rev()
            .filter(|r| r.key_id == key_id && since.is_none_or(|since| r.at >= since))
            .cloned()
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.at));
        rows.truncate(limit as usize);
        Ok(rows)
    }
}

#[async_trait]
impl ModelStore for DailyStore {
    async fn stored_models(&self) -> Result<Vec<StoredModel>, StorageError> {
        let state = self.state.lock().unwrap();
        Ok(state.models.values().cloned().collect())
    }

    async fn store_model(&self, model: &StoredModel) -> Result<(), StorageError> {
        // What every backend keeps: names without NUL and within llmgate's bounds.
        let model = model.normalized()?.into_owned();
        let mut state = self.state.lock().unwrap();
        state.models.insert(model.name.clone(), model);
        Ok(())
    }
}

impl Storage for DailyStore {}

/// Your model endpoint: the `usage` object it answers is what gets counted.
async fn chat(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = r#"{"object":"chat.completion","model":"echo","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(answer.as_bytes())))
        .expect("a valid response"))
}

/// Sends one chat request through the layer, with `key` if given, and answers the status.
pub async fn send(
    store: &Arc<DailyStore>,
    recorder: &UsageRecorder,
    key: Option<&Secret>,
) -> http::StatusCode {
    let service = ServiceBuilder::new()
        .layer(AuthUsageLayer::new(
            KeyCache::new(store.clone()),
            recorder.clone(),
        ))
        .service_fn(chat);
    let mut request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"echo"}"#)))
        .expect("a valid request");
    if let Some(key) = key {
        let bearer = format!("Bearer {}", key.expose());
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            bearer.parse().expect("a header"),
        );
    }
    let response = service.oneshot(request).await.expect("infallible");
    let status = response.status();
    // Usage is counted as the answer's body is read.
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    status
}

/// A store with one key, `demo`.
pub async fn store_with_demo_key() -> Result<(Arc<DailyStore>, KeyRecord, Secret), StorageError> {
    let store = Arc::new(DailyStore::default());
    let secret = Secret::generate();
    let key = KeyRecord::new("demo", Role::User, &secret);
    store.insert_key(&key, &secret.hash()).await?;
    Ok((store, key, secret))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (store, key, secret) = store_with_demo_key().await?;
    let (recorder, writer) = UsageRecorder::start(store.clone());
    for _ in 0..3 {
        println!(
            "with the key: {}",
            send(&store, &recorder, Some(&secret)).await
        );
    }
    println!("without a key: {}", send(&store, &recorder, None).await);
    recorder.flush().await;
    for (day, usage) in store.daily(&key.id) {
        println!(
            "{day}: {} requests, {} tokens",
            usage.requests,
            usage.total_tokens()
        );
    }
    writer.shutdown().await;
    Ok(())
}
