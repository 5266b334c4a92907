//! The gateway served as `llmgate serve` serves it, on its own event loops
//! (`http::serve_on_loops`): answers, streams and usage over many connections, and a
//! graceful stop that lets a stream in flight finish.

use std::time::Duration;

use llmgate_core::storage::{SqliteStore, UsageStore as _};
use llmgate_core::test_util::{mock_prompt_tokens, Answer, REPLY};
use llmgate_tests::{Gateway, Options};
use serde_json::{json, Value};

fn chat(content: &str, answer: Answer) -> Value {
    json!({"model": "mock-model", "stream": answer == Answer::Streamed,
           "messages": [{"role": "user", "content": content}]})
}

/// This process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test]
async fn the_serving_loops_answer_stream_meter_and_stop_gracefully() {
    let mut gw = Gateway::start_with(Options {
        loops: Some(2),
        ..Options::default()
    })
    .await;

    // A JSON answer and a stream, each whole.
    let answer: Value = gw
        .post_json(
            "/v1/chat/completions",
            &gw.alice,
            &chat("hello", Answer::Whole),
        )
        .await;
    assert_eq!(answer["usage"]["completion_tokens"], REPLY.len());
    // A thread takes its name when it first runs: one that has served nothing yet may
    // not have run on a loaded machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads_named("llmgate-serve-") < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(threads_named("llmgate-serve-"), 2, "one thread per loop");
    let streamed = gw
        .post(
            "/v1/chat/completions",
            &gw.alice,
            &chat("hello", Answer::Streamed),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let streamed = streamed.text().await.unwrap();
    assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
    assert!(!streamed.contains("usage"), "the client did not ask for it");

    // Eight clients, each on its own connection (spread over the loops), 3 calls each.
    let clients = (0..8).map(|_| {
        let (url, alice) = (gw.url.clone(), gw.alice.clone());
        async move {
            let http = reqwest::Client::new();
            for i in 0..3 {
                let response = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(alice.expose())
                    .json(&chat(
                        "hello",
                        if i % 2 == 1 {
                            Answer::Streamed
                        } else {
                            Answer::Whole
                        },
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
            }
        }
    });
    futures_util::future::join_all(clients).await;

    // The router's routes are served there too: refusals and the admin API.
    let refused = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat("hello", Answer::Whole))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let usage = gw.wait_for_requests(&gw.alice_id, 26).await;
    assert_eq!(usage["completion_tokens"], 26 * REPLY.len() as u64);
    assert_eq!(
        usage["prompt_tokens"],
        26 * mock_prompt_tokens(&chat("hello", Answer::Whole))
    );
    assert_eq!(usage["requests_without_usage"], 0);

    // A slow stream is in flight when the stop comes: it still arrives whole.
    gw.upstream.set_chunk_delay(Duration::from_millis(150));
    let slow = gw
        .post(
            "/v1/chat/completions",
            &gw.alice,
            &chat("slowly", Answer::Streamed),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let url = gw.url.clone();
    let (slow, ()) = tokio::join!(
        async { slow.text().await.expect("the stream is not cut off") },
        gw.shut_down()
    );
    assert!(slow.ends_with("data: [DONE]\n\n"), "{slow}");
    assert!(
        reqwest::get(format!("{url}/healthz")).await.is_err(),
        "no new connection once stopped"
    );

    // Everything answered is recorded, the stream stopped in flight included.
    let reopened = SqliteStore::open(&gw.db_path).await.unwrap();
    let totals = reopened.totals_for_key(&gw.alice_id).await.unwrap();
    assert_eq!(totals.requests, 27);
    assert_eq!(totals.completion_tokens, 27 * REPLY.len() as u64);
    assert_eq!(totals.requests_without_usage, 0);
}
