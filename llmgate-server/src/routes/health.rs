//! `GET /healthz`: no key needed.

use axum::Json;
use serde_json::{json, Value};

/// The gateway is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}
