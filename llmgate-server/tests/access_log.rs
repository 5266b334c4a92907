//! The access log of the built `llmgate`: one line per request naming the caller's key
//! id, and never a key.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmgate_core::test_util::MockUpstream;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Waits up to 10 s for a line of `log` that contains every one of `parts`.
async fn line_with(log: &Mutex<Vec<String>>, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .find(|line| parts.iter().all(|part| line.contains(part)))
            .cloned();
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} in:\n{}",
            log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_request_is_logged_with_its_key_id_and_no_key_reaches_the_log() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(common::BIN);
    command
        .args(["serve", "--upstream", &upstream.url])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("LLMGATE_LOG", "info,llmgate::access=trace")
        .env("LLMGATE_ADMIN_KEY", common::ADMIN)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped());
    let mut started = common::start(command, Duration::from_secs(30)).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut lines = BufReader::new(started.child.stderr.take().unwrap()).lines();
    let collected = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            collected.lock().unwrap().push(line);
        }
    });

    let alice = common::create_key(&started.url, "alice").await;
    let http = reqwest::Client::new();
    let chat = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("{}/v1/chat/completions", started.url);
    let answered = http
        .post(&url)
        .bearer_auth(&alice.secret)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    answered.bytes().await.unwrap();
    let refused = http
        .post(&url)
        .header("x-api-key", "sk-lg-notakey")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // The model call: method, path, status and the caller's key id on one line (at
    // DEBUG: the usage records have every model call).
    let line = line_with(
        &log,
        &["llmgate::access", "/v1/chat/completions", "status=200"],
    )
    .await;
    assert!(line.contains("DEBUG"), "{line}");
    assert!(line.contains("POST"), "{line}");
    assert!(line.contains(&alice.id), "the key id is named: {line}");
    assert!(line.contains("latency="), "{line}");
    // The refused call is logged too, with no key id to name.
    let line = line_with(&log, &["llmgate::access", "status=401"]).await;
    assert!(!line.contains("key_id"), "{line}");
    // An admin route, at INFO, names the admin's key id.
    let line = line_with(&log, &["llmgate::access", "/admin/keys", "status=201"]).await;
    assert!(line.contains("INFO") && line.contains("key_id="), "{line}");
    // At TRACE the headers are logged, the key headers redacted.
    let headers = line_with(&log, &["llmgate::access", "x-api-key"]).await;
    assert!(headers.contains("Sensitive"), "{headers}");

    common::terminate(&mut started.child, Duration::from_secs(10)).await;
    let log = log.lock().unwrap().join("\n");
    for secret in [alice.secret.as_str(), common::ADMIN, "sk-lg-notakey"] {
        assert!(!log.contains(secret), "a key in the log:\n{log}");
    }
}
