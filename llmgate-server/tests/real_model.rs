//! `llmgate up` with the real llama-cpp-python server and real models: the default
//! (instruction-tuned) model answering a question, and Gemma 3 270M driven by the
//! official `openai` Python package.
//!
//! Slow the first time on a machine: llmgate builds llama-cpp-python (cached in
//! `~/.cache/llmgate/wheels`) and this test creates a Python environment with `openai`
//! (`~/.cache/llmgate/test-python`). Later runs reuse both and take about a minute.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use llmgate_core::config::default_cache_dir;
use serde_json::Value;
use tokio::process::Command;

mod common;

use common::{key_after, start, BIN};

/// One real model at a time: the tests share the model server's environment (the SDK
/// test checks that no process of it is left when its gateway stops), and two models
/// loading at once on a small machine would only slow both.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `llmgate up` with `args` and the test environments, its stderr inherited; the
/// gateway, its URL and what it printed.
async fn up(data: &Path, args: &[&str]) -> common::Started {
    let mut command = Command::new(BIN);
    command
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--python-env-dir")
        .arg(default_cache_dir().join("test-envs"))
        .args(args)
        .env("LLMGATE_LOG", "warn")
        .env_remove("LLMGATE_ADMIN_KEY")
        .env_remove("LLMGATE_MODEL")
        .env_remove("LLMGATE_CHAT_FORMAT")
        .stderr(Stdio::inherit());
    let started = start(command, Duration::from_secs(60)).await;
    // The gateway answers at once; the model loads behind it. Up to 30 minutes: the very
    // first run on a machine compiles llama.cpp.
    let admin = key_after(&started.printed, "first admin key").expect("an admin key on first run");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        let list: Value = common::get_json(&format!("{}/admin/models", started.url), &admin).await;
        let state = &list["models"][0]["state"];
        assert_ne!(state, "failed", "the model failed: {list}");
        // Models that are not preloaded load on their first request.
        if state == "ready" || list["models"][0]["preload"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {list}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started
}

/// A Python with the `openai` package, created once and reused.
async fn python_with_openai() -> PathBuf {
    let dir = default_cache_dir().join("test-python");
    let python = dir.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
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
                "openai>=1.40,<3",
            ])
            .status()
            .await
            .unwrap();
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

#[tokio::test]
#[ignore = "needs Python 3 with venv and PyPI (builds llama-cpp-python, gets the model) or the Hugging Face Hub; scripts/test runs it"]
async fn the_openai_sdk_works_unchanged_against_a_real_model_and_usage_is_exact() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let python = python_with_openai().await;
    let data = tempfile::tempdir().unwrap();
    let envs = default_cache_dir().join("test-envs");
    // The base Gemma 3 270M by its name: the measurements in docs/models.md are its.
    let started = up(data.path(), &["--model", "gemma-3-270m"]).await;
    let (mut server, url) = (started.child, started.url);
    let admin = key_after(&started.printed, "first admin key").expect("an admin key on first run");
    let user =
        key_after(&started.printed, "user key named 'default'").expect("a user key on first run");

    let output = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openai_sdk_check.py"))
        .arg(format!("{url}/v1"))
        .arg(&user)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the SDK run failed: {stderr}");
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("SDK saw: {seen:#}");

    assert_eq!(
        seen["bad_key"], "AuthenticationError",
        "a bad key raises the SDK's AuthenticationError"
    );
    assert_eq!(seen["bad_key_code"], "invalid_api_key");
    assert_eq!(seen["models"].as_array().unwrap().len(), 1);
    let chat_text = seen["chat_text"].as_str().unwrap();
    assert!(
        !chat_text.trim().is_empty(),
        "the gemma chat format gives real answers"
    );
    assert_eq!(
        seen["chat_stream_text"], seen["chat_text"],
        "temperature 0: the stream says the same"
    );
    assert_eq!(
        seen["chat_stream_had_usage"], false,
        "the client did not ask for usage and gets none"
    );
    assert_eq!(seen["completion_stream_text"], seen["completion_text"]);

    // What the gateway recorded, request by request (newest first).
    let me: Value = common::get_json(&format!("{url}/v1/me/usage"), &user).await;
    let rows: Value = common::get_json(
        &format!(
            "{url}/admin/usage/{}/requests",
            me["key_id"].as_str().unwrap()
        ),
        &admin,
    )
    .await;
    let rows: Vec<&Value> = rows.as_array().unwrap().iter().rev().collect();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/v1/models",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/completions"
        ],
        "every SDK call is one request row; the refused one is not"
    );
    assert!(rows.iter().all(|r| r["status"] == 200));
    let tokens = |row: &Value| {
        (
            row["prompt_tokens"].as_u64().unwrap(),
            row["completion_tokens"].as_u64().unwrap(),
        )
    };
    let usage = |u: &Value| {
        (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        )
    };

    // Non-streamed: exactly the usage the SDK saw.
    assert_eq!(tokens(rows[1]), usage(&seen["chat_usage"]));
    assert_eq!(tokens(rows[3]), usage(&seen["completion_usage"]));
    // Streamed (llama-cpp-python sends no usage): counted with the model's tokenizer.
    let (chat_prompt, chat_completion) = tokens(rows[2]);
    let (text_prompt, text_completion) = tokens(rows[4]);
    eprintln!(
        "streamed vs non-streamed tokens: chat prompt {chat_prompt} vs {}, chat completion {chat_completion} vs {}; \
         completion prompt {text_prompt} vs {}, completion {text_completion} vs {}",
        seen["chat_usage"]["prompt_tokens"],
        seen["chat_usage"]["completion_tokens"],
        seen["completion_usage"]["prompt_tokens"],
        seen["completion_usage"]["completion_tokens"],
    );
    assert_eq!(
        chat_prompt,
        usage(&seen["chat_usage"]).0,
        "the gemma template is rebuilt exactly"
    );
    assert_eq!(text_prompt, usage(&seen["completion_usage"]).0);
    assert!(
        chat_completion.abs_diff(usage(&seen["chat_usage"]).1) <= 1,
        "{chat_completion}"
    );
    assert!(
        text_completion.abs_diff(usage(&seen["completion_usage"]).1) <= 1,
        "{text_completion}"
    );
    assert_eq!(me["requests"], 5);
    assert_eq!(me["requests_without_usage"], 0);

    // A graceful stop takes the model server with it. The server's own processes are
    // checked, by pid: other runs on the machine may use the same Python environment.
    let system = common::get_json(&format!("{url}/admin/system"), &admin).await;
    let pids: Vec<u64> = system["model_servers"]
        .as_array()
        .map(|list| list.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert!(!pids.is_empty(), "the model server is listed: {system}");
    let status = common::terminate(&mut server, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    let server_python = envs.join("llama-cpp-python-cpu/bin/python");
    for pid in pids {
        // Gone, or its pid taken by some other program since.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(server_python.to_str().unwrap()),
            "the model server (pid {pid}) outlived the gateway"
        );
    }
}

/// One chat request as `user`; the answer's JSON.
async fn chat(url: &str, user: &str, body: &Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(user)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The same request streamed: the text of its chunks.
async fn chat_streamed(url: &str, user: &str, body: &Value) -> String {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(user)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs Python 3 with venv and PyPI (builds llama-cpp-python, gets the default model); scripts/test runs it"]
async fn up_without_a_model_answers_a_question_and_counts_its_stream_exactly() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let data = tempfile::tempdir().unwrap();
    let started = up(data.path(), &[]).await;
    let (mut server, url) = (started.child, started.url);
    let admin = key_after(&started.printed, "first admin key").expect("an admin key on first run");
    let user =
        key_after(&started.printed, "user key named 'default'").expect("a user key on first run");

    let question = serde_json::json!({
        "model": "default",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 48,
    });
    let answer = chat(&url, &user, &question).await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    eprintln!("the default model says: {text:?}");
    assert!(
        text.contains("Paris"),
        "the default model answers: {text:?}"
    );

    // The same question streamed: llama-cpp-python sends no usage, so the gateway
    // counts it with the model's tokenizer and the chat format it rebuilt (ChatML).
    let streamed = chat_streamed(&url, &user, &question).await;
    assert_eq!(streamed, text, "temperature 0: the stream says the same");
    let me: Value = common::get_json(&format!("{url}/v1/me/usage"), &user).await;
    // Usage is written in the background, the stream's after it is counted.
    let mut rows = Vec::new();
    for _ in 0..100 {
        let listed: Value = common::get_json(
            &format!(
                "{url}/admin/usage/{}/requests",
                me["key_id"].as_str().unwrap()
            ),
            &admin,
        )
        .await;
        rows = listed.as_array().unwrap().clone();
        if rows.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 2, "both requests recorded: {rows:#?}");
    let (plain, stream) = (&rows[1], &rows[0]); // newest first
    eprintln!(
        "prompt + completion tokens: {} + {} non-streamed, {} + {} counted for the stream",
        plain["prompt_tokens"],
        plain["completion_tokens"],
        stream["prompt_tokens"],
        stream["completion_tokens"]
    );
    assert_eq!(
        plain["prompt_tokens"], answer["usage"]["prompt_tokens"],
        "the answer's own usage is recorded"
    );
    assert_eq!(
        stream["prompt_tokens"], answer["usage"]["prompt_tokens"],
        "the ChatML prompt is rebuilt exactly"
    );
    let completion = |row: &Value| row["completion_tokens"].as_u64().unwrap();
    assert!(
        completion(stream).abs_diff(completion(plain)) <= 1,
        "streamed completion tokens {} vs {}",
        completion(stream),
        completion(plain)
    );

    let status = common::terminate(&mut server, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
#[ignore = "needs Python 3 with venv and PyPI (builds llama-cpp-python, gets Gemma 3 270M); scripts/test runs it"]
async fn two_names_for_gemma_share_a_gateway_evict_each_other_and_usage_per_model_is_exact() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let python = python_with_openai().await;
    let data = tempfile::tempdir().unwrap();
    // Gemma 3 270M under two names: two model servers. The loader estimates about 3.5 GiB
    // for each (llama-cpp-python keeps every position's logits), so 5 GiB fits one.
    let config = data.path().join("llmgate.toml");
    std::fs::write(
        &config,
        r#"
memory_limit_mb = 5000

[[models]]
name = "gemma-a"
source = "gemma-3-270m"
n_ctx = 2048

[[models]]
name = "gemma-b"
aliases = ["b"]
source = "gemma-3-270m"
n_ctx = 2048
"#,
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let started = up(data.path(), &["--config", &config]).await;
    let (mut server, url) = (started.child, started.url);
    let admin = key_after(&started.printed, "first admin key").expect("an admin key");
    let user = key_after(&started.printed, "user key named 'default'").expect("a user key");
    // Loaded before the SDK's first call: on a new machine the first load builds
    // llama-cpp-python (minutes), and a call meanwhile is answered 503 model_loading.
    let http = reqwest::Client::new();
    let load = http
        .post(format!("{url}/admin/models/gemma-a/load"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(load.status(), 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    loop {
        let model = common::get_json(format!("{url}/admin/models/gemma-a"), &admin).await;
        assert_ne!(model["state"], "failed", "{model}");
        if model["state"] == "ready" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {model}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=600)
seen = {"models": sorted(m.id for m in client.models.list().data), "calls": []}
for model in ["gemma-a", "b", "gemma-a"]:
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "Say hello."}])
    seen["calls"].append({"model": model, "prompt": r.usage.prompt_tokens,
        "completion": r.usage.completion_tokens, "text": r.choices[0].message.content})
print(json.dumps(seen))
"#;
    let output = Command::new(&python)
        .args(["-c", script, &format!("{url}/v1"), &user])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the SDK run failed: {stderr}");
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("SDK saw: {seen:#}");
    assert_eq!(seen["models"], serde_json::json!(["gemma-a", "gemma-b"]));
    let calls = seen["calls"].as_array().unwrap();
    assert!(calls
        .iter()
        .all(|c| !c["text"].as_str().unwrap().is_empty()));

    let get = |path: &str| common::get_json(format!("{url}{path}"), &admin);
    // Each load of one stopped the other: a, then b (a out), then a (b out).
    let list = get("/admin/models").await;
    let state = |name: &str| {
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("gemma-a"), "ready", "{list}");
    assert_eq!(state("gemma-b"), "stopped", "{list}");
    let metrics = http
        .get(format!("{url}/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"llmgate_model_evictions_total{model="gemma-a"} 1"#)
            && metrics.contains(r#"llmgate_model_evictions_total{model="gemma-b"} 1"#),
        "{metrics}"
    );

    // Usage per model, exact to the token, under the model's name (not the alias).
    let expected = |model: &str| {
        calls
            .iter()
            .filter(|c| {
                let m = c["model"].as_str().unwrap();
                m == model || (model == "gemma-b" && m == "b")
            })
            .fold((0, 0, 0), |(n, p, c), call| {
                (
                    n + 1,
                    p + call["prompt"].as_u64().unwrap(),
                    c + call["completion"].as_u64().unwrap(),
                )
            })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let usage = loop {
        let all = get("/admin/usage").await;
        let mine = all
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "default")
            .cloned()
            .unwrap();
        if mine["models"]["gemma-a"]["requests"] == 2 && mine["models"]["gemma-b"]["requests"] == 1
        {
            break mine;
        }
        assert!(tokio::time::Instant::now() < deadline, "{mine}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for model in ["gemma-a", "gemma-b"] {
        let (n, p, c) = expected(model);
        let got = &usage["models"][model];
        assert_eq!(got["requests"], n, "{usage}");
        assert_eq!(got["prompt_tokens"], p, "{usage}");
        assert_eq!(got["completion_tokens"], c, "{usage}");
    }
    let status = common::terminate(&mut server, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}
