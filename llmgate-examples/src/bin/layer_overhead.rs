//! What `AuthUsageLayer` costs per request, in process, without a network: the same
//! JSON chat completion answered by a trivial service, bare and behind the layer
//! (auth only, with `RequireKeyLayer`, auth with usage recording to the in-memory
//! store, and the same with a key whose `rpm` and `tpm` limits are counted in process,
//! set high enough never to refuse).
//!
//! ```text
//! cargo run --release -p llmgate-examples --bin layer_overhead
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use llmgate_core::auth::{KeyCache, KeyRecord, RequireKeyLayer, Role, Secret};
use llmgate_core::limits::{KeyLimits, Limiter};
use llmgate_core::storage::{KeyStore, MemoryStore};
use llmgate_core::usage::UsageRecorder;
use llmgate_core::AuthUsageLayer;
use tower::{Layer, Service, ServiceExt};

const ANSWER: &str = r#"{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#;
const REQUEST: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"Say something short."}]}"#;

async fn answer(_request: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    Ok(http::Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(ANSWER))
        .unwrap())
}

fn request(key: &str) -> http::Request<Body> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(Bytes::from_static(REQUEST.as_bytes())))
        .unwrap()
}

async fn measure<S>(name: &str, service: S, key: &str) -> Duration
where
    S: Service<http::Request<Body>> + Clone,
    S::Response: Into<http::Response<BoxedBody>>,
    S::Error: std::fmt::Debug,
{
    // LLMGATE_BENCH_ROUNDS: fewer rounds, for a run under callgrind.
    let rounds = std::env::var("LLMGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    measure_rounds(name, service, key, rounds).await
}

async fn measure_rounds<S>(name: &str, service: S, key: &str, rounds: u32) -> Duration
where
    S: Service<http::Request<Body>> + Clone,
    S::Response: Into<http::Response<BoxedBody>>,
    S::Error: std::fmt::Debug,
{
    // LLMGATE_BENCH_ONLY=NAME runs one variant, for counting its instructions
    // (under `valgrind --tool=callgrind`).
    if std::env::var("LLMGATE_BENCH_ONLY").is_ok_and(|only| only != name) {
        return Duration::ZERO;
    }
    let run = |n: u32| {
        let service = service.clone();
        async move {
            let started = Instant::now();
            for _ in 0..n {
                let response: http::Response<BoxedBody> =
                    service.clone().oneshot(request(key)).await.unwrap().into();
                response.into_body().collect().await.unwrap();
            }
            started.elapsed()
        }
    };
    run(rounds / 10).await; // warm-up
    let elapsed = run(rounds).await;
    let per = elapsed / rounds;
    println!("{name:<28} {:>8.2} µs per request", per.as_secs_f64() * 1e6);
    per
}

type BoxedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, llmgate_core::BoxError>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = Arc::new(MemoryStore::new());
    let secret = Secret::generate();
    store
        .insert_key(
            &KeyRecord::new("bench", Role::User, &secret),
            &secret.hash(),
        )
        .await
        .unwrap();
    let (recorder, _writer) = UsageRecorder::start(store.clone());
    let key = secret.expose();

    let bare = tower::service_fn(answer)
        .map_response(|r: http::Response<Body>| r.map(|b| b.map_err(Into::into).boxed_unsync()));
    let base = measure("bare service", bare, key).await;
    let auth = RequireKeyLayer::new(KeyCache::new(store.clone()))
        .layer(tower::service_fn(answer))
        .map_response(|r| r.map(|b| b.map_err(Into::into).boxed_unsync()));
    let auth_only = measure("auth only", auth, key).await;
    let usage = AuthUsageLayer::new(KeyCache::new(store.clone()), recorder)
        .layer(tower::service_fn(answer))
        .map_response(|r| r.map(|b| b.map_err(Into::into).boxed_unsync()));
    let full = measure("auth + usage", usage, key).await;
    let limited_secret = Secret::generate();
    let mut limited_key = KeyRecord::new("limited", Role::User, &limited_secret);
    limited_key.limits = KeyLimits {
        rpm: Some(1_000_000_000),
        tpm: Some(1_000_000_000_000),
        ..KeyLimits::default()
    };
    store
        .insert_key(&limited_key, &limited_secret.hash())
        .await
        .unwrap();
    let limiter = Limiter::local(KeyLimits::default(), store.clone());
    let limited = AuthUsageLayer::new(
        KeyCache::new(store.clone()),
        UsageRecorder::start(store.clone()).0,
    )
    .limiter(limiter)
    .layer(tower::service_fn(answer))
    .map_response(|r| r.map(|b| b.map_err(Into::into).boxed_unsync()));
    let with_limits = measure("auth + usage + rpm/tpm", limited, limited_secret.expose()).await;
    // With LLMGATE_BENCH_REDIS_URL set, the same limits counted in that Redis.
    if let Ok(url) = std::env::var("LLMGATE_BENCH_REDIS_URL") {
        let limiter = Limiter::shared(&url, KeyLimits::default(), store.clone(), 1).unwrap();
        while !limiter.is_shared() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let shared = AuthUsageLayer::new(
            KeyCache::new(store.clone()),
            UsageRecorder::start(store.clone()).0,
        )
        .limiter(limiter)
        .layer(tower::service_fn(answer))
        .map_response(|r| r.map(|b| b.map_err(Into::into).boxed_unsync()));
        let in_redis = measure_rounds(
            "auth + usage + rpm/tpm, Redis",
            shared,
            limited_secret.expose(),
            20_000,
        )
        .await;
        println!(
            "Redis adds {:.2} µs per request over in-process limits",
            (in_redis.saturating_sub(with_limits)).as_secs_f64() * 1e6
        );
    }
    let routed_service = AuthUsageLayer::new(
        KeyCache::new(store.clone()),
        UsageRecorder::start(store.clone()).0,
    )
    .layer(tower::service_fn(answer));
    let router = axum::Router::new().route_service("/v1/{*path}", routed_service);
    let routed = tower::ServiceExt::<http::Request<Body>>::map_response(
        router,
        |r: axum::response::Response| r.map(|b| b.map_err(Into::into).boxed_unsync()),
    );
    measure("axum router + auth + usage", routed, key).await;
    println!(
        "layer overhead: auth {:.2} µs, auth + usage {:.2} µs, with rpm/tpm limits {:.2} µs per request",
        (auth_only.saturating_sub(base)).as_secs_f64() * 1e6,
        (full.saturating_sub(base)).as_secs_f64() * 1e6,
        (with_limits.saturating_sub(base)).as_secs_f64() * 1e6
    );
}
