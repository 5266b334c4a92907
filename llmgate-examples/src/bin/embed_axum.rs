//! Embedding llmgate's `AuthUsageLayer` in your own axum service.
//!
//! The layer authenticates every request under `/v1` (Bearer, `api-key` or `x-api-key`),
//! hands your handler the caller's identity, and counts the tokens your handler reports
//! in its OpenAI-style `usage` object — here with the in-memory store.
//!
//! ```text
//! cargo run -p llmgate-examples --bin embed_axum
//! curl -s localhost:3000/v1/chat/completions -H "Authorization: Bearer <printed key>" -d '{"model":"echo"}'
//! curl -s localhost:3000/usage
//! ```

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use llmgate_core::auth::{Caller, KeyCache, KeyRecord, Role, Secret};
use llmgate_core::storage::{KeyStore, MemoryStore};
use llmgate_core::usage::{usage_report, KeyUsage, UsageRecorder};
use llmgate_core::AuthUsageLayer;
use serde_json::{json, Value};

/// Your model endpoint: whatever it answers, the `usage` object is what gets counted.
async fn chat(Extension(caller): Extension<Caller>, Json(request): Json<Value>) -> Json<Value> {
    let prompt = request.to_string();
    let reply = format!("Hello, {}!", caller.name);
    Json(json!({
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt.split_whitespace().count(),
            "completion_tokens": reply.split_whitespace().count(),
            "total_tokens": prompt.split_whitespace().count() + reply.split_whitespace().count(),
        }
    }))
}

#[derive(Clone)]
struct AppState {
    store: Arc<MemoryStore>,
    recorder: UsageRecorder,
}

/// Everyone's usage (a real service would protect this with an admin key:
/// `.layer(RequireKeyLayer::admin(keys))`).
async fn usage(State(state): State<AppState>) -> Json<Vec<KeyUsage>> {
    state.recorder.flush().await;
    Json(
        usage_report(state.store.as_ref(), state.store.as_ref())
            .await
            .unwrap_or_default(),
    )
}

/// The router: metered `/v1` routes behind the layer, the rest outside it.
fn app(store: Arc<MemoryStore>, recorder: UsageRecorder) -> Router {
    let metered = Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(AuthUsageLayer::new(
            KeyCache::new(store.clone()),
            recorder.clone(),
        ));
    Router::new()
        .merge(metered)
        .route("/usage", get(usage))
        .with_state(AppState { store, recorder })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let store = Arc::new(MemoryStore::new());
    let secret = Secret::generate();
    store
        .insert_key(&KeyRecord::new("demo", Role::User, &secret), &secret.hash())
        .await?;
    println!("demo key: {}", secret.expose());

    let (recorder, writer) = UsageRecorder::start(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(store, recorder))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    writer.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_embedded_layer_authenticates_and_counts() {
        let store = Arc::new(MemoryStore::new());
        let secret = Secret::generate();
        store
            .insert_key(&KeyRecord::new("demo", Role::User, &secret), &secret.hash())
            .await
            .unwrap();
        let (recorder, _writer) = UsageRecorder::start(store.clone());
        let app = app(store, recorder);

        let request = |key: Option<&str>| {
            let mut builder = axum::http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json");
            if let Some(key) = key {
                builder = builder.header("x-api-key", key);
            }
            builder
                .body(axum::body::Body::from(r#"{"model":"echo"}"#))
                .unwrap()
        };
        let refused = app.clone().oneshot(request(None)).await.unwrap();
        assert_eq!(refused.status(), 401);
        let answered = app
            .clone()
            .oneshot(request(Some(secret.expose())))
            .await
            .unwrap();
        assert_eq!(answered.status(), 200);
        let body = axum::body::to_bytes(answered.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello, demo!");

        let report = app
            .oneshot(
                axum::http::Request::get("/usage")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let report: Value = serde_json::from_slice(
            &axum::body::to_bytes(report.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(report[0]["requests"], 1);
        assert_eq!(report[0]["total_tokens"], body["usage"]["total_tokens"]);
    }
}
