//! [`AuthUsage`]: the middleware service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tower::{Service, ServiceExt};

use super::body::Tracking;
use super::layer::Shared;
use super::{limit, AuthUsageBody, RequestedModel, ResponseFuture, ServedModel, UsageBody};
use crate::auth::{now_millis, AuthError, Caller};
use crate::error::ApiError;
use crate::limits::Effective;
use crate::usage::{inspect_request, ForCounting, RequestPlan, UsageGuard};
use crate::BoxError;

/// The longest a client may pause while sending a request body (nginx's
/// `client_body_timeout` is 60 s).
pub const BODY_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `future` (a body being read) while it makes progress: fails once it has been
/// pending, without being woken to any effect, for `stall` in a row. Each wake-up that
/// leaves it pending (a frame arrived) starts the wait again.
fn stall_limited<F: Future>(future: F, stall: std::time::Duration) -> StallLimited<F> {
    StallLimited {
        future,
        timer: None,
        stall,
    }
}

pin_project_lite::pin_project! {
    /// [`stall_limited`]'s future: a type of its own rather than an async fn, which
    /// would hold the future it runs twice (as given, and pinned) in every request's
    /// future. The timer starts at the first poll, in place.
    struct StallLimited<F> {
        #[pin]
        future: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        stall: std::time::Duration,
    }
}

impl<F: Future> Future for StallLimited<F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.timer.as_mut().as_pin_mut() {
            None => this.timer.set(Some(tokio::time::sleep(*this.stall))),
            Some(mut timer) => {
                // Still reading: the frame that woke us (if any) counts as progress.
                if timer.is_elapsed() || timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(()));
                }
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + *this.stall);
            }
        }
        let _ = this.timer.as_pin_mut().expect("set above").poll(cx);
        Poll::Pending
    }
}

/// The service built by [`AuthUsageLayer`](super::AuthUsageLayer).
#[derive(Clone, Debug)]
pub struct AuthUsage<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> AuthUsage<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthUsage<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<AuthUsageBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The ready service goes with this request; a clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::new(handle(shared, inner, request))
    }
}

fn refuse<B>(err: AuthError) -> Response<AuthUsageBody<B>> {
    ApiError::from(err)
        .into_response::<Full<Bytes>>()
        .map(Either::Right)
}

// An async block, not an async fn: an async fn's future holds its arguments twice (as
// given, and as its locals), the request alone 240 bytes, and the future is copied whole
// into its box.
#[allow(clippy::manual_async_fn)]
fn handle<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqBody>,
) -> impl Future<Output = Result<Response<AuthUsageBody<ResBody>>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + From<Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    async move {
        let started = Instant::now();
        let at = now_millis();
        let key = match shared.keys.authenticate(request.headers(), at).await {
            Ok(key) => key,
            Err(err) => return Ok(refuse(err)),
        };

        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let mut tracking = Tracking::new(UsageGuard::new(
            shared.recorder.clone(),
            &key,
            method.as_str(),
            path,
            at,
            started,
        ));
        let guard = &mut tracking.guard;

        let counting = if guard.counts_tokens() {
            ForCounting::Keep
        } else {
            ForCounting::Skip
        };
        let (mut request, mut plan) =
            match read_request(request, shared.max_body_bytes, counting).await {
                Ok(read) => read,
                Err(err) => {
                    let refusal = ApiError::from(err);
                    guard.set_status(refusal.status.as_u16());
                    guard.set_no_tokens();
                    return Ok(refusal.into_response::<Full<Bytes>>().map(Either::Right));
                }
            };

        let end_user = limit::end_user(plan.end_user.take(), request.headers());
        // Put in once its weight is known (a lookup less than setting it afterwards).
        let mut caller = Caller::from(&*key);
        // The rate windows as the admission left them, and the key's card, for the
        // `x-ratelimit-*` headers.
        let mut rate = None;
        // A key with no limits of its own, under no defaults, has nothing to check: no
        // allocation, no admission, no extension (every model, weight 1, as the `Caller`
        // already says).
        let limiter = shared
            .limiter
            .as_ref()
            .filter(|limiter| limiter.limits_anything(&key));
        if let Some(limiter) = limiter {
            let card = limiter.card(&key);
            let limits = &card.limits;
            let mut windows = None;
            let tokens = limiter.estimate(plan.body_len, plan.max_tokens);
            let admitted = match limiter.admit_now(&card, end_user.as_deref(), tokens) {
                Some(admitted) => admitted,
                // Boxed: the admission's future (a Redis call, a quota read) would otherwise
                // make this future larger, and every request's moves of it dearer.
                None => Box::pin(limiter.admit(&card, end_user.as_deref(), tokens)).await,
            };
            match admitted {
                Ok(Some(admission)) => {
                    windows = Some(admission.windows());
                    guard.set_admission(admission);
                }
                Ok(None) => {}
                Err(refusal) => {
                    guard.set_model(plan.model.take());
                    guard.set_end_user(end_user);
                    guard.set_status(429);
                    guard.set_no_tokens();
                    return Ok(limit::refused(&refusal, &card.limit_values));
                }
            }
            // The model allow-list, after the admission: a model the key may not use is
            // counted and answered exactly as the router answers a missing one (404 with
            // the same rate headers), so a key cannot tell the two apart.
            //
            // A key limited to some models must name one it may use: a request that names
            // none (or one the gateway cannot read, e.g. deep in a form) would go to the
            // default model, or let an upstream choose. Reads (`GET /v1/models`) name none
            // and are filtered by the router instead.
            let unnamed_write = plan.model.is_none()
                && limits.models.as_ref().is_some_and(|m| !m.is_empty())
                && !matches!(
                    method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
                );
            if let Some(model) = plan.model.as_deref().or(unnamed_write.then_some("")) {
                if unnamed_write || !limits.allows_model(model) {
                    let mut response = limit::model_not_found(model);
                    if let Some((requests, tokens)) = windows {
                        limit::rate_headers(
                            response.headers_mut(),
                            requests,
                            tokens,
                            &card.limit_values,
                        );
                    }
                    guard.set_model(plan.model.take());
                    guard.set_end_user(end_user);
                    guard.set_status(response.status().as_u16());
                    guard.set_no_tokens();
                    return Ok(response);
                }
            }
            caller.weight = limits.weight();
            request.extensions_mut().insert(Effective(limits.clone()));
            rate = windows.map(|(requests, tokens)| (requests, tokens, card));
        }
        request.extensions_mut().insert(caller);
        guard.set_end_user(end_user);

        // The model asked for is known now, even if the client leaves before the answer.
        if let Some(model) = plan.model.take() {
            request
                .extensions_mut()
                .insert(RequestedModel(model.clone()));
            guard.set_model(Some(model));
        }
        let response = inner.oneshot(request).await?;
        if let Some(served) = response.extensions().get::<ServedModel>() {
            guard.replace_model(&served.0);
        }
        let status = response.status();
        guard.responded(status.as_u16());
        if !status.is_success() || matches!(method, Method::GET | Method::HEAD | Method::DELETE) {
            // Nothing was generated; a usage object in the body still overrides this.
            guard.set_no_tokens();
        }
        let (mut parts, body) = response.into_parts();
        if let Some((requests, tokens, card)) = rate {
            limit::rate_headers(&mut parts.headers, requests, tokens, &card.limit_values);
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let body = UsageBody::tracked(body, tracking, content_type, plan);
        if body.edits() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

/// Reads a request body (within the limit) to learn its model and streaming options,
/// and rebuilds the request, asking the upstream for stream usage where needed.
// An async block, not an async fn, as `handle`: this future is part of that one.
#[allow(clippy::manual_async_fn)]
fn read_request<B>(
    request: Request<B>,
    limit: usize,
    counting: ForCounting,
) -> impl Future<Output = Result<(Request<B>, RequestPlan), AuthError>>
where
    B: Body<Data = Bytes> + From<Bytes>,
    B::Error: Into<BoxError>,
{
    async move {
        if matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        ) {
            return Ok((request, RequestPlan::default()));
        }
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(AuthError::BodyTooLarge { limit });
        }
        let (mut parts, body) = request.into_parts();
        // A client that stops sending its body would hold its connection (and a slot of
        // the server's) for ever: each frame must come within BODY_STALL_TIMEOUT.
        let collect = Limited::new(body, limit).collect();
        let bytes = match stall_limited(collect, BODY_STALL_TIMEOUT).await {
            Err(()) => return Err(AuthError::BodyStalled(BODY_STALL_TIMEOUT)),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err)) if err.is::<LengthLimitError>() => {
                return Err(AuthError::BodyTooLarge { limit })
            }
            Ok(Err(err)) => return Err(AuthError::BodyRead(err)),
        };
        let original_len = bytes.len();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (bytes, mut plan) = inspect_request(parts.uri.path(), content_type, bytes, counting);
        plan.body_len = original_len;
        // A length that was declared and still holds stays as it is.
        if bytes.len() != original_len || declared != Some(original_len as u64) {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        Ok((Request::from_parts(parts, B::from(bytes)), plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // On a paused clock: on the real one, a test thread held up for 100 ms would see the
    // next frame and the stall timer due at once, and the timer might be polled first.
    #[tokio::test(start_paused = true)]
    async fn a_body_read_fails_only_when_it_stops_making_progress() {
        let stall = Duration::from_millis(200);
        // Frames every 100 ms for a second: slow, but never stalled.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u8>(1);
        tokio::spawn(async move {
            for i in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(i).await.unwrap();
            }
        });
        let steady = async move {
            let mut got = 0;
            while rx.recv().await.is_some() {
                got += 1;
            }
            got
        };
        assert_eq!(stall_limited(steady, stall).await, Ok(10));
        // A read that stops: fails after about `stall`.
        let started = tokio::time::Instant::now();
        assert_eq!(
            stall_limited(std::future::pending::<()>(), stall).await,
            Err(())
        );
        let took = started.elapsed();
        assert!(
            took >= stall && took <= stall + Duration::from_millis(1),
            "{took:?}"
        );
    }
}

#[cfg(test)]
mod model_tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tower::{service_fn, Layer, ServiceExt};

    use crate::auth::{KeyCache, KeyRecord, Role, Secret};
    use crate::auth_usage::{AuthUsageLayer, RequestedModel, ServedModel};
    use crate::storage::{KeyStore, MemoryStore, UsageStore};
    use crate::usage::UsageRecorder;

    /// The service inside sees the model the body names; usage goes under the name it
    /// says served the request (an alias resolved), else under the name asked for (not
    /// the one the answer's body gives), also when the client leaves before the answer.
    #[tokio::test]
    async fn the_named_model_reaches_the_service_inside_and_usage_goes_under_the_served_name() {
        let store = Arc::new(MemoryStore::new());
        let secret = Secret::generate();
        let key = KeyRecord::new("alice", Role::User, &secret);
        store.insert_key(&key, &secret.hash()).await.unwrap();
        let (recorder, writer) = UsageRecorder::start(store.clone());
        let layer = AuthUsageLayer::new(KeyCache::new(store.clone()), recorder.clone());
        let model = service_fn(|request: Request<Full<Bytes>>| async move {
            let asked = request.extensions().get::<RequestedModel>().cloned();
            let Some(RequestedModel(name)) = asked else {
                return Ok::<_, Infallible>(
                    Response::builder()
                        .status(500)
                        .body(Full::default())
                        .unwrap(),
                );
            };
            if &*name == "hang" {
                std::future::pending::<()>().await;
            }
            let body =
                r#"{"model":"from-the-body","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
            let mut response = Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            if &*name == "short" {
                response
                    .extensions_mut()
                    .insert(ServedModel(Arc::from("the-full-name")));
            }
            Ok(response)
        });
        let service = layer.layer(model);
        let send = |model: &str| {
            let request = Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {}", secret.expose()))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(r#"{{"model":"{model}"}}"#))))
                .unwrap();
            service.clone().oneshot(request)
        };
        for model in ["short", "exact"] {
            let response = send(model).await.unwrap();
            assert_eq!(response.status(), 200, "{model}");
            response.into_body().collect().await.unwrap();
        }
        // The client leaves while the model server has not answered.
        let left = tokio::time::timeout(std::time::Duration::from_millis(100), send("hang")).await;
        assert!(left.is_err());

        recorder.flush().await;
        let rows = store.requests(&key.id, None, 10).await.unwrap();
        let mut recorded: Vec<_> = rows
            .iter()
            .map(|r| (r.model.as_deref(), r.status))
            .collect();
        recorded.sort();
        assert_eq!(
            recorded,
            [
                (Some("exact"), 200),
                (Some("hang"), 499),
                (Some("the-full-name"), 200)
            ]
        );
        writer.shutdown().await;
    }
}
