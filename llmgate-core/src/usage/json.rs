//! Token usage from a JSON response body.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
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

    /// The usage and model of the complete body, if it has them. The model is read only
    /// when `want_model` (the request named none).
    pub(crate) fn finish(&mut self, want_model: bool) -> (Option<TokenUsage>, Option<String>) {
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
        if !want_model {
            if let Some(usage) = trailing_usage(&body) {
                return (usage.token_usage(), None);
            }
        }
        match serde_json::from_slice::<Peek>(&body) {
            Ok(peek) => (
                peek.usage.as_ref().and_then(UsageFields::token_usage),
                peek.model,
            ),
            Err(_) => (None, None),
        }
    }
}

/// The top-level `usage` object when it is the last object member that holds one, as
/// every OpenAI-compatible server writes it (after `choices`): read from there on,
/// without parsing the generated text before it. `None` for any other shape, which the
/// caller then parses whole.
fn trailing_usage(body: &[u8]) -> Option<UsageFields> {
    // In JSON text a string holding `"usage"` has its quotes escaped, so these bytes are
    // a string token: a member name when a colon follows.
    let at = memmem::rfind(body, b"\"usage\"")?;
    let rest = body[at + b"\"usage\"".len()..].trim_ascii_start();
    let value = rest.strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<UsageFields>();
    let usage = values.next()?.ok()?;
    closes_the_top_level(&value[values.byte_offset()..]).then_some(usage)
}

/// Whether what follows a member of the top-level object is only more members and the
/// object's closing brace: then that member was at the top level.
fn closes_the_top_level(tail: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = tail.get(i) {
        match byte {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                loop {
                    let Some(j) = tail.get(i..).and_then(|s| memchr::memchr2(b'"', b'\\', s))
                    else {
                        return false;
                    };
                    i += j + 1;
                    if tail[i - 1] == b'"' {
                        break;
                    }
                    i += 1; // the escaped character
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b'}' => return tail[i + 1..].trim_ascii().is_empty(),
            b']' => return false,
            _ => {}
        }
        i += 1;
    }
    false
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
        let (usage, model) = collector.finish(true);
        assert_eq!(
            usage,
            Some(TokenUsage {
                prompt_tokens: 5,
                completion_tokens: 2
            })
        );
        assert_eq!(model.as_deref(), Some("gemma"));
    }

    fn usage_of(body: &str) -> Option<TokenUsage> {
        let mut collector = JsonCollector::default();
        collector.observe(&Bytes::copy_from_slice(body.as_bytes()));
        collector.finish(false).0
    }

    fn tokens(prompt_tokens: u64, completion_tokens: u64) -> Option<TokenUsage> {
        Some(TokenUsage {
            prompt_tokens,
            completion_tokens,
        })
    }

    #[test]
    fn reads_the_top_level_usage_whatever_comes_before_or_after_it() {
        // llama.cpp's server puts `timings` after `usage`; text may quote "usage".
        let body = r#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 99} }"}}],
            "usage" : {"prompt_tokens":5,"completion_tokens":2,"total_tokens":7},
            "timings":{"prompt_n":5,"note":"}]"},"id":"x"}"#;
        assert_eq!(usage_of(body), tokens(5, 2));
        // Responses API field names.
        let body = r#"{"output":[{"content":[{"text":"hi"}]}],"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}"#;
        assert_eq!(usage_of(body), tokens(3, 4));
    }

    #[test]
    fn a_nested_usage_after_the_top_level_one_is_not_taken_for_it() {
        let body = r#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"extra":{"usage":{"prompt_tokens":50,"completion_tokens":50}}}"#;
        assert_eq!(usage_of(body), tokens(1, 1));
        let body = r#"{"data":[{"usage":{"prompt_tokens":50,"completion_tokens":50}}]}"#;
        assert_eq!(usage_of(body), None);
        let body = r#"{"usage":null}"#;
        assert_eq!(usage_of(body), None);
    }

    #[test]
    fn a_body_that_is_not_json_has_no_usage() {
        let mut collector = JsonCollector::default();
        collector.observe(&Bytes::from_static(b"<html>bad gateway</html>"));
        assert_eq!(collector.finish(true), (None, None));
    }
}
