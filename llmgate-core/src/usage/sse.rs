//! Token usage from a server-sent-event stream (`stream: true`).
//!
//! Where the usage sits, in every stream OpenAI's SDKs read:
//! - chat completions and completions: a last chunk with `choices: []` and a top-level
//!   `usage` (sent only when the request asks for `stream_options.include_usage`);
//! - the Responses API: `response.usage` in the `response.completed` event (and in
//!   `response.incomplete` and `response.failed`), the model in `response.model`;
//! - audio transcriptions: a top-level `usage` in the `transcript.text.done` event.
//!
//! When the gateway asked for the usage chunk itself, it edits the stream's bytes: the
//! usage chunk goes, and so does each `"usage": null` member with one comma; every
//! other byte reaches the client as the upstream sent it.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;

use super::held::{HeadAndTail, MAX_GATHERED_TEXT_BYTES, MAX_HELD_BYTES};
use super::json::{trailing_usage, UsageFields};
use super::scan::{self, Member};
use super::TokenUsage;

/// What the splitter hands on.
#[derive(Debug)]
enum Piece {
    /// A whole event, terminator included.
    Event(Bytes),
    /// Bytes of an event too long to hold, which go to the client as they came;
    /// `ended` holds the event's ends once its last byte has gone.
    Through {
        bytes: Bytes,
        ended: Option<HeadAndTail>,
    },
}

/// Splits a byte stream into whole SSE events (each ending in a blank line), holding
/// at most [`MAX_HELD_BYTES`] of one event.
#[derive(Debug, Default)]
struct EventSplitter {
    /// Input not yet looked at.
    input: Bytes,
    /// The current event (and any events after it, until handed on).
    buf: BytesMut,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
    /// Start of the current line within `buf`.
    line_start: usize,
    /// The current event is over the limit: it is passed on, not held.
    long: Option<LongEvent>,
}

/// An event over [`MAX_HELD_BYTES`], while its bytes go by.
#[derive(Debug)]
struct LongEvent {
    ends: HeadAndTail,
    /// The current line so far: a blank one (empty or a lone `\r`) ends the event.
    line: Line,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Empty,
    Cr,
    Text,
}

impl Line {
    fn then(self, more: &[u8]) -> Self {
        match (self, more) {
            (line, []) => line,
            (Line::Empty, b"\r") => Line::Cr,
            _ => Line::Text,
        }
    }
}

impl LongEvent {
    /// Consumes `input` up to the end of the event: how many bytes that is, and whether
    /// the event ended there.
    fn scan(&mut self, input: &[u8]) -> (usize, bool) {
        let mut at = 0;
        while let Some(offset) = memchr::memchr(b'\n', &input[at..]) {
            let line = self.line.then(&input[at..at + offset]);
            at += offset + 1;
            if line != Line::Text {
                return (at, true);
            }
            self.line = Line::Empty;
        }
        self.line = self.line.then(&input[at..]);
        (input.len(), false)
    }
}

impl EventSplitter {
    fn push(&mut self, data: Bytes) {
        debug_assert!(
            self.input.is_empty(),
            "pieces are taken before the next push"
        );
        self.input = data;
    }

    /// The next piece of what was pushed, if any.
    fn next_piece(&mut self) -> Option<Piece> {
        loop {
            if let Some(long) = &mut self.long {
                if self.input.is_empty() {
                    return None;
                }
                let (len, ended) = long.scan(&self.input);
                let bytes = self.input.split_to(len);
                long.ends.push(&bytes);
                let ended = if ended {
                    self.long.take().map(|l| l.ends)
                } else {
                    None
                };
                return Some(Piece::Through { bytes, ended });
            }
            if let Some(event) = self.next_event() {
                return Some(Piece::Event(event));
            }
            if self.buf.len() >= MAX_HELD_BYTES {
                // No end within the limit: hand on what is held and hold no more of
                // this event (only its ends, for its usage). Only this event: the next
                // one is read, and edited, as usual, so one long event (a response that
                // repeats long instructions) changes nothing else in the stream.
                let mut ends = HeadAndTail::default();
                ends.push(&self.buf);
                let line = Line::Empty.then(&self.buf[self.line_start..]);
                self.reset_positions();
                self.long = Some(LongEvent { ends, line });
                let bytes = self.buf.split().freeze();
                return Some(Piece::Through { bytes, ended: None });
            }
            if self.input.is_empty() {
                return None;
            }
            let take = self.input.len().min(MAX_HELD_BYTES - self.buf.len());
            self.buf.extend_from_slice(&self.input.split_to(take));
        }
    }

    /// The next complete event in `buf`, terminator included.
    fn next_event(&mut self) -> Option<Bytes> {
        while let Some(offset) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            let newline = self.scanned + offset;
            let line = &self.buf[self.line_start..newline];
            self.scanned = newline + 1;
            if line.is_empty() || line == b"\r" {
                // (A stray blank line is an "event" of its own, passed on as it is.)
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

    /// The stream ended: what is left of an unterminated last event.
    fn finish(&mut self) -> Option<Piece> {
        self.reset_positions();
        if let Some(long) = self.long.take() {
            return Some(Piece::Through {
                bytes: Bytes::new(),
                ended: Some(long.ends),
            });
        }
        let rest = self.buf.split().freeze();
        (!rest.is_empty()).then_some(Piece::Event(rest))
    }

    /// Bytes held.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.len() + self.long.as_ref().map_or(0, |l| l.ends.held())
    }
}

/// Where an event's data lies: the content of each `data:` line (the payload is them
/// joined with `\n`).
fn data_lines(event: &[u8]) -> Vec<Range<usize>> {
    let mut lines = Vec::new();
    let mut start = 0;
    while start < event.len() {
        let end = memchr::memchr(b'\n', &event[start..]).map_or(event.len(), |i| start + i);
        let line_end = if event[start..end].ends_with(b"\r") {
            end - 1
        } else {
            end
        };
        if event[start..line_end].starts_with(b"data:") {
            let content = start + 5;
            let content =
                content + usize::from(event.get(content) == Some(&b' ') && content < line_end);
            lines.push(content..line_end);
        }
        start = end + 1;
    }
    lines
}

/// The payload of an event, borrowed when it is one line (as every server sends it).
fn payload<'a>(event: &'a [u8], lines: &[Range<usize>]) -> std::borrow::Cow<'a, [u8]> {
    match lines {
        [one] => std::borrow::Cow::Borrowed(&event[one.clone()]),
        _ => std::borrow::Cow::Owned(
            lines
                .iter()
                .map(|l| &event[l.clone()])
                .collect::<Vec<_>>()
                .join(&b'\n'),
        ),
    }
}

/// The event's byte offset of a payload offset (the payload's line joints map to the
/// end of the line before them).
fn event_offset(lines: &[Range<usize>], at: usize) -> usize {
    let mut line_start = 0;
    for line in lines {
        if at <= line_start + line.len() {
            return line.start + at - line_start;
        }
        line_start += line.len() + 1;
    }
    lines.last().map_or(0, |l| l.end)
}

/// What reaches the client of the usage in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamUsage {
    /// The stream goes to the client as the upstream sent it.
    AsSent,
    /// The gateway asked for usage, the client did not: remove what asking added.
    Strip,
}

/// Whether to gather a stream's text, for a token counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamText {
    /// Nothing counts tokens for this stream.
    Skip,
    /// Gather it, up to [`MAX_GATHERED_TEXT_BYTES`].
    Gather,
}

/// Watches (or, when the gateway asked for usage itself, edits) an SSE stream.
#[derive(Debug)]
pub(crate) struct SseExtractor {
    splitter: EventSplitter,
    usage_out: StreamUsage,
    /// Gather the streamed text, for a token counter; dropped past
    /// [`MAX_GATHERED_TEXT_BYTES`].
    text: Option<String>,
    usage: Option<TokenUsage>,
    model: Option<String>,
}

/// Text of a chat (`delta.content`) or completion (`text`) choice.
#[derive(Deserialize)]
struct TextChoice {
    delta: Option<Delta>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

impl SseExtractor {
    pub(crate) fn new(usage_out: StreamUsage, text: StreamText) -> Self {
        Self {
            splitter: EventSplitter::default(),
            usage_out,
            text: (text == StreamText::Gather).then(String::new),
            usage: None,
            model: None,
        }
    }

    /// Whether the stream reaching the client differs from the upstream's, so frames
    /// must go out through [`SseExtractor::edit`].
    pub(crate) fn edits(&self) -> bool {
        self.usage_out == StreamUsage::Strip
    }

    /// Looks at a frame that goes to the client unchanged.
    pub(crate) fn observe(&mut self, data: &Bytes) {
        self.splitter.push(data.clone());
        while let Some(piece) = self.splitter.next_piece() {
            self.take(piece, None);
        }
    }

    /// Takes a frame and queues what the client should get in its place.
    pub(crate) fn edit(&mut self, data: &Bytes, out: &mut VecDeque<Bytes>) {
        self.splitter.push(data.clone());
        while let Some(piece) = self.splitter.next_piece() {
            self.take(piece, Some(out));
        }
    }

    /// The stream ended: flush an unterminated last event.
    pub(crate) fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some(piece) = self.splitter.finish() {
            let out = self.edits().then_some(out);
            self.take(piece, out);
        }
    }

    fn take(&mut self, piece: Piece, out: Option<&mut VecDeque<Bytes>>) {
        match piece {
            Piece::Event(event) => {
                let kept = self.inspect(&event);
                if let (Some(out), Some(kept)) = (out, kept) {
                    out.push_back(kept);
                }
            }
            Piece::Through { bytes, ended } => {
                if let Some(out) = out.filter(|_| !bytes.is_empty()) {
                    out.push_back(bytes);
                }
                if let Some(ends) = ended {
                    self.read_long_event(&ends);
                }
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

    /// Bytes held for reading the stream.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.splitter.held()
    }

    /// Reads one event; returns what the client gets for it (`None`: nothing).
    fn inspect(&mut self, event: &Bytes) -> Option<Bytes> {
        let has_usage = memmem::find(event, b"\"usage\"").is_some();
        if !has_usage && self.text.is_none() && self.model.is_some() {
            return Some(event.clone());
        }
        let lines = data_lines(event);
        let data = payload(event, &lines);
        let open = scan::skip_ws(&data, 0);
        if data.get(open) != Some(&b'{') {
            return Some(event.clone()); // `[DONE]`, a comment, not JSON
        }
        let members: Vec<Member> = scan::members(&data, open).collect();
        let member = |name: &[u8]| members.iter().rposition(|m| data[m.name.clone()] == *name);
        let value = |index: Option<usize>| index.map(|i| &data[members[i].value.clone()]);
        // A Responses API event that carries the response: its model and usage are in it.
        let response = value(member(b"type"))
            .and_then(|t| serde_json::from_slice::<String>(t).ok())
            .filter(|t| carries_the_response(t))
            .and_then(|_| value(member(b"response")))
            .filter(|r| r.starts_with(b"{"));
        if self.model.is_none() {
            let model = match response {
                Some(response) => {
                    scan::find_member(response, 0, b"model").map(|m| &response[m.value])
                }
                None => value(member(b"model")),
            };
            self.model = model.and_then(|m| serde_json::from_slice(m).ok());
        }
        if let Some(text) = &mut self.text {
            if let Some(choices) = value(member(b"choices")) {
                gather_text(choices, text);
            }
            if text.len() > MAX_GATHERED_TEXT_BYTES {
                // Too much to keep for counting: the tokens will be unknown.
                self.text = None;
            }
        }
        let is_json = || serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok();
        if let Some(response) = response {
            if let Some(usage) = scan::find_member(response, 0, b"usage") {
                if is_json() {
                    self.count(&response[usage.value]);
                }
            }
            return Some(event.clone());
        }
        let Some(usage) = member(b"usage") else {
            return Some(event.clone());
        };
        if !is_json() {
            return Some(event.clone());
        }
        let usage_value = &data[members[usage].value.clone()];
        self.count(usage_value);
        if !self.edits() {
            return Some(event.clone());
        }
        let no_choices = value(member(b"choices")).is_some_and(|c| {
            c.strip_prefix(b"[")
                .is_some_and(|rest| rest.trim_ascii_start() == b"]")
        });
        if usage_value != b"null" && no_choices {
            // The extra chunk the gateway asked for: the client never sees it.
            return None;
        }
        let cut = scan::removal(&members, usage);
        let (start, end) = (
            event_offset(&lines, cut.start),
            event_offset(&lines, cut.end),
        );
        let mut kept = BytesMut::with_capacity(event.len() - (end - start));
        kept.extend_from_slice(&event[..start]);
        kept.extend_from_slice(&event[end..]);
        Some(kept.freeze())
    }

    /// Counts a `usage` value (`null` and shapes without tokens count nothing).
    fn count(&mut self, usage: &[u8]) {
        let found = serde_json::from_slice::<UsageFields>(usage).ok();
        if let Some(found) = found.as_ref().and_then(UsageFields::token_usage) {
            self.usage = Some(found);
        }
    }

    /// Reads the usage of an event too long to hold from its ends: a top-level `usage`
    /// at its end, or the response's in a Responses API event.
    fn read_long_event(&mut self, ends: &HeadAndTail) {
        let tail = ends.tail().trim_ascii_end();
        let last_line = memchr::memrchr(b'\n', tail).map_or(tail, |i| &tail[i + 1..]);
        let data = last_line.strip_prefix(b"data:").unwrap_or(last_line);
        let is_response = || {
            let head = ends.head();
            let lines = data_lines(head);
            let first = lines.first().map_or(&[][..], |l| &head[l.clone()]);
            scan::find_member(first, scan::skip_ws(first, 0), b"type")
                .and_then(|t| serde_json::from_slice::<String>(&first[t.value]).ok())
                .is_some_and(|t| carries_the_response(&t))
        };
        let usage = trailing_usage(data, 1)
            .or_else(|| is_response().then(|| trailing_usage(data, 2)).flatten());
        if let Some(found) = usage.as_ref().and_then(UsageFields::token_usage) {
            self.usage = Some(found);
        }
    }
}

/// Whether a Responses API event of this type is `{"type", "sequence_number",
/// "response"}`, the response being its only object member.
fn carries_the_response(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.created"
            | "response.queued"
            | "response.in_progress"
            | "response.completed"
            | "response.incomplete"
            | "response.failed"
    )
}

/// Appends the text of a chunk's choices.
fn gather_text(choices: &[u8], into: &mut String) {
    let Ok(choices) = serde_json::from_slice::<Vec<TextChoice>>(choices) else {
        return;
    };
    for choice in choices {
        let piece = choice.delta.and_then(|d| d.content).or(choice.text);
        if let Some(piece) = piece {
            into.push_str(&piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::MAX_HELD_BYTES;

    fn chunk(content: &str, usage: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]{usage}}}\n\n"
        )
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n";

    fn run(extractor: &mut SseExtractor, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = VecDeque::new();
        for frame in frames {
            let frame = Bytes::copy_from_slice(frame);
            if extractor.edits() {
                extractor.edit(&frame, &mut out);
            } else {
                extractor.observe(&frame);
                out.push_back(frame);
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
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
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
            let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Gather);
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
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
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
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
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
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(String::from_utf8(seen).unwrap(), upstream);
        assert_eq!(extractor.usage(), None);
    }

    fn tokens(prompt_tokens: u64, completion_tokens: u64) -> Option<TokenUsage> {
        Some(TokenUsage {
            prompt_tokens,
            completion_tokens,
        })
    }

    /// A Responses API stream as OpenAI sends it (shortened output, real shapes).
    pub(crate) const RESPONSES_STREAM: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"error\":null,\"incomplete_details\":null,\"instructions\":\"You are a helpful assistant.\",\"max_output_tokens\":null,\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"parallel_tool_calls\":true,\"previous_response_id\":null,\"reasoning\":{\"effort\":null,\"summary\":null},\"store\":true,\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"usage\":null,\"user\":null,\"metadata\":{}}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi \\\"usage\\\": {\\\"input_tokens\\\": 999}\"}\n\n",
        "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":5,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"text\":\"Hi \\\"usage\\\": {\\\"input_tokens\\\": 999}\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":8,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"completed\",\"error\":null,\"incomplete_details\":null,\"instructions\":\"You are a helpful assistant.\",\"max_output_tokens\":null,\"model\":\"gpt-4.1-2025-04-14\",\"output\":[{\"id\":\"msg_67c9\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi \\\"usage\\\": {\\\"input_tokens\\\": 999}\",\"annotations\":[]}]}],\"parallel_tool_calls\":true,\"previous_response_id\":null,\"reasoning\":{\"effort\":null,\"summary\":null},\"store\":true,\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":48},\"user\":null,\"metadata\":{}}}\n\n",
    );

    #[test]
    fn blank_lines_between_events_reach_the_client_when_editing() {
        let upstream = format!("\n: ping\n\n\r\n{}", chunk("a", ",\"usage\":null"));
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(
            String::from_utf8(seen).unwrap(),
            format!("\n: ping\n\n\r\n{}", chunk("a", ""))
        );
    }

    #[test]
    fn a_responses_stream_is_charged_from_its_completed_event() {
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
        let seen = run(&mut extractor, &[RESPONSES_STREAM.as_bytes()]);
        assert_eq!(
            seen,
            RESPONSES_STREAM.as_bytes(),
            "passed through unchanged"
        );
        assert_eq!(extractor.usage(), tokens(37, 11));
        assert_eq!(extractor.model(), Some("gpt-4.1-2025-04-14"));
        // An incomplete or failed response is charged what it used too.
        for status in ["incomplete", "failed"] {
            let stream = RESPONSES_STREAM
                .replace("response.completed", &format!("response.{status}"))
                .replace(
                    "\"status\":\"completed\"",
                    &format!("\"status\":\"{status}\""),
                );
            let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
            run(&mut extractor, &[stream.as_bytes()]);
            assert_eq!(extractor.usage(), tokens(37, 11), "{status}");
        }
    }

    #[test]
    fn a_streamed_transcription_is_charged_its_tokens() {
        let stream = concat!(
            "data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hello\",\"logprobs\":null}\n\n",
            "data: {\"type\":\"transcript.text.done\",\"text\":\"Hello there.\",\"usage\":{\"type\":\"tokens\",\"input_tokens\":14,\"input_token_details\":{\"text_tokens\":0,\"audio_tokens\":14},\"output_tokens\":4,\"total_tokens\":18}}\n\n",
        );
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
        let seen = run(&mut extractor, &[stream.as_bytes()]);
        assert_eq!(seen, stream.as_bytes());
        assert_eq!(extractor.usage(), tokens(14, 4));
    }

    #[test]
    fn the_client_gets_the_upstreams_bytes_exactly_less_the_usage_it_did_not_ask_for() {
        // Exponent floats, escapes, spaced separators, a nested `usage` that is content.
        let upstream = concat!(
            "data: {\"id\": \"c1\", \"usage\": null, \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"caf\\u00e9\"}, \"logprobs\": {\"content\": [{\"token\": \"caf\\u00e9\", \"logprob\": -1.9361265e-07, \"top_logprobs\": []}]}}], \"tool\": {\"usage\": null}}\r\n\r\n",
            "data:{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}] , \"usage\" :null }\n\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n",
        );
        let expected = concat!(
            "data: {\"id\": \"c1\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"caf\\u00e9\"}, \"logprobs\": {\"content\": [{\"token\": \"caf\\u00e9\", \"logprob\": -1.9361265e-07, \"top_logprobs\": []}]}}], \"tool\": {\"usage\": null}}\r\n\r\n",
            "data:{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}] }\n\n",
            "data: [DONE]\n\n",
        );
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Gather);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(String::from_utf8(seen).unwrap(), expected);
        assert_eq!(extractor.usage(), tokens(7, 2));
        assert_eq!(extractor.text(), Some("café"));
    }

    #[test]
    fn a_payload_over_several_data_lines_is_edited_in_place() {
        let upstream = "data: {\"choices\":[{\"text\":\"a\"}],\ndata: \"usage\":null}\n\n";
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
        let seen = run(&mut extractor, &[upstream.as_bytes()]);
        assert_eq!(
            String::from_utf8(seen).unwrap(),
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\n"
        );
    }

    /// Feeds an event whose one line is `total` bytes long, in 64 KiB frames, then
    /// `after`; checks what is held all along and that the client gets every byte.
    fn endless_line(extractor: &mut SseExtractor, total: usize, end: &[u8], after: &[u8]) {
        let frame = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = std::iter::once(Bytes::from_static(b"data: {\"choices\":[{\"text\":\""))
            .chain(std::iter::repeat_n(frame, total / (64 * 1024)))
            .chain([Bytes::copy_from_slice(end), Bytes::copy_from_slice(after)]);
        let (mut sent, mut seen) = (Vec::new(), Vec::new());
        let mut out = VecDeque::new();
        for data in frames {
            sent.extend_from_slice(&data);
            if extractor.edits() {
                extractor.edit(&data, &mut out);
            } else {
                extractor.observe(&data);
                out.push_back(data);
            }
            out.drain(..).for_each(|b| seen.extend_from_slice(&b));
            assert!(
                extractor.held() <= MAX_HELD_BYTES,
                "{} held",
                extractor.held()
            );
        }
        extractor.finish(&mut out);
        out.drain(..).for_each(|b| seen.extend_from_slice(&b));
        assert!(sent == seen, "every byte reaches the client unchanged");
    }

    #[test]
    fn text_gathered_for_counting_stops_at_its_bound() {
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Gather);
        let piece = "x".repeat(16 * 1024);
        let event = Bytes::from(chunk(&piece, ""));
        let events = MAX_GATHERED_TEXT_BYTES / piece.len() + 2;
        let mut out = VecDeque::new();
        for _ in 0..events {
            extractor.observe(&event);
            assert!(extractor
                .text()
                .is_none_or(|t| t.len() <= MAX_GATHERED_TEXT_BYTES + piece.len()));
        }
        extractor.finish(&mut out);
        assert_eq!(
            extractor.text(),
            None,
            "dropped: the tokens are unknown, not undercounted"
        );
        // Below the bound the text is kept whole.
        let mut short = SseExtractor::new(StreamUsage::AsSent, StreamText::Gather);
        short.observe(&event);
        assert_eq!(short.text().map(str::len), Some(piece.len()));
    }

    #[test]
    fn an_endless_line_is_passed_on_without_being_held() {
        for usage_out in [StreamUsage::AsSent, StreamUsage::Strip] {
            let mut extractor = SseExtractor::new(usage_out, StreamText::Skip);
            endless_line(&mut extractor, 50 * 1024 * 1024, b"", b"");
            assert_eq!(extractor.usage(), None, "tokens unknown");
        }
    }

    #[test]
    fn a_usage_event_after_an_overlong_one_is_still_counted_and_edited() {
        let mut extractor = SseExtractor::new(StreamUsage::Strip, StreamText::Skip);
        endless_line(&mut extractor, 2 * MAX_HELD_BYTES, b"\"}]}\n\n", b"");
        let mut out = VecDeque::new();
        extractor.edit(&Bytes::from(chunk("a", ",\"usage\":null")), &mut out);
        extractor.edit(&Bytes::from_static(USAGE_CHUNK.as_bytes()), &mut out);
        extractor.finish(&mut out);
        let seen: Vec<u8> = out.into_iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(String::from_utf8(seen).unwrap(), chunk("a", ""));
        assert_eq!(extractor.usage(), tokens(7, 2));
    }

    #[test]
    fn the_usage_at_the_end_of_an_overlong_event_is_still_counted() {
        // A chat chunk whose text alone is over the limit, usage last.
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
        let end = b"\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\r\n\r\n";
        endless_line(&mut extractor, 3 * MAX_HELD_BYTES, end, b"data: [DONE]\n\n");
        assert_eq!(extractor.usage(), tokens(5, 3));

        // A `response.completed` echoing huge instructions: `response.usage` near its end.
        let completed = RESPONSES_STREAM.split("\n\n").nth(3).unwrap();
        let huge = "x".repeat(3 * MAX_HELD_BYTES);
        let completed = completed.replace("You are a helpful assistant.", &huge) + "\n\n";
        for usage_out in [StreamUsage::AsSent, StreamUsage::Strip] {
            let mut extractor = SseExtractor::new(usage_out, StreamText::Skip);
            let seen = run(&mut extractor, &[completed.as_bytes()]);
            assert!(seen == completed.as_bytes());
            assert_eq!(extractor.usage(), tokens(37, 11));
        }
        // A `usage` two levels deep in another event is not the response's.
        let other = completed
            .replace("response.completed", "response.output_item.done")
            .replace("\"response\":{", "\"item\":{");
        let mut extractor = SseExtractor::new(StreamUsage::AsSent, StreamText::Skip);
        run(&mut extractor, &[other.as_bytes()]);
        assert_eq!(extractor.usage(), None);
    }
}
