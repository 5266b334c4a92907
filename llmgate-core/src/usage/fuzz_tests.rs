//! Property tests and fuzz tests (on stable, with proptest) of the code that reads what
//! clients and upstreams send: the SSE and JSON usage readers, the request inspector
//! (JSON bodies and multipart uploads) and the key header parser.
//!
//! Each fuzz target first replays its seed corpus (`llmgate-core/tests/corpus/<target>/`,
//! realistic and hostile inputs), then lets proptest mutate the seeds: bytes flipped,
//! inserted (SSE and JSON syntax included), deleted, truncated, and frames cut at any
//! point. Case counts are bounded so each target runs in seconds. A failing case is
//! shrunk by proptest; add it to the corpus as a seed once fixed.

use std::collections::VecDeque;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;

use super::json::{BodyModel, JsonCollector};
use super::sse::{SseExtractor, StreamText, StreamUsage};
use super::{inspect_request, ForCounting, TokenUsage, MAX_HELD_BYTES};

/// Cases per fuzz target: a few seconds each in a debug build.
const CASES: u32 = 400;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "a dozen seeds in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// One change to a seed.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let token = prop_oneof![
        Just(b"\"usage\"".to_vec()),
        Just(b"\"usage\":null,".to_vec()),
        Just(b"\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b",".to_vec()),
        Just(b"Bearer ".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), token).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..16usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for m in mutations {
        let at = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
        match m {
            Mutation::Flip { at: i, bit } if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] ^= 1 << bit;
            }
            Mutation::Flip { .. } => {}
            Mutation::Insert { at: i, bytes: more } => {
                let i = at(*i, bytes.len());
                bytes.splice(i..i, more.iter().copied());
            }
            Mutation::Delete { at: i, len } => {
                let i = at(*i, bytes.len());
                bytes.drain(i..(i + len).min(bytes.len()));
            }
            Mutation::Truncate { at: i } => bytes.truncate(at(*i, bytes.len())),
        }
    }
    bytes
}

/// A seed of `target` (by index), mutated, and cut points for its frames.
fn mutated(target: &'static str) -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let seeds = corpus(target);
    (
        0..seeds.len(),
        proptest::collection::vec(mutation(), 0..6),
        proptest::collection::vec(any::<usize>(), 0..6),
    )
        .prop_map(move |(i, mutations, cuts)| (mutate(&seeds[i], &mutations), cuts))
}

/// `bytes` cut into frames at `cuts` (taken modulo its length).
fn frames(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        out.push(Bytes::copy_from_slice(&bytes[start..cut]));
        start = cut;
    }
    out
}

/// Runs a stream through an extractor: what the client gets, the usage and the model.
fn through_sse(
    frames: &[Bytes],
    usage_out: StreamUsage,
) -> (Vec<u8>, Option<TokenUsage>, Option<String>) {
    let mut extractor = SseExtractor::new(usage_out, StreamText::Gather);
    let mut out = VecDeque::new();
    let mut seen = Vec::new();
    for frame in frames {
        if extractor.edits() {
            extractor.edit(frame, &mut out);
        } else {
            extractor.observe(frame);
            out.push_back(frame.clone());
        }
        assert!(extractor.held() <= MAX_HELD_BYTES);
        out.drain(..).for_each(|b| seen.extend_from_slice(&b));
    }
    extractor.finish(&mut out);
    out.drain(..).for_each(|b| seen.extend_from_slice(&b));
    (
        seen,
        extractor.usage(),
        extractor.model().map(str::to_owned),
    )
}

/// Whether `small` is `big` with some bytes taken out.
fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut big = big.iter();
    small.iter().all(|b| big.any(|c| c == b))
}

fn check_sse(input: &[u8], cuts: &[usize]) {
    let whole = [Bytes::copy_from_slice(input)];
    let cut = frames(input, cuts);
    // Watching: the client gets every byte; how the stream is cut changes nothing.
    let watched = through_sse(&cut, StreamUsage::AsSent);
    assert_eq!(watched.0, input);
    assert_eq!(watched, through_sse(&whole, StreamUsage::AsSent));
    // Editing: only deletions, the same whatever the frames, none without a usage name.
    let edited = through_sse(&cut, StreamUsage::Strip);
    assert_eq!(edited, through_sse(&whole, StreamUsage::Strip));
    assert!(is_subsequence(&edited.0, input));
    if memchr::memmem::find(input, b"\"usage\"").is_none() {
        assert_eq!(edited.0, input);
    }
    assert_eq!(edited.1, watched.1, "editing counts what watching counts");
}

#[test]
fn sse_corpus_replays() {
    for seed in corpus("sse") {
        for cut in 0..=seed.len() {
            check_sse(&seed, &[cut]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn sse_reader_survives_mutated_streams((input, cuts) in mutated("sse")) {
        check_sse(&input, &cuts);
    }
}

fn through_json(frames: &[Bytes], model: BodyModel) -> (Option<TokenUsage>, Option<String>) {
    let mut collector = JsonCollector::default();
    for frame in frames {
        collector.observe(frame);
        assert!(collector.held() <= MAX_HELD_BYTES);
    }
    collector.finish(model)
}

/// What a full parse finds: the reference for well-formed bodies.
fn parsed_usage(input: &[u8]) -> Option<TokenUsage> {
    let value = serde_json::from_slice::<Value>(input).ok()?;
    TokenUsage::from_usage_object(value.get("usage")?)
}

fn check_json(input: &[u8], cuts: &[usize]) {
    let whole = [Bytes::copy_from_slice(input)];
    for model in [BodyModel::Skip, BodyModel::Read] {
        let read = through_json(&frames(input, cuts), model);
        assert_eq!(read, through_json(&whole, model));
    }
}

#[test]
fn json_corpus_replays() {
    for seed in corpus("json") {
        for cut in 0..=seed.len() {
            check_json(&seed, &[cut]);
        }
        // Every seed that is JSON is read as a full parse reads it.
        if serde_json::from_slice::<Value>(&seed).is_ok() {
            let read = through_json(&[Bytes::from(seed.clone())], BodyModel::Skip).0;
            assert_eq!(
                read,
                parsed_usage(&seed),
                "{}",
                String::from_utf8_lossy(&seed)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn json_reader_survives_mutated_bodies((input, cuts) in mutated("json")) {
        check_json(&input, &cuts);
    }
}

/// Splits a request seed into its path (first line) and body.
fn path_and_body(seed: &[u8]) -> (String, Vec<u8>) {
    let line_end = memchr::memchr(b'\n', seed).unwrap_or(seed.len());
    let path = String::from_utf8_lossy(&seed[..line_end]).into_owned();
    (path, seed.get(line_end + 1..).unwrap_or_default().to_vec())
}

fn check_request(path: &str, body: &[u8]) {
    // Read as a multipart upload too (its model from the form): no panic, sent as is.
    let upload = Some("multipart/form-data; boundary=XyZ");
    let (out, _) = inspect_request(
        path,
        upload,
        Bytes::copy_from_slice(body),
        ForCounting::Skip,
    );
    if serde_json::from_slice::<Value>(body).is_err() {
        assert_eq!(out, body, "an upload is forwarded as sent");
    }
    let (out, plan) = inspect_request(path, None, Bytes::copy_from_slice(body), ForCounting::Skip);
    if !plan.strip_stream_usage {
        assert_eq!(out, body, "forwarded as sent");
        return;
    }
    // Only `stream_options.include_usage: true` differs, as the upstream reads it.
    let mut expected = serde_json::from_slice::<Value>(body).expect("only JSON is edited");
    let options = expected
        .as_object_mut()
        .unwrap()
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    options["include_usage"] = Value::Bool(true);
    let sent = serde_json::from_slice::<Value>(&out).expect("the edit is JSON");
    assert_eq!(sent, expected);
}

#[test]
fn request_corpus_replays() {
    for seed in corpus("request") {
        let (path, body) = path_and_body(&seed);
        check_request(&path, &body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn request_inspector_survives_mutated_bodies((input, _) in mutated("request")) {
        let (path, body) = path_and_body(&input);
        check_request(&path, &body);
    }
}

/// The headers of a key-header seed (`name: value` lines; lines http refuses are left
/// out, as hyper would refuse them).
fn headers(seed: &[u8]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for line in seed.split(|&b| b == b'\n') {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = http::HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = http::HeaderValue::from_bytes(
            line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]),
        );
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    map
}

fn check_key_header(seed: &[u8]) {
    let map = headers(seed);
    if let Some(key) = crate::auth::presented_key(&map) {
        assert!(!key.is_empty() && key.is_ascii());
        assert_eq!(key, key.trim_ascii(), "no surrounding whitespace");
        assert!(
            map.values()
                .any(|v| memchr::memmem::find(v.as_bytes(), key.as_bytes()).is_some()),
            "the key is one the request presented"
        );
    }
}

#[test]
fn key_header_corpus_replays() {
    for seed in corpus("key_header") {
        check_key_header(&seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn key_header_parser_survives_mutated_headers((input, _) in mutated("key_header")) {
        check_key_header(&input);
    }
}

/// One object member as written: name, the spacing around its colon, and its value.
#[derive(Debug, Clone)]
struct Written {
    name: &'static str,
    around_colon: (&'static str, &'static str),
    value: String,
}

/// An object as some server writes it: members, the spacing around each comma, and
/// inside the braces.
#[derive(Debug, Clone)]
struct WrittenObject {
    members: Vec<Written>,
    around_commas: Vec<(&'static str, &'static str)>,
    inside: (&'static str, &'static str),
}

impl WrittenObject {
    /// The text, without member `skip`, which takes one comma (and its spacing) with
    /// it: the one after it, or for the last member the one before it.
    fn render(&self, skip: Option<usize>) -> String {
        let last = self.members.len() - 1;
        let mut out = format!("{{{}", self.inside.0);
        for (i, m) in self.members.iter().enumerate() {
            let comma = (i < last).then(|| self.around_commas[i]);
            let skipped = skip == Some(i);
            // A skipped last member takes the comma before it, already written: undo.
            if skipped && i == last && i > 0 {
                let (before, after) = self.around_commas[i - 1];
                out.truncate(out.len() - before.len() - 1 - after.len());
            }
            if !skipped {
                let (a, b) = m.around_colon;
                out.push_str(&format!("\"{}\"{a}:{b}{}", m.name, m.value));
            }
            if let Some((before, after)) = comma.filter(|_| !skipped) {
                out.push_str(&format!("{before},{after}"));
            }
        }
        out.push_str(self.inside.1);
        out.push('}');
        out
    }
}

fn space() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("\t"), Just("  ")]
}

/// Text values as servers escape them, `usage` look-alikes included.
fn text() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("Hi"),
        Just("caf\\u00e9"),
        Just("caf\u{e9}"),
        Just("\\\"usage\\\": null, "),
        Just("a\\\\"),
        Just("}\\n\\n{"),
        Just("\\ud83d\\ude00"),
    ]
}

fn number() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("-1.9361265e-07"),
        Just("1E+3"),
        Just("0.0"),
        Just("-0"),
        Just("12")
    ]
}

/// A chunk's members other than `usage`, in any order, and the spacing.
fn written_object(members: Vec<BoxedStrategy<Written>>) -> impl Strategy<Value = WrittenObject> {
    let n = members.len();
    (
        members.prop_shuffle(),
        proptest::collection::vec((space(), space()), n),
        (space(), space()),
    )
        .prop_map(|(members, around_commas, inside)| WrittenObject {
            members,
            around_commas,
            inside,
        })
}

fn member(
    name: &'static str,
    value: impl Strategy<Value = String> + 'static,
) -> BoxedStrategy<Written> {
    ((space(), space()), value)
        .prop_map(move |(around_colon, value)| Written {
            name,
            around_colon,
            value,
        })
        .boxed()
}

fn content_chunk() -> impl Strategy<Value = WrittenObject> {
    let choices = (text(), number()).prop_map(|(t, n)| {
        format!(r#"[{{"index":0,"delta":{{"content":"{t}"}},"logprobs":{{"content":[{{"token":"{t}","logprob":{n}}}]}}}}]"#)
    });
    let nested = prop_oneof![
        Just(r#"{"usage":null}"#.to_owned()),
        Just(r#"{ "usage" : {"prompt_tokens":99,"completion_tokens":99} }"#.to_owned()),
    ];
    written_object(vec![
        member("id", Just("\"chatcmpl-1\"".to_owned())),
        member("model", Just("\"gpt-4o\"".to_owned())),
        member("created", number().prop_map(str::to_owned)),
        member("choices", choices),
        member("tool", nested),
        member("usage", Just("null".to_owned())),
    ])
}

fn usage_chunk() -> impl Strategy<Value = (WrittenObject, (u64, u64))> {
    let usage = (0..100_000u64, 0..100_000u64, space()).prop_map(|(p, c, s)| {
        (
            format!(
                r#"{{"prompt_tokens":{s}{p},{s}"completion_tokens":{c},"total_tokens":{}}}"#,
                p + c
            ),
            (p, c),
        )
    });
    (
        usage,
        written_object(vec![
            member("id", Just("\"chatcmpl-1\"".to_owned())),
            member(
                "choices",
                prop_oneof![Just("[]".to_owned()), Just("[ ]".to_owned())],
            ),
            member("tool", Just(r#"{"usage":{"prompt_tokens":99}}"#.to_owned())),
            member("usage", Just(String::new())),
        ]),
    )
        .prop_map(|((usage, counts), mut object)| {
            let at = object
                .members
                .iter()
                .position(|m| m.name == "usage")
                .unwrap();
            object.members[at].value = usage;
            (object, counts)
        })
}

/// A whole stream as some server writes it, and what the client should get.
fn styled_stream() -> impl Strategy<Value = (String, String, (u64, u64))> {
    (
        proptest::collection::vec(content_chunk(), 1..4),
        usage_chunk(),
        prop_oneof![Just("data: "), Just("data:")],
        prop_oneof![Just("\n"), Just("\r\n")],
    )
        .prop_map(|(contents, (last, counts), data, eol)| {
            let event = |json: String| format!("{data}{json}{eol}{eol}");
            let mut upstream = String::new();
            let mut client = String::new();
            for chunk in &contents {
                let usage = chunk.members.iter().position(|m| m.name == "usage");
                upstream.push_str(&event(chunk.render(None)));
                client.push_str(&event(chunk.render(usage)));
            }
            upstream.push_str(&event(last.render(None)));
            let done = event("[DONE]".to_owned());
            upstream.push_str(&done);
            client.push_str(&done);
            (upstream, client, counts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the server's JSON style and however the stream is cut, the client gets
    /// the upstream's bytes less exactly the top-level `usage` members (and the usage
    /// chunk), and the usage is counted.
    #[test]
    fn editing_removes_exactly_the_top_level_usage(
        (upstream, client, (prompt, completion)) in styled_stream(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let (seen, usage, model) = through_sse(&frames(upstream.as_bytes(), &cuts), StreamUsage::Strip);
        prop_assert_eq!(String::from_utf8(seen).unwrap(), client);
        prop_assert_eq!(usage, Some(TokenUsage { prompt_tokens: prompt, completion_tokens: completion }));
        prop_assert_eq!(model.as_deref(), Some("gpt-4o"));
    }
}
