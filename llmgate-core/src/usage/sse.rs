//! Token usage from a server-sent-event stream (`stream: true`).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

use super::TokenUsage;

/// Splits a byte stream into whole SSE events (each ending in a blank line).
#[derive(Debug, Default)]
struct EventSplitter {
    buf: BytesMut,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
    /// Start of the current line within `buf`.
    line_start: usize,
}

impl EventSplitter {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete event, terminator included.
    fn next_event(&mut self) -> Option<Bytes> {
        while let Some(offset) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            let newline = self.scanned + offset;
            let line = &self.buf[self.line_start..newline];
            self.scanned = newline + 1;
            if line.is_empty() || line == b"\r" {
                if newline == self.line_start && self.line_start == 0 {
                    // A stray blank line before any field: not an event of its own.
                    let _ = self.buf.split_to(newline + 1);
                    self.reset_positions();
                    continue;
                }
                let event = self.buf.split_to(newline + 1).freeze();
                self.reset_positions();
                return Some(event);
            }
            self.line_start = newline + 1;
        }
        None
    }

    fn reset_positions(&mut self) {
        self.scanned = 0;
        self.line_start = 0;
    }

    /// Whatever is left when the stream ends (an unterminated last event).
    fn take_rest(&mut self) -> Bytes {
        self.reset_positions();
        self.buf.split().freeze()
    }
}

/// The JSON payload of an event: its `data:` lines joined.
fn payload(event: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = line.strip_prefix(b"data:") {
            if !out.is_empty() {
                out.push(b'\n');
            }
            out.extend_from_slice(data.strip_prefix(b" ").unwrap_or(data));
        }
    }
    out
}

/// The event with its data replaced by `json`, other fields and line endings kept.
fn with_payload(event: &[u8], json: &[u8]) -> Bytes {
    let crlf = memmem::find(event, b"\r\n").is_some();
    let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut data_written = false;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line.starts_with(b"data:") {
            if !data_written {
                let spaced = line.starts_with(b"data: ");
                out.extend_from_slice(if spaced { b"data: " } else { b"data:" });
                out.extend_from_slice(json);
                out.extend_from_slice(eol);
                data_written = true;
            }
        } else {
            out.extend_from_slice(line);
            out.extend_from_slice(eol);
        }
    }
    out.extend_from_slice(eol);
    Bytes::from(out)
}

/// Watches (or, when the gateway asked for usage itself, edits) an SSE stream.
#[derive(Debug)]
pub(crate) struct SseExtractor {
    splitter: EventSplitter,
    /// The client did not ask for usage: remove what asking added.
    strip_usage: bool,
    /// Gather the streamed text, for a token counter.
    text: Option<String>,
    usage: Option<TokenUsage>,
    model: Option<String>,
}

impl SseExtractor {
    pub(crate) fn new(strip_usage: bool, collect_text: bool) -> Self {
        Self {
            splitter: EventSplitter::default(),
            strip_usage,
            text: collect_text.then(String::new),
            usage: None,
            model: None,
        }
    }

    /// Whether the stream reaching the client differs from the upstream's, so frames
    /// must go out through [`SseExtractor::edit`].
    pub(crate) fn edits(&self) -> bool {
        self.strip_usage
    }

    /// Looks at a frame that goes to the client unchanged.
    pub(crate) fn observe(&mut self, data: &[u8]) {
        self.splitter.push(data);
        while let Some(event) = self.splitter.next_event() {
            let _ = self.inspect(&event);
        }
    }

    /// Takes a frame and queues what the client should get in its place.
    pub(crate) fn edit(&mut self, data: &[u8], out: &mut VecDeque<Bytes>) {
        self.splitter.push(data);
        while let Some(event) = self.splitter.next_event() {
            if let Some(kept) = self.inspect(&event) {
                out.push_back(kept);
            }
        }
    }

    /// The stream ended: flush an unterminated last event.
    pub(crate) fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        let rest = self.splitter.take_rest();
        if !rest.is_empty() {
            let edited = self.inspect(&rest);
            if self.strip_usage {
                out.extend(edited);
            }
        }
    }

    pub(crate) fn usage(&self) -> Option<TokenUsage> {
        self.usage
    }

    pub(crate) fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub(crate) fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// Reads one event; returns what the client gets for it (`None`: nothing).
    fn inspect(&mut self, event: &Bytes) -> Option<Bytes> {
        let has_usage = memmem::find(event, b"\"usage\"").is_some();
        if !has_usage && self.text.is_none() && self.model.is_some() {
            return Some(event.clone());
        }
        let data = payload(event);
        if data.is_empty() || data == b"[DONE]" {
            return Some(event.clone());
        }
        let Ok(mut chunk) = serde_json::from_slice::<Value>(&data) else {
            return Some(event.clone());
        };
        if self.model.is_none() {
            self.model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        if let Some(text) = &mut self.text {
            gather_text(&chunk, text);
        }
        let Some(object) = chunk.as_object_mut() else {
            return Some(event.clone());
        };
        let Some(usage) = object.get("usage") else {
            return Some(event.clone());
        };
        let had_usage = !usage.is_null();
        if let Some(found) = TokenUsage::from_usage_object(usage) {
            self.usage = Some(found);
        }
        if !self.strip_usage {
            return Some(event.clone());
        }
        object.remove("usage");
        let no_choices = object
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if had_usage && no_choices {
            // The extra chunk the gateway asked for: the client never sees it.
            return None;
        }
        let json = serde_json::to_vec(&chunk).expect("a JSON value serializes");
        Some(with_payload(event, &json))
    }
}

/// Appends the text of a chat (`delta.content`) or completion (`text`) chunk.
fn gather_text(chunk: &Value, into: &mut String) {
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return;
    };
    for choice in choices {
        let piece = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str);
        if let Some(piece) = piece {
            into.push_str(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str, usage: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]{usage}}}\n\n"
        )
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n";

    fn run(extractor: &mut SseExtractor, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = VecDeque::new();
        for frame in frames {
            if extractor.edits() {
                extractor.edit(frame, &mut out);
            } else {
                extractor.observe(frame);
                out.push_back(Bytes::copy_from_slice(frame));
            }
        }
        extractor.finish(&mut out);
        out.into_iter().flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn finds_usage_in_a_stream_the_client_asked_for() {
        let stream = format!(
            "{}{}{}data: [DONE]\n\n",
            chunk("Hi", ",\"usage\":null"),
            chunk("!", ",\"usage\":null"),
            USAGE_CHUNK
        );
        let mut extractor = SseExtractor::new(false, false);
        let seen = run(&mut extractor, &[stream.as_bytes()]);
        assert_eq!(seen, stream.as_bytes(), "passed through unchanged");
        assert_eq!(
            extractor.usage(),
            Some(TokenUsage {
                prompt_tokens: 7,
                completion_tokens: 2
            })
        );
        assert_eq!(extractor.model(), Some("m"));
    }

    #[test]
    fn strips_what_the_gateway_asked_for_even_across_frame_boundaries() {
        let upstream = format!(
            "{}{}{}data: [DONE]\n\n",
            chunk("Hi", ",\"usage\":null"),
            chunk("!", ",\"usage\":null"),
            USAGE_CHUNK
        );
        let client_expects = format!("{}{}data: [DONE]\n\n", chunk("Hi", ""), chunk("!", ""));
        let bytes = upstream.as_bytes();
        // Every split point, including inside `data:` and inside the JSON.
        for cut in 1..bytes.len() {
            let mut extractor = SseExtractor::new(true, true);
            let seen = run(&mut extractor, &[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(
                String::from_utf8(seen).unwrap(),
                client_expects,
                "cut at {cut}"
            );
            assert_eq!(
                extractor.usage(),
                Some(TokenUsage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                })
            );
            assert_eq!(extractor.text(), Some("Hi!"));
        }
    }

    #[test]
    fn keeps_crlf_line_endings_and_other_fields() {
        let upstream =
            b"event: message\r\ndata: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\r\n\r\n";
        let mut extractor = SseExtractor::new(true, false);
        let seen = run(&mut extractor, &[upstream]);
        assert_eq!(
            seen,
            b"event: message\r\ndata: {\"choices\":[{\"text\":\"a\"}]}\r\n\r\n"
        );
    }

    #[test]
    fn usage_on_the_last_content_chunk_is_counted_and_removed() {
        let upstream = chunk(
            "end",
            ",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}",
        );
        let mut extractor = SseExtractor::new(true, false);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(String::from_utf8(seen).unwrap(), chunk("end", ""));
        assert_eq!(
            extractor.usage(),
            Some(TokenUsage {
                prompt_tokens: 3,
                completion_tokens: 1
            })
        );
    }

    #[test]
    fn a_stream_without_usage_reports_none_and_an_unterminated_end_is_kept() {
        let upstream = format!("{}data: [DONE]", chunk("x", ""));
        let mut extractor = SseExtractor::new(true, false);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(String::from_utf8(seen).unwrap(), upstream);
        assert_eq!(extractor.usage(), None);
    }
}
