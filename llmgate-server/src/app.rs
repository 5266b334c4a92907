//! The whole HTTP application as one service, so tests can drive it without a socket.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::Router;
use futures_util::future::Either;
use futures_util::FutureExt;
use llmgate_core::auth::{KeyCache, RequireKeyLayer};
use llmgate_core::auth_usage::{AuthUsage, AuthUsageBody, AuthUsageLayer, ResponseFuture};
use llmgate_core::proxy::{Proxy, ProxyBody};
use llmgate_core::storage::UsageStore;
use llmgate_core::system::SystemMonitor;
use llmgate_core::usage::UsageRecorder;
use tower::{Layer, Service};

use crate::console;
use crate::metrics::Metrics;
use crate::models::ModelManager;
use crate::routes;

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
    /// The model llmgate runs (or the external upstream it forwards to).
    pub models: Arc<ModelManager>,
    /// Prometheus metrics (also the usage recorder's observer).
    pub metrics: Arc<Metrics>,
    /// Serve `/metrics` without a key (default: admin key needed).
    pub metrics_public: bool,
}

impl AppState {
    /// State for a gateway that runs no model itself.
    pub fn new(
        keys: KeyCache,
        usage: Arc<dyn UsageStore>,
        recorder: UsageRecorder,
        metrics: Arc<Metrics>,
        models: Arc<ModelManager>,
    ) -> Result<Self, llmgate_core::system::SystemError> {
        Ok(Self {
            keys,
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
pub fn app(state: AppState, proxy: Proxy, max_body_bytes: usize) -> App {
    let keys = state.keys.clone();
    let gateway = AuthUsageLayer::new(keys.clone(), state.recorder.clone())
        .max_body_bytes(max_body_bytes)
        .layer(proxy);
    let admin = Router::new()
        .route("/usage", get(routes::usage::all))
        .route("/usage/rejected", get(routes::usage::rejected))
        .route("/usage/{key_id}", get(routes::usage::one))
        .route("/usage/{key_id}/requests", get(routes::usage::requests))
        .route("/keys", get(routes::keys::list).post(routes::keys::create))
        .route("/system", get(routes::system::report))
        .route("/models", get(routes::models::view))
        .route("/models/run", axum::routing::post(routes::models::run))
        .route("/models/stop", axum::routing::post(routes::models::stop))
        .route(
            "/keys/{key_id}",
            axum::routing::delete(routes::keys::revoke),
        )
        .layer(axum::middleware::from_fn(routes::answer_within))
        .layer(RequireKeyLayer::admin(keys.clone()));
    let metrics = Router::new().route("/metrics", get(routes::metrics::render));
    let metrics = if state.metrics_public {
        metrics
    } else {
        metrics.layer(RequireKeyLayer::admin(keys.clone()))
    };
    let me = Router::new()
        .route(ME_USAGE, get(routes::usage::me))
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
    App { gateway, router }
}

/// The one `/v1/` path llmgate answers itself.
const ME_USAGE: &str = "/v1/me/usage";

/// Model calls (`/v1/...`) go straight to the metered proxy, the hot path, without a
/// router in front; everything else to the router.
#[derive(Clone, Debug)]
pub struct App {
    gateway: AuthUsage<Proxy>,
    router: Router,
}

impl App {
    fn is_model_call(path: &str) -> bool {
        path.len() > "/v1/".len() && path.starts_with("/v1/") && path != ME_USAGE
    }
}

/// The gateway's answer, its body boxed into axum's.
type GatewayFuture = futures_util::future::Map<
    ResponseFuture<ProxyBody, Infallible>,
    fn(Result<GatewayResponse, Infallible>) -> Result<Response, Infallible>,
>;
type GatewayResponse = http::Response<AuthUsageBody<ProxyBody>>;

impl Service<Request> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<GatewayFuture, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (the proxy's pool waits inside the call).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if Self::is_model_call(request.uri().path()) {
            let to_axum: fn(Result<GatewayResponse, Infallible>) -> Result<Response, Infallible> =
                |response| response.map(|response| response.map(Body::new));
            Either::Left(self.gateway.call(request).map(to_axum))
        } else {
            Either::Right(self.router.call(request))
        }
    }
}
