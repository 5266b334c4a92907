//! The gateway end to end over real sockets: key headers, refusals, token counts for
//! JSON and streams, disconnects, upstream failures, limits, admin routes.

use std::time::Duration;

use futures_util::StreamExt;
use llmgate_core::storage::UsageStore as _;
use llmgate_core::test_util::{mock_prompt_tokens, stream_events, CompletionApi, REPLY};
use llmgate_tests::{openai_error, Gateway, Options};
use serde_json::{json, Value};

fn chat(content: &str) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn every_key_header_form_is_accepted_and_none_reaches_the_upstream() {
    let gw = Gateway::start().await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let key = gw.alice.expose();
    let requests = [
        gw.http
            .post(&url)
            .header("authorization", format!("Bearer {key}")),
        gw.http.post(&url).header("api-key", key),
        gw.http.post(&url).header("x-api-key", key),
    ];
    for request in requests {
        let response = request.json(&chat("hi")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], REPLY.concat());
    }
    for seen in gw.upstream.seen() {
        for header in ["authorization", "api-key", "x-api-key"] {
            assert!(!seen.headers.contains_key(header), "{header} was forwarded");
        }
    }
    let usage = gw.wait_for_requests(&gw.alice_id, 3).await;
    assert_eq!(usage["endpoints"]["/v1/chat/completions"], 3);
}

#[tokio::test]
async fn missing_unknown_and_malformed_keys_get_openai_401s() {
    let gw = Gateway::start().await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let attempts = [
        gw.http.post(&url),
        gw.http
            .post(&url)
            .bearer_auth("sk-lg-0000000000000000000000000000000000000000"),
        gw.http.post(&url).bearer_auth("not-a-key"),
        gw.http
            .post(&url)
            .header("authorization", format!("Basic {}", gw.alice.expose())),
    ];
    for attempt in attempts {
        let response = attempt.json(&chat("hi")).send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body = openai_error(response).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    assert!(
        gw.upstream.seen().is_empty(),
        "refused requests never reach the upstream"
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_very_next_request() {
    let gw = Gateway::start().await;
    assert_eq!(
        gw.post("/v1/chat/completions", &gw.alice, &chat("hi"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let revoke = gw
        .http
        .delete(format!("{}/admin/keys/{}", gw.url, gw.alice_id))
        .bearer_auth(gw.admin.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body = openai_error(response).await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
}

#[tokio::test]
async fn json_responses_are_counted_exactly_per_key_and_endpoint() {
    let gw = Gateway::start().await;
    let mut expected = (0u64, 0u64);
    for (i, text) in ["one", "one two three", "a b c d e f g"].iter().enumerate() {
        let mut body = chat(text);
        body["max_tokens"] = json!(i + 2);
        let response: Value = gw.post_json("/v1/chat/completions", &gw.alice, &body).await;
        expected.0 += response["usage"]["prompt_tokens"].as_u64().unwrap();
        expected.1 += response["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let completion: Value = gw
        .post_json(
            "/v1/completions",
            &gw.alice,
            &json!({"model": "m", "prompt": "say it"}),
        )
        .await;
    expected.0 += completion["usage"]["prompt_tokens"].as_u64().unwrap();
    expected.1 += completion["usage"]["completion_tokens"].as_u64().unwrap();
    let models = gw.get("/v1/models", &gw.alice).send().await.unwrap();
    assert_eq!(models.status(), 200);
    models.bytes().await.unwrap();

    let usage = gw.wait_for_requests(&gw.alice_id, 5).await;
    assert_eq!(usage["prompt_tokens"], expected.0);
    assert_eq!(usage["completion_tokens"], expected.1);
    assert_eq!(usage["total_tokens"], expected.0 + expected.1);
    assert_eq!(usage["requests_without_usage"], 0);
    assert_eq!(
        usage["endpoints"],
        json!({"/v1/chat/completions": 3, "/v1/completions": 1, "/v1/models": 1})
    );
    assert!(usage["last_request_at"].is_string());

    // The admin's own view of everyone, and nobody else's usage moved.
    let all: Value = gw.get_json("/admin/usage", &gw.admin).await;
    let alice = all
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap();
    assert_eq!(alice["total_tokens"], expected.0 + expected.1);
    let root = all
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "root")
        .unwrap();
    assert_eq!(root["requests"], 0);

    // One row per request, with model and tokens.
    let rows: Value = gw
        .get_json(
            &format!("/admin/usage/{}/requests?limit=2", gw.alice_id),
            &gw.admin,
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["path"], "/v1/models");
    assert_eq!(rows[1]["path"], "/v1/completions");
    assert_eq!(rows[1]["model"], "m");
    assert_eq!(rows[1]["status"], 200);
    assert_eq!(
        rows[1]["completion_tokens"],
        completion["usage"]["completion_tokens"]
    );
}

async fn read_stream(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn a_stream_without_include_usage_is_counted_and_reaches_the_client_unchanged() {
    let gw = Gateway::start().await;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let mut body = if path == "/v1/chat/completions" {
            chat("tell me a story")
        } else {
            json!({"model": "mock-model", "prompt": "tell me a story"})
        };
        body["stream"] = json!(true);
        let through_gateway =
            read_stream(gw.post(path, &gw.alice, &body).send().await.unwrap()).await;
        let direct = read_stream(
            gw.http
                .post(format!("{}{path}", gw.upstream.url))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            through_gateway, direct,
            "the client sees exactly the upstream's stream without usage"
        );
        assert!(!through_gateway.contains("usage"));
        // The gateway did ask the upstream for usage.
        let asked = gw
            .upstream
            .seen()
            .into_iter()
            .find(|s| s.uri == path)
            .unwrap();
        let asked: Value = serde_json::from_slice(&asked.body).unwrap();
        assert_eq!(asked["stream_options"]["include_usage"], true);
    }
    let usage = gw.wait_for_requests(&gw.alice_id, 2).await;
    let prompt = mock_prompt_tokens(&chat("tell me a story"))
        + mock_prompt_tokens(&json!({"prompt": "tell me a story"}));
    assert_eq!(usage["prompt_tokens"], prompt);
    assert_eq!(usage["completion_tokens"], 2 * REPLY.len() as u64);
    assert_eq!(usage["requests_without_usage"], 0);
}

#[tokio::test]
async fn a_stream_with_include_usage_keeps_its_usage_chunk() {
    let gw = Gateway::start().await;
    let mut body = chat("count me");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let seen = read_stream(
        gw.post("/v1/chat/completions", &gw.alice, &body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let usage = json!({"prompt_tokens": mock_prompt_tokens(&body), "completion_tokens": REPLY.len(), "total_tokens": mock_prompt_tokens(&body) + REPLY.len() as u64});
    assert_eq!(
        seen,
        stream_events(CompletionApi::Chat, "mock-model", &REPLY, Some(usage)).concat()
    );
    let recorded = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(recorded["prompt_tokens"], mock_prompt_tokens(&body));
    assert_eq!(recorded["completion_tokens"], REPLY.len());
}

#[tokio::test]
async fn a_stream_whose_upstream_sends_no_usage_is_counted_with_unknown_tokens() {
    let gw = Gateway::start().await;
    gw.upstream.without_stream_usage();
    let mut body = chat("no usage here");
    body["stream"] = json!(true);
    let seen = read_stream(
        gw.post("/v1/chat/completions", &gw.alice, &body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        seen,
        stream_events(CompletionApi::Chat, "mock-model", &REPLY, None).concat()
    );
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(usage["requests_without_usage"], 1);
    assert_eq!(usage["total_tokens"], 0);
    let rows = gw.requests_of(&gw.alice_id).await;
    assert!(
        rows[0]["prompt_tokens"].is_null(),
        "unknown, not zero: {rows}"
    );
    assert!(rows[0]["completion_tokens"].is_null());
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_still_counted() {
    let gw = Gateway::start().await;
    gw.upstream.set_chunk_delay(Duration::from_millis(300));
    let mut body = chat("long story");
    body["stream"] = json!(true);
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream); // the client hangs up after the first chunk
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(usage["endpoints"]["/v1/chat/completions"], 1);
    let rows = gw.requests_of(&gw.alice_id).await;
    assert_eq!(rows[0]["status"], 200);
    assert!(
        rows[0]["latency_ms"].as_u64().unwrap() < 1_500,
        "settled when the client left, not when the stream would have ended"
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_a_json_answer_is_read_is_charged_its_tokens() {
    let gw = Gateway::start().await;
    gw.upstream.set_chunk_delay(Duration::from_millis(300));
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat("quick question"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response); // headers arrived; the client hangs up before the body
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(
        usage["prompt_tokens"],
        mock_prompt_tokens(&chat("quick question"))
    );
    assert_eq!(usage["completion_tokens"], REPLY.len());
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_starts_is_recorded_with_its_model() {
    let gw = Gateway::start().await;
    gw.upstream.set_response_delay(Duration::from_millis(1_000));
    let request = gw
        .post("/v1/chat/completions", &gw.alice, &chat("slow"))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(request.is_err(), "the client gave up before the headers");
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(usage["endpoints"]["/v1/chat/completions"], 1);
    let rows = gw.requests_of(&gw.alice_id).await;
    assert_eq!(rows[0]["status"], 499);
    assert_eq!(rows[0]["model"], chat("slow")["model"]);
    assert!(
        rows[0]["prompt_tokens"].is_null(),
        "tokens unknown, not zero"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_in_openai_shape() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw = Gateway::start_with(Options {
        upstream: Some(dead),
        ..Options::default()
    })
    .await;
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = openai_error(response).await;
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "no internals: {body}"
    );
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(usage["total_tokens"], 0);
    assert_eq!(
        usage["requests_without_usage"], 0,
        "a failed request used no tokens"
    );
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_a_504() {
    let gw = Gateway::start_with(Options {
        timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    gw.upstream.set_response_delay(Duration::from_secs(3));
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(
        openai_error(response).await["error"]["code"],
        "upstream_timeout"
    );
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413_and_never_forwarded() {
    let gw = Gateway::start_with(Options {
        max_body_bytes: 1024,
        ..Options::default()
    })
    .await;
    let big = chat(&"word ".repeat(1000));
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body = openai_error(response).await;
    assert_eq!(body["error"]["code"], "request_too_large");
    assert!(body["error"]["message"].as_str().unwrap().contains("1024"));

    // Without a Content-Length (chunked), the limit still holds.
    let chunks =
        futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.to_string().into_bytes())]);
    let response = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(gw.alice.expose())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(gw.upstream.seen().is_empty());

    // A body under the limit still goes through.
    assert_eq!(
        gw.post("/v1/chat/completions", &gw.alice, &chat("small"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn invalid_json_is_forwarded_unchanged_and_answered_by_the_upstream() {
    let gw = Gateway::start().await;
    let raw = "{\"model\": \"mock-model\", \"messages\": [";
    let response = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(gw.alice.expose())
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body = openai_error(response).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("parse the JSON"),
        "the upstream's own answer: {body}"
    );
    assert_eq!(gw.upstream.seen()[0].body, raw.as_bytes());
    let usage = gw.wait_for_requests(&gw.alice_id, 1).await;
    assert_eq!(usage["total_tokens"], 0);
}

#[tokio::test]
async fn admin_routes_need_an_admin_key() {
    let gw = Gateway::start().await;
    for (method, path) in [
        ("GET", "/admin/usage"),
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
    ] {
        let request = gw
            .http
            .request(method.parse().unwrap(), format!("{}{path}", gw.url));
        let response = request
            .try_clone()
            .unwrap()
            .bearer_auth(gw.alice.expose())
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        assert_eq!(
            openai_error(response).await["error"]["code"],
            "insufficient_permissions"
        );
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path} without a key");
    }
    assert_eq!(
        gw.get("/admin/usage", &gw.admin)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let health = gw
        .http
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let unknown = gw.get("/nope", &gw.alice).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    openai_error(unknown).await;
}

#[tokio::test]
async fn any_key_reads_its_own_usage() {
    let gw = Gateway::start().await;
    gw.post_drained("/v1/chat/completions", &gw.alice, &chat("hi"))
        .await;
    gw.wait_for_requests(&gw.alice_id, 1).await;
    let mine: Value = gw.get_json("/v1/me/usage", &gw.alice).await;
    assert_eq!(mine["name"], "alice");
    assert_eq!(mine["requests"], 1);
    assert_eq!(
        mine["total_tokens"],
        mock_prompt_tokens(&chat("hi")) + REPLY.len() as u64
    );
    // Reading usage is not itself counted as usage.
    let again: Value = gw.get_json("/v1/me/usage", &gw.alice).await;
    assert_eq!(again["requests"], 1);
}

#[tokio::test]
async fn keys_created_over_the_admin_api_work_at_once_and_list_without_secrets() {
    let gw = Gateway::start().await;
    let created = gw
        .post(
            "/admin/keys",
            &gw.admin,
            &json!({"name": "bob", "role": "user"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-lg-") && secret.len() >= 38);
    let bob = llmgate_core::auth::Secret::new(secret.clone());
    assert_eq!(
        gw.post("/v1/chat/completions", &bob, &chat("hi"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let list = gw
        .get("/admin/keys", &gw.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !list.contains(&secret[10..]),
        "a listing never shows a secret"
    );
    let list: Value = serde_json::from_str(&list).unwrap();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "bob")
        .unwrap();
    assert_eq!(listed["prefix"], &secret[..10]);
    assert_eq!(listed["role"], "user");

    let duplicate = gw
        .post("/admin/keys", &gw.admin, &json!({"name": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409);
    openai_error(duplicate).await;
    for bad in [
        json!({"name": ""}),
        json!({"name": "x", "role": "owner"}),
        json!({"nom": "x"}),
    ] {
        let response = gw
            .post("/admin/keys", &gw.admin, &bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        openai_error(response).await;
    }
    let missing = gw
        .http
        .delete(format!("{}/admin/keys/key_nope", gw.url))
        .bearer_auth(gw.admin.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn usage_stays_exact_under_concurrent_load() {
    let gw = Gateway::start().await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let request = if i % 2 == 0 {
            let mut body = chat("concurrent request");
            body["stream"] = json!(true);
            gw.post("/v1/chat/completions", &gw.alice, &body)
        } else {
            gw.post(
                "/v1/chat/completions",
                &gw.alice,
                &chat("concurrent request"),
            )
        };
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let usage = gw.wait_for_requests(&gw.alice_id, 200).await;
    let per = mock_prompt_tokens(&chat("concurrent request"));
    assert_eq!(usage["prompt_tokens"], 200 * per);
    assert_eq!(usage["completion_tokens"], 200 * REPLY.len() as u64);
}

#[tokio::test]
async fn bad_query_parameters_get_a_clear_400() {
    let gw = Gateway::start().await;
    for query in ["since=yesterday", "limit=0", "limit=lots"] {
        let response = gw
            .get(
                &format!("/admin/usage/{}/requests?{query}", gw.alice_id),
                &gw.admin,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        openai_error(response).await;
    }
    for (query, message) in [
        (
            "since=yesterday",
            "since must be a time like 2026-11-26T10:00:00Z or Unix seconds, not 'yesterday'.",
        ),
        (
            "since=99999999999999999",
            "since=99999999999999999 is out of range.",
        ),
    ] {
        let response = gw
            .get(
                &format!("/admin/usage/{}/requests?{query}", gw.alice_id),
                &gw.admin,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body = openai_error(response).await;
        assert_eq!(body["error"]["message"], message, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    let response = gw
        .get("/admin/usage/key_unknown", &gw.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn stopping_drains_the_queue_and_a_new_store_sees_everything() {
    let mut gw = Gateway::start().await;
    for _ in 0..20 {
        gw.post_drained("/v1/chat/completions", &gw.alice, &chat("persist me"))
            .await;
    }
    gw.stop().await;
    let reopened = llmgate_core::storage::SqliteStore::open(&gw.db_path)
        .await
        .unwrap();
    let totals = llmgate_core::storage::UsageStore::totals_for_key(&reopened, &gw.alice_id)
        .await
        .unwrap();
    assert_eq!(totals.requests, 20);
    assert_eq!(totals.completion_tokens, 20 * REPLY.len() as u64);
}

#[tokio::test]
async fn the_system_report_shows_cpu_memory_and_no_gpu_to_admins_only() {
    let gw = Gateway::start().await;
    let response = gw.get("/admin/system", &gw.admin).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    let cores = report["cpu"]["cores"].as_u64().unwrap();
    assert!(cores >= 1);
    assert_eq!(
        report["cpu"]["per_core_percent"].as_array().unwrap().len() as u64,
        cores
    );
    let usage = report["cpu"]["usage_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&usage), "{usage}");
    assert!(report["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        report["gateway"]["pid"].as_u64().unwrap(),
        u64::from(std::process::id())
    );
    assert!(
        report["model_server"].is_null(),
        "this gateway runs no model"
    );
    if !std::path::Path::new("/proc/driver/nvidia").exists() {
        assert_eq!(report["gpu"]["message"], "no GPU found");
        assert_eq!(report["gpu"]["devices"], json!([]));
    }
    let refused = gw.get("/admin/system", &gw.alice).send().await.unwrap();
    assert_eq!(refused.status(), 403);
}

/// `name{labels} value` lines of a Prometheus/OpenMetrics exposition.
fn samples(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            (name.to_owned(), labels, value.parse().expect("a number"))
        })
        .collect()
}

fn sample(
    all: &[(String, std::collections::BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    all.iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latency_per_key_and_need_an_admin_key() {
    let gw = Gateway::start().await;
    assert_eq!(
        gw.http
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        gw.get("/metrics", &gw.alice).send().await.unwrap().status(),
        403
    );

    let mut expected_prompt = 0;
    for i in 0..3 {
        let mut body = chat("measure me");
        body["stream"] = json!(i == 2);
        gw.post_drained("/v1/chat/completions", &gw.alice, &body)
            .await;
        expected_prompt += mock_prompt_tokens(&chat("measure me"));
    }
    gw.get_drained("/v1/models", &gw.alice).await;
    gw.wait_for_requests(&gw.alice_id, 4).await;

    let response = gw.get("/metrics", &gw.admin).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let all = samples(&response.text().await.unwrap());
    let chat_labels = [
        ("key", "alice"),
        ("endpoint", "/v1/chat/completions"),
        ("status", "200"),
    ];
    assert_eq!(
        sample(&all, "llmgate_requests_total", &chat_labels),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &all,
            "llmgate_requests_total",
            &[("key", "alice"), ("endpoint", "/v1/models")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&all, "llmgate_prompt_tokens_total", &[("key", "alice")]),
        Some(expected_prompt as f64)
    );
    assert_eq!(
        sample(&all, "llmgate_completion_tokens_total", &[("key", "alice")]),
        Some(3.0 * REPLY.len() as f64)
    );
    let chat_endpoint = [("endpoint", "/v1/chat/completions")];
    assert_eq!(
        sample(
            &all,
            "llmgate_request_duration_seconds_count",
            &chat_endpoint
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &all,
            "llmgate_upstream_duration_seconds_count",
            &chat_endpoint
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &all,
            "llmgate_model_state",
            &[("model", "upstream"), ("state", "ready")]
        ),
        Some(1.0)
    );
    assert!(sample(&all, "llmgate_memory_total_bytes", &[]).unwrap() > 0.0);
    assert!(sample(&all, "llmgate_cpu_usage_percent", &[]).is_some());

    // The counters move with traffic.
    gw.post_drained("/v1/chat/completions", &gw.alice, &chat("once more"))
        .await;
    gw.wait_for_requests(&gw.alice_id, 5).await;
    let all = samples(
        &gw.get("/metrics", &gw.admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(
        sample(&all, "llmgate_requests_total", &chat_labels),
        Some(4.0)
    );
}

#[tokio::test]
#[ignore = "needs Python 3 with venv (python3-venv); scripts/test installs it"]
async fn admins_add_a_llama_cpp_python_model_over_http_while_the_gateway_keeps_serving() {
    let envs = tempfile::tempdir().unwrap();
    llmgate_tests::fake_llama_cpp_env(envs.path());
    let model = envs.path().join("tiny.gguf");
    std::fs::write(&model, "ok").unwrap();
    let gw = Gateway::start_with(Options {
        python_env_dir: Some(envs.path().to_owned()),
        ..Options::default()
    })
    .await;

    let list: Value = gw.get_json("/admin/models", &gw.admin).await;
    assert_eq!(list["models"][0]["name"], "upstream", "{list}");
    assert_eq!(list["models"][0]["kind"], "upstream");
    assert_eq!(list["models"][0]["state"], "ready");
    assert_eq!(
        gw.get("/admin/models", &gw.alice)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );

    let bad = gw
        .post(
            "/admin/models",
            &gw.admin,
            &json!({"name": "tiny", "source": model, "backend": "tpu"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(openai_error(bad).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tpu"));

    let added = gw
        .post(
            "/admin/models",
            &gw.admin,
            &json!({"name": "tiny", "source": model, "backend": "cpu"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let loading = gw
        .post("/admin/models/tiny/load", &gw.admin, &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(loading.status(), 202, "set-up runs in the background");
    // The gateway keeps answering while the model starts.
    assert_eq!(
        gw.http
            .get(format!("{}/healthz", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view: Value = gw.get_json("/admin/models/tiny", &gw.admin).await;
        if view["state"] == "ready" {
            break view;
        }
        assert_ne!(view["state"], "failed", "{view}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view["runner"], "llama-cpp-python");
    assert_eq!(view["backend"], "cpu");
    let log = view["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        log.contains("Starting the model server") && log.contains("fake server pid"),
        "{log}"
    );

    // Requests naming it reach it; the others still reach the upstream.
    let mut ask = chat("hi");
    ask["model"] = json!("tiny");
    let answer: Value = gw.post_json("/v1/chat/completions", &gw.alice, &ask).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "fake answer");
    let system: Value = gw.get_json("/admin/system", &gw.admin).await;
    let servers = system["model_servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{system}");
    assert_eq!(servers[0]["model"], "tiny");
    assert!(servers[0]["pid"].as_u64().is_some(), "{system}");

    let stopped: Value = gw
        .post_json("/admin/models/tiny/unload", &gw.admin, &json!({}))
        .await;
    assert_eq!(stopped["state"], "stopped");
    let system: Value = gw.get_json("/admin/system", &gw.admin).await;
    assert_eq!(system["model_servers"], json!([]));
}

#[tokio::test]
async fn an_expired_key_is_refused_and_says_so() {
    let gw = Gateway::start().await;
    let secret = llmgate_core::auth::Secret::generate();
    let mut record =
        llmgate_core::auth::KeyRecord::new("temp", llmgate_core::auth::Role::User, &secret);
    record.expires_at = Some(llmgate_core::auth::now_millis() - chrono::Duration::seconds(1));
    llmgate_core::storage::KeyStore::insert_key(gw.store.as_ref(), &record, &secret.hash())
        .await
        .unwrap();
    let response = gw
        .post("/v1/chat/completions", &secret, &chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body = openai_error(response).await;
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
}

/// The usage a key has recorded, once `n` requests are in: (prompt, completion) tokens
/// and the requests without usage.
async fn recorded_tokens(gw: &Gateway, n: u64) -> (Value, Value, Value) {
    let usage = gw.wait_for_requests(&gw.alice_id, n).await;
    (
        usage["prompt_tokens"].clone(),
        usage["completion_tokens"].clone(),
        usage["requests_without_usage"].clone(),
    )
}

#[tokio::test]
async fn a_streamed_responses_api_answer_is_charged_and_reaches_both_ends_unchanged() {
    let gw = Gateway::start().await;
    let raw = r#"{"model": "gpt-4.1", "input": "tell me a story", "stream": true}"#;
    let response = gw
        .http
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(gw.alice.expose())
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    let seen = read_stream(response).await;
    let input_tokens = mock_prompt_tokens(&json!({"input": "tell me a story"}));
    assert_eq!(
        seen,
        llmgate_core::test_util::responses_events("gpt-4.1", &REPLY, input_tokens).concat()
    );
    let asked = gw.upstream.seen().pop().unwrap();
    assert_eq!(asked.body, raw.as_bytes(), "nothing added to the request");
    assert_eq!(
        recorded_tokens(&gw, 1).await,
        (json!(input_tokens), json!(REPLY.len()), json!(0))
    );
    let rows = gw.requests_of(&gw.alice_id).await;
    assert_eq!(rows[0]["model"], "gpt-4.1");
    assert_eq!(rows[0]["path"], "/v1/responses");

    // The same answer as JSON is charged the same.
    let answer: Value = gw
        .post_json(
            "/v1/responses",
            &gw.alice,
            &json!({"model": "gpt-4.1", "input": "tell me a story"}),
        )
        .await;
    assert_eq!(answer["usage"]["output_tokens"], REPLY.len());
    assert_eq!(
        recorded_tokens(&gw, 2).await,
        (json!(2 * input_tokens), json!(2 * REPLY.len()), json!(0))
    );
}

#[tokio::test]
async fn transcriptions_are_charged_their_tokens_as_json_and_streamed() {
    let gw = Gateway::start().await;
    let form = |stream: bool| {
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\0\0\0WAVE\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n".to_vec();
        if stream {
            body.extend_from_slice(
                b"--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n",
            );
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body
    };
    let mut sent = Vec::new();
    for stream in [false, true] {
        let body = form(stream);
        let response = gw
            .http
            .post(format!("{}/v1/audio/transcriptions", gw.url))
            .bearer_auth(gw.alice.expose())
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
        assert!(text.contains(llmgate_core::test_util::TRANSCRIPT), "{text}");
        sent.push(body);
    }
    let seen: Vec<_> = gw
        .upstream
        .seen()
        .into_iter()
        .map(|s| s.body.to_vec())
        .collect();
    assert_eq!(seen, sent, "the forms reach the upstream as sent");
    let (input, output) = llmgate_core::test_util::TRANSCRIPTION_TOKENS;
    assert_eq!(
        recorded_tokens(&gw, 2).await,
        (json!(2 * input), json!(2 * output), json!(0))
    );
    // The model is read from the form's field (the answers do not name one).
    let rows = gw.store.requests(&gw.alice_id, None, 10).await.unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row.model.as_deref(), Some("gpt-4o-transcribe"), "{row:?}");
    }
}

#[tokio::test]
async fn the_client_gets_the_upstreams_stream_byte_for_byte_less_the_usage_it_did_not_ask_for() {
    let gw = Gateway::start().await;
    // Spaced separators, escapes and exponent floats, as some servers write them.
    let content = "data: {\"id\": \"c1\", \"object\": \"chat.completion.chunk\", \"model\": \"mock-model\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"caf\\u00e9\"}, \"logprobs\": {\"content\": [{\"token\": \"caf\\u00e9\", \"logprob\": -1.9361265e-07, \"top_logprobs\": []}]}, \"finish_reason\": null}], \"usage\": null}\n\n";
    let usage = "data: {\"id\": \"c1\", \"object\": \"chat.completion.chunk\", \"model\": \"mock-model\", \"choices\": [], \"usage\": {\"prompt_tokens\": 6, \"completion_tokens\": 1, \"total_tokens\": 7}}\n\n";
    let frames = [content, usage, "data: [DONE]\n\n"].concat();
    // Frames cut mid-event, as a network delivers them.
    let (a, b) = frames.split_at(37);
    let (b, c) = b.split_at(300);
    gw.upstream.serve_chat_stream(
        [a, b, c]
            .iter()
            .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
            .collect(),
    );
    let raw = r#"{ "model": "mock-model", "stream": true, "messages": [{"role": "user", "content": "caf\u00e9"}], "temperature": 1e-07 }"#;
    let response = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(gw.alice.expose())
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    let seen = read_stream(response).await;
    assert_eq!(
        seen,
        format!(
            "{}data: [DONE]\n\n",
            content.replace(", \"usage\": null}", "}")
        )
    );
    let asked = gw.upstream.seen().pop().unwrap();
    assert_eq!(
        String::from_utf8(asked.body.to_vec()).unwrap(),
        format!(
            "{{\"stream_options\":{{\"include_usage\":true}},{}",
            &raw[1..]
        ),
        "the upstream gets the client's bytes plus the one option"
    );
    assert_eq!(
        recorded_tokens(&gw, 1).await,
        (json!(6), json!(1), json!(0))
    );
}

#[tokio::test]
async fn an_answer_still_read_after_its_client_left_is_recorded_at_shutdown() {
    let mut gw = Gateway::start().await;
    // The JSON answer's second half would come in 30 s.
    gw.upstream.set_chunk_delay(Duration::from_secs(30));
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat("slow answer"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(response); // the client leaves; the gateway reads on, for the usage
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    gw.stop().await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the stop waited {:?}",
        asked.elapsed()
    );
    let totals = gw.store.totals_for_key(&gw.alice_id).await.unwrap();
    assert_eq!(totals.requests, 1, "the request is recorded: {totals:?}");
    assert_eq!(
        totals.requests_without_usage, 1,
        "cut short: tokens unknown"
    );
}
