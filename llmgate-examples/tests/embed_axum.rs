//! Starts the `embed_axum` example as a user would and talks to it over HTTP.

use serde_json::Value;

mod common;

use common::Example;

#[tokio::test]
async fn the_axum_server_answers_a_key_refuses_none_and_keeps_usage_to_admins() {
    let mut example = Example::start(env!("CARGO_BIN_EXE_embed_axum"));
    let key = example.printed("demo key: ").await;
    let admin_key = example.printed("admin key: ").await;
    let url = example.printed("listening on ").await;

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
