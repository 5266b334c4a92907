//! The whole HTTP application as one service, so tests can drive it without a socket.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::header::{HeaderName, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http_body_util::Full;
use llmgate_core::auth::{Caller, KeyCache, RequireKeyLayer};
use llmgate_core::auth_usage::{AuthUsage, AuthUsageBody, AuthUsageLayer, ResponseFuture};
use llmgate_core::error::ApiError;
use llmgate_core::storage::UsageStore;
use llmgate_core::system::SystemMonitor;
use llmgate_core::usage::UsageRecorder;
use llmgate_core::BoxError;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::body::UnsyncBoxBody;
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer, ResponseForPanic};
use tower_http::classify::ServerErrorsAsFailures;
use tower_http::classify::{NeverClassifyEos, ServerErrorsFailureClass, SharedClassifier};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};
use tower_http::trace::{MakeSpan, OnRequest, OnResponse, Trace, TraceLayer};
use tracing::Span;

use crate::console;
use crate::metrics::Metrics;
use crate::models::{ModelRouter, Registry, RoutedBody};
use crate::routes;
use llmgate_core::limits::{KeyLimits, Limiter, Refused};

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Keys, through the cache the gateway authenticates with.
    pub keys: KeyCache,
    /// Usage totals and rows.
    pub usage: Arc<dyn UsageStore>,
    /// The queue of usage records (flushed before usage is read).
    pub recorder: UsageRecorder,
    /// CPU, memory and GPU.
    pub system: Arc<SystemMonitor>,
    /// The models behind the gateway.
    pub models: Arc<Registry>,
    /// Prometheus metrics (also the usage recorder's observer).
    pub metrics: Arc<Metrics>,
    /// Serve `/metrics` without a key (default: admin key needed).
    pub metrics_public: bool,
    /// What each key may use, and what it has left (the model calls' and `/v1/me`'s).
    pub limiter: Limiter,
}

impl AppState {
    /// The handlers' state, with a [`SystemMonitor`] of its own, `/metrics` behind the
    /// admin key (set [`metrics_public`](Self::metrics_public) to open it) and a
    /// [`Limiter`] counting in this process with no defaults (set
    /// [`limiter`](Self::limiter) for others); fails only when the system monitor cannot
    /// start.
    pub fn new(
        keys: KeyCache,
        usage: Arc<dyn UsageStore>,
        recorder: UsageRecorder,
        metrics: Arc<Metrics>,
        models: Arc<Registry>,
    ) -> Result<Self, llmgate_core::system::SystemError> {
        Ok(Self {
            keys,
            limiter: Limiter::local(KeyLimits::default(), usage.clone()),
            usage,
            recorder,
            system: Arc::new(SystemMonitor::new()?),
            models,
            metrics,
            metrics_public: false,
        })
    }
}

/// The gateway: `/v1/*` proxied with auth and usage, the admin API, `/healthz`, and the
/// web console at `/` (public: the page holds no data, its API calls carry the key).
/// Every request has a panic answered with a 500; every request the access log
/// ([`ACCESS_LOG`]) shows has its line there and its key headers marked sensitive. Model
/// calls, shown only at DEBUG, skip those two layers when the log level is lower.
pub fn app(state: AppState, max_body_bytes: usize) -> App {
    let keys = state.keys.clone();
    state.metrics.set_limiter(state.limiter.clone());
    let refusals_in = state.metrics.clone();
    let metered = AuthUsageLayer::new(keys.clone(), state.recorder.clone())
        .max_body_bytes(max_body_bytes)
        .limiter(state.limiter.clone());
    let router_of_models = ModelRouter::new(state.models.clone());
    let gateway = metered.layer(NoteCaller(router_of_models.clone()));
    let admin = Router::new()
        .route("/usage", get(routes::usage::all))
        .route("/usage/rejected", get(routes::usage::rejected))
        .route("/usage/{key_id}", get(routes::usage::one))
        .route("/usage/{key_id}/requests", get(routes::usage::requests))
        .route("/keys", get(routes::keys::list).post(routes::keys::create))
        .route("/system", get(routes::system::report))
        .route(
            "/models",
            get(routes::models::list).post(routes::models::add),
        )
        .route(
            "/models/{name}",
            get(routes::models::one)
                .patch(routes::models::change)
                .delete(routes::models::remove),
        )
        .route(
            "/models/{name}/load",
            axum::routing::post(routes::models::load),
        )
        .route(
            "/models/{name}/unload",
            axum::routing::post(routes::models::unload),
        )
        .route(
            "/keys/{key_id}",
            axum::routing::delete(routes::keys::revoke).patch(routes::keys::update),
        )
        .route(
            "/keys/{key_id}/rotate",
            axum::routing::post(routes::keys::rotate),
        )
        .layer(NoteCallerLayer)
        .layer(axum::middleware::from_fn(routes::answer_within))
        .layer(RequireKeyLayer::admin(keys.clone()));
    let metrics = Router::new()
        .route("/metrics", get(routes::metrics::render))
        .layer(NoteCallerLayer);
    let metrics = if state.metrics_public {
        metrics
    } else {
        metrics.layer(RequireKeyLayer::admin(keys.clone()))
    };
    let me = Router::new()
        .route(ME, get(routes::keys::me))
        .route(ME_USAGE, get(routes::usage::me))
        .layer(NoteCallerLayer)
        .layer(axum::middleware::from_fn(routes::answer_within))
        .layer(RequireKeyLayer::new(keys));
    let router = Router::new()
        .route("/healthz", get(routes::health::healthz))
        .nest("/admin", admin)
        .merge(me)
        .merge(metrics)
        .merge(console::router())
        .fallback(routes::not_found)
        .with_state(state);
    let dispatch = Dispatch { gateway, router };
    // Model calls are in the access log only at DEBUG: below that, they skip its layers
    // (about 2 000 instructions a request, a few per cent of a proxied one).
    let traced_model_calls = tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG);
    // Nor do they need the caller noted: without the access log's layers there is no
    // span to note it in.
    App {
        fast: (!traced_model_calls)
            .then(|| CatchPanicLayer::custom(AnswerPanic).layer(metered.layer(router_of_models))),
        inner: served(dispatch),
        metrics: refusals_in,
    }
}

/// The `/v1/` paths llmgate answers itself: the caller's key and its limits, and its
/// usage.
const ME: &str = "/v1/me";
const ME_USAGE: &str = "/v1/me/usage";

/// The access log's target. At INFO (the default level) it has a line for each request
/// but model calls: those are at DEBUG, as a line costs a third more instructions than
/// the rest of a proxied request, and each model call is in the usage records anyway.
/// `LLMGATE_LOG=info,llmgate::access=debug` logs model calls too, `=trace` adds each
/// request's headers (the key headers redacted), `=warn` turns the access log off.
pub const ACCESS_LOG: &str = "llmgate::access";

/// The headers that carry a key or a session. Marked sensitive, their values show as
/// `Sensitive` in any log that prints a request's headers (and HTTP/2 never indexes
/// them in its header compression).
fn secret_headers() -> [HeaderName; 5] {
    [
        AUTHORIZATION,
        HeaderName::from_static("api-key"),
        HeaderName::from_static("x-api-key"),
        PROXY_AUTHORIZATION,
        COOKIE,
    ]
}

/// `service` with what every request goes through, outermost first: the key headers
/// marked sensitive, the access log (its span holds the request; the line is written
/// when the answer's head is ready), and a panic caught and answered with a 500 in the
/// OpenAI error shape, so the connection and the server live on.
fn served<S>(service: S) -> Served<S> {
    ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(secret_headers()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(AccessSpan)
                .on_request(LogHeaders)
                .on_response(AccessLog)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        .layer(CatchPanicLayer::custom(AnswerPanic))
        .service(service)
}

/// What [`served`] builds.
type Served<S> = SetSensitiveRequestHeaders<
    Trace<
        CatchPanic<S, AnswerPanic>,
        SharedClassifier<ServerErrorsAsFailures>,
        AccessSpan,
        LogHeaders,
        AccessLog,
        (),
        (),
        (),
    >,
>;

/// The body of every answer the [`App`] gives: through the access log's layers, or a
/// model call's past them.
pub type AppBody = http_body_util::Either<TracedBody, UnsyncBoxBody<Bytes, BoxError>>;

/// An answer's body through [`served`].
type TracedBody = tower_http::trace::ResponseBody<
    UnsyncBoxBody<Bytes, BoxError>,
    NeverClassifyEos<ServerErrorsFailureClass>,
    (),
    (),
    (),
>;

/// A request's access log span on [`ACCESS_LOG`] (INFO, DEBUG for a model call):
/// method, path (no query), and the caller's key id once the key is checked (see
/// [`NoteCaller`]).
#[derive(Clone, Copy, Debug)]
struct AccessSpan;

impl<B> MakeSpan<B> for AccessSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        let path = request.uri().path();
        if Dispatch::is_model_call(path) {
            tracing::debug_span!(
                target: ACCESS_LOG,
                "request",
                method = %request.method(),
                path,
                key_id = tracing::field::Empty,
            )
        } else {
            tracing::info_span!(
                target: ACCESS_LOG,
                "request",
                method = %request.method(),
                path,
                key_id = tracing::field::Empty,
            )
        }
    }
}

/// At TRACE, a request's headers (the key headers already marked sensitive).
#[derive(Clone, Copy, Debug)]
struct LogHeaders;

impl<B> OnRequest<B> for LogHeaders {
    fn on_request(&mut self, request: &http::Request<B>, _span: &Span) {
        tracing::trace!(target: ACCESS_LOG, headers = ?request.headers(), "request");
    }
}

/// The access log line: status and the time to the answer's head (a stream's tokens
/// come after), in the request's span and at its level.
#[derive(Clone, Copy, Debug)]
struct AccessLog;

impl<B> OnResponse<B> for AccessLog {
    fn on_response(self, response: &http::Response<B>, latency: Duration, span: &Span) {
        let status = response.status().as_u16();
        if span.metadata().map(|span| *span.level()) == Some(tracing::Level::INFO) {
            tracing::info!(target: ACCESS_LOG, status, ?latency, "answered");
        } else {
            tracing::debug!(target: ACCESS_LOG, status, ?latency, "answered");
        }
    }
}

/// A panic's answer: logged, and a 500 the OpenAI SDKs understand.
#[derive(Clone, Copy, Debug)]
struct AnswerPanic;

impl ResponseForPanic for AnswerPanic {
    type ResponseBody = Full<Bytes>;

    fn response_for_panic(
        &mut self,
        panic: Box<dyn Any + Send + 'static>,
    ) -> http::Response<Full<Bytes>> {
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(
            panic = message,
            "a request's handler panicked; answered 500"
        );
        ApiError::internal().into_response()
    }
}

/// Records the authenticated caller's key id in the access log's span. It sits inside
/// the auth layer, the only place the [`Caller`] is known, and is polled within the
/// span (nothing between it and the trace layer spawns).
#[derive(Clone, Debug)]
struct NoteCaller<S>(S);

impl<S, B> Service<http::Request<B>> for NoteCaller<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        if let Some(caller) = request.extensions().get::<Caller>() {
            Span::current().record("key_id", caller.key_id.as_str());
        }
        self.0.call(request)
    }
}

/// [`NoteCaller`] for the router's authenticated routes.
#[derive(Clone, Copy, Debug)]
struct NoteCallerLayer;

impl<S> Layer<S> for NoteCallerLayer {
    type Service = NoteCaller<S>;

    fn layer(&self, inner: S) -> NoteCaller<S> {
        NoteCaller(inner)
    }
}

/// The whole gateway as one service (see [`app`]).
#[derive(Clone, Debug)]
pub struct App {
    inner: Served<Dispatch>,
    /// Model calls past the access log's layers, when it would not show them.
    fast: Option<CatchPanic<FastGateway, AnswerPanic>>,
    /// Where model calls the limiter refused are counted.
    metrics: Arc<Metrics>,
}

pin_project_lite::pin_project! {
    /// The [`App`]'s answer on its way. The access log's future is boxed: unboxed, it
    /// would make every model call's future (a few dozen bytes) as large as its own
    /// (hundreds), and each move of it on the way to the connection that much dearer.
    pub struct AppFuture {
        #[pin]
        inner: Either<
            Pin<Box<<Served<Dispatch> as Service<Request>>::Future>>,
            <CatchPanic<FastGateway, AnswerPanic> as Service<Request>>::Future,
        >,
        // For a model call: counts it in `llmgate_rate_limited_total` if the limiter
        // refused it. Here rather than in a layer of its own around the metered proxy:
        // a look at each answer's status is all it needs, and a layer's future would
        // add its own poll and move of the answer to every model call.
        refusals: Option<Arc<Metrics>>,
    }
}

impl Future for AppFuture {
    type Output = Result<http::Response<AppBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(answer) = std::task::ready!(match this.inner.as_pin_mut() {
            Either::Left(traced) => traced
                .poll(cx)
                .map_ok(|answer| answer.map(http_body_util::Either::Left)),
            Either::Right(fast) => fast
                .poll(cx)
                .map_ok(|answer| answer.map(http_body_util::Either::Right)),
        });
        if answer.status() == http::StatusCode::TOO_MANY_REQUESTS {
            if let (Some(Refused(reason)), Some(metrics)) =
                (answer.extensions().get::<Refused>(), this.refusals.take())
            {
                metrics.rate_limited(reason);
            }
        }
        Poll::Ready(Ok(answer))
    }
}

impl std::fmt::Debug for AppFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppFuture").finish_non_exhaustive()
    }
}

impl Service<Request> for App {
    type Response = http::Response<AppBody>;
    type Error = Infallible;
    type Future = AppFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (the proxy's pool waits inside the call).
        if let Some(fast) = &mut self.fast {
            std::task::ready!(Service::<Request>::poll_ready(fast, cx))?;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let model_call = Dispatch::is_model_call(request.uri().path());
        let inner = match &mut self.fast {
            Some(fast) if model_call => Either::Right(fast.call(request)),
            _ => Either::Left(Box::pin(self.inner.call(request))),
        };
        AppFuture {
            inner,
            refusals: model_call.then(|| self.metrics.clone()),
        }
    }
}

/// Model calls (`/v1/...`) go straight to the metered proxy, the hot path, without a
/// router in front; everything else to the router.
#[derive(Clone, Debug)]
struct Dispatch {
    gateway: Gateway,
    router: Router,
}

impl Dispatch {
    fn is_model_call(path: &str) -> bool {
        path.len() > "/v1/".len() && path.starts_with("/v1/") && path != ME && path != ME_USAGE
    }
}

/// The metered proxy, sending each call to the model it names.
type Gateway = AuthUsage<NoteCaller<ModelRouter>>;

/// The metered proxy of model calls that skip the access log's layers.
type FastGateway = AuthUsage<ModelRouter>;

/// An answer's body: the metered proxy's, or the router's (no box for either: the
/// panic layer boxes it once).
type DispatchBody = http_body_util::Either<AuthUsageBody<RoutedBody>, Body>;
type GatewayResponse = http::Response<AuthUsageBody<RoutedBody>>;
type DispatchResult = Result<http::Response<DispatchBody>, Infallible>;
type GatewayFuture = futures_util::future::Map<
    ResponseFuture<RoutedBody, Infallible>,
    fn(Result<GatewayResponse, Infallible>) -> DispatchResult,
>;
type RouterFuture = futures_util::future::Map<
    RouteFuture<Infallible>,
    fn(Result<Response, Infallible>) -> DispatchResult,
>;

impl Service<Request> for Dispatch {
    type Response = http::Response<DispatchBody>;
    type Error = Infallible;
    type Future = Either<GatewayFuture, RouterFuture>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (the proxy's pool waits inside the call).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if Self::is_model_call(request.uri().path()) {
            let left: fn(Result<GatewayResponse, Infallible>) -> DispatchResult =
                |response| response.map(|response| response.map(http_body_util::Either::Left));
            Either::Left(self.gateway.call(request).map(left))
        } else {
            let right: fn(Result<Response, Infallible>) -> DispatchResult =
                |response| response.map(|response| response.map(http_body_util::Either::Right));
            Either::Right(self.router.call(request).map(right))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// Answers "fine", or panics on `/panic` (in its future) and `/panic-at-call` (in
    /// `call` itself); says whether the key header reached it marked sensitive.
    #[derive(Clone)]
    struct Fragile;

    impl Service<Request> for Fragile {
        type Response = Response;
        type Error = Infallible;
        type Future = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request) -> Self::Future {
            let path = request.uri().path().to_owned();
            assert_ne!(path, "/panic-at-call", "a bug in call");
            let sensitive = request
                .headers()
                .get(AUTHORIZATION)
                .is_some_and(|v| v.is_sensitive());
            Box::pin(async move {
                assert_ne!(path, "/panic", "a bug in a handler");
                Ok(Response::new(Body::from(format!(
                    "fine, sensitive: {sensitive}"
                ))))
            })
        }
    }

    async fn send(service: &mut Served<Fragile>, path: &str) -> (u16, String) {
        let request = Request::get(path)
            .header(AUTHORIZATION, "Bearer sk-lg-secret")
            .body(Body::empty())
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_panic_is_answered_with_an_openai_500_and_the_service_goes_on() {
        let mut service = served(Fragile);
        for path in ["/panic", "/panic-at-call"] {
            let (status, body) = send(&mut service, path).await;
            assert_eq!(status, 500, "{path}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["type"], "server_error", "{body}");
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("internal error"));
            let error = body["error"].as_object().unwrap();
            assert!(["param", "code"].iter().all(|k| error.contains_key(*k)));
            // Nothing of the panic reaches the client.
            assert!(!body.to_string().contains("bug"), "{body}");
            // The same service answers the next request.
            assert_eq!(
                send(&mut service, "/").await,
                (200, "fine, sensitive: true".to_owned())
            );
        }
    }

    #[test]
    fn only_model_calls_skip_the_router() {
        assert!(Dispatch::is_model_call("/v1/chat/completions"));
        assert!(!Dispatch::is_model_call(ME_USAGE));
        assert!(!Dispatch::is_model_call(ME));
        assert!(!Dispatch::is_model_call("/v1/"));
        assert!(!Dispatch::is_model_call("/admin/keys"));
    }
}
