//! A mock OpenAI-compatible upstream for tests: a real HTTP server on 127.0.0.1:0.
//!
//! It answers `/v1/chat/completions`, `/v1/completions` (JSON or SSE, with OpenAI's
//! `stream_options.include_usage` semantics), `/v1/responses` (JSON or SSE, usage in
//! `response.completed`), `/v1/audio/transcriptions` (multipart; JSON or SSE, usage in
//! tokens), `/v1/embeddings` and `/v1/models`, and remembers every request it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// The words every mock completion is made of.
pub const REPLY: [&str; 5] = ["The", " quick", " brown", " fox", " jumps"];

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct State {
    seen: Mutex<Vec<SeenRequest>>,
    /// Behave like llama-cpp-python: ignore `stream_options`, never send usage in a stream.
    no_stream_usage: AtomicBool,
    chunk_delay_ms: AtomicU64,
    response_delay_ms: AtomicU64,
    /// Sent as they are for every streamed chat completion, instead of the usual events.
    chat_stream: Mutex<Option<Vec<Bytes>>>,
}

/// The running mock; stops when dropped.
#[derive(Debug)]
pub struct MockUpstream {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type MockBody = UnsyncBoxBody<Bytes, Infallible>;

impl MockUpstream {
    /// Starts the mock on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            addr,
            state,
            task,
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Like llama-cpp-python: streams carry no usage even when asked.
    pub fn without_stream_usage(&self) {
        self.state.no_stream_usage.store(true, Ordering::SeqCst);
    }

    /// Pause between stream chunks (and between the halves of a JSON answer).
    pub fn set_chunk_delay(&self, delay: Duration) {
        self.state
            .chunk_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Streamed chat completions get exactly these frames (whatever was asked).
    pub fn serve_chat_stream(&self, frames: Vec<Bytes>) {
        *self.state.chat_stream.lock().unwrap() = Some(frames);
    }

    /// Pause before answering at all.
    pub fn set_response_delay(&self, delay: Duration) {
        self.state
            .response_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

fn json_response(status: StatusCode, value: Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed_unsync())
        .expect("valid response")
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Prompt tokens of a request, as the mock's "tokenizer" counts them: the words of
/// every message (plus 3 per message for the template), of the prompt, or of a
/// Responses API `input`.
pub fn mock_prompt_tokens(request: &Value) -> u64 {
    if let Some(messages) = request["messages"].as_array() {
        messages
            .iter()
            .map(|m| 3 + m["content"].as_str().map_or(0, words))
            .sum()
    } else {
        request["prompt"]
            .as_str()
            .or(request["input"].as_str())
            .map_or(0, words)
    }
}

/// The transcript of any audio sent to the mock, and its usage (14 audio tokens in).
pub const TRANSCRIPT: &str = "The quick brown fox.";

/// Usage of the mock's transcriptions: `input_tokens`, `output_tokens`.
pub const TRANSCRIPTION_TOKENS: (u64, u64) = (14, 4);

fn transcription(body: &[u8]) -> Response<MockBody> {
    let (input, output) = TRANSCRIPTION_TOKENS;
    let usage = json!({"type": "tokens", "input_tokens": input, "input_token_details": {"text_tokens": 0, "audio_tokens": input}, "output_tokens": output, "total_tokens": input + output});
    let streams = body
        .windows(b"name=\"stream\"\r\n\r\ntrue".len())
        .any(|w| w == b"name=\"stream\"\r\n\r\ntrue");
    if !streams {
        return json_response(StatusCode::OK, json!({"text": TRANSCRIPT, "usage": usage}));
    }
    let events = vec![
        format!(
            "data: {}\n\n",
            json!({"type": "transcript.text.delta", "delta": TRANSCRIPT, "logprobs": null})
        ),
        format!(
            "data: {}\n\n",
            json!({"type": "transcript.text.done", "text": TRANSCRIPT, "logprobs": null, "usage": usage})
        ),
    ];
    sse_response(
        events.into_iter().map(Bytes::from).collect(),
        Duration::ZERO,
    )
}

/// The Responses API events the mock streams, as OpenAI sends them: the response in
/// `response.created` (usage null) and `response.completed` (with usage), text deltas
/// between.
pub fn responses_events(model: &str, reply: &[&str], input_tokens: u64) -> Vec<String> {
    let text: String = reply.concat();
    let response = |status: &str, output: Value, usage: Value| json!({"id": "resp_mock", "object": "response", "created_at": 1, "status": status, "error": null, "incomplete_details": null, "instructions": null, "model": model, "output": output, "parallel_tool_calls": true, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": null, "metadata": {}});
    let message = json!({"id": "msg_mock", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let usage = json!({"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": reply.len(), "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input_tokens + reply.len() as u64});
    let mut events = vec![
        json!({"type": "response.created", "sequence_number": 0, "response": response("in_progress", json!([]), Value::Null)}),
    ];
    for word in reply {
        events.push(json!({"type": "response.output_text.delta", "sequence_number": events.len(), "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": word}));
    }
    events.push(json!({"type": "response.output_text.done", "sequence_number": events.len(), "item_id": "msg_mock", "output_index": 0, "content_index": 0, "text": text}));
    events.push(json!({"type": "response.completed", "sequence_number": events.len(), "response": response("completed", json!([message]), usage)}));
    events
        .into_iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

fn sse_response(frames: Vec<Bytes>, delay: Duration) -> Response<MockBody> {
    let body = futures_util::stream::iter(frames).then(move |frame| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Infallible>(Frame::data(frame))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(body).boxed_unsync())
        .expect("valid response")
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(SeenRequest {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let delay = state.response_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let path = parts.uri.path();
    if parts.method == Method::GET && path == "/v1/models" {
        return Ok(json_response(
            StatusCode::OK,
            json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "llmgate"}]}),
        ));
    }
    if parts.method != Method::POST {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": "not found", "type": "invalid_request_error", "param": null, "code": null}}),
        ));
    }
    if path == "/v1/audio/transcriptions" {
        return Ok(transcription(&body));
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": null, "code": null}}),
        ));
    };
    let model = request["model"].as_str().unwrap_or("mock-model").to_owned();
    let prompt_tokens = mock_prompt_tokens(&request);
    let max = request["max_tokens"]
        .as_u64()
        .unwrap_or(REPLY.len() as u64)
        .min(REPLY.len() as u64) as usize;
    let reply = &REPLY[..max];
    match path {
        "/v1/chat/completions" | "/v1/completions" => {
            let api = if path == "/v1/chat/completions" {
                CompletionApi::Chat
            } else {
                CompletionApi::Text
            };
            let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": reply.len(), "total_tokens": prompt_tokens + reply.len() as u64});
            if request["stream"] == json!(true) {
                if let Some(frames) = state.chat_stream.lock().unwrap().clone() {
                    return Ok(sse_response(frames, Duration::ZERO));
                }
                let include_usage = request["stream_options"]["include_usage"] == json!(true)
                    && !state.no_stream_usage.load(Ordering::SeqCst);
                let delay = Duration::from_millis(state.chunk_delay_ms.load(Ordering::SeqCst));
                return Ok(stream(
                    api,
                    &model,
                    reply,
                    include_usage.then_some(usage),
                    delay,
                ));
            }
            let text: String = reply.concat();
            let (choice, object) = match api {
                CompletionApi::Chat => (
                    json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}),
                    "chat.completion",
                ),
                CompletionApi::Text => (
                    json!({"index": 0, "text": text, "finish_reason": "stop"}),
                    "text_completion",
                ),
            };
            let answer = json!({"id": "mock-1", "object": object, "created": 1, "model": model, "choices": [choice], "usage": usage});
            let delay = Duration::from_millis(state.chunk_delay_ms.load(Ordering::SeqCst));
            if delay.is_zero() {
                return Ok(json_response(StatusCode::OK, answer));
            }
            // Headers first, then the body in two halves with a pause between.
            let text = answer.to_string();
            let (head, tail) = text.split_at(text.len() / 2);
            let parts = vec![
                (Bytes::from(head.to_owned()), Duration::ZERO),
                (Bytes::from(tail.to_owned()), delay),
            ];
            let body = futures_util::stream::iter(parts).then(|(part, pause)| async move {
                tokio::time::sleep(pause).await;
                Ok::<_, Infallible>(Frame::data(part))
            });
            Ok(Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(body).boxed_unsync())
                .expect("valid response"))
        }
        "/v1/responses" => {
            if request["stream"] == json!(true) {
                let events = responses_events(&model, reply, prompt_tokens);
                let delay = Duration::from_millis(state.chunk_delay_ms.load(Ordering::SeqCst));
                return Ok(sse_response(
                    events.into_iter().map(Bytes::from).collect(),
                    delay,
                ));
            }
            let text: String = reply.concat();
            Ok(json_response(
                StatusCode::OK,
                json!({"id": "resp_mock", "object": "response", "created_at": 1, "status": "completed", "model": model, "output": [{"id": "msg_mock", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}], "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": reply.len(), "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt_tokens + reply.len() as u64}, "user": null, "metadata": {}}),
            ))
        }
        "/v1/embeddings" => {
            let tokens = request["input"].as_str().map_or(0, words);
            Ok(json_response(
                StatusCode::OK,
                json!({"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
            ))
        }
        _ => Ok(json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": "not found", "type": "invalid_request_error", "param": null, "code": null}}),
        )),
    }
}

/// Whether a request asks for its answer whole or streamed (`"stream": true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// One JSON body.
    Whole,
    /// Server-sent events.
    Streamed,
}

/// Which of OpenAI's two completion APIs an answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionApi {
    /// `/v1/chat/completions`: the text comes in `message` or `delta.content`.
    Chat,
    /// `/v1/completions` (the legacy API): the text comes in `text`.
    Text,
}

/// The SSE events the mock sends for `api`, as OpenAI does: with `usage: null` in every
/// chunk and a final usage chunk when usage was asked for.
pub fn stream_events(
    api: CompletionApi,
    model: &str,
    reply: &[&str],
    usage: Option<Value>,
) -> Vec<String> {
    let object = match api {
        CompletionApi::Chat => "chat.completion.chunk",
        CompletionApi::Text => "text_completion",
    };
    let chunk = |choice: Value, usage_field: Option<Value>| {
        let mut value = json!({"id": "mock-1", "object": object, "created": 1, "model": model, "choices": [choice]});
        if let Some(u) = usage_field {
            value["usage"] = u;
        }
        value
    };
    let nul = usage.as_ref().map(|_| Value::Null);
    let mut events = Vec::new();
    for (i, word) in reply.iter().enumerate() {
        let choice = match api {
            CompletionApi::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": word})
                } else {
                    json!({"content": word})
                };
                json!({"index": 0, "delta": delta, "finish_reason": null})
            }
            CompletionApi::Text => json!({"index": 0, "text": word, "finish_reason": null}),
        };
        events.push(chunk(choice, nul.clone()));
    }
    let last = match api {
        CompletionApi::Chat => json!({"index": 0, "delta": {}, "finish_reason": "stop"}),
        CompletionApi::Text => json!({"index": 0, "text": "", "finish_reason": "stop"}),
    };
    events.push(chunk(last, nul));
    if let Some(usage) = usage {
        let mut value =
            json!({"id": "mock-1", "object": object, "created": 1, "model": model, "choices": []});
        value["usage"] = usage;
        events.push(value);
    }
    let mut out: Vec<String> = events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect();
    out.push("data: [DONE]\n\n".to_owned());
    out
}

fn stream(
    api: CompletionApi,
    model: &str,
    reply: &[&str],
    usage: Option<Value>,
    delay: Duration,
) -> Response<MockBody> {
    let events = stream_events(api, model, reply, usage);
    sse_response(events.into_iter().map(Bytes::from).collect(), delay)
}
