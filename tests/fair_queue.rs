//! Fair queuing at a busy model, measured through the gateway with a stand-in model
//! server (the `fake-llama-server` binary) that serves one request at a time in a fixed
//! time: a key that keeps many requests waiting does not hold up a key that sends one at
//! a time (`queue = "fair"`), as it does in arrival order (`queue = "fifo"`); and keys
//! share the model by their weights.
//!
//! Each test prints what it measured (`cargo test --test fair_queue -- --nocapture`):
//! `docs/benchmarks.md` quotes those lines.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmgate_core::auth::{KeyRecord, Role, Secret};
use llmgate_core::config::{ModelConfig, QueuePolicy, RunnerKind};
use llmgate_core::limits::KeyLimits;
use llmgate_core::storage::KeyStore;
use llmgate_tests::{add_key, Gateway, Options};
use serde_json::{json, Value};

/// How long the model takes for each request.
const SERVICE: Duration = Duration::from_millis(100);

/// Requests the busy key keeps waiting.
const KEPT_WAITING: usize = 32;

fn fake_server() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-llama-server"))
}

/// A local model on the stand-in that takes one request at a time, each in
/// [`SERVICE`], waiters served by `queue`.
fn one_at_a_time(dir: &Path, queue: QueuePolicy) -> ModelConfig {
    let path = dir.join("one.gguf");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    ModelConfig {
        runner: Some(RunnerKind::LlamaServer),
        args: vec!["--fake-delay-ms".into(), SERVICE.as_millis().to_string()],
        max_concurrency: Some(1),
        queue,
        ..ModelConfig::local("one", path.to_string_lossy())
    }
}

async fn start(dir: &Path, queue: QueuePolicy) -> Gateway {
    let gw = Gateway::start_with(Options {
        models: vec![one_at_a_time(dir, queue)],
        llama_server: Some(fake_server()),
        ..Options::default()
    })
    .await;
    // Loaded before anything is measured.
    assert_eq!(ask(&gw, &gw.alice).await, 200);
    gw
}

/// A chat for the model; its status.
async fn ask(gw: &Gateway, key: &Secret) -> u16 {
    let chat = json!({"model": "one", "messages": [{"role": "user", "content": "hi"}]});
    let response = gw
        .post("/v1/chat/completions", key, &chat)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    response.bytes().await.unwrap();
    status
}

/// `key` sends requests back to back on `clients` connections until the tasks are
/// aborted, counting those served and those refused.
fn keep_asking(gw: &Arc<Gateway>, key: &Secret, clients: usize) -> KeepAsking {
    let served = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let tasks = (0..clients)
        .map(|_| {
            let (gw, key) = (gw.clone(), key.clone());
            let (served, refused) = (served.clone(), refused.clone());
            tokio::spawn(async move {
                loop {
                    let counter = if ask(&gw, &key).await == 200 {
                        &served
                    } else {
                        &refused
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    KeepAsking {
        tasks,
        served,
        refused,
    }
}

struct KeepAsking {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    served: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl KeepAsking {
    fn served(&self) -> u64 {
        assert_eq!(
            self.refused.load(Ordering::SeqCst),
            0,
            "every request is served in turn"
        );
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for KeepAsking {
    fn drop(&mut self) {
        // Their clients leave; the requests still waiting leave the queue.
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn queued(gw: &Gateway) -> u64 {
    let view: Value = gw.get_json("/admin/models/one", &gw.admin).await;
    view["queued"].as_u64().unwrap_or_else(|| panic!("{view}"))
}

async fn wait_until_queued(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued(gw).await < n {
        assert!(Instant::now() < deadline, "never {n} waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Key A keeps [`KEPT_WAITING`] requests waiting while key B sends `asks` requests one
/// after the other: how long each of B's waited for the model (its time less the
/// model's), sorted.
async fn waits_of_one_at_a_time_behind_a_busy_key(
    queue: QueuePolicy,
    asks: usize,
) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(start(dir.path(), queue).await);
    let (bob, _) = add_key(gw.store.as_ref(), "bob", Role::User).await;
    // One being served, the rest waiting.
    let busy = keep_asking(&gw, &gw.alice, KEPT_WAITING + 1);
    wait_until_queued(&gw, KEPT_WAITING as u64).await;
    let mut waits = Vec::with_capacity(asks);
    for _ in 0..asks {
        let sent = Instant::now();
        assert_eq!(ask(&gw, &bob).await, 200);
        waits.push(sent.elapsed().saturating_sub(SERVICE));
    }
    assert!(
        queued(&gw).await >= KEPT_WAITING as u64 - 1,
        "A kept its requests waiting all along"
    );
    assert!(busy.served() > 0);
    drop(busy);
    // A's clients left: their requests leave the queue at once, instead of being
    // served to no one (32 service times).
    let deadline = Instant::now() + SERVICE * 10;
    while queued(&gw).await > 0 {
        assert!(
            Instant::now() < deadline,
            "requests whose clients left are taken out of the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waits.sort();
    waits
}

fn in_services(wait: Duration) -> f64 {
    wait.as_secs_f64() / SERVICE.as_secs_f64()
}

fn report(what: &str, waits: &[Duration]) -> f64 {
    let median = in_services(waits[waits.len() / 2]);
    let list: Vec<String> = waits
        .iter()
        .map(|w| format!("{:.2}", in_services(*w)))
        .collect();
    println!(
        "{what}: B's median wait {median:.2} service times ({} ms service, A keeping {KEPT_WAITING} waiting; each of {} requests: {})",
        SERVICE.as_millis(),
        waits.len(),
        list.join(" ")
    );
    median
}

#[tokio::test]
async fn fair_a_key_sending_one_at_a_time_waits_about_one_request_behind_a_key_keeping_32_waiting()
{
    let waits = waits_of_one_at_a_time_behind_a_busy_key(QueuePolicy::Fair, 11).await;
    let median = report("fair", &waits);
    assert!(
        median <= 1.5,
        "B waits for about the one request in service, not for A's queue: {median:.2} service times"
    );
}

#[tokio::test]
async fn fifo_a_key_sending_one_at_a_time_waits_behind_everything_a_busy_key_queued() {
    let waits = waits_of_one_at_a_time_behind_a_busy_key(QueuePolicy::Fifo, 5).await;
    let median = report("fifo", &waits);
    // About 32: every request A has waiting, then its own.
    assert!(
        (KEPT_WAITING as f64 * 0.75..=KEPT_WAITING as f64 * 1.5).contains(&median),
        "in arrival order B waits for A's whole queue: {median:.2} service times"
    );
}

/// A user key with `limits`, straight into the gateway's store.
async fn add_key_with(gw: &Gateway, name: &str, limits: KeyLimits) -> Secret {
    let secret = Secret::generate();
    let mut record = KeyRecord::new(name, Role::User, &secret);
    record.limits = limits;
    gw.store.insert_key(&record, &secret.hash()).await.unwrap();
    secret
}

#[tokio::test]
async fn keys_share_a_busy_model_by_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Arc::new(start(dir.path(), QueuePolicy::Fair).await);
    let heavy = add_key_with(
        &gw,
        "heavy",
        KeyLimits {
            weight: Some(3),
            ..KeyLimits::default()
        },
    )
    .await;
    let light = add_key_with(&gw, "light", KeyLimits::default()).await;
    let heavy_asks = keep_asking(&gw, &heavy, 8);
    let light_asks = keep_asking(&gw, &light, 8);
    wait_until_queued(&gw, 14).await;
    let before = (heavy_asks.served(), light_asks.served());
    let services = 60;
    tokio::time::sleep(SERVICE * services).await;
    let heavy_served = heavy_asks.served() - before.0;
    let light_served = light_asks.served() - before.1;
    drop((heavy_asks, light_asks));
    let ratio = heavy_served as f64 / light_served.max(1) as f64;
    println!(
        "weights 3 and 1, each keeping 8 requests in: served {heavy_served} and {light_served} in {services} service times, {ratio:.2} to 1"
    );
    assert!(
        (2.3..=3.7).contains(&ratio),
        "weight 3 is served about three times as often as weight 1: {heavy_served} against {light_served}"
    );
}
