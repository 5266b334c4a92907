//! The `custom_storage` example's backend passes llmgate's storage contract, and counts
//! what goes through the layer by day.

#[path = "../src/bin/custom_storage.rs"]
#[allow(dead_code)]
mod custom_storage;

use custom_storage::{send, store_with_demo_key, DailyStore};
use llmgate_core::storage::{contract, UsageStore};
use llmgate_core::usage::UsageRecorder;

#[tokio::test]
async fn the_daily_store_keeps_the_storage_contract() {
    contract::run_all(|| async { DailyStore::default() }).await;
}

#[tokio::test]
async fn requests_through_the_layer_are_counted_per_key_and_day() {
    let (store, key, secret) = store_with_demo_key().await.unwrap();
    let (recorder, _writer) = UsageRecorder::start(store.clone());
    assert_eq!(send(&store, &recorder, Some(&secret)).await, 200);
    assert_eq!(send(&store, &recorder, Some(&secret)).await, 200);
    assert_eq!(send(&store, &recorder, None).await, 401);
    recorder.flush().await;

    let daily = store.daily(&key.id);
    let today = chrono::Utc::now().date_naive();
    assert_eq!(daily.len(), 1, "{daily:?}");
    let day = daily
        .range(today.pred_opt().unwrap()..=today)
        .next()
        .expect("today's (or, just after midnight, yesterday's) usage")
        .1;
    assert_eq!((day.requests, day.total_tokens()), (2, 14));
    // The model the requests named.
    let echo = &day.models["echo"];
    assert_eq!((echo.requests, echo.total_tokens()), (2, 14));
    assert_eq!(store.totals_for_key(&key.id).await.unwrap(), *day);
}
