//! What the metering layer answers for the [`Limiter`](crate::limits::Limiter): the
//! 429s and 404s in OpenAI's shape, the `x-ratelimit-*` headers, the end user.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::AuthUsageBody;
use crate::error::ApiError;
use crate::limits::{cut_end_user, write_duration, LimitValues, Refusal, Refused, Window};

/// What Open WebUI's headers naming its user start with, when
/// `ENABLE_FORWARD_USER_INFO_HEADERS` is on: `-id`, else `-email`, names the user.
const END_USER_HEADER_PREFIX: &str = "x-openwebui-user-";

/// The end user a request names: its body's `user`, else Open WebUI's headers; cut to
/// the length the store keeps.
pub(super) fn end_user(from_body: Option<String>, headers: &HeaderMap) -> Option<String> {
    let name = match from_body {
        Some(name) => name,
        None => from_headers(headers)?.to_owned(),
    };
    Some(match cut_end_user(&name).len() {
        len if len == name.len() => name,
        len => name[..len].to_owned(),
    })
}

/// `X-OpenWebUI-User-Id`, else `-Email` (the first value of each, trimmed, if not
/// empty). One pass over the header names, comparing lengths and a prefix, instead of
/// two hashed lookups: it runs on every request, and nearly none has them. The names
/// alone: walking the values too costs more than the comparisons.
fn from_headers(headers: &HeaderMap) -> Option<&str> {
    let text = |name: &HeaderName| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        (!value.is_empty()).then_some(value)
    };
    let mut email = None;
    for name in headers.keys() {
        match name.as_str().strip_prefix(END_USER_HEADER_PREFIX) {
            Some("id") => {
                if let Some(id) = text(name) {
                    return Some(id);
                }
            }
            Some("email") => email = text(name),
            _ => {}
        }
    }
    email
}

/// The answer to a model the key may not use: the same as for a model that does not
/// exist (the router's), so that a key cannot learn which models are there.
pub(super) fn model_not_found<B>(model: &str) -> Response<AuthUsageBody<B>> {
    if model.is_empty() {
        // As OpenAI answers a request without a model.
        let mut err = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "You must provide a model parameter: this key may use only some models.",
        );
        err.param = Some("model");
        return err.into_response::<Full<Bytes>>().map(Either::Right);
    }
    ApiError::model_not_found(model)
        .into_response::<Full<Bytes>>()
        .map(Either::Right)
}

/// The 429 of a refused request, as OpenAI sends it: `rate_limit_exceeded` (type
/// `requests` or `tokens`) or `insufficient_quota`, with `Retry-After` (whole seconds)
/// and `retry-after-ms`, and the buckets' headers.
pub(super) fn refused<B>(refusal: &Refusal, known: &LimitValues) -> Response<AuthUsageBody<B>> {
    let code = if refusal.is_quota() {
        "insufficient_quota"
    } else {
        "rate_limit_exceeded"
    };
    let err = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        refusal.kind(),
        Some(code),
        refusal.message(),
    );
    let mut response = err.into_response::<Full<Bytes>>().map(Either::Right);
    let headers = response.headers_mut();
    let seconds = refusal.retry_ms.div_ceil(1000).max(1);
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    headers.insert(
        HeaderName::from_static("retry-after-ms"),
        HeaderValue::from(refusal.retry_ms),
    );
    rate_headers(headers, refusal.requests, refusal.tokens, known);
    response.extensions_mut().insert(Refused(refusal.reason()));
    response
}

// Constants, each copied where it is used: `from_static` checks its name each time it
// runs, and a clone of a static name costs a call through its `Bytes`' table.
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// The values of the rate headers that change from one answer to the next, written
/// side by side on the stack and then moved into the one allocation they all share
/// (`Bytes::from_owner`): a `BytesMut` frozen and sliced costs two.
struct RateValues {
    bytes: [u8; RateValues::CAPACITY],
    len: usize,
}

impl RateValues {
    /// Two windows' values at their longest: a limit and a remaining count of 20 digits
    /// each, and a reset of `{hours}h59m59.999s` (13 digits of hours).
    const CAPACITY: usize = 2 * (20 + 20 + 24);

    fn number(&mut self, n: u64) {
        let _ = std::fmt::Write::write_str(self, itoa::Buffer::new().format(n));
    }
}

impl std::fmt::Write for RateValues {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let to = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        to.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl AsRef<[u8]> for RateValues {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Where one window's values are: its limit (made before, or written at
/// `..limit_end`), then its remaining count and its reset.
struct WindowValues<'a> {
    known_limit: Option<&'a HeaderValue>,
    limit_end: usize,
    remaining_end: usize,
    reset_end: usize,
}

impl<'a> WindowValues<'a> {
    fn write(values: &mut RateValues, w: &Window, known: &'a Option<(u64, HeaderValue)>) -> Self {
        let known_limit = match known {
            Some((limit, value)) if *limit == w.limit => Some(value),
            _ => None,
        };
        if known_limit.is_none() {
            values.number(w.limit);
        }
        let limit_end = values.len;
        values.number(w.remaining);
        let remaining_end = values.len;
        // Cannot fail: the buffer holds the longest values.
        let _ = write_duration(values, w.reset_ms);
        Self {
            known_limit,
            limit_end,
            remaining_end,
            reset_end: values.len,
        }
    }

    /// Inserts the three headers, `names` in the order limit, remaining, reset; `start`
    /// is where this window's values begin in `text`.
    fn insert(&self, headers: &mut HeaderMap, names: [HeaderName; 3], text: &Bytes, start: usize) {
        let [limit, remaining, reset] = names;
        let value = |from, to| HeaderValue::from_maybe_shared(text.slice(from..to)).ok();
        match self.known_limit {
            Some(known) => {
                headers.insert(limit, known.clone());
            }
            None => {
                if let Some(value) = value(start, self.limit_end) {
                    headers.insert(limit, value);
                }
            }
        }
        if let Some(value) = value(self.limit_end, self.remaining_end) {
            headers.insert(remaining, value);
        }
        if let Some(value) = value(self.remaining_end, self.reset_end) {
            headers.insert(reset, value);
        }
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, for the buckets a key has;
/// `known` holds the key's limits' values made before.
pub(super) fn rate_headers(
    headers: &mut HeaderMap,
    requests: Option<Window>,
    tokens: Option<Window>,
    known: &LimitValues,
) {
    if requests.is_none() && tokens.is_none() {
        return;
    }
    let mut values = RateValues {
        bytes: [0; RateValues::CAPACITY],
        len: 0,
    };
    let requests = requests.map(|w| WindowValues::write(&mut values, &w, &known[0]));
    let tokens_start = values.len;
    let tokens = tokens.map(|w| WindowValues::write(&mut values, &w, &known[1]));
    let text = Bytes::from_owner(values);
    headers.reserve(3 * (usize::from(requests.is_some()) + usize::from(tokens.is_some())));
    if let Some(requests) = requests {
        let names = [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS];
        requests.insert(headers, names, &text, 0);
    }
    if let Some(tokens) = tokens {
        let names = [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS];
        tokens.insert(headers, names, &text, tokens_start);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use serde_json::Value;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::auth::{KeyCache, KeyRecord, Role, Secret};
    use crate::limits::{Effective, KeyLimits, Limiter, Refused};
    use crate::storage::{KeyStore, MemoryStore};
    use crate::usage::{UsageRecorder, UsageWriter};
    use crate::AuthUsageLayer;

    type Body = BoxBody<Bytes, Infallible>;

    /// A gateway with one user key of `limits` in front of a model that answers
    /// `x-tokens` tokens (half prompt, half completion), or never finishes its answer
    /// when asked `x-hang`. It answers 500 if the layer gave it no `Effective` limits.
    struct Gateway {
        service: tower::util::BoxCloneService<
            Request<Full<Bytes>>,
            Response<crate::auth_usage::AuthUsageBody<Body>>,
            Infallible,
        >,
        secret: Secret,
        key_id: String,
        store: Arc<MemoryStore>,
        recorder: UsageRecorder,
        _writer: UsageWriter,
    }

    async fn gateway(limits: KeyLimits) -> Gateway {
        let store = Arc::new(MemoryStore::new());
        let secret = Secret::generate();
        let mut key = KeyRecord::new("alice", Role::User, &secret);
        key.limits = limits;
        store.insert_key(&key, &secret.hash()).await.unwrap();
        let (recorder, writer) = UsageRecorder::start(store.clone());
        let limiter = Limiter::local(KeyLimits::default(), store.clone());
        let layer =
            AuthUsageLayer::new(KeyCache::new(store.clone()), recorder.clone()).limiter(limiter);
        let model = service_fn(|request: Request<Full<Bytes>>| async move {
            if request.extensions().get::<Effective>().is_none() {
                let body = Full::new(Bytes::from_static(b"no limits")).boxed();
                return Ok::<_, Infallible>(Response::builder().status(500).body(body).unwrap());
            }
            if let Some(content_type) = request.headers().get("x-hang").cloned() {
                let body = StreamBody::new(futures_util::stream::pending::<
                    Result<http_body::Frame<Bytes>, Infallible>,
                >());
                return Ok(Response::builder()
                    .header("content-type", content_type)
                    .body(body.boxed())
                    .unwrap());
            }
            let tokens: u64 = request
                .headers()
                .get("x-tokens")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(10);
            let json = format!(
                r#"{{"model":"m","usage":{{"prompt_tokens":{},"completion_tokens":{}}}}}"#,
                tokens / 2,
                tokens - tokens / 2
            );
            Ok(Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json)).boxed())
                .unwrap())
        });
        let service = tower::ServiceBuilder::new().layer(layer).service(model);
        Gateway {
            service: tower::util::BoxCloneService::new(service),
            secret,
            key_id: key.id.clone(),
            store,
            recorder,
            _writer: writer,
        }
    }

    impl Gateway {
        async fn rows(&self) -> Vec<crate::storage::RequestRecord> {
            crate::storage::UsageStore::requests(&*self.store, &self.key_id, None, 100)
                .await
                .unwrap()
        }

        fn request(&self, _body: &str) -> http::request::Builder {
            Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {}", self.secret.expose()))
                .header("content-type", "application/json")
        }

        /// Sends `body` and reads the whole answer.
        async fn send(&self, builder: http::request::Builder, body: &str) -> (Response<()>, Value) {
            let request = builder
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap();
            let response = self.service.clone().oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (Response::from_parts(parts, ()), json)
        }

        async fn chat(&self, body: &str) -> (Response<()>, Value) {
            self.send(self.request(body), body).await
        }
    }

    fn header<'a>(response: &'a Response<()>, name: &str) -> &'a str {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    const CHAT: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;

    #[tokio::test]
    async fn over_the_request_limit_a_client_gets_openais_429_and_headers() {
        let gw = gateway(KeyLimits {
            rpm: Some(3),
            ..KeyLimits::default()
        })
        .await;
        for left in ["2", "1", "0"] {
            let (response, _) = gw.chat(CHAT).await;
            assert_eq!(response.status(), 200);
            assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
            assert_eq!(header(&response, "x-ratelimit-remaining-requests"), left);
            assert!(response.headers().get("x-ratelimit-limit-tokens").is_none());
        }
        let (response, body) = gw.chat(CHAT).await;
        assert_eq!(response.status(), 429);
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("Limit 3, Used 3, Requested 1"),
            "{message}"
        );
        assert!(
            message.contains("Please try again in 19.") || message.contains("in 20s"),
            "{message}"
        );
        // 3 a minute: the next one in 20 s (less the moments the test took).
        assert_eq!(header(&response, "retry-after"), "20");
        let retry_ms: u64 = header(&response, "retry-after-ms").parse().unwrap();
        assert!((19_000..=20_000).contains(&retry_ms), "{retry_ms}");
        assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
        // Full again a minute after the first request.
        let reset = header(&response, "x-ratelimit-reset-requests");
        assert!(reset == "1m0s" || reset.starts_with("59."), "{reset}");
        assert_eq!(
            response.extensions().get::<Refused>(),
            Some(&Refused("requests"))
        );
        // The refusal is in the key's usage, without tokens.
        gw.recorder.flush().await;
        let rows = gw.rows().await;
        assert_eq!(rows.iter().filter(|r| r.status == 429).count(), 1);
    }

    #[tokio::test]
    async fn a_change_to_a_keys_limits_holds_from_its_next_request() {
        let gw = gateway(KeyLimits {
            rpm: Some(100),
            tpm: Some(10_000),
            ..KeyLimits::default()
        })
        .await;
        let (response, _) = gw.chat(CHAT).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "100");
        assert_eq!(header(&response, "x-ratelimit-limit-tokens"), "10000");
        let update = crate::storage::KeyUpdate {
            limits: crate::storage::LimitsPatch::replacing(KeyLimits {
                rpm: Some(7),
                models: Some(vec!["gemma-*".into()]),
                ..KeyLimits::default()
            }),
            ..Default::default()
        };
        gw.store
            .update_key(&gw.key_id, &update)
            .await
            .unwrap()
            .unwrap();
        // Once the key cache reads the key again, its next request has the new limits.
        tokio::time::sleep(crate::auth::DEFAULT_KEY_TTL + Duration::from_millis(100)).await;
        let (response, body) = gw.chat(CHAT).await;
        assert_eq!(response.status(), 404, "{body}");
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "7");
        assert!(response.headers().get("x-ratelimit-limit-tokens").is_none());
        let (response, _) = gw.chat(r#"{"model":"gemma-3"}"#).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "7");
    }

    #[tokio::test]
    async fn the_token_window_is_settled_with_the_real_count() {
        let gw = gateway(KeyLimits {
            tpm: Some(10_000),
            ..KeyLimits::default()
        })
        .await;
        let body = r#"{"model":"m","max_tokens":4000}"#; // estimate: 8 + 4000
        let (first, _) = gw
            .send(gw.request(body).header("x-tokens", "100"), body)
            .await;
        let after_first: u64 = header(&first, "x-ratelimit-remaining-tokens")
            .parse()
            .unwrap();
        assert!(
            after_first <= 10_000 - 4000,
            "the estimate is taken: {after_first}"
        );
        let (second, _) = gw
            .send(gw.request(body).header("x-tokens", "100"), body)
            .await;
        let after_second: u64 = header(&second, "x-ratelimit-remaining-tokens")
            .parse()
            .unwrap();
        // The first request counts 100 now, not its estimate of 4008.
        assert!(after_second >= 10_000 - 100 - 4008, "{after_second}");
        assert!(after_second < 10_000 - 4008, "{after_second}");
        // Both settled at 100: 9800 left, not enough for an estimate of 9900 and more.
        let large = r#"{"model":"m","max_tokens":9900}"#;
        let (third, body) = gw.send(gw.request(large), large).await;
        assert_eq!(third.status(), 429);
        assert_eq!(body["error"]["type"], "tokens");
        assert!(header(&third, "x-ratelimit-reset-tokens").ends_with('s'));
    }

    #[tokio::test]
    async fn a_quota_is_overshot_by_at_most_one_request() {
        let gw = gateway(KeyLimits {
            quota_tokens: Some(1000),
            ..KeyLimits::default()
        })
        .await;
        let mut admitted = 0;
        loop {
            let (response, body) = gw
                .send(gw.request(CHAT).header("x-tokens", "300"), CHAT)
                .await;
            if response.status() == 429 {
                assert_eq!(body["error"]["type"], "insufficient_quota");
                assert_eq!(body["error"]["code"], "insufficient_quota");
                assert!(header(&response, "retry-after").parse::<u64>().unwrap() >= 1);
                break;
            }
            assert_eq!(response.status(), 200);
            admitted += 1;
            assert!(admitted < 10, "the quota never refused");
        }
        gw.recorder.flush().await;
        let used: u64 = gw
            .rows()
            .await
            .iter()
            .map(|r| r.prompt_tokens.unwrap_or(0) + r.completion_tokens.unwrap_or(0))
            .sum();
        assert_eq!(admitted, 4, "admitted at 0, 300, 600 and 900 used");
        assert!(
            used <= 1000 + 300,
            "used {used}: more than one request over"
        );
    }

    #[tokio::test]
    async fn a_place_in_flight_is_freed_when_the_client_leaves() {
        // A stream, and a JSON answer (whose rest is still read for its tokens).
        for content_type in ["text/event-stream", "application/json"] {
            let gw = gateway(KeyLimits {
                max_parallel: Some(1),
                ..KeyLimits::default()
            })
            .await;
            let request = gw
                .request(CHAT)
                .header("x-hang", content_type)
                .body(Full::new(Bytes::from(CHAT)))
                .unwrap();
            let hanging = gw.service.clone().oneshot(request).await.unwrap();
            assert_eq!(hanging.status(), 200);
            let (response, body) = gw.chat(CHAT).await;
            assert_eq!(response.status(), 429, "{content_type}");
            assert_eq!(
                response.extensions().get::<Refused>(),
                Some(&Refused("parallel"))
            );
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            drop(hanging); // the client leaves mid-answer
            let (response, _) = gw.chat(CHAT).await;
            assert_eq!(response.status(), 200, "{content_type}");
        }
    }

    #[tokio::test]
    async fn end_users_are_limited_apart_by_body_or_open_webui_headers() {
        let gw = gateway(KeyLimits {
            per_user_rpm: Some(1),
            ..KeyLimits::default()
        })
        .await;
        let ann = r#"{"model":"m","user":"ann"}"#;
        assert_eq!(gw.chat(ann).await.0.status(), 200);
        let (response, body) = gw.chat(ann).await;
        assert_eq!(response.status(), 429);
        assert!(body["error"]["message"].as_str().unwrap().contains("'ann'"));
        assert_eq!(
            gw.chat(r#"{"model":"m","user":"bob"}"#).await.0.status(),
            200
        );
        let carol = || gw.request(CHAT).header("x-openwebui-user-id", "carol");
        assert_eq!(gw.send(carol(), CHAT).await.0.status(), 200);
        assert_eq!(gw.send(carol(), CHAT).await.0.status(), 429);
        let by_email = || {
            gw.request(CHAT)
                .header("x-openwebui-user-email", "dan@example.com")
        };
        assert_eq!(gw.send(by_email(), CHAT).await.0.status(), 200);
        assert_eq!(gw.send(by_email(), CHAT).await.0.status(), 429);
        // Without an end user only the key's limits apply (it has none that count).
        assert_eq!(gw.chat(CHAT).await.0.status(), 200);
        assert_eq!(gw.chat(CHAT).await.0.status(), 200);
        // Each request is recorded with its end user, refused or not.
        gw.recorder.flush().await;
        let mut users: Vec<_> = gw
            .rows()
            .await
            .into_iter()
            .map(|r| (r.end_user.unwrap_or_default(), r.status))
            .collect();
        users.sort();
        let expected = [
            ("", 200),
            ("", 200),
            ("ann", 200),
            ("ann", 429),
            ("bob", 200),
            ("carol", 200),
            ("carol", 429),
            ("dan@example.com", 200),
            ("dan@example.com", 429),
        ];
        let expected: Vec<_> = expected.iter().map(|(u, s)| (u.to_string(), *s)).collect();
        assert_eq!(users, expected);
    }

    #[tokio::test]
    async fn the_end_user_is_recorded_without_a_limiter_too() {
        let store = Arc::new(MemoryStore::new());
        let secret = Secret::generate();
        let key = KeyRecord::new("alice", Role::User, &secret);
        store.insert_key(&key, &secret.hash()).await.unwrap();
        let (recorder, _writer) = UsageRecorder::start(store.clone());
        let service = AuthUsageLayer::new(KeyCache::new(store.clone()), recorder.clone()).layer(
            service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
            }),
        );
        let request = Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {}", secret.expose()))
            .header("x-openwebui-user-email", "eve@example.com")
            .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
        recorder.flush().await;
        let rows = crate::storage::UsageStore::requests(&*store, &key.id, None, 10)
            .await
            .unwrap();
        assert_eq!(rows[0].end_user.as_deref(), Some("eve@example.com"));
    }

    #[tokio::test]
    async fn a_model_the_key_may_not_use_is_answered_as_an_unknown_model() {
        let gw = gateway(KeyLimits {
            models: Some(vec!["gemma-*".into()]),
            ..KeyLimits::default()
        })
        .await;
        let body = r#"{"model":"llama-3"}"#;
        let (response, json) = gw.chat(body).await;
        assert_eq!(response.status(), 404);
        assert_eq!(
            json["error"],
            serde_json::json!({
                "message": "The model `llama-3` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            })
        );
        let (response, _) = gw.chat(r#"{"model":"gemma-3-270m"}"#).await;
        assert_eq!(
            response.status(),
            200,
            "the model sees the Effective limits"
        );
        assert!(response
            .headers()
            .get("x-ratelimit-limit-requests")
            .is_none());
        // Naming no model (or one the gateway cannot read) would reach the default
        // model, or let an upstream choose: refused, as OpenAI refuses a missing model.
        for body in [
            r#"{"messages":[]}"#,
            r#"{"model":null}"#,
            r#"{"model":123}"#,
        ] {
            let (response, json) = gw.chat(body).await;
            assert_eq!(response.status(), 400, "{body}");
            assert_eq!(json["error"]["param"], "model", "{body}");
        }
        // A name longer than any model's is refused without matching it.
        let long = format!(r#"{{"model":"gemma-{}"}}"#, "x".repeat(100_000));
        assert_eq!(gw.chat(&long).await.0.status(), 404);
    }

    #[tokio::test]
    async fn a_huge_max_tokens_charges_at_most_a_minute_of_tokens() {
        // One request naming max_tokens 10^9 whose client leaves before the count is
        // known keeps its estimate: capped at the tpm, the key waits a minute at most.
        let gw = gateway(KeyLimits {
            tpm: Some(1000),
            ..KeyLimits::default()
        })
        .await;
        let huge = r#"{"model":"m","max_tokens":1000000000}"#;
        let request = gw
            .request(huge)
            .header("x-hang", "text/event-stream")
            .body(Full::new(Bytes::from(huge)))
            .unwrap();
        let hanging = gw.service.clone().oneshot(request).await.unwrap();
        assert_eq!(hanging.status(), 200);
        drop(hanging); // the client leaves: no count, the estimate stays
        let (response, _) = gw.chat(CHAT).await;
        assert_eq!(response.status(), 429);
        let retry: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry <= 60, "waits {retry} s");
    }

    #[tokio::test]
    async fn clients_that_leave_before_their_count_do_not_use_up_the_quota() {
        // The store counts an answer whose tokens are unknown as 0: so does the quota.
        let gw = gateway(KeyLimits {
            quota_tokens: Some(1000),
            ..KeyLimits::default()
        })
        .await;
        let huge = r#"{"model":"m","max_tokens":1000000000}"#;
        for _ in 0..3 {
            let request = gw
                .request(huge)
                .header("x-hang", "text/event-stream")
                .body(Full::new(Bytes::from(huge)))
                .unwrap();
            let hanging = gw.service.clone().oneshot(request).await.unwrap();
            assert_eq!(hanging.status(), 200);
            drop(hanging); // the client leaves: no count
            gw.recorder.flush().await;
            let (response, _) = gw.chat(CHAT).await;
            assert_eq!(response.status(), 200);
            gw.recorder.flush().await;
        }
        let rows = gw.rows().await;
        assert_eq!(rows.len(), 6);
        assert_eq!(rows.iter().filter(|r| r.prompt_tokens.is_none()).count(), 3);
    }

    #[test]
    fn rate_headers_carry_each_window_exactly() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let requests = Window {
            limit: 1_000_000_000,
            remaining: 999_999_999,
            reset_ms: 1,
        };
        let tokens = Window {
            limit: u64::MAX,
            remaining: u64::MAX,
            reset_ms: u64::MAX,
        };
        rate_headers(&mut headers, Some(requests), Some(tokens), &[None, None]);
        let text = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert_eq!(text("x-ratelimit-limit-requests"), "1000000000");
        assert_eq!(text("x-ratelimit-remaining-requests"), "999999999");
        assert_eq!(text("x-ratelimit-reset-requests"), "1ms");
        // The longest values there are fit.
        assert_eq!(text("x-ratelimit-limit-tokens"), u64::MAX.to_string());
        assert_eq!(text("x-ratelimit-remaining-tokens"), u64::MAX.to_string());
        assert_eq!(
            text("x-ratelimit-reset-tokens"),
            crate::limits::format_duration(u64::MAX)
        );
        assert!(text("x-ratelimit-reset-tokens").starts_with("5124095576030h25m"));
        assert_eq!(headers.len(), 7);
        // Only the windows a key has; a value already there is replaced.
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-limit-tokens", HeaderValue::from_static("1"));
        let tokens = Window {
            limit: 90_000,
            remaining: 89_500,
            reset_ms: 61_500,
        };
        rate_headers(&mut headers, None, Some(tokens), &[None, None]);
        let text = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert_eq!(text("x-ratelimit-limit-tokens"), "90000");
        assert_eq!(text("x-ratelimit-remaining-tokens"), "89500");
        assert_eq!(text("x-ratelimit-reset-tokens"), "1m1.5s");
        assert_eq!(headers.len(), 3);
        rate_headers(&mut headers, None, None, &[None, None]);
        assert_eq!(headers.len(), 3);
        // The key's limits made before are used where the windows show them; a window
        // showing another limit (a fallback's share of it) has its own written.
        let known: LimitValues = [
            Some((1000, HeaderValue::from(1000u64))),
            Some((90_000, HeaderValue::from(90_000u64))),
        ];
        let requests = Window {
            limit: 1000,
            remaining: 10,
            reset_ms: 0,
        };
        let tokens = Window {
            limit: 45_000,
            remaining: 1,
            reset_ms: 30_000,
        };
        let mut headers = HeaderMap::new();
        rate_headers(&mut headers, Some(requests), Some(tokens), &known);
        let text = |name: &str| headers[name].to_str().unwrap().to_owned();
        assert_eq!(text("x-ratelimit-limit-requests"), "1000");
        assert_eq!(text("x-ratelimit-remaining-requests"), "10");
        assert_eq!(text("x-ratelimit-reset-requests"), "0ms");
        assert_eq!(text("x-ratelimit-limit-tokens"), "45000");
        assert_eq!(text("x-ratelimit-remaining-tokens"), "1");
        assert_eq!(text("x-ratelimit-reset-tokens"), "30s");
        let names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            "in OpenAI's order"
        );
    }

    #[test]
    fn the_end_user_comes_from_the_body_first_and_is_cut() {
        let mut headers = HeaderMap::new();
        headers.insert("x-openwebui-user-email", HeaderValue::from_static("a@b"));
        headers.insert("x-openwebui-user-id", HeaderValue::from_static("id-1"));
        headers.insert("x-openwebui-user-name", HeaderValue::from_static("Ann B"));
        assert_eq!(
            end_user(Some("ann".into()), &headers).as_deref(),
            Some("ann")
        );
        assert_eq!(end_user(None, &headers).as_deref(), Some("id-1"));
        // An empty or blank id: the email.
        headers.insert("x-openwebui-user-id", HeaderValue::from_static("  "));
        assert_eq!(end_user(None, &headers).as_deref(), Some("a@b"));
        headers.remove("x-openwebui-user-id");
        assert_eq!(end_user(None, &headers).as_deref(), Some("a@b"));
        // Only the first value of each counts, as a client reading one value sees it.
        headers.append("x-openwebui-user-email", HeaderValue::from_static("c@d"));
        assert_eq!(end_user(None, &headers).as_deref(), Some("a@b"));
        headers.insert("x-openwebui-user-email", HeaderValue::from_static(" "));
        headers.append("x-openwebui-user-email", HeaderValue::from_static("c@d"));
        assert_eq!(end_user(None, &headers).as_deref(), None);
        assert_eq!(end_user(None, &HeaderMap::new()), None);
        let long = "x".repeat(1000);
        assert_eq!(end_user(Some(long), &headers).unwrap().len(), 256);
    }
    use super::*;
}
