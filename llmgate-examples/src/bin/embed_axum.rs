//! Embedding llmgate's `AuthUsageLayer` in your own axum service.
//!
//! The layer authenticates every request under `/v1` (Bearer, `api-key` or `x-api-key`),
//! hands your handler the caller's identity, and counts the tokens your handler reports
//! in its OpenAI-style `usage` object — here with the in-memory store. `GET /usage` is
//! not metered but needs an admin key (`RequireKeyLayer::admin`): a user key gets 403.
//!
//! ```text
//! cargo run -p llmgate-examples --bin embed_axum                 # 127.0.0.1:3000
//! cargo run -p llmgate-examples --bin embed_axum -- 127.0.0.1:0  # any free port
//! curl -s localhost:3000/v1/chat/completions -H "Authorization: Bearer <printed demo key>" -d '{"model":"echo"}'
//! curl -s localhost:3000/usage -H "Authorization: Bearer <printed admin key>"
//! ```

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use llmgate_core::auth::{Caller, KeyCache, KeyRecord, RequireKeyLayer, Role, Secret};
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

/// Everyone's usage: behind an admin key, see [`app`].
async fn usage(State(state): State<AppState>) -> Json<Vec<KeyUsage>> {
    state.recorder.flush().await;
    Json(
        usage_report(state.store.as_ref(), state.store.as_ref())
            .await
            .unwrap_or_default(),
    )
}

/// The router: metered `/v1` routes behind the layer; `/usage` outside it, behind an
/// admin key and not metered.
fn app(store: Arc<MemoryStore>, recorder: UsageRecorder) -> Router {
    let keys = KeyCache::new(store.clone());
    let metered = Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(AuthUsageLayer::new(keys.clone(), recorder.clone()));
    let admin = Router::new()
        .route("/usage", get(usage))
        .layer(RequireKeyLayer::admin(keys));
    Router::new()
        .merge(metered)
        .merge(admin)
        .with_state(AppState { store, recorder })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs go to stderr: stdout carries the keys and the address.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let store = Arc::new(MemoryStore::new());
    for (name, role) in [("demo", Role::User), ("admin", Role::Admin)] {
        let secret = Secret::generate();
        store
            .insert_key(&KeyRecord::new(name, role, &secret), &secret.hash())
            .await?;
        println!("{name} key: {}", secret.expose());
    }

    let (recorder, writer) = UsageRecorder::start(store.clone());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
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
        let admin = Secret::generate();
        store
            .insert_key(&KeyRecord::new("admin", Role::Admin, &admin), &admin.hash())
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

        let usage = |key: &str| {
            axum::http::Request::get("/usage")
                .header("x-api-key", key)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let forbidden = app.clone().oneshot(usage(secret.expose())).await.unwrap();
        assert_eq!(forbidden.status(), 403);
        let report = app.oneshot(usage(admin.expose())).await.unwrap();
        assert_eq!(report.status(), 200);
        let report: Value = serde_json::from_slice(
            &axum::body::to_bytes(report.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
        .unwrap();
        let demo = report
            .as_array()
            .unwrap()
            .iter()
            .find(|key| key["name"] == "demo")
            .unwrap();
        assert_eq!(demo["requests"], 1);
        assert_eq!(demo["total_tokens"], body["usage"]["total_tokens"]);
    }
}
