//! The whole HTTP application as one `Router`, so tests can drive it without a socket.

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use llmgate_core::auth::{AuthUsageLayer, KeyCache, Role};
use llmgate_core::proxy::Proxy;
use llmgate_core::storage::UsageStore;
use llmgate_core::system::SystemMonitor;
use llmgate_core::usage::UsageRecorder;
use tower::ServiceBuilder;

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
    ) -> Result<Self, String> {
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
pub fn app(state: AppState, proxy: Proxy, max_body_bytes: usize) -> Router {
    let keys = state.keys.clone();
    let gateway = ServiceBuilder::new()
        .layer(
            AuthUsageLayer::new(keys.clone(), state.recorder.clone())
                .max_body_bytes(max_body_bytes),
        )
        .service(proxy);
    let admin = Router::new()
        .route("/usage", get(routes::usage::all))
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
        .layer(AuthUsageLayer::auth_only(keys.clone()).require_role(Role::Admin));
    let metrics = Router::new().route("/metrics", get(routes::metrics::render));
    let metrics = if state.metrics_public {
        metrics
    } else {
        metrics.layer(AuthUsageLayer::auth_only(keys.clone()).require_role(Role::Admin))
    };
    let me = Router::new()
        .route("/v1/me/usage", get(routes::usage::me))
        .layer(AuthUsageLayer::auth_only(keys));
    Router::new()
        .route("/healthz", get(routes::health::healthz))
        .nest("/admin", admin)
        .merge(me)
        .merge(metrics)
        .merge(console::router())
        .route_service("/v1/{*path}", gateway)
        .fallback(routes::not_found)
        .with_state(state)
}
