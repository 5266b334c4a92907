//! What the gateway reads from (and may add to) a request body.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::scan;

/// What the response side needs to know about the request.
#[derive(Debug, Default)]
pub(crate) struct RequestPlan {
    /// The `model` field: shared by the usage record and the request's
    /// [`RequestedModel`](crate::auth_usage::RequestedModel), without a copy.
    pub model: Option<Arc<str>>,
    /// The gateway added `stream_options.include_usage` to get token counts: the usage
    /// chunk (and the `usage: null` fields) must be taken out of what the client sees.
    pub strip_stream_usage: bool,
    /// The parsed request, kept for a [`TokenCounter`](super::TokenCounter) when the
    /// request streams.
    pub for_counting: Option<Arc<Value>>,
    /// The `user` field: the end user the client names.
    pub end_user: Option<String>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// The request body's size in bytes, as the client sent it.
    pub body_len: usize,
}

/// Only the fields we need; serde skips the rest without allocating.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// What the gateway reads from a request.
#[derive(Debug, Default, PartialEq)]
struct Fields {
    model: Option<Arc<str>>,
    streams: bool,
    asked_for_usage: bool,
    user: Option<String>,
    max_tokens: Option<u64>,
}

impl Fields {
    /// The fields of a JSON body; `None` when it is not JSON.
    fn of(body: &[u8]) -> Option<Self> {
        if let Ok(peek) = serde_json::from_slice::<Peek<'_>>(body) {
            return Some(Self {
                model: peek.model.as_deref().map(Arc::from),
                streams: peek.stream == Some(true),
                asked_for_usage: peek.stream_options.and_then(|o| o.include_usage) == Some(true),
                user: peek.user.filter(|u| !u.is_empty()).map(Cow::into_owned),
                max_tokens: peek.max_completion_tokens.or(peek.max_tokens),
            });
        }
        // A name given twice, or a field of an unexpected type: read it as the
        // upstream's parser will (the last of duplicated names wins), so that repeating
        // `"stream": true` does not stream past the meter.
        let value = serde_json::from_slice::<Value>(body).ok()?;
        Some(Self {
            model: value.get("model").and_then(Value::as_str).map(Arc::from),
            streams: value.get("stream").is_some_and(truthy),
            asked_for_usage: value.pointer("/stream_options/include_usage")
                == Some(&Value::Bool(true)),
            user: value
                .get("user")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                .map(str::to_owned),
            max_tokens: value
                .get("max_completion_tokens")
                .and_then(Value::as_u64)
                .or_else(|| value.get("max_tokens").and_then(Value::as_u64)),
        })
    }
}

/// Whether an upstream with lax type conversion (pydantic, as vLLM and
/// llama-cpp-python use) reads `value` as `true`: `"stream": 1` or `"true"` streams
/// there, so it must be metered as a stream here.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on" | "t" | "y"
        ),
        _ => false,
    }
}

/// Endpoints that accept `stream_options.include_usage`: chat completions and
/// completions, at OpenAI's `…/v1/chat/completions` and `…/v1/completions` or Azure
/// OpenAI's `…/deployments/{name}/chat/completions` and `…/deployments/{name}/completions`.
/// Others (the Responses API, transcriptions) report usage in their streams unasked,
/// and may refuse a parameter they do not know.
fn supports_stream_options(path: &str) -> bool {
    let mut segments = path.rsplit('/');
    matches!(
        (segments.next(), segments.next(), segments.next()),
        (Some("completions"), Some("chat" | "v1"), _)
            | (Some("completions"), Some(_), Some("deployments"))
    )
}

/// Whether a token counter may need the request, to count what the upstream reports no
/// usage for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForCounting {
    /// Nothing counts this caller's tokens.
    Skip,
    /// Keep the parsed request in the plan.
    Keep,
}

/// Reads the request body; returns the body to forward (changed only when the gateway
/// asks the upstream for stream usage) and the plan. A body that is not JSON is
/// forwarded unchanged: the upstream answers it.
pub(crate) fn inspect_request(
    path: &str,
    content_type: Option<&str>,
    body: Bytes,
    counting: ForCounting,
) -> (Bytes, RequestPlan) {
    let keep_for_counting = counting == ForCounting::Keep;
    let Some(fields) = Fields::of(&body) else {
        // Uploads (audio transcriptions and translations) name their model in a form.
        let model = content_type
            .and_then(multipart_boundary)
            .and_then(|boundary| multipart_model(&body, boundary))
            .map(Arc::from);
        return (
            body,
            RequestPlan {
                model,
                ..RequestPlan::default()
            },
        );
    };
    let mut plan = RequestPlan {
        model: fields.model,
        end_user: fields.user,
        max_tokens: fields.max_tokens,
        ..RequestPlan::default()
    };
    if !fields.streams || (fields.asked_for_usage && !keep_for_counting) {
        return (body, plan);
    }
    // Only a body that parses whole is counted or edited (serde's skipping of the
    // fields it does not need is lenient: a lone surrogate escape passes it).
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return (body, plan);
    };
    if fields.asked_for_usage || !supports_stream_options(path) {
        plan.for_counting = keep_for_counting.then(|| Arc::new(value));
        return (body, plan);
    }
    let asked = with_include_usage(&body)
        .filter(|edited| Fields::of(edited).is_some_and(|f| f.asked_for_usage))
        .or_else(|| rewritten_with_include_usage(value.clone()));
    plan.for_counting = keep_for_counting.then(|| Arc::new(value));
    match asked {
        Some(asked) => {
            plan.strip_stream_usage = true;
            (Bytes::from(asked), plan)
        }
        None => (body, plan),
    }
}

/// The body with `stream_options.include_usage` set to `true`, every other byte as the
/// client sent it: `"stream_options":{"include_usage":true},` right after the opening
/// brace, or `"include_usage":true` put into (or set in) the client's own
/// `stream_options`. `None` when `stream_options` is there but not an object.
fn with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = scan::skip_ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return None;
    }
    let (at, replace, insert): (usize, usize, &[u8]) =
        match scan::find_member(body, open, b"stream_options") {
            None => (open + 1, 0, b"\"stream_options\":{\"include_usage\":true}"),
            Some(options) if body[options.value.start] == b'{' => {
                match scan::find_member(body, options.value.start, b"include_usage") {
                    Some(flag) => (flag.value.start, flag.value.len(), b"true"),
                    None => (options.value.start + 1, 0, b"\"include_usage\":true"),
                }
            }
            // `"stream_options": null` means none were given: replaced.
            Some(options) if &body[options.value.clone()] == b"null" => (
                options.value.start,
                options.value.len(),
                b"{\"include_usage\":true}",
            ),
            Some(_) => return None,
        };
    // An insert goes right after a brace: a comma follows it unless the object is empty.
    let comma = replace == 0 && scan::members(body, at - 1).next().is_some();
    let mut out = Vec::with_capacity(body.len() + insert.len() + 1);
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert);
    if comma {
        out.push(b',');
    }
    out.extend_from_slice(&body[at + replace..]);
    Some(out)
}

/// The body re-serialised with `stream_options.include_usage: true`: for a body whose
/// names the byte edit cannot see (written with escapes, or given twice).
fn rewritten_with_include_usage(mut value: Value) -> Option<Vec<u8>> {
    let options = value
        .as_object_mut()?
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    if options.is_null() {
        *options = Value::Object(Default::default());
    }
    // Garbage: let the upstream judge the client's request.
    options.as_object_mut()?;
    options["include_usage"] = Value::Bool(true);
    Some(serde_json::to_vec(&value).expect("a JSON value serializes"))
}

/// The boundary of a `multipart/form-data` body, from its `Content-Type`.
fn multipart_boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';').map(str::trim);
    if !params.next()?.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// The value of the `model` field of a `multipart/form-data` body (RFC 7578): what an
/// upload to `/v1/audio/transcriptions` names its model with. At most the first 64 parts
/// are looked at, and a value of at most 1 KiB is taken.
fn multipart_model(body: &[u8], boundary: &str) -> Option<String> {
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    let mut starts = finder.find_iter(body).take(65).peekable();
    while let Some(start) = starts.next() {
        let part = &body[start + delimiter.len()..starts.peek().copied().unwrap_or(body.len())];
        let Some(head_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..head_end]);
        let names_model = head.lines().any(|line| {
            let Some((name, value)) = line.split_once(':') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("content-disposition")
                && value.split(';').map(str::trim).any(|param| {
                    param.split_once('=').is_some_and(|(k, v)| {
                        k.trim() == "name" && v.trim().trim_matches('"') == "model"
                    })
                })
        });
        if !names_model {
            continue;
        }
        let value = &part[head_end + 4..];
        let value = value.strip_suffix(b"\r\n").unwrap_or(value);
        if value.len() > 1024 {
            return None;
        }
        return std::str::from_utf8(value).ok().map(str::to_owned);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_stream_options_and_lax_stream_values_are_metered() {
        let (sent, plan) = inspect_request(
            "/v1/chat/completions",
            None,
            Bytes::from_static(
                br#"{"model":"m","stream":true,"stream_options":null,"messages":[]}"#,
            ),
            ForCounting::Skip,
        );
        assert!(plan.strip_stream_usage);
        assert_eq!(
            &sent[..],
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
        );
        for stream in ["1", "\"true\"", "\"True\""] {
            let body = format!(r#"{{"model":"m","stream":{stream},"messages":[]}}"#);
            let (sent, plan) = inspect_request(
                "/v1/completions",
                None,
                Bytes::from(body),
                ForCounting::Skip,
            );
            assert!(plan.strip_stream_usage, "stream: {stream}");
            let sent: Value = serde_json::from_slice(&sent).unwrap();
            assert_eq!(sent["stream_options"]["include_usage"], true);
        }
        for stream in ["0", "false", "null", "\"false\""] {
            let body = format!(r#"{{"model":"m","stream":{stream},"messages":[]}}"#);
            let (_, plan) = inspect_request(
                "/v1/completions",
                None,
                Bytes::from(body),
                ForCounting::Skip,
            );
            assert!(!plan.strip_stream_usage, "stream: {stream}");
        }
    }

    #[test]
    fn an_uploads_model_is_read_from_its_form_field() {
        let boundary = multipart_boundary("multipart/form-data; boundary=\"xyz123\"").unwrap();
        assert_eq!(boundary, "xyz123");
        let body = b"--xyz123\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01name=\"model\"\r\n--xyz123\r\ncontent-disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--xyz123--\r\n";
        assert_eq!(
            multipart_model(body, boundary).as_deref(),
            Some("whisper-1")
        );
        assert_eq!(multipart_model(b"--xyz123\r\n\r\nno head", boundary), None);
        assert_eq!(multipart_model(b"", boundary), None);
        assert!(multipart_boundary("application/json").is_none());
        assert!(multipart_boundary("multipart/form-data").is_none());
    }
    use serde_json::json;

    fn inspect(path: &str, body: Value) -> (Value, RequestPlan) {
        let (out, plan) =
            inspect_request(path, None, Bytes::from(body.to_string()), ForCounting::Skip);
        (serde_json::from_slice(&out).unwrap(), plan)
    }

    #[test]
    fn asks_for_stream_usage_when_the_client_did_not() {
        let (sent, plan) = inspect(
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "messages": []}),
        );
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        assert!(plan.strip_stream_usage);
        assert_eq!(plan.model.as_deref(), Some("m"));
    }

    #[test]
    fn keeps_the_clients_own_stream_options() {
        let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
        let (sent, plan) = inspect("/v1/completions", body.clone());
        assert_eq!(sent, body);
        assert!(!plan.strip_stream_usage);

        let body = json!({"stream": true, "stream_options": {"include_usage": false, "x": 1}});
        let (sent, plan) = inspect("/v1/completions", body);
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
        assert!(plan.strip_stream_usage);
    }

    #[test]
    fn leaves_other_requests_alone() {
        for body in [
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "stream": false}),
        ] {
            let (sent, plan) = inspect("/v1/chat/completions", body.clone());
            assert_eq!(sent, body);
            assert!(!plan.strip_stream_usage);
        }
        let (sent, plan) = inspect("/v1/embeddings", json!({"stream": true}));
        assert_eq!(sent, json!({"stream": true}));
        assert!(!plan.strip_stream_usage);
    }

    #[test]
    fn invalid_json_is_forwarded_byte_for_byte() {
        let raw = Bytes::from_static(b"{\"model\": \"m\", \"stream\": tru");
        let (out, plan) =
            inspect_request("/v1/chat/completions", None, raw.clone(), ForCounting::Keep);
        assert_eq!(out, raw);
        assert!(plan.model.is_none());
    }

    fn sent(path: &str, body: &str) -> (String, RequestPlan) {
        let (out, plan) = inspect_request(
            path,
            None,
            Bytes::copy_from_slice(body.as_bytes()),
            ForCounting::Skip,
        );
        (String::from_utf8(out.to_vec()).unwrap(), plan)
    }

    #[test]
    fn the_upstream_gets_the_clients_bytes_with_only_include_usage_added() {
        let body = r#"{ "model": "m", "stream": true, "messages": [{"role": "user", "content": "caf\u00e9"}], "temperature": 1e-07 }"#;
        let (out, plan) = sent("/v1/chat/completions", body);
        assert_eq!(
            out,
            r#"{"stream_options":{"include_usage":true}, "model": "m", "stream": true, "messages": [{"role": "user", "content": "caf\u00e9"}], "temperature": 1e-07 }"#
        );
        assert!(plan.strip_stream_usage);
        for (options, expected) in [
            (
                r#"{ "include_usage" : false, "x": 1.50 }"#,
                r#"{ "include_usage" : true, "x": 1.50 }"#,
            ),
            (r#"{ "x": 1.50 }"#, r#"{"include_usage":true, "x": 1.50 }"#),
            ("{ }", r#"{"include_usage":true }"#),
            (r#"{"include_usage":null}"#, r#"{"include_usage":true}"#),
        ] {
            let body = format!(r#"{{"stream":true,"stream_options":{options},"n":1}}"#);
            let (out, plan) = sent("/v1/completions", &body);
            assert_eq!(
                out,
                format!(r#"{{"stream":true,"stream_options":{expected},"n":1}}"#)
            );
            assert!(plan.strip_stream_usage);
        }
        let (out, _) = sent(
            "/v1/chat/completions",
            r#"{"stream":true,"stream_options":"x"}"#,
        );
        assert_eq!(
            out, r#"{"stream":true,"stream_options":"x"}"#,
            "garbage is left to the upstream to refuse"
        );
    }

    #[test]
    fn asks_nothing_of_endpoints_that_report_usage_unasked() {
        for path in [
            "/v1/responses",
            "/v1/audio/transcriptions",
            "/v1/embeddings",
            "/v1/chat/completions/chatcmpl-1/messages",
            "/v1/x/completions",
        ] {
            let body = r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#;
            let (out, plan) = sent(path, body);
            assert_eq!(out, body, "{path}");
            assert!(!plan.strip_stream_usage, "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/openai/deployments/gpt-4o/chat/completions",
            "/openai/deployments/davinci/completions",
        ] {
            assert!(
                sent(path, r#"{"stream":true}"#).1.strip_stream_usage,
                "{path}"
            );
        }
    }

    #[test]
    fn a_repeated_or_escaped_name_cannot_stream_past_the_meter() {
        // The upstream's parser takes the last of repeated names: this request streams.
        let (out, plan) = sent(
            "/v1/chat/completions",
            r#"{"model":"m","stream":false,"stream":true}"#,
        );
        assert!(plan.strip_stream_usage);
        assert_eq!(plan.model.as_deref(), Some("m"));
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()["stream_options"],
            json!({"include_usage": true})
        );

        // A name written with an escape is the same name to the upstream.
        let (out, plan) = sent(
            "/v1/chat/completions",
            r#"{"stream":true,"stream\u005foptions":{"include_usage":false}}"#,
        );
        assert!(plan.strip_stream_usage);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn a_body_that_does_not_parse_whole_is_not_edited() {
        // A lone surrogate escape in a field the gateway does not read.
        let body = r#"{"stream":true,"messages":[{"content":"\ud800"}]}"#;
        let (out, plan) = sent("/v1/chat/completions", body);
        assert_eq!(out, body);
        assert!(!plan.strip_stream_usage);
    }
}
