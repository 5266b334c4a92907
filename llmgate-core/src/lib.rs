//! # llmgate-core
//!
//! Per-key API authentication and exact per-key usage accounting for OpenAI-compatible
//! services, as a tower layer — plus the proxy, storage and settings the `llmgate`
//! gateway is built from.
//!
//! ## Quick start: put the layer in front of a service
//!
//! ```
//! use std::sync::Arc;
//! use llmgate_core::auth::{KeyCache, KeyRecord, Role, Secret};
//! use llmgate_core::AuthUsageLayer;
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
//!     .layer(AuthUsageLayer::new(KeyCache::new(store.clone()), recorder.clone()))
//!     .service(service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
//!         let body = r#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
//!         Ok::<_, std::convert::Infallible>(
//!             http::Response::builder()
//!                 .header("content-type", "application/json")
//!                 .body(http_body_util::Full::new(bytes::Bytes::from(body)))
//!                 .unwrap(),
//!         )
//!     }));
//!
//! let request = http::Request::post("/v1/chat/completions")
//!     .header("authorization", format!("Bearer {}", secret.expose()))
//!     .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"model":"m"}"#)))
//!     .unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
//!
//! writer.shutdown().await; // writes everything queued
//! let usage = store.totals_for_key(&key.id).await.unwrap();
//! assert_eq!((usage.requests, usage.total_tokens()), (1, 8));
//! # }
//! ```
//!
//! ## Map
//! - [`auth_usage`] — the [`AuthUsageLayer`] middleware: its service, future and the
//!   response body that reads usage as it goes by.
//! - [`auth`] — keys ([`auth::Secret`], [`auth::KeyRecord`]), the [`auth::KeyCache`],
//!   reading a key from headers, and [`auth::RequireKeyLayer`] for unmetered routes.
//! - [`usage`] — reading tokens from JSON and SSE bodies, the request inspector, the
//!   [`usage::UsageRecorder`] queue and its batch writer, usage reports.
//! - [`proxy`] — the forwarding [`proxy::Proxy`] service.
//! - [`storage`] — the [`storage::KeyStore`] and [`storage::UsageStore`] traits and their
//!   backends.
//! - [`error`] — the OpenAI-shaped [`error::ApiError`].
//! - [`config`] — [`config::GatewayConfig`].
//! - [`runner`] — the `runner::ModelRunner` trait and the runners that start a model
//!   server (feature `runner`).
//! - `hub` — downloading models from the Hugging Face Hub (feature `hub`).
//! - `system` — CPU, memory and GPU figures (feature `system`).
//!
//! ## Features
//! All on by default, as the `llmgate` server uses them; an embedder who needs only the
//! layer sets `default-features = false` and picks what it stores in:
//! - `sqlite` — `storage::SqliteStore`; `postgres` — `storage::PostgresStore`.
//!   Without either, sqlx is not compiled and [`storage::MemoryStore`] is the store.
//! - `runner` — the model runners (the `Backend` setting stays, as plain data).
//! - `hub` — Hugging Face downloads (hf-hub, reqwest).
//! - `system` — CPU and memory figures (sysinfo); `nvml` adds NVIDIA GPUs.
//! - `tls` — https upstreams for the proxy (rustls).
//! - `test-util` (off by default) — the mock upstream in `test_util` and the storage
//!   contract tests (`storage::contract`) that any backend can run.

#![deny(missing_docs)]
// The docs link items of every feature; the default build, which has them all, checks
// those links (CI: cargo doc with -D warnings).
#![cfg_attr(
    not(all(
        feature = "sqlite",
        feature = "postgres",
        feature = "runner",
        feature = "hub",
        feature = "system"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
pub mod auth_usage;
pub mod config;
pub mod error;
#[cfg(feature = "hub")]
#[cfg_attr(docsrs, doc(cfg(feature = "hub")))]
pub mod hub;
pub mod limits;
pub mod proxy;
pub mod runner;
pub mod storage;
#[cfg(feature = "system")]
#[cfg_attr(docsrs, doc(cfg(feature = "system")))]
pub mod system;
pub mod usage;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use auth_usage::AuthUsageLayer;

/// The error type of bodies and services that can fail in many ways.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
