//! Embedding llmgate's `AuthUsageLayer` in a plain hyper 1 server, stacked with
//! `tower::ServiceBuilder`: no web framework.
//!
//! Requests to `/v1/…` go through the layer (a key is required, usage is counted);
//! `GET /usage` answers everyone's usage (a real service would put it behind an admin
//! key).
//!
//! ```text
//! cargo run -p llmgate-examples --bin embed_hyper                 # 127.0.0.1:3000
//! cargo run -p llmgate-examples --bin embed_hyper -- 127.0.0.1:0  # any free port
//! curl -s localhost:3000/v1/chat/completions -H "Authorization: Bearer <printed key>" -d '{"model":"echo"}'
//! curl -s localhost:3000/usage
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use llmgate_core::auth::{Caller, KeyCache, KeyRecord, Role, Secret};
use llmgate_core::auth_usage::DEFAULT_MAX_BODY_BYTES;
use llmgate_core::storage::{KeyStore, MemoryStore};
use llmgate_core::usage::{usage_report, UsageRecorder};
use llmgate_core::AuthUsageLayer;
use serde_json::{json, Value};
use tower::{Service, ServiceBuilder, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Answer = Response<BoxBody<Bytes, BoxError>>;

/// Your model endpoint: whatever it answers, the `usage` object is what gets counted.
async fn chat(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let caller = request
        .extensions()
        .get::<Caller>()
        .expect("the layer puts the caller in")
        .clone();
    let body = request.into_body().collect().await?.to_bytes();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = format!("Hello, {}!", caller.name);
    let prompt_tokens = request.to_string().split_whitespace().count();
    let completion_tokens = reply.split_whitespace().count();
    let answer = json!({
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    });
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .expect("a valid response"))
}

/// The whole service: `/usage` outside the layer, everything else through it.
fn app(
    store: Arc<MemoryStore>,
    recorder: UsageRecorder,
) -> impl Service<Request<Incoming>, Response = Answer, Error = BoxError, Future: Send>
       + Clone
       + Send
       + 'static {
    let metered = ServiceBuilder::new()
        .layer(AuthUsageLayer::new(
            KeyCache::new(store.clone()),
            recorder.clone(),
        ))
        .service_fn(chat);
    tower::service_fn(move |request: Request<Incoming>| {
        let (metered, store, recorder) = (metered.clone(), store.clone(), recorder.clone());
        async move {
            if request.uri().path() == "/usage" {
                recorder.flush().await;
                let report = usage_report(store.as_ref(), store.as_ref()).await?;
                let body = Full::new(Bytes::from(serde_json::to_vec(&report)?));
                return Ok(Response::new(body.map_err(|never| match never {}).boxed()));
            }
            // The layer rebuilds the body it inspects from bytes, so it takes a body
            // that can be made from `Bytes`: hyper's streaming body is read first, up to
            // the layer's own default limit.
            let (parts, body) = request.into_parts();
            let body = match Limited::new(body, DEFAULT_MAX_BODY_BYTES).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    let mut refused =
                        Response::new(Full::default().map_err(|n| match n {}).boxed());
                    *refused.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                    return Ok(refused);
                }
            };
            let response = metered
                .oneshot(Request::from_parts(parts, Full::new(body)))
                .await?;
            Ok::<_, BoxError>(response.map(|body| body.map_err(Into::into).boxed()))
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let store = Arc::new(MemoryStore::new());
    let secret = Secret::generate();
    store
        .insert_key(&KeyRecord::new("demo", Role::User, &secret), &secret.hash())
        .await?;
    println!("demo key: {}", secret.expose());

    let (recorder, writer) = UsageRecorder::start(store.clone());
    let service = app(store, recorder);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            _ = tokio::signal::ctrl_c() => break,
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    // Writes what is still queued before the process ends.
    writer.shutdown().await;
    Ok(())
}
