//! The behaviour every backend must show, as tests a backend's own test suite calls.
//!
//! The memory, SQLite and PostgreSQL backends run these; a backend written in another
//! crate runs them too, with the `test-util` feature:
//!
//! ```toml
//! [dev-dependencies]
//! llmgate-core = { version = "*", features = ["test-util"] }
//! ```
//!
//! ```
//! # use llmgate_core::storage::{contract, MemoryStore};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // In a `#[tokio::test]`: each contract runs on a fresh, empty store.
//! contract::run_all(|| async { MemoryStore::new() }).await;
//! # }
//! ```
//!
//! Each function panics, like an `assert!`, where the backend breaks the contract. They
//! expect an empty store, and write keys and usage with made-up key ids.

use std::future::Future;

use chrono::DateTime;

use super::{
    KeyStore, RequestRecord, StorageError, UsageStore, UsageTotals, MAX_LATENCY_MS,
    MAX_MODEL_BYTES, MAX_PATH_BYTES, MAX_TOKENS_PER_REQUEST,
};
use crate::auth::{now_millis, KeyRecord, Role, Secret};

/// Runs every contract, each on a fresh store from `make_store`.
pub async fn run_all<S, F, Fut>(mut make_store: F)
where
    S: KeyStore + UsageStore,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    keys(&make_store().await).await;
    usage(&make_store().await).await;
    hostile_values(&make_store().await).await;
}

/// Keys: stored and found by their hash, one active key per name (a clash is
/// [`StorageError::Conflict`]), revoked once, the name free again after, listed oldest
/// first.
pub async fn keys(store: &dyn KeyStore) {
    let secret = Secret::generate();
    let record = KeyRecord::new("alice", Role::User, &secret);
    store.insert_key(&record, &secret.hash()).await.unwrap();

    let found = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
    assert_eq!(found, record);
    assert!(store
        .key_by_hash(&Secret::generate().hash())
        .await
        .unwrap()
        .is_none());

    let other = Secret::generate();
    let clash = KeyRecord::new("alice", Role::Admin, &other);
    assert!(matches!(
        store.insert_key(&clash, &other.hash()).await,
        Err(StorageError::Conflict(_))
    ));

    assert!(store.revoke_key(&record.id, now_millis()).await.unwrap());
    assert!(!store.revoke_key(&record.id, now_millis()).await.unwrap());
    let revoked = store.key_by_hash(&secret.hash()).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
    // The name is free again once its key is revoked.
    store.insert_key(&clash, &other.hash()).await.unwrap();
    let names: Vec<_> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.name, k.role))
        .collect();
    assert_eq!(
        names,
        [
            ("alice".to_string(), Role::User),
            ("alice".to_string(), Role::Admin)
        ]
    );
}

fn row(key: &str, path: &str, at_ms: i64, tokens: Option<(u64, u64)>) -> RequestRecord {
    RequestRecord {
        at: DateTime::from_timestamp_millis(at_ms).unwrap(),
        key_id: key.into(),
        method: "POST".into(),
        path: path.into(),
        model: Some("m".into()),
        status: 200,
        prompt_tokens: tokens.map(|t| t.0),
        completion_tokens: tokens.map(|t| t.1),
        latency_ms: 5,
        first_byte_ms: Some(2),
    }
}

/// Usage: batches add up to per-key totals and endpoint counts (made-up paths count as
/// one endpoint), request rows read back newest first, filtered by time and limited,
/// and large or mixed batches keep every row as it was.
pub async fn usage(store: &dyn UsageStore) {
    let chat = "/v1/chat/completions";
    store
        .record(&[
            row("k1", chat, 1_000, Some((10, 5))),
            row("k1", chat, 2_000, Some((3, 4))),
            row("k1", "/v1/completions", 3_000, None),
            row("k2", chat, 1_500, Some((1, 1))),
        ])
        .await
        .unwrap();
    store
        .record(&[row("k1", chat, 4_000, Some((1, 0)))])
        .await
        .unwrap();

    let k1 = store.totals_for_key("k1").await.unwrap();
    assert_eq!(k1.requests, 4);
    assert_eq!(k1.prompt_tokens, 14);
    assert_eq!(k1.completion_tokens, 9);
    assert_eq!(k1.total_tokens(), 23);
    assert_eq!(k1.requests_without_usage, 1);
    assert_eq!(k1.last_request_at.unwrap().timestamp_millis(), 4_000);
    assert_eq!(k1.endpoints[chat], 3);
    assert_eq!(k1.endpoints["/v1/completions"], 1);

    // Made-up paths count under one endpoint, whatever their number; the request
    // rows keep the path as sent.
    let made_up: Vec<RequestRecord> = (0..50)
        .map(|i| row("k9", &format!("/v1/made-up-{i}"), 5_000 + i, None))
        .collect();
    store.record(&made_up).await.unwrap();
    let k9 = store.totals_for_key("k9").await.unwrap();
    assert_eq!(k9.endpoints.len(), 1, "{:?}", k9.endpoints);
    assert_eq!(k9.endpoints[super::OTHER_ENDPOINT], 50);
    let rows = store.requests("k9", None, 100).await.unwrap();
    assert!(rows.iter().any(|r| r.path == "/v1/made-up-7"));

    let all = store.totals().await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all["k2"].requests, 1);
    assert_eq!(
        store.totals_for_key("nobody").await.unwrap(),
        UsageTotals::default()
    );

    let rows = store.requests("k1", None, 10).await.unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].at.timestamp_millis(), 4_000, "newest first");
    assert_eq!(rows[1].prompt_tokens, None);
    let since = store
        .requests("k1", DateTime::from_timestamp_millis(2_000), 10)
        .await
        .unwrap();
    assert_eq!(since.len(), 3);
    assert_eq!(store.requests("k1", None, 2).await.unwrap().len(), 2);

    // A large batch (written in several multi-row statements) keeps every row.
    let many: Vec<_> = (0..150)
        .map(|i| row("k3", chat, 10_000 + i, Some((i as u64, 1))))
        .collect();
    store.record(&many).await.unwrap();
    let k3 = store.totals_for_key("k3").await.unwrap();
    assert_eq!(k3.requests, 150);
    assert_eq!(k3.prompt_tokens, (0..150).sum::<u64>());
    let rows = store.requests("k3", None, 1000).await.unwrap();
    assert_eq!(rows.len(), 150);
    assert_eq!(rows[0].at.timestamp_millis(), 10_149);
    assert_eq!(rows[149].prompt_tokens, Some(0));

    // A mixed batch of keys, endpoints and models: every row keeps its own values.
    let paths = [chat, "/v1/completions"];
    let models = [Some("m"), None, Some("n")];
    let mixed: Vec<_> = (0..120usize)
        .map(|i| RequestRecord {
            model: models[i % 3].map(Into::into),
            ..row(
                ["k4", "k5"][i % 2],
                paths[(i / 2) % 2],
                20_000 + i as i64,
                Some((i as u64, i as u64 + 1)),
            )
        })
        .collect();
    store.record(&mixed).await.unwrap();
    for key in ["k4", "k5"] {
        let rows = store.requests(key, None, 1000).await.unwrap();
        assert_eq!(rows.len(), 60, "{key}");
        for r in rows {
            let i = (r.at.timestamp_millis() - 20_000) as usize;
            assert_eq!(r, mixed[i], "{key}, row {i}");
        }
    }
}

/// Values no real request has, but that a client or an upstream can send: every
/// backend takes them (normalized, see [`RequestRecord::normalized`]), and totals,
/// rows, keys and the usage report still read back sane and consistent numbers.
pub async fn hostile_values<S: KeyStore + UsageStore>(store: &S) {
    let secret = Secret::generate();
    let key = KeyRecord::new("mallory", Role::User, &secret);
    store.insert_key(&key, &secret.hash()).await.unwrap();
    let id = key.id.as_str();
    let chat = "/v1/chat/completions";
    let tokens = |at: i64, p: u64, c: u64| RequestRecord {
        prompt_tokens: Some(p),
        completion_tokens: Some(c),
        ..row(id, chat, at, None)
    };
    let named = |at: i64, method: &str, path: &str, model: Option<&str>| RequestRecord {
        method: method.into(),
        path: path.into(),
        model: model.map(Into::into),
        ..row(id, chat, at, Some((1, 1)))
    };
    let crabs = "\u{1F980}".repeat(100);
    let big_model = "m".repeat(1 << 20);
    let big_path = format!("/v1/{}", "p".repeat(1 << 20));
    let hostile = |base: i64| {
        vec![
            tokens(base, u64::MAX, u64::MAX),
            tokens(base + 1, i64::MAX as u64, i64::MAX as u64),
            tokens(base + 2, i64::MAX as u64 + 1, 1),
            tokens(base + 3, MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST),
            tokens(base + 4, MAX_TOKENS_PER_REQUEST + 1, 3),
            named(base + 5, "POST", "/v1/chat\0/completions", Some("a\0b")),
            named(base + 6, "POST", &big_path, Some(&big_model)),
            named(base + 7, "P\u{f6}ST", "/v1/\u{6a21}\u{578b}", Some(&crabs)),
            named(base + 8, "", "", Some("")),
            named(base + 9, "GET", chat, None),
            RequestRecord {
                latency_ms: u64::MAX,
                first_byte_ms: Some(u64::MAX),
                ..row(id, chat, base + 10, Some((2, 2)))
            },
        ]
    };
    // Once as one batch, once a record at a time.
    let mut sent = hostile(1_000);
    store.record(&sent).await.unwrap();
    for record in hostile(2_000) {
        store.record(std::slice::from_ref(&record)).await.unwrap();
        sent.push(record);
    }
    // Many requests on one key, each at the bound.
    for batch in 0..2 {
        let at_bound: Vec<_> = (0..1_000)
            .map(|i| {
                let at = 10_000 + batch * 1_000 + i;
                tokens(at, MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST)
            })
            .collect();
        store.record(&at_bound).await.unwrap();
        sent.extend(at_bound);
    }

    let mut expected = UsageTotals::default();
    for record in &sent {
        expected.add(&record.clone().normalized());
    }
    let totals = store.totals_for_key(id).await.unwrap();
    assert_eq!(totals, expected);
    assert_eq!(totals.requests, 2_022);
    assert_eq!(
        totals.requests_without_usage, 8,
        "counts beyond the bound are unknown, not huge"
    );
    assert_eq!(totals.prompt_tokens, 2_002 * MAX_TOKENS_PER_REQUEST + 14);
    assert!(totals.total_tokens() < i64::MAX as u64);
    assert_eq!(store.totals().await.unwrap()[id], totals);

    let rows = store.requests(id, None, 10_000).await.unwrap();
    assert_eq!(rows.len(), sent.len());
    for row in &rows {
        let at = row.at.timestamp_millis();
        let original = sent.iter().find(|r| r.at.timestamp_millis() == at).unwrap();
        assert_eq!(*row, original.clone().normalized(), "the row at {at}");
        assert!(row.is_normal());
    }
    let at = |ms: i64| rows.iter().find(|r| r.at.timestamp_millis() == ms).unwrap();
    assert_eq!(at(1_000).prompt_tokens, None);
    assert_eq!(at(1_003).prompt_tokens, Some(MAX_TOKENS_PER_REQUEST));
    assert_eq!(at(1_004).completion_tokens, Some(3));
    assert_eq!(at(1_005).model.as_deref(), Some("a\u{FFFD}b"));
    assert_eq!(at(1_005).path, "/v1/chat\u{FFFD}/completions");
    assert_eq!(at(1_006).model.as_ref().unwrap().len(), MAX_MODEL_BYTES);
    assert_eq!(at(1_006).path.len(), MAX_PATH_BYTES);
    assert_eq!(at(1_007).model.as_deref(), Some(&crabs[..MAX_MODEL_BYTES]));
    assert_eq!(at(1_007).method, "P\u{f6}ST");
    assert_eq!(at(1_008).model.as_deref(), Some(""));
    assert_eq!(at(1_010).latency_ms, MAX_LATENCY_MS);

    let keys = store.list_keys().await.unwrap();
    assert!(keys.iter().any(|k| k.id == id));
    let report = crate::usage::usage_report(store, store).await.unwrap();
    let mine = report.iter().find(|u| u.key_id == id).unwrap();
    assert_eq!(mine.requests, 2_022);
}
