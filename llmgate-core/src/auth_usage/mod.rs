//! The [`AuthUsageLayer`] middleware: authenticate every request by its API key and
//! record its usage (requests, tokens, endpoint, model) against that key.
//!
//! As in tower-http, the middleware is one folder: the [`AuthUsageLayer`] builds the
//! [`AuthUsage`] service, whose calls return a [`ResponseFuture`] resolving to a
//! response with an [`AuthUsageBody`]. The usage guard of a request lives in the future
//! and then in the body, so a client that leaves early is still counted.
//!
//! Dependency order, each file importing only from those before it: the key types of
//! [`auth`](crate::auth); [`storage`](crate::storage); the key cache and
//! [`usage`](crate::usage); [`error`](crate::error); [`proxy`](crate::proxy) and
//! [`RequireKeyLayer`](crate::auth::RequireKeyLayer); then this module, which only the
//! settings ([`config`](crate::config), for the default body limit) import.
//!
//! ```
//! use std::sync::Arc;
//! use llmgate_core::auth::{KeyCache, KeyRecord, Role, Secret};
//! use llmgate_core::auth_usage::AuthUsageLayer;
//! use llmgate_core::storage::{KeyStore, MemoryStore, UsageStore};
//! use llmgate_core::usage::UsageRecorder;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = Arc::new(MemoryStore::new());
//! let secret = Secret::generate();
//! let key = KeyRecord::new("alice", Role::User, &secret);
//! store.insert_key(&key, &secret.hash()).await.unwrap();
//!
//! let (recorder, writer) = UsageRecorder::start(store.clone());
//! let service = ServiceBuilder::new()
//!     .layer(AuthUsageLayer::new(KeyCache::new(store.clone()), recorder).max_body_bytes(1 << 20))
//!     .service(service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
//!         let body = r#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
//!         Ok::<_, std::convert::Infallible>(
//!             http::Response::builder()
//!                 .header("content-type", "application/json")
//!                 .body(http_body_util::Full::new(bytes::Bytes::from(body)))
//!                 .unwrap(),
//!         )
//!     }));
//!
//! // Without a key: 401, and nothing is recorded.
//! let anonymous = http::Request::post("/v1/embeddings")
//!     .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
//!     .unwrap();
//! assert_eq!(service.clone().oneshot(anonymous).await.unwrap().status(), 401);
//!
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("authorization", format!("Bearer {}", secret.expose()))
//!     .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"model":"m"}"#)))
//!     .unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
//!
//! writer.shutdown().await;
//! let usage = store.totals_for_key(&key.id).await.unwrap();
//! assert_eq!((usage.requests, usage.total_tokens()), (1, 5));
//! # }
//! ```

mod body;
mod future;
mod layer;
mod limit;
mod service;

pub use body::{AuthUsageBody, UsageBody};
pub use future::ResponseFuture;
pub use layer::{AuthUsageLayer, DEFAULT_MAX_BODY_BYTES};
pub use service::{AuthUsage, BODY_STALL_TIMEOUT};

/// The model a request names (the `model` of its JSON body, or of its multipart form),
/// as the layer read it. The layer puts it in the request's extensions, so the service
/// inside can pick a model server by it without reading the body again. Shared: the
/// request's usage record holds the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedModel(pub std::sync::Arc<str>);

/// The model that served a request, by its canonical name. The service inside the layer
/// may put it in the response's extensions (a router that resolved an alias): usage is
/// then recorded under this name instead of the one the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel(pub std::sync::Arc<str>);
