//! Token usage from a JSON response body.

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;

use super::held::{HeadAndTail, MAX_HELD_BYTES};
use super::scan;
use super::TokenUsage;

/// Keeps a copy of the body's frames (cheap: `Bytes` are reference-counted) and reads
/// `usage` and `model` once the body is complete. A body over [`MAX_HELD_BYTES`] is
/// not held: only its ends are, and its usage is read from its tail.
#[derive(Debug, Default)]
pub(crate) struct JsonCollector {
    frames: Vec<Bytes>,
    len: usize,
    /// The body is over [`MAX_HELD_BYTES`]: its first and last bytes.
    long: Option<HeadAndTail>,
}

#[derive(Deserialize)]
struct Peek {
    model: Option<String>,
    usage: Option<UsageFields>,
}

/// The `usage` object's counts, read without building a JSON tree. Every OpenAI shape:
/// `prompt_tokens`/`completion_tokens`/`total_tokens` (chat, completions, embeddings)
/// and `input_tokens`/`output_tokens` (responses, audio transcriptions; a
/// transcription billed by `{"type": "duration", "seconds": …}` has no tokens).
#[derive(Deserialize)]
pub(super) struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl UsageFields {
    pub(super) fn token_usage(&self) -> Option<TokenUsage> {
        TokenUsage::from_counts(
            self.prompt_tokens.or(self.input_tokens),
            self.completion_tokens.or(self.output_tokens),
            self.total_tokens,
        )
    }
}

/// Whether to read the model from a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyModel {
    /// The request named none.
    Read,
    /// The request named it; only the usage is wanted.
    Skip,
}

impl JsonCollector {
    pub(crate) fn observe(&mut self, data: &Bytes) {
        if let Some(long) = &mut self.long {
            long.push(data);
            return;
        }
        self.len += data.len();
        if self.len > MAX_HELD_BYTES {
            let mut long = HeadAndTail::default();
            for frame in std::mem::take(&mut self.frames) {
                long.push(&frame);
            }
            long.push(data);
            self.long = Some(long);
        } else {
            self.frames.push(data.clone());
        }
    }

    /// Bytes held for reading the usage.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.long.as_ref().map_or(self.len, HeadAndTail::held)
    }

    /// The usage and model of the complete body, if it has them (the model only when
    /// `model` says to read it).
    pub(crate) fn finish(&mut self, model: BodyModel) -> (Option<TokenUsage>, Option<String>) {
        let want_model = model == BodyModel::Read;
        if let Some(long) = self.long.take() {
            let usage = trailing_usage(long.tail(), 1).and_then(|u| u.token_usage());
            let model = want_model.then(|| leading_model(long.head())).flatten();
            return (usage, model);
        }
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
            if let Some(usage) = trailing_usage(&body, 1) {
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

/// The top-level `model` of an object cut off after its first bytes, when it is whole
/// there.
fn leading_model(head: &[u8]) -> Option<String> {
    let member = scan::find_member(head, scan::skip_ws(head, 0), b"model")?;
    serde_json::from_slice(&head[member.value]).ok()
}

/// How many `usage` names, from the end, [`trailing_usage`] tries: a hostile body full
/// of them costs a bounded number of short scans.
const TRAILING_TRIES: usize = 16;

/// The `usage` object that is a member `levels` objects deep (1: of the top-level
/// object) when nothing but members and closing braces follow it, as every
/// OpenAI-compatible server writes it (after `choices`, `output` or `data`). Read from
/// the end, without parsing the generated text before it, so it works on the last
/// bytes of a body too. `None` for any other shape (the caller then parses whole).
pub(super) fn trailing_usage(bytes: &[u8], levels: usize) -> Option<UsageFields> {
    memmem::rfind_iter(bytes, b"\"usage\"")
        .take(TRAILING_TRIES)
        .find_map(|at| {
            // A name's quote follows `{` or `,`; a quote inside a string follows a
            // backslash, so text that quotes `"usage":` is never taken for the name.
            let before = bytes[..at].trim_ascii_end().last();
            if !matches!(before, Some(b'{' | b',')) {
                return None;
            }
            let rest = bytes[at + b"\"usage\"".len()..].trim_ascii_start();
            let value = rest.strip_prefix(b":")?;
            let mut values = serde_json::Deserializer::from_slice(value).into_iter::<UsageFields>();
            let usage = values.next()?.ok()?;
            (objects_closed(&value[values.byte_offset()..]) == Some(levels)).then_some(usage)
        })
}

/// How many enclosing objects the bytes after a member close, up to a last brace
/// with nothing after it; `None` when they close an array or never end that way.
fn objects_closed(tail: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut closed = 0;
    let mut i = 0;
    while let Some(&byte) = tail.get(i) {
        match byte {
            b'"' => {
                i = scan::string_end(tail, i)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => depth -= 1,
            b'}' => {
                closed += 1;
                if tail[i + 1..].trim_ascii().is_empty() {
                    return Some(closed);
                }
            }
            b']' => return None,
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::MAX_HELD_BYTES;

    #[test]
    fn reads_usage_from_a_body_split_into_frames() {
        let body = br#"{"id":"x","model":"gemma","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
        let mut collector = JsonCollector::default();
        for part in body.chunks(10) {
            collector.observe(&Bytes::copy_from_slice(part));
        }
        let (usage, model) = collector.finish(BodyModel::Read);
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
        collector.finish(BodyModel::Skip).0
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
        assert_eq!(collector.finish(BodyModel::Read), (None, None));
    }

    #[test]
    fn reads_transcription_usage_and_knows_duration_billing_has_no_tokens() {
        let body = r#"{"text":"Hello there.","usage":{"type":"tokens","input_tokens":14,"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":4,"total_tokens":18}}"#;
        assert_eq!(usage_of(body), tokens(14, 4));
        let body = r#"{"text":"Hello there.","usage":{"type":"duration","seconds":3}}"#;
        assert_eq!(usage_of(body), None);
        let body = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[-1.9361265e-07]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(usage_of(body), tokens(8, 0));
    }

    #[test]
    fn a_name_written_inside_text_is_not_taken_for_the_usage() {
        // A key that ends in an escaped quote: the bytes `"usage":` sit inside a name.
        let body = r#"{"choices":[],"note \"usage":{"prompt_tokens":99,"completion_tokens":99}}"#;
        assert_eq!(usage_of(body), None);
    }

    /// Feeds a body made of `start`, `len` filler bytes and `end` in 64 KiB frames.
    fn long_body(start: &str, len: usize, end: &str) -> JsonCollector {
        let mut collector = JsonCollector::default();
        collector.observe(&Bytes::copy_from_slice(start.as_bytes()));
        let filler = Bytes::from(vec![b'7'; 64 * 1024]);
        for _ in 0..len / filler.len() {
            collector.observe(&filler);
            assert!(collector.held() <= MAX_HELD_BYTES);
        }
        collector.observe(&Bytes::copy_from_slice(end.as_bytes()));
        assert!(collector.held() <= MAX_HELD_BYTES);
        collector
    }

    #[test]
    fn a_body_over_the_limit_is_not_held_and_is_counted_from_its_end() {
        let mut embeddings = long_body(
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0."#,
            20 * 1024 * 1024,
            r#"]}],"model":"m","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        assert_eq!(embeddings.finish(BodyModel::Read), (tokens(8, 0), None));

        let mut model_first = long_body(
            r#"{"model":"gemma","choices":[{"text":"0."#,
            2 * MAX_HELD_BYTES,
            r#""}],"usage":{"prompt_tokens":1,"completion_tokens":2},"timings":{}}"#,
        );
        assert_eq!(
            model_first.finish(BodyModel::Read),
            (tokens(1, 2), Some("gemma".into()))
        );

        // Usage that is not at the end of a long body cannot be read: tokens unknown.
        let mut usage_first = long_body(
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"data":[0."#,
            2 * MAX_HELD_BYTES,
            "]}",
        );
        assert_eq!(usage_first.finish(BodyModel::Skip), (None, None));
    }
}
