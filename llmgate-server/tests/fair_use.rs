//! Fair use as an operator and a key holder meet it, against the built binary in front of
//! the mock upstream: limits set, changed and cleared over the admin API and the CLI, a
//! key rotated with a grace, `/v1/me` telling a key what it has left, the 429s and headers
//! OpenAI's clients expect, `/v1/models` showing only a key's models, usage per end user,
//! and `/metrics` counting refusals.

use std::path::Path;
use std::time::{Duration, Instant};

use llmgate_core::test_util::MockUpstream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::process::Command;

mod common;

use common::{serve_fronting, Gateway, ADMIN, BIN};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn admin_call(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = client().request(method, url).bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A new key over the admin API with `body`'s fields; its answer.
async fn create(gateway: &Gateway, body: Value) -> Value {
    let (status, created) = admin_call(
        reqwest::Method::POST,
        &format!("{}/admin/keys", gateway.url),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

fn chat(model: &str, user: Option<&str>) -> Value {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]});
    if let Some(user) = user {
        body["user"] = json!(user);
    }
    body
}

async fn call_model(gateway: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn me(gateway: &Gateway, key: &str) -> (StatusCode, Value) {
    let response = client()
        .get(format!("{}/v1/me", gateway.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn error_of(body: &Value) -> (&str, &str, &str) {
    (
        body["error"]["type"].as_str().unwrap_or(""),
        body["error"]["code"].as_str().unwrap_or(""),
        body["error"]["message"].as_str().unwrap_or(""),
    )
}

async fn metrics(gateway: &Gateway) -> String {
    client()
        .get(format!("{}/metrics", gateway.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `series` (name and labels exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn limits_are_set_at_creation_changed_by_a_merge_patch_and_checked() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let keys = format!("{}/admin/keys", gateway.url);

    let created = create(
        &gateway,
        json!({"name": "bob", "rpm": 60, "models": ["mock-*"], "quota_tokens": 100000, "quota_period": "day"}),
    )
    .await;
    assert_eq!(created["rpm"], 60);
    assert_eq!(created["models"], json!(["mock-*"]));
    assert_eq!(created["quota_period"], "day");
    assert!(created["key"].as_str().unwrap().starts_with("sk-lg-"));
    let id = created["id"].as_str().unwrap().to_owned();

    // Unknown fields are named; bad values name their field; nothing is created.
    let (status, body) = admin_call(
        reqwest::Method::POST,
        &keys,
        Some(json!({"name": "carol", "rpmm": 5, "colour": "red"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (kind, _, message) = error_of(&body);
    assert_eq!(kind, "invalid_request_error");
    assert!(
        message.contains("'rpmm'") && message.contains("'colour'"),
        "{message}"
    );
    for bad in [
        json!({"name": "carol", "rpm": 0}),
        json!({"name": "carol", "weight": 5000}),
        json!({"name": "carol", "quota_period": "year"}),
        json!({"name": "carol", "tpm": "lots"}),
    ] {
        let (status, body) = admin_call(reqwest::Method::POST, &keys, Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let (_, listed) = admin_call(reqwest::Method::GET, &keys, None).await;
    assert!(!listed
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "carol"));

    // A merge patch: a field present sets, null clears, a field left out stays.
    let one = format!("{keys}/{id}");
    let (status, view) = admin_call(
        reqwest::Method::PATCH,
        &one,
        Some(json!({"rpm": null, "tpm": 5000, "name": "bobby", "expires_at": "2099-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["name"], "bobby");
    assert!(view.get("rpm").is_none(), "{view}");
    assert_eq!(view["tpm"], 5000);
    assert_eq!(view["quota_tokens"], 100000);
    assert_eq!(view["models"], json!(["mock-*"]));
    let (_, listed) = admin_call(reqwest::Method::GET, &keys, None).await;
    let bob = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(bob["tpm"], 5000);
    assert_eq!(bob["name"], "bobby");
    assert!(bob["expires_at"].as_str().unwrap().starts_with("2099"));
    let (status, view) = admin_call(
        reqwest::Method::PATCH,
        &one,
        Some(json!({"expires_at": null})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(view["expires_at"].is_null(), "{view}");

    // Refused changes leave the key as it was.
    create(&gateway, json!({"name": "taken"})).await;
    for (patch, expected) in [
        (json!({"name": "taken"}), StatusCode::CONFLICT),
        (json!({"name": null}), StatusCode::BAD_REQUEST),
        (json!({"max_parallel": 0}), StatusCode::BAD_REQUEST),
        (json!({"burst": 3}), StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = admin_call(reqwest::Method::PATCH, &one, Some(patch.clone())).await;
        assert_eq!(status, expected, "{patch}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let (status, body) = admin_call(
        reqwest::Method::PATCH,
        &format!("{keys}/key_nosuchkey"),
        Some(json!({"rpm": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, listed) = admin_call(reqwest::Method::GET, &keys, None).await;
    let bob = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(bob["name"], "bobby");
    assert!(bob.get("max_parallel").is_none());
}

/// Two admins (or scripts) changing different fields of a key at the same moment: every
/// change holds, none is undone by another that wrote back the limits it had read before.
#[tokio::test]
async fn patches_of_different_fields_sent_at_once_all_hold() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let keys = format!("{}/admin/keys", gateway.url);
    let numbers = [
        "rpm",
        "tpm",
        "max_parallel",
        "quota_tokens",
        "weight",
        "per_user_rpm",
        "per_user_quota_tokens",
    ];
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let mut body = json!({"name": name, "models": ["mock-*"], "quota_period": "day"});
        for field in numbers {
            body[field] = json!(1);
        }
        ids.push(
            create(&gateway, body).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }

    for round in 1..=3u64 {
        // Per key, one patch per field (each limit, the name, the expiry): 22 at once.
        // Every round changes every field; some limits are cleared with null.
        let mut patches = Vec::new();
        let mut expected = Vec::new();
        for (k, id) in ids.iter().enumerate() {
            let url = format!("{keys}/{id}");
            let mut fields = Vec::new();
            for (i, field) in numbers.into_iter().enumerate() {
                let value = if (i as u64 + round).is_multiple_of(3) {
                    Value::Null
                } else {
                    json!(round * 100 + i as u64 + 1)
                };
                fields.push((field, value));
            }
            fields.push(("models", json!([format!("mock-{round}-*")])));
            fields.push((
                "quota_period",
                json!(["day", "week", "month"][round as usize % 3]),
            ));
            fields.push(("name", json!(format!("{}-{round}", ["alice", "bob"][k]))));
            fields.push(("expires_at", json!(format!("209{round}-01-01T00:00:00Z"))));
            for (field, value) in &fields {
                patches.push((url.clone(), json!({ *field: value })));
            }
            expected.push((id.clone(), fields));
        }
        assert_eq!(patches.len(), 22);
        let answers = futures_util::future::join_all(
            patches
                .iter()
                .map(|(url, patch)| admin_call(reqwest::Method::PATCH, url, Some(patch.clone()))),
        )
        .await;
        for ((_, patch), (status, body)) in patches.iter().zip(&answers) {
            assert_eq!(*status, StatusCode::OK, "{patch}: {body}");
        }

        let (_, listed) = admin_call(reqwest::Method::GET, &keys, None).await;
        for (id, fields) in expected {
            let key = listed
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["id"] == id.as_str())
                .unwrap();
            let lost: Vec<String> = fields
                .iter()
                .filter(|(field, value)| match key.get(field) {
                    // A cleared limit is left out of the listing.
                    None => !value.is_null(),
                    Some(listed) if field == &"expires_at" => !listed
                        .as_str()
                        .unwrap()
                        .starts_with(&value.as_str().unwrap()[..4]),
                    Some(listed) => listed != value,
                })
                .map(|(field, value)| format!("{field}: {value}"))
                .collect();
            assert!(
                lost.is_empty(),
                "round {round}: changes lost, the key shows {key} where the patches set {lost:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_rotated_key_keeps_its_id_and_limits_and_the_old_secret_works_only_for_the_grace() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let created = create(&gateway, json!({"name": "rotating", "tpm": 10000})).await;
    let id = created["id"].as_str().unwrap();
    let old = created["key"].as_str().unwrap().to_owned();
    assert_eq!(
        call_model(&gateway, &old, &chat("mock-model", None))
            .await
            .status(),
        200
    );

    let rotate = format!("{}/admin/keys/{id}/rotate", gateway.url);
    let (status, body) = admin_call(
        reqwest::Method::POST,
        &rotate,
        Some(json!({"grace_secs": 2_592_001})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, rotated) = admin_call(
        reqwest::Method::POST,
        &rotate,
        Some(json!({"grace_secs": 2})),
    )
    .await;
    let rotated_at = Instant::now();
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["id"], id);
    assert_eq!(rotated["tpm"], 10000);
    let new = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated["prefix"].as_str().unwrap(), &new[..10]);

    // Both work during the grace, the same key to the gateway.
    let (status, me_new) = me(&gateway, &new).await;
    assert_eq!(status, StatusCode::OK, "{me_new}");
    assert_eq!(me_new["id"], id);
    let (status, me_old) = me(&gateway, &old).await;
    assert_eq!(status, StatusCode::OK, "{me_old}");
    assert_eq!(me_old["id"], id);
    assert_eq!(
        call_model(&gateway, &old, &chat("mock-model", None))
            .await
            .status(),
        200
    );

    // After it, the old one is refused (the key cache trusts an answer for a second).
    tokio::time::sleep_until((rotated_at + Duration::from_millis(3200)).into()).await;
    let response = call_model(&gateway, &old, &chat("mock-model", None)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        call_model(&gateway, &new, &chat("mock-model", None))
            .await
            .status(),
        200
    );

    // No grace: the secret just replaced stops at once; usage stays with the id.
    let (status, again) = admin_call(reqwest::Method::POST, &rotate, None).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(me(&gateway, &new).await.0, StatusCode::UNAUTHORIZED);
    let newest = again["key"].as_str().unwrap();
    let usage = client()
        .get(format!("{}/v1/me/usage", gateway.url))
        .bearer_auth(newest)
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 200);
    let usage: Value = usage.json().await.unwrap();
    assert_eq!(usage["requests"], 3, "{usage}");

    let (status, _) = admin_call(
        reqwest::Method::POST,
        &format!("{}/admin/keys/key_nosuchkey/rotate", gateway.url),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn over_its_rpm_a_key_gets_openais_429_and_every_answer_has_the_rate_limit_headers() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let created = create(&gateway, json!({"name": "limited", "rpm": 2})).await;
    let key = created["key"].as_str().unwrap();

    let mut remaining = Vec::new();
    for _ in 0..2 {
        let response = call_model(&gateway, key, &chat("mock-model", None)).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["x-ratelimit-limit-requests"], "2");
        assert!(headers.contains_key("x-ratelimit-reset-requests"));
        remaining.push(
            headers["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["1", "0"]);
    let refused = call_model(&gateway, key, &chat("mock-model", None)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let body: Value = refused.json().await.unwrap();
    let (kind, code, message) = error_of(&body);
    assert_eq!((kind, code), ("requests", "rate_limit_exceeded"), "{body}");
    assert!(message.contains("Limit 2"), "{message}");
    assert!(body["error"].as_object().unwrap().contains_key("param"));

    // The refusal reached no model and is counted by reason; the limiter is local.
    assert_eq!(upstream.seen().len(), 2);
    let text = metrics(&gateway).await;
    assert_eq!(
        sample(&text, "llmgate_rate_limited_total{type=\"requests\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "llmgate_rate_limited_total{type=\"tokens\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "llmgate_limiter_shared"), Some(0.0));
    assert_eq!(
        sample(&text, "llmgate_limiter_mode{mode=\"local\"}"),
        Some(1.0)
    );

    // /v1/me says what is left, without spending any.
    let (status, view) = me(&gateway, key).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["name"], "limited");
    assert!(view["limits"].to_string().contains("\"rpm\":2"), "{view}");

    // A key without limits gets no rate-limit headers.
    let free = create(&gateway, json!({"name": "free"})).await;
    let response = call_model(
        &gateway,
        free["key"].as_str().unwrap(),
        &chat("mock-model", None),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(!response
        .headers()
        .contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn a_key_sees_and_uses_only_its_models_and_the_defaults_apply_to_user_keys() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("llmgate.toml");
    std::fs::write(
        &config,
        "[key_defaults]\nmodels = [\"mock-*\"]\nrpm = 1000\n",
    )
    .unwrap();
    let gateway = serve_fronting(
        data.path(),
        &upstream.url,
        &[("LLMGATE_CONFIG", config.to_str().unwrap())],
    )
    .await;
    let only_other = create(
        &gateway,
        json!({"name": "other-only", "models": ["other-*"]}),
    )
    .await;
    let defaulted = create(&gateway, json!({"name": "defaulted"})).await;
    let models = |key: String| {
        let url = format!("{}/v1/models", gateway.url);
        async move {
            let list: Value = client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        models(defaulted["key"].as_str().unwrap().to_owned()).await,
        ["mock-model"]
    );
    assert!(models(only_other["key"].as_str().unwrap().to_owned())
        .await
        .is_empty());
    // The admin key has no defaults: every model.
    assert_eq!(models(ADMIN.to_owned()).await, ["mock-model"]);

    // A model the key may not use is answered as one that does not exist.
    let refused = call_model(
        &gateway,
        only_other["key"].as_str().unwrap(),
        &chat("mock-model", None),
    )
    .await;
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let (status, view) = me(&gateway, defaulted["key"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(view["limits"].to_string().contains("1000"), "{view}");
}

#[tokio::test]
async fn usage_is_shown_per_end_user_within_a_key() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let created = create(&gateway, json!({"name": "webui", "per_user_rpm": 100})).await;
    let key = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    for user in ["alice", "alice", "bob"] {
        let response = call_model(&gateway, key, &chat("mock-model", Some(user))).await;
        assert_eq!(response.status(), 200);
    }
    // Open WebUI says who it is in a header.
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(key)
        .header("X-OpenWebUI-User-Id", "carol-id")
        .json(&chat("mock-model", None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    call_model(&gateway, key, &chat("mock-model", None)).await;

    let (status, usage) = admin_call(
        reqwest::Method::GET,
        &format!("{}/admin/usage/{id}", gateway.url),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(usage["requests"], 5, "{usage}");
    assert_eq!(usage["users"]["alice"]["requests"], 2, "{usage}");
    assert_eq!(usage["users"]["bob"]["requests"], 1, "{usage}");
    assert_eq!(usage["users"]["carol-id"]["requests"], 1, "{usage}");
    assert_eq!(usage["users"].as_object().unwrap().len(), 3, "{usage}");
    let (_, all) = admin_call(
        reqwest::Method::GET,
        &format!("{}/admin/usage", gateway.url),
        None,
    )
    .await;
    let row = all
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id)
        .unwrap();
    assert_eq!(row["users"]["alice"]["requests"], 2);
    // The key sees its own limits next to its totals.
    let mine: Value = client()
        .get(format!("{}/v1/me/usage", gateway.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["requests"], 5);
    assert!(
        mine["limits"].to_string().contains("per_user_rpm"),
        "{mine}"
    );
}

async fn llmgate(data: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_creates_updates_lists_and_rotates_keys_with_limits() {
    let data = tempfile::tempdir().unwrap();
    let (ok, out, err) = llmgate(
        data.path(),
        &[
            "keys",
            "create",
            "alice",
            "--rpm",
            "60",
            "--models",
            "gemma-*,smollm2",
            "--quota",
            "1000",
            "--quota-period",
            "week",
            "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["rpm"], 60);
    assert_eq!(created["models"], json!(["gemma-*", "smollm2"]));
    assert_eq!(created["quota_period"], "week");
    let first_secret = created["key"].as_str().unwrap().to_owned();

    let (ok, _, err) = llmgate(data.path(), &["keys", "create", "bad", "--rpm", "0"]).await;
    assert!(!ok);
    assert!(err.contains("--rpm"), "{err}");

    let (ok, out, err) = llmgate(
        data.path(),
        &[
            "keys", "update", "alice", "--clear", "rpm", "--tpm", "5000", "--weight", "3", "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let updated: Value = serde_json::from_str(&out).unwrap();
    assert!(updated["limits"].get("rpm").is_none(), "{updated}");
    assert_eq!(updated["limits"]["tpm"], 5000);
    assert_eq!(updated["limits"]["weight"], 3);
    assert_eq!(updated["limits"]["quota_tokens"], 1000);
    let (ok, _, err) = llmgate(
        data.path(),
        &["keys", "update", "alice", "--clear", "colour"],
    )
    .await;
    assert!(!ok && err.contains("colour"), "{err}");

    let (ok, out, _) = llmgate(data.path(), &["keys", "list"]).await;
    assert!(ok);
    let line = out.lines().find(|l| l.contains("alice")).unwrap();
    for shown in [
        "models=gemma-*,smollm2",
        "tpm=5000",
        "quota=1000",
        "weight=3",
    ] {
        assert!(line.contains(shown), "{shown} in {line}");
    }
    assert!(!line.contains("rpm="), "{line}");

    let (ok, out, err) = llmgate(data.path(), &["keys", "rotate", "alice", "--grace", "60"]).await;
    assert!(ok, "{err}");
    let secret = out.trim();
    assert!(
        secret.starts_with("sk-lg-") && secret != first_secret,
        "{out}"
    );
    assert!(err.contains("works until"), "{err}");
    let (ok, _, err) = llmgate(
        data.path(),
        &["keys", "rotate", "alice", "--grace", "99999999"],
    )
    .await;
    assert!(!ok && err.contains("30 days"), "{err}");
}

/// Sends `body` to the gateways in turn, `n` times, `parallel` at once; the statuses.
async fn spread(
    gateways: &[&Gateway],
    key: &str,
    body: &Value,
    n: usize,
    parallel: usize,
) -> Vec<u16> {
    use futures_util::StreamExt;
    let urls: Vec<String> = gateways
        .iter()
        .map(|g| format!("{}/v1/chat/completions", g.url))
        .collect();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let request = client()
                .post(&urls[i % urls.len()])
                .bearer_auth(key)
                .json(body);
            async move { request.send().await.unwrap().status().as_u16() }
        })
        .buffered(parallel)
        .collect()
        .await
}

#[tokio::test]
#[ignore = "needs PostgreSQL (LLMGATE_TEST_POSTGRES, default 127.0.0.1:5432) and Redis at 127.0.0.1:6379; scripts/test starts them"]
async fn two_replicas_on_one_database_and_one_redis_allow_each_limit_once() {
    let upstream = MockUpstream::start().await;
    let database = common::TestDatabase::create("fair_replicas").await;
    let url = database.url();
    let env = [
        ("LLMGATE_DATABASE_URL", url.as_str()),
        ("LLMGATE_REDIS_URL", "redis://127.0.0.1:6379"),
        ("LLMGATE_REPLICAS", "2"),
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve_fronting(dir_a.path(), &upstream.url, &env).await;
    let b = serve_fronting(dir_b.path(), &upstream.url, &env).await;
    for gateway in [&a, &b] {
        let text = metrics(gateway).await;
        assert_eq!(sample(&text, "llmgate_limiter_shared"), Some(1.0), "{text}");
        assert_eq!(
            sample(&text, "llmgate_limiter_mode{mode=\"shared\"}"),
            Some(1.0)
        );
    }

    // rpm = 60: 200 requests over both replicas get the 60 of the burst, plus what
    // refills (one a second) while they run.
    let limited = create(&a, json!({"name": "sixty", "rpm": 60})).await;
    let started = Instant::now();
    let statuses = spread(
        &[&a, &b],
        limited["key"].as_str().unwrap(),
        &chat("mock-model", None),
        200,
        4,
    )
    .await;
    let refill = started.elapsed().as_secs() + 1;
    // A Redis call over 100 ms (a machine overloaded by other tests) sends a replica to
    // its local share for a second, which may admit more: say so if it happened.
    let mut modes = Vec::new();
    for gateway in [&a, &b] {
        modes.push(sample(&metrics(gateway).await, "llmgate_limiter_shared"));
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let refused = statuses.iter().filter(|&&s| s == 429).count() as u64;
    assert_eq!(ok + refused, 200, "{statuses:?}");
    assert!(
        (60..=60 + refill).contains(&ok),
        "{ok} admitted in {:?} (llmgate_limiter_shared after: {modes:?})",
        started.elapsed()
    );

    // A quota holds across both: sequential requests, each of the mock's ~10 tokens,
    // stop once the used tokens reach it, with at most one request's overshoot.
    let quota = create(
        &a,
        json!({"name": "quota", "quota_tokens": 100, "quota_period": "day"}),
    )
    .await;
    let key = quota["key"].as_str().unwrap();
    let mut admitted = 0;
    for i in 0..40 {
        let gateway = if i % 2 == 0 { &a } else { &b };
        let response = call_model(gateway, key, &chat("mock-model", None)).await;
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            }
            other => panic!("status {other}"),
        }
    }
    let (_, usage) = admin_call(
        reqwest::Method::GET,
        &format!("{}/admin/usage/{}", a.url, quota["id"].as_str().unwrap()),
        None,
    )
    .await;
    let used = usage["total_tokens"].as_u64().unwrap();
    let per_request = used / admitted.max(1);
    assert!(admitted < 40, "the quota stopped the key");
    assert!(
        used >= 100 && used <= 100 + per_request,
        "{used} tokens in {admitted} requests"
    );

    // A revocation or a rotation on one replica is refused by the other within a second.
    for change in ["revoke", "rotate"] {
        let victim = create(&a, json!({"name": format!("victim-{change}")})).await;
        let secret = victim["key"].as_str().unwrap();
        assert_eq!(me(&b, secret).await.0, StatusCode::OK);
        let id = victim["id"].as_str().unwrap();
        let (status, _) = if change == "revoke" {
            admin_call(
                reqwest::Method::DELETE,
                &format!("{}/admin/keys/{id}", a.url),
                None,
            )
            .await
        } else {
            admin_call(
                reqwest::Method::POST,
                &format!("{}/admin/keys/{id}/rotate", a.url),
                None,
            )
            .await
        };
        assert_eq!(status, StatusCode::OK);
        let changed = Instant::now();
        while me(&b, secret).await.0 == StatusCode::OK {
            assert!(
                changed.elapsed() < Duration::from_secs(1),
                "{change}: still accepted after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // A replica whose Redis cannot be reached serves with its share of the limits and
    // says so; never a 500.
    let c_dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let c = serve_fronting(
        c_dir.path(),
        &upstream.url,
        &[
            ("LLMGATE_DATABASE_URL", url.as_str()),
            ("LLMGATE_REDIS_URL", closed_url.as_str()),
            ("LLMGATE_REPLICAS", "2"),
        ],
    )
    .await;
    let ten = create(&c, json!({"name": "ten", "rpm": 10})).await;
    let statuses = spread(
        &[&c],
        ten["key"].as_str().unwrap(),
        &chat("mock-model", None),
        12,
        1,
    )
    .await;
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (5..=6).contains(&ok),
        "rpm 10 over 2 replicas: {ok} admitted"
    );
    let text = metrics(&c).await;
    assert_eq!(sample(&text, "llmgate_limiter_shared"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "llmgate_limiter_mode{mode=\"fallback\"}"),
        Some(1.0),
        "{text}"
    );

    drop((a, b, c));
    database.drop().await;
}

/// A Python with the `openai` package (the one `real_model.rs` makes), created once.
async fn python_with_openai() -> std::path::PathBuf {
    let dir = llmgate_core::config::default_cache_dir().join("test-python");
    let python = dir.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .await
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("openai>=1.40,<3")
            .status()
            .await
            .unwrap();
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

#[tokio::test]
#[ignore = "needs Python 3 with venv and PyPI (the openai package); scripts/test runs it"]
async fn the_openai_sdk_reads_the_limits_and_its_retry_waits_as_told() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let gateway = serve_fronting(data.path(), &upstream.url, &[]).await;
    let created = create(&gateway, json!({"name": "sdk", "rpm": 60})).await;
    let python = python_with_openai().await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openai_sdk_limits.py");
    let output = Command::new(python)
        .arg(script)
        .arg(format!("{}/v1", gateway.url))
        .arg(created["key"].as_str().unwrap())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["limit_header"], "60", "{seen}");
    assert_eq!(seen["remaining_header"], "59", "{seen}");
    assert!(
        seen["reset_header"].as_str().unwrap().ends_with('s'),
        "{seen}"
    );
    assert!(
        seen["tokens_limit_header"].is_null(),
        "no tpm, no token headers: {seen}"
    );
    assert_eq!(seen["refused"], true, "{seen}");
    assert!(seen["admitted"].as_u64().unwrap() >= 60, "{seen}");
    assert_eq!(seen["status"], 429);
    assert_eq!(seen["type"], "requests");
    assert_eq!(seen["code"], "rate_limit_exceeded");
    assert_eq!(
        seen["retry_after"], "1",
        "one request refills in a second: {seen}"
    );
    assert_eq!(seen["retried_ok"], true);
    let waited = seen["retry_wait_secs"].as_f64().unwrap();
    assert!((1.5..15.0).contains(&waited), "{seen}");
}

#[tokio::test]
async fn the_model_list_shows_a_key_only_the_models_it_may_use() {
    let upstream = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("llmgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"mock-a\"\nupstream = \"{0}\"\n\n[[models]]\nname = \"other-b\"\nupstream = \"{0}\"\n",
            upstream.url
        ),
    )
    .unwrap();
    let gateway = serve_fronting(
        data.path(),
        &upstream.url,
        &[("LLMGATE_CONFIG", config.to_str().unwrap())],
    )
    .await;
    let key = create(
        &gateway,
        json!({"name": "mocks", "models": ["mock-*"], "rpm": 100}),
    )
    .await;
    let key = key["key"].as_str().unwrap();
    let get = |path: &str, key: &str| {
        client()
            .get(format!("{}{path}", gateway.url))
            .bearer_auth(key.to_owned())
            .send()
    };
    let ids = |list: Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mine = get("/v1/models", key).await.unwrap().json().await.unwrap();
    assert_eq!(ids(mine), ["mock-a"]);
    let all = get("/v1/models", ADMIN)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ids(all).contains(&"other-b".to_owned()));
    assert_eq!(get("/v1/models/mock-a", key).await.unwrap().status(), 200);
    let hidden = get("/v1/models/other-b", key).await.unwrap();
    let missing = get("/v1/models/no-such-model", key).await.unwrap();
    assert_eq!(hidden.status(), 404);
    assert_eq!(missing.status(), 404);
    let (hidden, missing): (Value, Value) =
        (hidden.json().await.unwrap(), missing.json().await.unwrap());
    assert_eq!(hidden["error"]["code"], missing["error"]["code"]);
    assert_eq!(
        hidden["error"]["message"]
            .as_str()
            .unwrap()
            .replace("other-b", "X"),
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .replace("no-such-model", "X"),
        "the same answer as for a model that does not exist"
    );

    // A model call, headers and all: a model the key may not use is counted and
    // answered as a model that does not exist (one of the key's globs, or none).
    let (hidden, missing, unmatched) = (
        call_model(&gateway, key, &chat("other-b", None)).await,
        call_model(&gateway, key, &chat("mock-missing", None)).await,
        call_model(&gateway, key, &chat("nothing-like-it", None)).await,
    );
    let names = |response: &reqwest::Response| {
        let mut names: Vec<String> = response
            .headers()
            .keys()
            .map(|name| name.as_str().to_owned())
            .filter(|name| !["date", "content-length", "x-request-id"].contains(&name.as_str()))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&hidden), names(&missing));
    assert_eq!(names(&unmatched), names(&missing));
    let remaining = |response: &reqwest::Response| -> u64 {
        response.headers()["x-ratelimit-remaining-requests"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        remaining(&hidden),
        remaining(&missing) + 1,
        "each one counted"
    );
    assert_eq!(remaining(&missing), remaining(&unmatched) + 1);
    for (response, name) in [
        (hidden, "other-b"),
        (missing, "mock-missing"),
        (unmatched, "nothing-like-it"),
    ] {
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "100");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "model_not_found", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(name),
            "{body}"
        );
    }
}
