//! Counting tokens where the upstream reports none.

use async_trait::async_trait;
use serde_json::Value;

use super::TokenUsage;
use crate::BoxError;

/// Counts the tokens of a request whose upstream sent no usage (a stream from a server
/// that ignores `stream_options.include_usage`). Model runners implement it with the
/// model's own tokenizer. The recorder calls it in the background writer, never on the
/// request path.
#[async_trait]
pub trait TokenCounter: Send + Sync {
    /// `request` is the client's JSON request body (messages or prompt, model, …);
    /// `completion` is the text the stream delivered.
    async fn count(&self, request: &Value, completion: &str) -> Result<TokenUsage, BoxError>;
}

impl std::fmt::Debug for dyn TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn TokenCounter")
    }
}
