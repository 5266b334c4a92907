//! Starts the `embed_axum` example as a user would and talks to it over HTTP.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn the_axum_server_answers_a_key_refuses_none_and_keeps_usage_to_admins() {
    let mut example = Command::new(env!("CARGO_BIN_EXE_embed_axum"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(example.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the example prints within 30 s")
            .unwrap()
            .expect("a line")
    };
    let key = next_line().await;
    let key = key.strip_prefix("demo key: ").expect(&key).to_owned();
    let admin_key = next_line().await;
    let admin_key = admin_key
        .strip_prefix("admin key: ")
        .expect(&admin_key)
        .to_owned();
    let url = next_line().await;
    let url = url.strip_prefix("listening on ").expect(&url).to_owned();

    let client = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let refused = client
        .post(&chat)
        .header("content-type", "application/json")
        .body(r#"{"model":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refusal: Value = refused.json().await.unwrap();
    assert_eq!(refusal["error"]["code"], "invalid_api_key", "{refusal}");

    let answered = client
        .post(&chat)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"model":"echo","messages":[{"role":"user","content":"hi there"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let answer: Value = answered.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello, demo!");

    let usage = format!("{url}/usage");
    let forbidden = client.get(&usage).bearer_auth(&key).send().await.unwrap();
    assert_eq!(forbidden.status(), 403);
    let refusal: Value = forbidden.json().await.unwrap();
    assert!(refusal["error"]["message"].is_string(), "{refusal}");
    let unauthenticated = client.get(&usage).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let report = client
        .get(&usage)
        .bearer_auth(&admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);
    let report: Value = report.json().await.unwrap();
    let demo = report
        .as_array()
        .expect("a list of keys")
        .iter()
        .find(|entry| entry["name"] == "demo")
        .unwrap_or_else(|| panic!("the demo key in {report}"));
    assert_eq!(demo["requests"], 1, "{report}");
    assert_eq!(demo["total_tokens"], answer["usage"]["total_tokens"]);
}
