//! Token counts for streams whose server reports no usage, with the model's own
//! tokenizer.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::{format_chat_prompt, ModelRunner};
use crate::usage::{TokenCounter, TokenUsage};
use crate::BoxError;

/// Counts a streamed request's tokens through its runner's tokenizer:
/// - completion tokens: the streamed text, tokenized (without the BOS token a prompt
///   gets);
/// - prompt tokens: the prompt rebuilt with the runner's chat format
///   ([`format_chat_prompt`]) and tokenized as the server does (BOS included); for a
///   chat format not known here, the messages' text joined (an approximation).
#[derive(Debug, Clone)]
pub struct RunnerTokenCounter {
    runner: Arc<dyn ModelRunner>,
}

impl RunnerTokenCounter {
    /// A counter using `runner`'s tokenizer.
    pub fn new(runner: Arc<dyn ModelRunner>) -> Self {
        Self { runner }
    }
}

#[async_trait]
impl TokenCounter for RunnerTokenCounter {
    async fn count(&self, request: &Value, completion: &str) -> Result<TokenUsage, BoxError> {
        let prompt = if let Some(messages) = request["messages"].as_array() {
            let format = self.runner.chat_format();
            format
                .as_deref()
                .and_then(|f| format_chat_prompt(f, messages))
                .unwrap_or_else(|| {
                    messages
                        .iter()
                        .filter_map(|m| m["content"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
        } else {
            match &request["prompt"] {
                Value::String(p) => p.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(""),
                _ => String::new(),
            }
        };
        let bos = self.runner.count_tokens("").await?;
        let prompt_tokens = self.runner.count_tokens(&prompt).await?;
        let completion_tokens = if completion.is_empty() {
            0
        } else {
            self.runner
                .count_tokens(completion)
                .await?
                .saturating_sub(bos)
        };
        Ok(TokenUsage {
            prompt_tokens,
            completion_tokens,
        })
    }
}
