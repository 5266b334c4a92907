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
//! expect an empty store, and write keys, usage and models with made-up names.

use std::collections::BTreeMap;
use std::future::Future;

use chrono::{DateTime, Duration, Utc};

use super::{
    KeyStore, KeyUpdate, LimitField, LimitsPatch, ModelStore, ModelUsage, RefusedModel,
    RequestRecord, StorageError, StoredModel, UsageStore, UsageTotals, MAX_END_USERS_PER_KEY,
    MAX_END_USER_BYTES, MAX_LATENCY_MS, MAX_MODELS_PER_KEY, MAX_MODEL_BYTES,
    MAX_MODEL_SETTINGS_BYTES, MAX_PATH_BYTES, MAX_TOKENS_PER_REQUEST, NO_MODEL, OTHER_END_USER,
    OTHER_MODEL,
};
use crate::auth::{now_millis, KeyRecord, Role, Secret};
use crate::limits::{KeyLimits, QuotaPeriod};

/// Runs every contract, each on a fresh store from `make_store`.
pub async fn run_all<S, F, Fut>(mut make_store: F)
where
    S: KeyStore + UsageStore + ModelStore,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    keys(&make_store().await).await;
    key_changes(&make_store().await).await;
    let store = make_store().await;
    limit_changes_at_once(&store, &store).await;
    usage(&make_store().await).await;
    end_users(&make_store().await).await;
    usage_per_model(&make_store().await).await;
    hostile_values(&make_store().await).await;
    models(&make_store().await).await;
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

/// Keys after their creation: their own limits kept as set; [`KeyStore::update_key`]
/// changing only what it is given (name, expiry, the limits its patch names), refusing a
/// name another active key has, and leaving revoked keys alone; [`KeyStore::rotate_key`] giving a key a new
/// secret while the previous one works until its grace ends (and not past the key's own
/// expiry), one previous secret at a time.
pub async fn key_changes(store: &dyn KeyStore) {
    let every_limit = KeyLimits {
        models: Some(vec!["gemma-*".into(), "it's \"quoted\" \u{1F980}".into()]),
        rpm: Some(60),
        tpm: Some(10_000),
        max_parallel: Some(2),
        quota_tokens: Some(0),
        quota_period: Some(QuotaPeriod::Week),
        weight: Some(3),
        per_user_rpm: Some(5),
        per_user_quota_tokens: Some(u64::MAX),
    };
    let first = Secret::generate();
    let bob = KeyRecord {
        limits: every_limit.clone(),
        ..KeyRecord::new("bob", Role::User, &first)
    };
    store.insert_key(&bob, &first.hash()).await.unwrap();
    let carol_secret = Secret::generate();
    let carol = KeyRecord::new("carol", Role::Admin, &carol_secret);
    store
        .insert_key(&carol, &carol_secret.hash())
        .await
        .unwrap();
    let found = |secret: &Secret| {
        let hash = secret.hash();
        async move { store.key_by_hash(&hash).await.unwrap() }
    };
    assert_eq!(found(&first).await, Some(bob.clone()));
    assert_eq!(found(&carol_secret).await, Some(carol.clone()));
    assert_eq!(
        store.list_keys().await.unwrap(),
        [bob.clone(), carol.clone()]
    );

    // Only what an update names changes; the key comes back as it now is.
    let now = now_millis();
    let tomorrow = now + Duration::days(1);
    let update = |name: Option<&str>,
                  expires_at: Option<Option<DateTime<Utc>>>,
                  limits: Option<KeyLimits>| KeyUpdate {
        name: name.map(Into::into),
        expires_at,
        limits: limits.map_or_else(LimitsPatch::default, LimitsPatch::replacing),
    };
    let mut expected = KeyRecord {
        name: "robert".into(),
        expires_at: Some(tomorrow),
        ..bob.clone()
    };
    let updated = store
        .update_key(&bob.id, &update(Some("robert"), Some(Some(tomorrow)), None))
        .await
        .unwrap();
    assert_eq!(updated.as_ref(), Some(&expected));
    assert_eq!(found(&first).await.as_ref(), Some(&expected));
    // A patch changes the limits it names and leaves the others as they are.
    let patch = LimitsPatch {
        clear: [LimitField::Models, LimitField::Rpm].into(),
        set: KeyLimits {
            tpm: Some(7),
            quota_period: Some(QuotaPeriod::Day),
            ..KeyLimits::default()
        },
    };
    patch.apply(&mut expected.limits);
    assert_eq!(
        expected.limits,
        KeyLimits {
            models: None,
            rpm: None,
            tpm: Some(7),
            quota_period: Some(QuotaPeriod::Day),
            ..every_limit.clone()
        }
    );
    let patched = store
        .update_key(
            &bob.id,
            &KeyUpdate {
                limits: patch.clone(),
                ..KeyUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.as_ref(), Some(&expected));
    assert_eq!(found(&first).await.as_ref(), Some(&expected));
    // Replaced as a whole; no limits at all is no limits.
    let fewer = KeyLimits {
        rpm: Some(5),
        ..KeyLimits::default()
    };
    expected.limits = fewer.clone();
    let updated = store
        .update_key(&bob.id, &update(None, None, Some(fewer)))
        .await
        .unwrap();
    assert_eq!(updated.as_ref(), Some(&expected));
    expected.limits = KeyLimits::default();
    expected.expires_at = None;
    let updated = store
        .update_key(
            &bob.id,
            &update(None, Some(None), Some(KeyLimits::default())),
        )
        .await
        .unwrap();
    assert_eq!(updated.as_ref(), Some(&expected));
    assert_eq!(found(&first).await.as_ref(), Some(&expected));
    let unchanged = store
        .update_key(&bob.id, &KeyUpdate::default())
        .await
        .unwrap();
    assert_eq!(unchanged.as_ref(), Some(&expected));

    // Another active key's name is refused and nothing changes; the key's own is fine.
    let clash = store
        .update_key(&bob.id, &update(Some("carol"), Some(Some(now)), None))
        .await;
    assert!(matches!(clash, Err(StorageError::Conflict(_))), "{clash:?}");
    assert_eq!(found(&first).await.as_ref(), Some(&expected));
    let same = store
        .update_key(&bob.id, &update(Some("robert"), None, None))
        .await
        .unwrap();
    assert_eq!(same.as_ref(), Some(&expected));
    assert_eq!(
        store
            .update_key("key_nobody", &update(Some("x"), None, None))
            .await
            .unwrap(),
        None
    );
    // A revoked key is not changed, and its name is free for another.
    assert!(store.revoke_key(&carol.id, now).await.unwrap());
    assert_eq!(
        store
            .update_key(&carol.id, &update(Some("carla"), None, None))
            .await
            .unwrap(),
        None
    );
    let patch_revoked = KeyUpdate {
        limits: LimitsPatch::replacing(every_limit.clone()),
        ..KeyUpdate::default()
    };
    assert_eq!(
        store.update_key(&carol.id, &patch_revoked).await.unwrap(),
        None
    );
    let carol_now = found(&carol_secret).await.unwrap();
    assert_eq!(carol_now.name, "carol");
    assert_eq!(carol_now.limits, KeyLimits::default());
    expected.name = "carol".into();
    let renamed = store
        .update_key(&bob.id, &update(Some("carol"), None, None))
        .await
        .unwrap();
    assert_eq!(renamed.as_ref(), Some(&expected));

    // Rotation: a new secret for the same key; the previous one works until the grace ends.
    let expected_limits = KeyLimits {
        tpm: Some(99),
        ..KeyLimits::default()
    };
    store
        .update_key(&bob.id, &update(None, None, Some(expected_limits.clone())))
        .await
        .unwrap();
    expected.limits = expected_limits;
    let second = Secret::generate();
    let grace_end = now + Duration::hours(1);
    assert!(store
        .rotate_key(&bob.id, &second.hash(), &second.public_prefix(), grace_end)
        .await
        .unwrap());
    expected.prefix = second.public_prefix();
    assert_eq!(found(&second).await.as_ref(), Some(&expected));
    let by_first = found(&first)
        .await
        .expect("the previous secret, in its grace");
    assert_eq!(
        by_first,
        KeyRecord {
            expires_at: Some(grace_end),
            ..expected.clone()
        }
    );
    assert!(by_first.is_active(now) && !by_first.is_active(grace_end));
    let listed = store.list_keys().await.unwrap();
    assert_eq!(listed.iter().find(|k| k.id == bob.id), Some(&expected));
    assert_eq!(listed.len(), 2, "a rotation adds no key");
    // The key's own expiry, when sooner, ends the grace too.
    let soon = now + Duration::minutes(30);
    store
        .update_key(&bob.id, &update(None, Some(Some(soon)), None))
        .await
        .unwrap();
    assert_eq!(found(&first).await.unwrap().expires_at, Some(soon));
    assert_eq!(found(&second).await.unwrap().expires_at, Some(soon));
    store
        .update_key(&bob.id, &update(None, Some(None), None))
        .await
        .unwrap();

    // Rotating again keeps one previous secret: the first is forgotten, and a grace
    // ending now stops the second at once.
    let third = Secret::generate();
    assert!(store
        .rotate_key(&bob.id, &third.hash(), &third.public_prefix(), now)
        .await
        .unwrap());
    assert_eq!(found(&first).await, None);
    let by_second = found(&second).await.unwrap();
    assert_eq!(by_second.expires_at, Some(now));
    assert!(!by_second.is_active(now));
    let by_third = found(&third).await.unwrap();
    assert!(by_third.is_active(now));
    assert_eq!(by_third.prefix, third.public_prefix());

    // A revoked key cannot be rotated, and none of its secrets works.
    assert!(store.revoke_key(&bob.id, now).await.unwrap());
    let fourth = Secret::generate();
    assert!(!store
        .rotate_key(&bob.id, &fourth.hash(), &fourth.public_prefix(), grace_end)
        .await
        .unwrap());
    assert_eq!(found(&fourth).await, None);
    for secret in [&second, &third] {
        assert!(found(secret).await.unwrap().revoked_at.is_some());
    }
    assert!(!store
        .rotate_key("key_nobody", &fourth.hash(), "sk-lg-xxxx", grace_end)
        .await
        .unwrap());
}

/// Changes of different limits of one key made at the same time, half of them through
/// `replica` (a second store on the same data, as a second gateway sharing the database
/// has; or `store` again), all hold: none is lost to another written over it. So do a
/// name and an expiry changed at the same time.
pub async fn limit_changes_at_once(store: &dyn KeyStore, replica: &dyn KeyStore) {
    let secret = Secret::generate();
    let key = KeyRecord::new("shared", Role::User, &secret);
    store.insert_key(&key, &secret.hash()).await.unwrap();
    let now = now_millis();
    let mut expected = key.clone();
    for round in 1..=6u32 {
        // Each round sets some limits and clears others; every field changes every round.
        let mut updates: Vec<KeyUpdate> = LimitField::ALL
            .into_iter()
            .zip(0u32..)
            .map(|(field, i)| {
                let limits = if (i + round) % 3 == 0 {
                    LimitsPatch {
                        clear: [field].into(),
                        ..LimitsPatch::default()
                    }
                } else {
                    LimitsPatch {
                        set: setting(field, 10 * round + i),
                        ..LimitsPatch::default()
                    }
                };
                KeyUpdate {
                    limits,
                    ..KeyUpdate::default()
                }
            })
            .collect();
        updates.push(KeyUpdate {
            name: Some(format!("shared-{round}")),
            ..KeyUpdate::default()
        });
        updates.push(KeyUpdate {
            expires_at: Some((round % 2 == 0).then(|| now + Duration::days(round.into()))),
            ..KeyUpdate::default()
        });
        for update in &updates {
            update.apply(&mut expected);
        }
        let results =
            futures_util::future::join_all(updates.iter().enumerate().map(|(i, update)| {
                let via = if i % 2 == 0 { store } else { replica };
                via.update_key(&key.id, update)
            }))
            .await;
        for result in results {
            assert!(result.unwrap().is_some(), "round {round}: the key is there");
        }
        let stored = store.key_by_hash(&secret.hash()).await.unwrap();
        assert_eq!(stored.as_ref(), Some(&expected), "round {round}");
        let seen = replica.key_by_hash(&secret.hash()).await.unwrap();
        assert_eq!(
            seen.as_ref(),
            Some(&expected),
            "round {round}, via the replica"
        );
    }
}

/// Limits setting only `field`, to a value made from `n`.
fn setting(field: LimitField, n: u32) -> KeyLimits {
    let mut limits = KeyLimits::default();
    match field {
        LimitField::Models => limits.models = Some(vec![format!("model-{n}-*")]),
        LimitField::Rpm => limits.rpm = Some(n),
        LimitField::Tpm => limits.tpm = Some(n.into()),
        LimitField::MaxParallel => limits.max_parallel = Some(n),
        LimitField::QuotaTokens => limits.quota_tokens = Some(n.into()),
        LimitField::QuotaPeriod => {
            let periods = [QuotaPeriod::Day, QuotaPeriod::Week, QuotaPeriod::Month];
            limits.quota_period = Some(periods[n as usize % periods.len()]);
        }
        LimitField::Weight => limits.weight = Some(n),
        LimitField::PerUserRpm => limits.per_user_rpm = Some(n),
        LimitField::PerUserQuotaTokens => limits.per_user_quota_tokens = Some(n.into()),
    }
    limits
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
        end_user: None,
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

/// Usage per model: each request counts under the model it named ([`NO_MODEL`] for none
/// or an empty name), with exact sums over batches, requests without token counts
/// counted apart, and at most [`MAX_MODELS_PER_KEY`] models per key, the rest under
/// [`OTHER_MODEL`].
pub async fn usage_per_model(store: &dyn UsageStore) {
    let chat = "/v1/chat/completions";
    let asking =
        |key: &str, at: i64, model: Option<&str>, tokens: Option<(u64, u64)>| RequestRecord {
            model: model.map(Into::into),
            ..row(key, chat, at, tokens)
        };
    store
        .record(&[
            asking("k1", 1_000, Some("chat"), Some((10, 5))),
            asking("k1", 1_001, Some("coder"), Some((7, 3))),
            asking("k1", 1_002, Some("chat"), None),
            asking("k1", 1_003, None, Some((1, 1))),
            asking("k1", 1_004, Some(""), Some((2, 0))),
            asking("k2", 1_005, Some("chat"), Some((100, 100))),
        ])
        .await
        .unwrap();
    store
        .record(&[
            asking("k1", 2_000, Some("chat"), Some((4, 6))),
            asking("k1", 2_001, Some("embed"), Some((9, 0))),
            RequestRecord {
                completion_tokens: None,
                ..asking("k1", 2_002, Some("coder"), Some((5, 5)))
            },
        ])
        .await
        .unwrap();
    store
        .record(&[asking("k1", 3_000, Some("chat"), Some((1, 2)))])
        .await
        .unwrap();

    let usage = |requests, prompt_tokens, completion_tokens, requests_without_usage| ModelUsage {
        requests,
        prompt_tokens,
        completion_tokens,
        requests_without_usage,
    };
    let k1 = store.totals_for_key("k1").await.unwrap();
    let expected: BTreeMap<String, ModelUsage> = [
        ("chat", usage(4, 15, 13, 1)),
        ("coder", usage(2, 12, 3, 1)),
        ("embed", usage(1, 9, 0, 0)),
        (NO_MODEL, usage(2, 3, 1, 0)),
    ]
    .into_iter()
    .map(|(m, u)| (m.to_owned(), u))
    .collect();
    assert_eq!(k1.models, expected);
    assert_eq!(
        (k1.requests, k1.prompt_tokens, k1.completion_tokens),
        (9, 39, 17)
    );
    assert_eq!(k1.requests_without_usage, 2);
    assert_eq!(k1.models["chat"].total_tokens(), 28);
    let all = store.totals().await.unwrap();
    assert_eq!(all["k1"], k1);
    assert_eq!(
        all["k2"].models,
        BTreeMap::from([("chat".to_owned(), usage(1, 100, 100, 0))])
    );

    // A key naming more models than are kept apart: the first ones keep counting under
    // their names, new ones count under `other`, and nothing is lost from the sums.
    let first: Vec<_> = (0..MAX_MODELS_PER_KEY)
        .map(|i| {
            asking(
                "many",
                10_000 + i as i64,
                Some(&format!("m{i:03}")),
                Some((1, 1)),
            )
        })
        .collect();
    store.record(&first).await.unwrap();
    let mut more: Vec<_> = (0..50)
        .map(|i| asking("many", 20_000 + i, Some(&format!("x{i:03}")), Some((2, 0))))
        .collect();
    more.push(asking("many", 21_000, Some("m000"), Some((3, 3))));
    store.record(&more).await.unwrap();
    store
        .record(&[asking("many", 22_000, Some("x999"), None)])
        .await
        .unwrap();
    let many = store.totals_for_key("many").await.unwrap();
    assert_eq!(many.models.len(), MAX_MODELS_PER_KEY + 1);
    assert_eq!(many.models["m000"], usage(2, 4, 4, 0));
    assert_eq!(many.models["m099"], usage(1, 1, 1, 0));
    assert_eq!(many.models[OTHER_MODEL], usage(51, 100, 0, 1));
    assert!(!many.models.contains_key("x000"));
    assert_sums_match(&many);

    // Thousands of made-up names in one batch add no more rows than that.
    let made_up: Vec<_> = (0..2_000)
        .map(|i| {
            asking(
                "hostile",
                30_000 + i,
                Some(&format!("made-up-{i}")),
                Some((1, 0)),
            )
        })
        .collect();
    store.record(&made_up).await.unwrap();
    let hostile = store.totals_for_key("hostile").await.unwrap();
    assert_eq!(hostile.models.len(), MAX_MODELS_PER_KEY + 1);
    assert_eq!(
        hostile.models[OTHER_MODEL].requests,
        2_000 - MAX_MODELS_PER_KEY as u64
    );
    assert_sums_match(&hostile);
    assert_eq!(store.totals().await.unwrap()["hostile"], hostile);
}

/// End users: each request of an end user counts under its name in the key's
/// [`UsageTotals::users`] (requests without one, or with an empty name, only in the
/// key's totals), names as they are kept ([`RequestRecord::normalized`]), at most
/// [`MAX_END_USERS_PER_KEY`] per key and the rest under [`OTHER_END_USER`]; request rows
/// read back with their end user; [`UsageStore::tokens_since`] sums the known tokens of
/// a key's (or one end user's) requests from a time on, that time included.
pub async fn end_users(store: &dyn UsageStore) {
    let chat = "/v1/chat/completions";
    let by = |key: &str, at: i64, user: Option<&str>, tokens: Option<(u64, u64)>| RequestRecord {
        end_user: user.map(Into::into),
        ..row(key, chat, at, tokens)
    };
    store
        .record(&[
            by("k1", 1_000, Some("alice"), Some((10, 5))),
            by("k1", 1_001, Some("bob"), Some((1, 1))),
            by("k1", 1_002, None, Some((100, 100))),
            by("k1", 1_003, Some("alice"), None),
            by("k1", 1_004, Some(""), Some((7, 7))),
            by("k2", 1_005, Some("alice"), Some((50, 50))),
        ])
        .await
        .unwrap();
    store
        .record(&[by("k1", 2_000, Some("alice"), Some((2, 3)))])
        .await
        .unwrap();
    let usage = |requests, prompt_tokens, completion_tokens, requests_without_usage| ModelUsage {
        requests,
        prompt_tokens,
        completion_tokens,
        requests_without_usage,
    };
    let k1 = store.totals_for_key("k1").await.unwrap();
    assert_eq!(
        k1.users,
        BTreeMap::from([
            ("alice".to_owned(), usage(3, 12, 8, 1)),
            ("bob".to_owned(), usage(1, 1, 1, 0)),
        ])
    );
    assert_eq!((k1.requests, k1.total_tokens()), (6, 236));
    let all = store.totals().await.unwrap();
    assert_eq!(all["k1"], k1);
    assert_eq!(
        all["k2"].users,
        BTreeMap::from([("alice".to_owned(), usage(1, 50, 50, 0))])
    );
    let rows = store.requests("k1", None, 10).await.unwrap();
    let users: Vec<_> = rows.iter().map(|r| r.end_user.as_deref()).collect();
    assert_eq!(
        users,
        [
            Some("alice"),
            None,
            Some("alice"),
            None,
            Some("bob"),
            Some("alice")
        ],
        "newest first; an empty name is none"
    );

    let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap();
    let since = |key: &'static str, user: Option<&'static str>, ms: i64| async move {
        store.tokens_since(key, user, at(ms)).await.unwrap()
    };
    assert_eq!(since("k1", None, 0).await, 236);
    assert_eq!(since("k1", Some("alice"), 0).await, 20);
    assert_eq!(since("k1", Some("alice"), 1_001).await, 5);
    assert_eq!(
        since("k1", None, 2_000).await,
        5,
        "the time itself included"
    );
    assert_eq!(since("k1", None, 2_001).await, 0);
    assert_eq!(since("k1", Some("bob"), 0).await, 2);
    assert_eq!(since("k1", Some("nobody"), 0).await, 0);
    assert_eq!(since("k2", Some("alice"), 0).await, 100);
    assert_eq!(since("nokey", None, 0).await, 0);
    // A count known on one side only adds that side; a count no request can have adds
    // nothing; sums go past 32 bits.
    store
        .record(&[
            by("k4", 3_000, Some("dan"), Some((4, 0))),
            RequestRecord {
                completion_tokens: None,
                ..by("k4", 3_001, Some("dan"), Some((6, 0)))
            },
            by(
                "k4",
                3_002,
                Some("dan"),
                Some((MAX_TOKENS_PER_REQUEST + 1, 1)),
            ),
            by(
                "k4",
                3_003,
                Some("eve"),
                Some((MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST)),
            ),
            by(
                "k4",
                3_004,
                Some("eve"),
                Some((MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST)),
            ),
            by(
                "k4",
                3_005,
                Some("eve"),
                Some((MAX_TOKENS_PER_REQUEST, MAX_TOKENS_PER_REQUEST)),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(since("k4", Some("dan"), 0).await, 11);
    assert_eq!(
        since("k4", Some("eve"), 0).await,
        6 * MAX_TOKENS_PER_REQUEST
    );
    assert_eq!(since("k4", None, 0).await, 6 * MAX_TOKENS_PER_REQUEST + 11);

    // Names as a client may send them: kept as every name is (NUL replaced, cut to
    // MAX_END_USER_BYTES at a character boundary), and found again by the name sent.
    let crabs = "\u{1F980}".repeat(100);
    let kept = &crabs[..MAX_END_USER_BYTES];
    let quoted = "it's \"o'brien\"; DROP TABLE api_keys; --";
    store
        .record(&[
            by("k3", 5_000, Some("a\0b"), Some((1, 0))),
            by("k3", 5_001, Some(&crabs), Some((2, 0))),
            by("k3", 5_002, Some(quoted), Some((4, 0))),
            by("k3", 5_003, Some("%"), Some((8, 0))),
        ])
        .await
        .unwrap();
    let k3 = store.totals_for_key("k3").await.unwrap();
    let names: Vec<&str> = k3.users.keys().map(String::as_str).collect();
    let mut expected = vec!["a\u{FFFD}b", kept, quoted, "%"];
    expected.sort();
    assert_eq!(names, expected);
    for (name, tokens) in [
        ("a\0b", 1),
        (crabs.as_str(), 2),
        (kept, 2),
        (quoted, 4),
        ("%", 8),
    ] {
        assert_eq!(
            store.tokens_since("k3", Some(name), at(0)).await.unwrap(),
            tokens,
            "{name}"
        );
    }
    let rows = store.requests("k3", None, 10).await.unwrap();
    assert_eq!(rows[2].end_user.as_deref(), Some(kept));
    assert_eq!(rows[3].end_user.as_deref(), Some("a\u{FFFD}b"));

    // A key with more end users than are kept apart: the first ones keep counting under
    // their names, new ones count under `other`, and nothing is lost from the sums.
    let first: Vec<_> = (0..MAX_END_USERS_PER_KEY)
        .map(|i| {
            by(
                "many",
                10_000 + i as i64,
                Some(&format!("u{i:04}")),
                Some((1, 1)),
            )
        })
        .collect();
    store.record(&first).await.unwrap();
    let mut more: Vec<_> = (0..50)
        .map(|i| by("many", 20_000 + i, Some(&format!("x{i:03}")), Some((2, 0))))
        .collect();
    more.push(by("many", 21_000, Some("u0000"), Some((3, 3))));
    store.record(&more).await.unwrap();
    store
        .record(&[by("many", 22_000, Some("x999"), None)])
        .await
        .unwrap();
    let many = store.totals_for_key("many").await.unwrap();
    assert_eq!(many.users.len(), MAX_END_USERS_PER_KEY + 1);
    assert_eq!(many.users["u0000"], usage(2, 4, 4, 0));
    assert_eq!(many.users["u0999"], usage(1, 1, 1, 0));
    assert_eq!(many.users[OTHER_END_USER], usage(51, 100, 0, 1));
    assert!(!many.users.contains_key("x000"));
    assert_shares_match(&many, &many.users);
    assert_eq!(
        store
            .tokens_since("many", Some("x007"), at(0))
            .await
            .unwrap(),
        2,
        "the request rows keep the name, past the bound too"
    );

    // Thousands of made-up names in one batch add no more rows than that.
    let made_up: Vec<_> = (0..3_000)
        .map(|i| {
            by(
                "hostile",
                30_000 + i,
                Some(&format!("made-up-{i}")),
                Some((1, 0)),
            )
        })
        .collect();
    store.record(&made_up).await.unwrap();
    let hostile = store.totals_for_key("hostile").await.unwrap();
    assert_eq!(hostile.users.len(), MAX_END_USERS_PER_KEY + 1);
    assert_eq!(
        hostile.users[OTHER_END_USER].requests,
        3_000 - MAX_END_USERS_PER_KEY as u64
    );
    assert_shares_match(&hostile, &hostile.users);
    assert_eq!(store.totals().await.unwrap()["hostile"], hostile);
}

/// The per-model shares add up to the key's totals.
fn assert_sums_match(totals: &UsageTotals) {
    assert_shares_match(totals, &totals.models);
}

/// The shares (per model, or per end user when every request had one) add up to the
/// key's totals.
fn assert_shares_match(totals: &UsageTotals, shares: &BTreeMap<String, ModelUsage>) {
    let mut sum = ModelUsage::default();
    for usage in shares.values() {
        sum.merge(usage);
    }
    assert_eq!(
        sum,
        ModelUsage {
            requests: totals.requests,
            prompt_tokens: totals.prompt_tokens,
            completion_tokens: totals.completion_tokens,
            requests_without_usage: totals.requests_without_usage,
        }
    );
}

/// Model settings: stored and overwritten by name, removed as a tombstone that is still
/// listed, listed by name in byte order; names with quotes and other characters kept as
/// they are, NUL replaced by U+FFFD, and an empty or too long name (or too large
/// settings) refused with [`StorageError::Rejected`], storing nothing.
pub async fn models(store: &dyn ModelStore) {
    assert_eq!(store.stored_models().await.unwrap(), []);
    let at = |ms: i64| DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap();
    let model = |name: &str, settings: Option<&str>, ms: i64| StoredModel {
        name: name.into(),
        settings: settings.map(Into::into),
        updated_at: at(ms),
    };
    let chat = model("chat", Some(r#"{"name":"chat","source":"a.gguf"}"#), 1);
    let coder = model(
        "coder",
        Some(r#"{"name":"coder","upstream":"http://x"}"#),
        2,
    );
    store.store_model(&coder).await.unwrap();
    store.store_model(&chat).await.unwrap();
    assert_eq!(
        store.stored_models().await.unwrap(),
        [chat.clone(), coder.clone()]
    );

    // Overwritten, then removed (a tombstone, still listed), then added back.
    let chat2 = model("chat", Some(r#"{"name":"chat","n_ctx":4096}"#), 3);
    store.store_model(&chat2).await.unwrap();
    let removed = model("coder", None, 4);
    store.store_model(&removed).await.unwrap();
    assert_eq!(
        store.stored_models().await.unwrap(),
        [chat2.clone(), removed.clone()]
    );
    let back = model("coder", Some(r#"{"name":"coder"}"#), 5);
    store.store_model(&back).await.unwrap();
    assert_eq!(
        store.stored_models().await.unwrap(),
        [chat2.clone(), back.clone()]
    );

    // Times are kept to the millisecond.
    let precise = StoredModel {
        updated_at: at(6) + chrono::Duration::nanoseconds(123_456),
        ..model("precise", None, 0)
    };
    store.store_model(&precise).await.unwrap();

    // Names as a client may write them: each is its own model, read back unchanged.
    let hostile_names = [
        "it's \"quoted\"; DROP TABLE model_settings; --".to_owned(),
        "Chat".to_owned(),
        "chat ".to_owned(),
        "\u{1F980} crab".to_owned(),
        "%_\\".to_owned(),
        "m".repeat(MAX_MODEL_BYTES),
    ];
    for (i, name) in hostile_names.iter().enumerate() {
        let settings = format!("{{\"name\":{}}}", serde_json::Value::from(name.as_str()));
        store
            .store_model(&model(name, Some(&settings), 10 + i as i64))
            .await
            .unwrap();
    }
    store
        .store_model(&model("nul\0name", Some("{\"a\":\"\0\"}"), 20))
        .await
        .unwrap();

    for (bad, why) in [
        (model("", Some("{}"), 30), RefusedModel::EmptyName),
        (
            model(&"m".repeat(MAX_MODEL_BYTES + 1), Some("{}"), 31),
            RefusedModel::NameTooLong {
                len: MAX_MODEL_BYTES + 1,
                max: MAX_MODEL_BYTES,
            },
        ),
        (
            model(&format!("{}\0", "m".repeat(MAX_MODEL_BYTES - 2)), None, 32),
            RefusedModel::NameTooLong {
                len: MAX_MODEL_BYTES + 1,
                max: MAX_MODEL_BYTES,
            },
        ),
        (
            model("big", Some(&"x".repeat(MAX_MODEL_SETTINGS_BYTES + 1)), 33),
            RefusedModel::SettingsTooLarge {
                len: MAX_MODEL_SETTINGS_BYTES + 1,
                max: MAX_MODEL_SETTINGS_BYTES,
            },
        ),
    ] {
        let err = store.store_model(&bad).await.unwrap_err();
        assert!(err.refuses_content(), "{err:?}");
        let source = std::error::Error::source(&err).expect("the reason");
        assert_eq!(source.downcast_ref::<RefusedModel>(), Some(&why), "{err}");
    }

    let stored = store.stored_models().await.unwrap();
    let names: Vec<&str> = stored.iter().map(|m| m.name.as_str()).collect();
    let mut expected: Vec<String> = hostile_names.to_vec();
    expected.extend(["chat", "coder", "precise", "nul\u{FFFD}name"].map(String::from));
    expected.sort();
    assert_eq!(names, expected, "every model once, by name in byte order");
    let find = |name: &str| stored.iter().find(|m| m.name == name).unwrap();
    assert_eq!(*find("chat"), chat2);
    assert_eq!(*find("coder"), back);
    assert_eq!(find("precise").updated_at, at(6));
    assert_eq!(
        find("nul\u{FFFD}name").settings.as_deref(),
        Some("{\"a\":\"\u{FFFD}\"}")
    );
    for (i, name) in hostile_names.iter().enumerate() {
        let m = find(name);
        assert_eq!(m.updated_at, at(10 + i as i64), "{name}");
        let settings: serde_json::Value =
            serde_json::from_str(m.settings.as_deref().unwrap()).unwrap();
        assert_eq!(settings["name"], name.as_str());
    }
}
