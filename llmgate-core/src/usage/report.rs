//! Usage per key, joined with the keys' names: what the admin API and `llmgate usage`
//! show.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::{KeyRecord, Role};
use crate::storage::{KeyStore, ModelUsage, StorageError, UsageStore, UsageTotals};

/// One key's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// The key's id.
    pub key_id: String,
    /// The key's name.
    pub name: String,
    /// The key's role.
    pub role: Role,
    /// Whether the key has been revoked.
    pub revoked: bool,
    /// Requests made.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Requests whose token counts are unknown (not included in the token sums).
    pub requests_without_usage: u64,
    /// When the last request arrived.
    pub last_request_at: Option<DateTime<Utc>>,
    /// Requests per endpoint path.
    pub endpoints: BTreeMap<String, u64>,
    /// Usage per model (`none` for requests that named none, `other` past
    /// [`MAX_MODELS_PER_KEY`](crate::storage::MAX_MODELS_PER_KEY) models).
    pub models: BTreeMap<String, ModelUsage>,
    /// Usage per end user the requests named (`other` past
    /// [`MAX_END_USERS_PER_KEY`](crate::storage::MAX_END_USERS_PER_KEY) of them);
    /// requests that named none are in no entry. Left out when empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, ModelUsage>,
}

impl KeyUsage {
    /// A key's record and totals, together.
    pub fn new(key: &KeyRecord, totals: UsageTotals) -> Self {
        Self {
            key_id: key.id.clone(),
            name: key.name.clone(),
            role: key.role,
            revoked: key.revoked_at.is_some(),
            requests: totals.requests,
            prompt_tokens: totals.prompt_tokens,
            completion_tokens: totals.completion_tokens,
            total_tokens: totals.total_tokens(),
            requests_without_usage: totals.requests_without_usage,
            last_request_at: totals.last_request_at,
            endpoints: totals.endpoints,
            models: totals.models,
            users: totals.users,
        }
    }
}

/// Every key (revoked ones too: their history stays), oldest first, with its usage.
pub async fn usage_report(
    keys: &dyn KeyStore,
    usage: &dyn UsageStore,
) -> Result<Vec<KeyUsage>, StorageError> {
    let mut totals = usage.totals().await?;
    Ok(keys
        .list_keys()
        .await?
        .iter()
        .map(|key| KeyUsage::new(key, totals.remove(&key.id).unwrap_or_default()))
        .collect())
}
