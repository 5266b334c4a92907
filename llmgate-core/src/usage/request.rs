//! What the gateway reads from (and may add to) a request body.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// What the response side needs to know about the request.
#[derive(Debug, Default)]
pub(crate) struct RequestPlan {
    /// The `model` field.
    pub model: Option<String>,
    /// The gateway added `stream_options.include_usage` to get token counts: the usage
    /// chunk (and the `usage: null` fields) must be taken out of what the client sees.
    pub strip_stream_usage: bool,
    /// The parsed request, kept for a [`TokenCounter`](super::TokenCounter) when the
    /// request streams.
    pub for_counting: Option<Arc<Value>>,
}

/// Only the fields we need; serde skips the rest without allocating.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Endpoints that accept `stream_options.include_usage`.
fn supports_stream_options(path: &str) -> bool {
    path.ends_with("/chat/completions") || path.ends_with("/completions")
}

/// Reads the request body; returns the body to forward (changed only when the gateway
/// asks the upstream for stream usage) and the plan. A body that is not JSON is
/// forwarded unchanged: the upstream answers it.
pub(crate) fn inspect_request(
    path: &str,
    body: Bytes,
    keep_for_counting: bool,
) -> (Bytes, RequestPlan) {
    let Ok(peek) = serde_json::from_slice::<Peek<'_>>(&body) else {
        return (body, RequestPlan::default());
    };
    let mut plan = RequestPlan {
        model: peek.model.map(Cow::into_owned),
        ..RequestPlan::default()
    };
    let streams = peek.stream == Some(true);
    let asked_for_usage = peek.stream_options.and_then(|o| o.include_usage) == Some(true);
    if !streams || (asked_for_usage && !keep_for_counting) {
        return (body, plan);
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(&body) else {
        return (body, plan);
    };
    if keep_for_counting {
        plan.for_counting = Some(Arc::new(value.clone()));
    }
    if asked_for_usage || !supports_stream_options(path) {
        return (body, plan);
    }
    let Some(object) = value.as_object_mut() else {
        return (body, plan);
    };
    let options = object
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    if !options.is_object() {
        // `stream_options: null` or garbage: let the upstream judge the client's request.
        return (body, plan);
    }
    options["include_usage"] = Value::Bool(true);
    plan.strip_stream_usage = true;
    let rewritten = serde_json::to_vec(&value).expect("a JSON value serializes");
    (Bytes::from(rewritten), plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inspect(path: &str, body: Value) -> (Value, RequestPlan) {
        let (out, plan) = inspect_request(path, Bytes::from(body.to_string()), false);
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
        let (out, plan) = inspect_request("/v1/chat/completions", raw.clone(), true);
        assert_eq!(out, raw);
        assert!(plan.model.is_none());
    }
}
