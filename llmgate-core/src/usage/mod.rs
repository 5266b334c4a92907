//! Per-key usage: reading token counts out of responses, and recording them.
//!
//! The readers here find a JSON body's `usage` object, or the usage chunk at the end of
//! a server-sent-event stream, as the bytes go by; the request inspector learns a
//! request's model and streaming options. The middleware in
//! [`auth_usage`](crate::auth_usage) drives them from its response body and holds a
//! guard that settles one [`RequestRecord`](crate::storage::RequestRecord) when the body
//! ends or is dropped (a client that goes away mid-stream is still counted). The guard
//! hands the record to the [`UsageRecorder`]'s queue; a background [`UsageWriter`]
//! writes the queue to a [`UsageStore`](crate::storage::UsageStore) in batches, so the
//! request path never waits on the database.

mod counter;
#[cfg(test)]
mod fuzz_tests;
mod held;
mod json;
mod recorder;
mod report;
mod request;
mod scan;
mod spill;
mod sse;

pub use crate::storage::{endpoint_label, OTHER_ENDPOINT};
pub use counter::TokenCounter;
pub use held::{MAX_GATHERED_TEXT_BYTES, MAX_HELD_BYTES};
pub use recorder::{
    RecorderOptions, RejectedRecord, UsageObserver, UsageRecorder, UsageWriter, DEFAULT_QUEUE_MAX,
    MAX_REJECTED_SHOWN, MAX_WAITING_FOR_COUNT, REJECTED_FILE, SPILL_FILE,
};
pub use report::{usage_report, KeyUsage};

pub(crate) use json::{BodyModel, JsonCollector};
pub(crate) use recorder::UsageGuard;
pub(crate) use request::{inspect_request, ForCounting, RequestPlan};
pub(crate) use sse::{SseExtractor, StreamText, StreamUsage};

use serde_json::Value;

/// Tokens of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Tokens of the prompt (input).
    pub prompt_tokens: u64,
    /// Tokens generated (output).
    pub completion_tokens: u64,
}

impl TokenUsage {
    /// Reads an OpenAI `usage` object: `prompt_tokens`/`completion_tokens` (chat,
    /// completions, embeddings) or `input_tokens`/`output_tokens` (responses API).
    pub fn from_usage_object(usage: &Value) -> Option<Self> {
        let usage = usage.as_object()?;
        let field = |name: &str| usage.get(name).and_then(Value::as_u64);
        Self::from_counts(
            field("prompt_tokens").or_else(|| field("input_tokens")),
            field("completion_tokens").or_else(|| field("output_tokens")),
            field("total_tokens"),
        )
    }

    pub(crate) fn from_counts(
        prompt: Option<u64>,
        completion: Option<u64>,
        total: Option<u64>,
    ) -> Option<Self> {
        match (prompt, completion, total) {
            (Some(p), Some(c), _) => Some(Self {
                prompt_tokens: p,
                completion_tokens: c,
            }),
            // Embeddings report only prompt and total tokens.
            (Some(p), None, t) => Some(Self {
                prompt_tokens: p,
                completion_tokens: t.map_or(0, |t| t.saturating_sub(p)),
            }),
            (None, Some(c), _) => Some(Self {
                prompt_tokens: 0,
                completion_tokens: c,
            }),
            (None, None, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_usage_shape() {
        let chat = json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21});
        assert_eq!(
            TokenUsage::from_usage_object(&chat),
            Some(TokenUsage {
                prompt_tokens: 9,
                completion_tokens: 12
            })
        );
        let responses = json!({"input_tokens": 4, "output_tokens": 6, "total_tokens": 10});
        assert_eq!(
            TokenUsage::from_usage_object(&responses),
            Some(TokenUsage {
                prompt_tokens: 4,
                completion_tokens: 6
            })
        );
        let embeddings = json!({"prompt_tokens": 8, "total_tokens": 8});
        assert_eq!(
            TokenUsage::from_usage_object(&embeddings),
            Some(TokenUsage {
                prompt_tokens: 8,
                completion_tokens: 0
            })
        );
        assert_eq!(TokenUsage::from_usage_object(&Value::Null), None);
        assert_eq!(TokenUsage::from_usage_object(&json!({})), None);
    }
}
