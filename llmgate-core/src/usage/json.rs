//! Token usage from a JSON response body.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::TokenUsage;

/// Beyond this a response is not kept for reading its usage (the client still gets
/// all of it); its tokens are then recorded as unknown.
const MAX_KEPT: usize = 64 * 1024 * 1024;

/// Keeps a copy of the body's frames (cheap: `Bytes` are reference-counted) and reads
/// `usage` and `model` once the body is complete.
#[derive(Debug, Default)]
pub(crate) struct JsonCollector {
    frames: Vec<Bytes>,
    len: usize,
    overflowed: bool,
}

#[derive(Deserialize)]
struct Peek {
    model: Option<String>,
    usage: Option<UsageFields>,
}

/// The `usage` object's counts, read without building a JSON tree.
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl UsageFields {
    fn token_usage(&self) -> Option<TokenUsage> {
        TokenUsage::from_counts(
            self.prompt_tokens.or(self.input_tokens),
            self.completion_tokens.or(self.output_tokens),
            self.total_tokens,
        )
    }
}

impl JsonCollector {
    pub(crate) fn observe(&mut self, data: &Bytes) {
        if self.overflowed {
            return;
        }
        self.len += data.len();
        if self.len > MAX_KEPT {
            self.overflowed = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(data.clone());
        }
    }

    /// The usage and model of the complete body, if it has them.
    pub(crate) fn finish(&mut self) -> (Option<TokenUsage>, Option<String>) {
        let frames = std::mem::take(&mut self.frames);
        let body = match frames.len() {
            0 => return (None, None),
            1 => frames.into_iter().next().expect("one frame"),
            _ => {
                let mut all = BytesMut::with_capacity(self.len);
                frames.iter().for_each(|f| all.extend_from_slice(f));
                all.freeze()
            }
        };
        match serde_json::from_slice::<Peek>(&body) {
            Ok(peek) => (
                peek.usage.as_ref().and_then(UsageFields::token_usage),
                peek.model,
            ),
            Err(_) => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_usage_from_a_body_split_into_frames() {
        let body = br#"{"id":"x","model":"gemma","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        let mut collector = JsonCollector::default();
        for part in body.chunks(10) {
            collector.observe(&Bytes::copy_from_slice(part));
        }
        let (usage, model) = collector.finish();
        assert_eq!(
            usage,
            Some(TokenUsage {
                prompt_tokens: 5,
                completion_tokens: 2
            })
        );
        assert_eq!(model.as_deref(), Some("gemma"));
    }

    #[test]
    fn a_body_that_is_not_json_has_no_usage() {
        let mut collector = JsonCollector::default();
        collector.observe(&Bytes::from_static(b"<html>bad gateway</html>"));
        assert_eq!(collector.finish(), (None, None));
    }
}
