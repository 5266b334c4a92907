//! Starts the `embed_hyper` example as a user would and talks to it over HTTP.

use serde_json::Value;

mod common;

use common::Example;

#[tokio::test]
async fn the_hyper_server_answers_a_key_refuses_none_and_counts_usage() {
    let mut example = Example::start(env!("CARGO_BIN_EXE_embed_hyper"));
    let key = example.printed("demo key: ").await;
    let url = example.printed("listening on ").await;

    let client = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let refused = client
        .post(&chat)
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

    let report: Value = client
        .get(format!("{url}/usage"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report[0]["name"], "demo", "{report}");
    assert_eq!(report[0]["requests"], 1, "{report}");
    assert_eq!(report[0]["total_tokens"], answer["usage"]["total_tokens"]);
}
