//! Many models behind one gateway, with stand-in model servers (real processes: the
//! `fake-llama-server` binary, run as `llama-server`): routing by name and alias, loads
//! on demand shared by concurrent requests, eviction by memory, idle unload, the queue
//! bound, and the admin API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llmgate_core::config::{ModelConfig, RunnerKind};
use llmgate_tests::{openai_error, Gateway, Options};
use serde_json::{json, Value};

fn fake_server() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-llama-server"))
}

/// A "model file" of `mib` MiB (sparse: it takes no disk), which the loader counts by
/// its size as it has no GGUF header.
fn model_file(dir: &Path, name: &str, mib: u64) -> String {
    let path = dir.join(format!("{name}.gguf"));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(mib << 20).unwrap();
    path.to_string_lossy().into_owned()
}

/// A local model served by the stand-in, loading in `load_ms`, answering in `delay_ms`.
fn local(dir: &Path, name: &str, mib: u64, load_ms: u64, delay_ms: u64) -> ModelConfig {
    ModelConfig {
        runner: Some(RunnerKind::LlamaServer),
        args: vec![
            "--fake-load-ms".into(),
            load_ms.to_string(),
            "--fake-delay-ms".into(),
            delay_ms.to_string(),
        ],
        ..ModelConfig::local(name, model_file(dir, name, mib))
    }
}

async fn start(dir: &Path, models: Vec<ModelConfig>, limit_mb: Option<u64>) -> Gateway {
    let _ = dir;
    Gateway::start_with(Options {
        models,
        memory_limit_mb: limit_mb,
        llama_server: Some(fake_server()),
        ..Options::default()
    })
    .await
}

fn chat_with(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// Sends a chat to `model`: (status, answer text or error body).
async fn ask(gw: &Gateway, model: &str) -> (u16, Value) {
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat_with(model))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer: {answer}"))
}

/// The server's pid in an answer.
fn pid(answer: &Value) -> u32 {
    content(answer)
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid: {answer}"))
}

async fn view(gw: &Gateway, name: &str) -> Value {
    gw.get_json(&format!("/admin/models/{name}"), &gw.admin)
        .await
}

async fn wait_for_state(gw: &Gateway, name: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = view(gw, name).await;
        if v["state"] == state {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test]
async fn requests_go_to_the_model_they_name_by_name_or_alias_and_unknown_names_get_404() {
    let dir = tempfile::tempdir().unwrap();
    let mut chat = local(dir.path(), "chat", 1, 0, 0);
    chat.aliases = vec!["gpt-4o-mini".into()];
    let coder = local(dir.path(), "coder", 1, 0, 0);
    let gw = start(dir.path(), vec![chat, coder], None).await;

    let (status, by_name) = ask(&gw, "chat").await;
    assert_eq!(status, 200, "{by_name}");
    assert!(content(&by_name).starts_with("chat pid"), "{by_name}");
    let (_, by_alias) = ask(&gw, "gpt-4o-mini").await;
    assert_eq!(
        pid(&by_alias),
        pid(&by_name),
        "an alias reaches the same server"
    );
    let (_, coder) = ask(&gw, "coder").await;
    assert!(content(&coder).starts_with("coder pid"), "{coder}");
    assert_ne!(pid(&coder), pid(&by_name));

    let unknown = gw
        .post("/v1/chat/completions", &gw.alice, &chat_with("gpt-5"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error = openai_error(unknown).await;
    assert_eq!(error["error"]["code"], "model_not_found", "{error}");
    assert_eq!(error["error"]["param"], "model");

    // The list comes from the gateway, loaded or not; the mock upstream is a model too.
    let list: Value = gw.get_json("/v1/models", &gw.alice).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "coder", "upstream"], "{list}");
    assert_eq!(list["object"], "list");
    let one: Value = gw.get_json("/v1/models/coder", &gw.alice).await;
    assert_eq!(one["id"], "coder");
    let missing = gw.get("/v1/models/nope", &gw.alice).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // Usage goes under the model's name, also when the client used an alias.
    gw.wait_for_requests(&gw.alice_id, 7).await;
    let rows: Value = gw
        .get_json(
            &format!("/admin/usage/{}/requests?limit=20", gw.alice_id),
            &gw.admin,
        )
        .await;
    let models: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions" && r["status"] == 200)
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert_eq!(models.iter().filter(|m| **m == "chat").count(), 2, "{rows}");
    assert_eq!(
        models.iter().filter(|m| **m == "coder").count(),
        1,
        "{rows}"
    );
}

#[tokio::test]
async fn concurrent_requests_for_a_stopped_model_share_one_load_and_none_fails() {
    let dir = tempfile::tempdir().unwrap();
    let models = vec![
        local(dir.path(), "a", 1, 700, 0),
        local(dir.path(), "b", 1, 700, 0),
    ];
    let gw = start(dir.path(), models, None).await;
    assert_eq!(view(&gw, "a").await["state"], "stopped");

    let asks = (0..6).map(|i| ask(&gw, if i % 2 == 0 { "a" } else { "b" }));
    let answers = futures_util::future::join_all(asks).await;
    let mut pids = std::collections::HashMap::new();
    for (i, (status, answer)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {answer}");
        pids.entry(i % 2).or_insert_with(Vec::new).push(pid(answer));
    }
    for (model, seen) in &pids {
        assert!(
            seen.iter().all(|p| *p == seen[0]),
            "model {model}: one server for all its requests: {seen:?}"
        );
    }
    assert_ne!(pids[&0][0], pids[&1][0], "two models, two servers");
    assert_eq!(view(&gw, "a").await["state"], "ready");
    assert_eq!(view(&gw, "b").await["state"], "ready");
}

#[tokio::test]
async fn under_a_tight_budget_the_least_recently_used_idle_model_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two of the three 40 MiB models.
    let models = vec![
        local(dir.path(), "a", 40, 0, 0),
        local(dir.path(), "b", 40, 0, 0),
        local(dir.path(), "c", 40, 0, 0),
    ];
    let gw = start(dir.path(), models, Some(100)).await;
    let (_, a) = ask(&gw, "a").await;
    let (_, b) = ask(&gw, "b").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_, again) = ask(&gw, "a").await; // b is now the least recently used
    assert_eq!(pid(&again), pid(&a));
    let (status, c) = ask(&gw, "c").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(view(&gw, "b").await["state"], "stopped", "b made room");
    assert_eq!(view(&gw, "a").await["state"], "ready");
    assert_eq!(view(&gw, "c").await["state"], "ready");
    assert!(!process_alive(pid(&b)), "b's server is gone");
    assert!(process_alive(pid(&a)));
    let listed: Value = gw.get_json("/admin/models", &gw.admin).await;
    assert_eq!(listed["memory"]["limit_bytes"], 100u64 << 20);
    let held = listed["memory"]["models_bytes"].as_u64().unwrap();
    assert_eq!(held, 80 << 20, "{listed}");
}

#[tokio::test]
async fn max_loaded_models_caps_how_many_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let models = vec![
        local(dir.path(), "a", 1, 0, 0),
        local(dir.path(), "b", 1, 0, 0),
    ];
    let gw = Gateway::start_with(Options {
        models,
        max_loaded_models: Some(1),
        llama_server: Some(fake_server()),
        ..Options::default()
    })
    .await;
    let (_, a) = ask(&gw, "a").await;
    let (status, b) = ask(&gw, "b").await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(view(&gw, "a").await["state"], "stopped", "a made room");
    assert!(!process_alive(pid(&a)));
    assert_eq!(view(&gw, "b").await["state"], "ready");
}

#[tokio::test]
async fn a_model_serving_a_request_is_not_stopped_and_the_refusal_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // Room for one; `slow` answers in 1.5 s.
    let models = vec![
        local(dir.path(), "slow", 60, 0, 1500),
        local(dir.path(), "other", 60, 0, 0),
    ];
    let gw = start(dir.path(), models, Some(100)).await;
    let (status, _) = ask(&gw, "slow").await; // loaded
    assert_eq!(status, 200);
    let in_flight = ask(&gw, "slow");
    let refused = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.post("/v1/chat/completions", &gw.alice, &chat_with("other"))
            .send()
            .await
            .unwrap()
    };
    let ((status, answer), refused) = tokio::join!(in_flight, refused);
    assert_eq!(status, 200, "the request in flight finished: {answer}");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let error = openai_error(refused).await;
    assert_eq!(error["error"]["code"], "insufficient_memory");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("slow") && message.contains("in use"),
        "{message}"
    );

    // Once idle, it makes room.
    let (status, other) = ask(&gw, "other").await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(view(&gw, "slow").await["state"], "stopped");
}

#[tokio::test]
async fn an_idle_model_stops_after_its_ttl_and_loads_again_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = local(dir.path(), "brief", 1, 0, 0);
    model.ttl_secs = 1;
    let gw = start(dir.path(), vec![model], None).await;
    let (_, first) = ask(&gw, "brief").await;
    assert!(process_alive(pid(&first)));
    wait_for_state(&gw, "brief", "stopped").await;
    assert!(!process_alive(pid(&first)), "its server stopped");
    let (status, second) = ask(&gw, "brief").await;
    assert_eq!(status, 200);
    assert_ne!(pid(&second), pid(&first), "a new server");
}

#[tokio::test]
async fn beyond_max_concurrency_requests_wait_in_a_bounded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = local(dir.path(), "one", 1, 0, 600);
    model.max_concurrency = Some(1);
    model.max_queue = 2;
    let gw = start(dir.path(), vec![model], None).await;
    let (status, _) = ask(&gw, "one").await;
    assert_eq!(status, 200);

    let sends = (0..5).map(|_| {
        gw.post("/v1/chat/completions", &gw.alice, &chat_with("one"))
            .send()
    });
    let responses = futures_util::future::join_all(sends).await;
    let mut served = Vec::new();
    let mut refused = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => served.push(response.json::<Value>().await.unwrap()),
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                let error = openai_error(response).await;
                assert_eq!(error["error"]["code"], "model_overloaded", "{error}");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(served.len(), 3, "one at a time plus two waiting");
    assert_eq!(refused, 2);
    for answer in &served {
        assert!(
            content(answer).ends_with("most 1"),
            "the server never had two at once: {answer}"
        );
    }
}

#[tokio::test]
async fn admins_add_change_load_unload_and_remove_models_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), vec![], None).await;
    let file = model_file(dir.path(), "late", 1);
    let added = gw
        .post(
            "/admin/models",
            &gw.admin,
            &json!({"name": "late", "source": file, "runner": "llama-server", "aliases": ["l"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let added: Value = added.json().await.unwrap();
    assert_eq!(added["state"], "stopped");
    assert_eq!(added["origin"], "admin");
    let taken = gw
        .post(
            "/admin/models",
            &gw.admin,
            &json!({"name": "other", "upstream": "http://127.0.0.1:9", "aliases": ["l"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), 409, "an alias is one model's");
    let bad = gw
        .post("/admin/models", &gw.admin, &json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(openai_error(bad).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("source"));
    let huge = gw
        .post(
            "/admin/models",
            &gw.admin,
            &json!({"name": "huge", "upstream": "http://127.0.0.1:9", "args": ["x".repeat(70_000)]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        huge.status(),
        400,
        "settings too large to keep are the admin's to fix"
    );
    assert!(openai_error(huge).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most"));
    let user = gw
        .post(
            "/admin/models",
            &gw.alice,
            &json!({"name": "y", "upstream": "http://127.0.0.1:9"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 403);

    let loading = gw
        .post("/admin/models/late/load", &gw.admin, &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(loading.status(), 202);
    let ready = wait_for_state(&gw, "late", "ready").await;
    assert!(ready["pid"].as_u64().is_some(), "{ready}");
    let (status, answer) = ask(&gw, "l").await;
    assert_eq!(status, 200, "{answer}");

    let changed = gw
        .http
        .patch(format!("{}/admin/models/late", gw.url))
        .bearer_auth(gw.admin.expose())
        .json(&json!({"ttl_secs": 600, "max_concurrency": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let changed: Value = changed.json().await.unwrap();
    assert_eq!(changed["ttl_secs"], 600);
    assert_eq!(changed["max_concurrency"], 2);
    assert_eq!(changed["aliases"], json!(["l"]), "other settings stay");
    // Stopped in the background: SIGTERM, then reaped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_alive(pid(&answer)) {
        assert!(std::time::Instant::now() < deadline, "the old server stops");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (_, again) = ask(&gw, "late").await;
    let unloaded: Value = gw
        .post_json("/admin/models/late/unload", &gw.admin, &json!({}))
        .await;
    assert_eq!(unloaded["state"], "stopped");
    assert!(!process_alive(pid(&again)));

    let deleted = gw
        .http
        .delete(format!("{}/admin/models/late", gw.url))
        .bearer_auth(gw.admin.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let gone = gw
        .get("/admin/models/late", &gw.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let listed: Value = gw.get_json("/admin/models", &gw.admin).await;
    assert_eq!(listed["models"].as_array().unwrap().len(), 1, "{listed}");
}

#[tokio::test]
async fn a_model_that_fails_to_load_answers_503_with_why_and_the_next_request_tries_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut broken = local(dir.path(), "broken", 1, 0, 0);
    let file = broken.source.clone().unwrap();
    std::fs::remove_file(&file).unwrap();
    broken.source = Some(file.clone());
    let gw = start(dir.path(), vec![broken], None).await;
    let response = gw
        .post("/v1/chat/completions", &gw.alice, &chat_with("broken"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let error = openai_error(response).await;
    assert_eq!(error["error"]["code"], "model_load_failed", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("does not exist"), "{message}");
    assert_eq!(view(&gw, "broken").await["state"], "failed");

    // Mended, the next request loads it.
    std::fs::File::create(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (status, answer) = ask(&gw, "broken").await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn models_added_changed_and_removed_at_run_time_survive_a_restart() {
    use llmgate_core::config::GatewayConfig;
    use llmgate_core::storage::SqliteStore;
    use llmgate_server::models::{Progress, Put, Registry};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("llmgate.db");
    let config = GatewayConfig {
        models: vec![
            ModelConfig::remote("from-file", "http://127.0.0.1:9"),
            ModelConfig::remote("kept", "http://127.0.0.1:9"),
        ],
        data_dir: dir.path().to_owned(),
        ..GatewayConfig::default()
    };
    {
        let store = Arc::new(SqliteStore::open(&db).await.unwrap());
        let registry = Registry::new(config.clone(), Progress::ConsoleOnly);
        registry.restore(store.clone()).await.unwrap();
        registry
            .put(
                ModelConfig::remote("added", "http://127.0.0.1:10"),
                Put::New,
            )
            .await
            .unwrap();
        let mut changed = registry.config_of("kept").unwrap();
        changed.ttl_secs = 60;
        changed.aliases = vec!["k".into()];
        registry.put(changed, Put::Replace).await.unwrap();
        registry.remove("from-file").await.unwrap();
        assert_eq!(registry.names(), ["kept", "added"]);
    }
    // A restart: the same file config, the same database.
    let store = Arc::new(SqliteStore::open(&db).await.unwrap());
    let registry = Registry::new(config, Progress::ConsoleOnly);
    registry.restore(store).await.unwrap();
    let mut names = registry.names();
    names.sort();
    assert_eq!(
        names,
        ["added", "kept"],
        "the removal and the addition stay"
    );
    let kept = registry.config_of("kept").unwrap();
    assert_eq!(kept.ttl_secs, 60);
    assert_eq!(registry.route(Some("k")).unwrap().name(), "kept");
    assert_eq!(
        registry.config_of("added").unwrap().upstream.as_deref(),
        Some("http://127.0.0.1:10")
    );
}

#[tokio::test]
async fn a_change_made_on_one_replica_reaches_another_sharing_the_database() {
    use llmgate_core::config::GatewayConfig;
    use llmgate_core::storage::SqliteStore;
    use llmgate_server::models::{Progress, Put, Registry};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("llmgate.db");
    let config = GatewayConfig {
        models: vec![ModelConfig::remote("shared", "http://127.0.0.1:9")],
        data_dir: dir.path().to_owned(),
        ..GatewayConfig::default()
    };
    let one = Registry::new(config.clone(), Progress::ConsoleOnly);
    one.restore(Arc::new(SqliteStore::open(&db).await.unwrap()))
        .await
        .unwrap();
    let two = Registry::new(config, Progress::ConsoleOnly);
    two.restore(Arc::new(SqliteStore::open(&db).await.unwrap()))
        .await
        .unwrap();

    one.put(ModelConfig::remote("new", "http://127.0.0.1:10"), Put::New)
        .await
        .unwrap();
    one.remove("shared").await.unwrap();
    assert_eq!(two.names(), ["shared"], "not yet");
    two.sync().await;
    assert_eq!(two.names(), ["new"]);
    // Applied once: a second look changes nothing, and a change back on two reaches one.
    two.sync().await;
    assert_eq!(two.names(), ["new"]);
    let mut changed = two.config_of("new").unwrap();
    changed.ttl_secs = 30;
    two.put(changed, Put::Replace).await.unwrap();
    one.sync().await;
    assert_eq!(one.config_of("new").unwrap().ttl_secs, 30);
}

#[tokio::test]
async fn new_settings_for_a_busy_model_keep_its_waiting_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = local(dir.path(), "busy", 1, 0, 700);
    model.max_concurrency = Some(1);
    let gw = start(dir.path(), vec![model], None).await;
    let (status, _) = ask(&gw, "busy").await;
    assert_eq!(status, 200);
    let asks = futures_util::future::join_all((0..3).map(|_| ask(&gw, "busy")));
    let change = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let changed = gw
            .http
            .patch(format!("{}/admin/models/busy", gw.url))
            .bearer_auth(gw.admin.expose())
            .json(&json!({"ttl_secs": 600}))
            .send()
            .await
            .unwrap();
        assert_eq!(changed.status(), 200);
    };
    let (answers, ()) = tokio::join!(asks, change);
    for (status, answer) in answers {
        assert_eq!(
            status, 200,
            "a waiting request is served under the new settings: {answer}"
        );
    }
    assert_eq!(view(&gw, "busy").await["ttl_secs"], 600);
}
