//! stand-in until L and S merge: the limiter's and the key store's items of the fair-use
//! design, with their signatures, so that the server compiles against them. Removed
//! when `fair-limiter` and `fair-storage` are merged.

#![allow(missing_docs, dead_code, clippy::unused_async)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use llmgate_core::auth::{KeyHash, KeyRecord, Role};
use llmgate_core::auth_usage::AuthUsageLayer;
use llmgate_core::limits::KeyLimits;
use llmgate_core::storage::{KeyStore, StorageError, UsageStore};
use serde::Serialize;

// stand-in until L merges
pub const DEFAULT_ESTIMATED_COMPLETION_TOKENS: u64 = 256;

// stand-in until L merges
#[derive(Clone)]
pub struct Limiter {
    defaults: KeyLimits,
    shared: bool,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limiter")
    }
}

// stand-in until L merges
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimiterMode {
    Local,
    Shared,
    Fallback,
}

impl LimiterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Shared => "shared",
            Self::Fallback => "fallback",
        }
    }
}

// stand-in until L merges
#[derive(Debug, Clone, Serialize)]
pub struct LimitStatus {
    pub limits: KeyLimits,
}

// stand-in until L merges
#[derive(Debug)]
pub struct LimitError(pub String);

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitError {}

impl Limiter {
    pub fn local(defaults: KeyLimits, _usage: Arc<dyn UsageStore>) -> Self {
        Self {
            defaults,
            shared: false,
        }
    }
    pub fn shared(
        _redis_url: &str,
        defaults: KeyLimits,
        _usage: Arc<dyn UsageStore>,
        _replicas: u32,
    ) -> Result<Self, LimitError> {
        Ok(Self {
            defaults,
            shared: true,
        })
    }
    pub fn with_token_estimate(self, _default_max_tokens: u64) -> Self {
        self
    }
    pub fn defaults(&self) -> &KeyLimits {
        &self.defaults
    }
    pub fn effective(&self, key: &KeyRecord) -> KeyLimits {
        match key.role {
            Role::User => key.limits.or(&self.defaults),
            Role::Admin => key.limits.clone(),
        }
    }
    pub async fn status(&self, key: &KeyRecord, _end_user: Option<&str>) -> LimitStatus {
        LimitStatus {
            limits: self.effective(key),
        }
    }
    pub fn is_shared(&self) -> bool {
        self.shared
    }
    pub fn mode(&self) -> LimiterMode {
        if self.shared {
            LimiterMode::Shared
        } else {
            LimiterMode::Local
        }
    }
}

// stand-in until L merges
#[derive(Debug, Clone)]
pub struct Effective(pub Arc<KeyLimits>);

// stand-in until L merges
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str);

// stand-in until L merges
pub trait WithLimiter {
    fn limiter(self, limiter: Limiter) -> Self;
}

impl WithLimiter for AuthUsageLayer {
    fn limiter(self, _limiter: Limiter) -> Self {
        self
    }
}

// stand-in until S merges
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub limits: Option<KeyLimits>,
}

// stand-in until S merges
#[async_trait::async_trait]
pub trait KeyStoreFairUse {
    async fn update_key(
        &self,
        id: &str,
        update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError>;
    async fn rotate_key(
        &self,
        id: &str,
        new_hash: &KeyHash,
        new_prefix: &str,
        old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError>;
}

#[async_trait::async_trait]
impl<T: KeyStore + ?Sized> KeyStoreFairUse for T {
    async fn update_key(
        &self,
        _id: &str,
        _update: &KeyUpdate,
    ) -> Result<Option<KeyRecord>, StorageError> {
        Err(StorageError::Database("stand-in".into()))
    }
    async fn rotate_key(
        &self,
        _id: &str,
        _new_hash: &KeyHash,
        _new_prefix: &str,
        _old_valid_until: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        Err(StorageError::Database("stand-in".into()))
    }
}
