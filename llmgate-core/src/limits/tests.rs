//! The limiter's rules with a clock the tests move.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};

use super::*;
use crate::auth::{KeyRecord, Role, Secret};
use crate::storage::{MemoryStore, StorageError};

struct Setup {
    limiter: Limiter,
    clock: Arc<Mutex<DateTime<Utc>>>,
    key: KeyRecord,
}

impl Setup {
    fn new(limits: KeyLimits) -> Self {
        let clock = Arc::new(Mutex::new(
            Utc.with_ymd_and_hms(2026, 12, 2, 23, 59, 0).unwrap(),
        ));
        let now = clock.clone();
        let limiter = Limiter::local_with_clock(
            KeyLimits::default(),
            Arc::new(MemoryStore::new()),
            move || *now.lock().unwrap(),
        );
        let mut key = KeyRecord::new("alice", Role::User, &Secret::generate());
        key.limits = limits;
        Self {
            limiter,
            clock,
            key,
        }
    }

    fn advance(&self, ms: i64) {
        *self.clock.lock().unwrap() += Duration::milliseconds(ms);
    }

    async fn ask(&self, user: Option<&str>, tokens: u64) -> Admitted {
        let card = self.limiter.card(&self.key);
        self.limiter.admit(&card, user, tokens).await
    }
}

#[tokio::test]
async fn requests_per_minute_burst_then_refill() {
    let s = Setup::new(KeyLimits {
        rpm: Some(3),
        ..KeyLimits::default()
    });
    for left in [2, 1, 0] {
        let admitted = s.ask(None, 10).await.unwrap().unwrap();
        assert_eq!(admitted.windows().0.unwrap().remaining, left);
    }
    let refused = s.ask(None, 10).await.unwrap_err();
    assert_eq!(refused.reason(), "requests");
    assert_eq!(refused.retry_ms, 20_000, "3 a minute: one each 20 s");
    assert!(
        refused.message().contains("Limit 3, Used 3, Requested 1"),
        "{}",
        refused.message()
    );
    s.advance(19_999);
    assert!(s.ask(None, 10).await.is_err());
    s.advance(1);
    assert!(s.ask(None, 10).await.is_ok());
}

#[tokio::test]
async fn a_refused_request_takes_nothing_from_any_limit() {
    let s = Setup::new(KeyLimits {
        rpm: Some(2),
        tpm: Some(100),
        ..KeyLimits::default()
    });
    s.ask(None, 90).await.unwrap();
    // Over the tokens: refused, and its request is not counted.
    assert_eq!(s.ask(None, 50).await.unwrap_err().reason(), "tokens");
    let admitted = s.ask(None, 5).await.unwrap().unwrap();
    assert_eq!(admitted.windows().0.unwrap().remaining, 0);
}

#[tokio::test]
async fn tokens_are_settled_with_the_real_count() {
    let s = Setup::new(KeyLimits {
        tpm: Some(1000),
        ..KeyLimits::default()
    });
    let first = s.ask(None, 800).await.unwrap().unwrap();
    assert_eq!(first.windows().1.unwrap().remaining, 200);
    assert!(s.ask(None, 300).await.is_err());
    first.settle(Some(100));
    let second = s.ask(None, 300).await.unwrap().unwrap();
    assert_eq!(second.windows().1.unwrap().remaining, 600);
    // More than estimated: the bucket goes into debt.
    second.settle(Some(1500));
    let refused = s.ask(None, 1).await.unwrap_err();
    assert_eq!(refused.reason(), "tokens");
    assert!(refused.retry_ms > 1000);
}

#[tokio::test]
async fn an_unknown_count_keeps_the_tpm_estimate_and_counts_nothing_on_the_quota() {
    let s = Setup::new(KeyLimits {
        tpm: Some(1000),
        quota_tokens: Some(1000),
        ..KeyLimits::default()
    });
    // A client that left before its answer was counted: the estimate stays in the
    // bucket (capped at the tpm), and the quota counts what the store counts, 0.
    s.ask(None, 5000).await.unwrap().unwrap().settle(None);
    assert_eq!(s.ask(None, 1).await.unwrap_err().reason(), "tokens");
    let status = s.limiter.status(&s.key, None).await;
    assert_eq!(status.quota.unwrap().used, 0);
    // A quota without a tpm: a huge `max_tokens` whose count never arrives does not
    // use it up.
    let s = Setup::new(KeyLimits {
        quota_tokens: Some(1000),
        ..KeyLimits::default()
    });
    s.ask(None, 1_000_000_000)
        .await
        .unwrap()
        .unwrap()
        .settle(None);
    s.ask(None, 10).await.unwrap().unwrap().settle(Some(10));
    assert_eq!(s.limiter.status(&s.key, None).await.quota.unwrap().used, 10);
}

#[tokio::test]
async fn debt_settled_after_the_bucket_refilled_is_owed_in_full() {
    let s = Setup::new(KeyLimits {
        tpm: Some(600),
        ..KeyLimits::default()
    });
    let long = s.ask(None, 10).await.unwrap().unwrap();
    // Its answer ends two minutes later with 1210 tokens: 1200 more than taken, two
    // minutes' worth, owed from now: the bucket is empty for another minute.
    s.advance(120_000);
    long.settle(Some(1210));
    let refused = s.ask(None, 1).await.unwrap_err();
    assert_eq!(refused.reason(), "tokens");
    assert!(refused.retry_ms > 59_000, "{}", refused.retry_ms);
}

#[tokio::test]
async fn a_quota_admits_while_below_and_overshoots_by_at_most_one_request() {
    let s = Setup::new(KeyLimits {
        quota_tokens: Some(100),
        quota_period: Some(QuotaPeriod::Day),
        ..KeyLimits::default()
    });
    let mut used = 0;
    let mut admitted = 0;
    while let Ok(Some(admission)) = s.ask(None, 50).await {
        admission.settle(Some(30));
        used += 30;
        admitted += 1;
        assert!(admitted < 10);
    }
    assert_eq!(admitted, 4, "admitted at 0, 30, 60 and 90 tokens used");
    assert!(used <= 100 + 30, "at most one request over the quota");
    let refused = s.ask(None, 50).await.unwrap_err();
    assert!(refused.is_quota());
    assert_eq!(refused.kind(), "insufficient_quota");
    // The day ends at midnight UTC, a minute later: a new quota.
    assert_eq!(refused.retry_ms, 60_000);
    s.advance(60_000);
    assert!(s.ask(None, 50).await.is_ok());
}

#[tokio::test]
async fn a_quota_counts_from_the_usage_stored_in_the_period() {
    let store = Arc::new(MemoryStore::new());
    let mut key = KeyRecord::new("alice", Role::User, &Secret::generate());
    key.limits = KeyLimits {
        quota_tokens: Some(1000),
        quota_period: Some(QuotaPeriod::Day),
        per_user_quota_tokens: Some(100),
        ..KeyLimits::default()
    };
    let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
    let row = |at: DateTime<Utc>, tokens: u64, user: Option<&str>| crate::storage::RequestRecord {
        at,
        key_id: key.id.clone(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some("m".into()),
        status: 200,
        prompt_tokens: Some(tokens / 2),
        completion_tokens: Some(tokens - tokens / 2),
        latency_ms: 1,
        first_byte_ms: Some(1),
        end_user: user.map(str::to_owned),
    };
    crate::storage::UsageStore::record(
        &*store,
        &[
            // Yesterday's tokens do not count today.
            row(now - Duration::days(1), 5000, None),
            row(now - Duration::hours(1), 850, None),
            row(now - Duration::hours(1), 100, Some("ann")),
        ],
    )
    .await
    .unwrap();
    let limiter = Limiter::local_with_clock(KeyLimits::default(), store, move || now);
    let card = limiter.card(&key);
    let ask = |user| limiter.admit(&card, user, 10);
    let refused = ask(Some("ann")).await.unwrap_err();
    assert_eq!(refused.limit, Limit::UserQuota, "ann used her 100 today");
    ask(Some("bob")).await.unwrap().unwrap().settle(Some(40));
    let status = limiter.status(&key, None).await;
    assert_eq!(status.quota.unwrap().used, 990);
    ask(None).await.unwrap();
    let refused = ask(None).await.unwrap_err();
    assert_eq!(refused.limit, Limit::Quota);
    assert!(
        refused.message().contains("1000 of 1000 tokens this day"),
        "{}",
        refused.message()
    );
}

/// A usage store that cannot say how many tokens were used, and counts the asks.
#[derive(Default)]
struct Broken {
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl crate::storage::UsageStore for Broken {
    async fn record(&self, _: &[crate::storage::RequestRecord]) -> Result<(), StorageError> {
        Ok(())
    }
    async fn totals(
        &self,
    ) -> Result<std::collections::BTreeMap<String, crate::storage::UsageTotals>, StorageError> {
        Ok(Default::default())
    }
    async fn totals_for_key(&self, _: &str) -> Result<crate::storage::UsageTotals, StorageError> {
        Ok(Default::default())
    }
    async fn requests(
        &self,
        _: &str,
        _: Option<DateTime<Utc>>,
        _: u32,
    ) -> Result<Vec<crate::storage::RequestRecord>, StorageError> {
        Ok(Vec::new())
    }
    async fn tokens_since(
        &self,
        _: &str,
        _: Option<&str>,
        _: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        self.asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(StorageError::Database("down".into()))
    }
}

#[tokio::test]
async fn a_store_that_cannot_count_the_quota_is_asked_again_only_after_a_pause() {
    let store = Arc::new(Broken::default());
    let clock = Arc::new(Mutex::new(Utc::now()));
    let now = clock.clone();
    let limiter = Limiter::local_with_clock(KeyLimits::default(), store.clone(), move || {
        *now.lock().unwrap()
    });
    let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
    key.limits.quota_tokens = Some(10);
    let card = limiter.card(&key);
    for _ in 0..5 {
        // Admitted: a store outage is no reason to refuse.
        assert!(limiter.admit(&card, None, 100).await.is_ok());
    }
    let asked = || store.asked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(asked(), 1);
    *clock.lock().unwrap() += Duration::milliseconds(QUOTA_LOAD_PAUSE_MS);
    assert!(limiter.admit(&card, None, 100).await.is_ok());
    assert_eq!(asked(), 2);
}

#[tokio::test]
async fn a_place_in_flight_is_freed_when_the_request_ends() {
    let s = Setup::new(KeyLimits {
        max_parallel: Some(2),
        ..KeyLimits::default()
    });
    let a = s.ask(None, 1).await.unwrap().unwrap();
    let b = s.ask(None, 1).await.unwrap().unwrap();
    assert_eq!(s.ask(None, 1).await.unwrap_err().reason(), "parallel");
    drop(a);
    let c = s.ask(None, 1).await.unwrap().unwrap();
    let status = s.limiter.status(&s.key, None).await;
    assert_eq!(status.in_flight.unwrap().current, 2);
    drop((b, c));
    let status = s.limiter.status(&s.key, None).await;
    assert_eq!(status.in_flight.unwrap().current, 0);
}

#[tokio::test]
async fn end_users_have_their_own_limits_within_the_key() {
    let s = Setup::new(KeyLimits {
        rpm: Some(10),
        per_user_rpm: Some(1),
        per_user_quota_tokens: Some(1000),
        ..KeyLimits::default()
    });
    s.ask(Some("ann"), 5).await.unwrap();
    let refused = s.ask(Some("ann"), 5).await.unwrap_err();
    assert_eq!(refused.reason(), "requests");
    assert!(refused.message().contains("end user 'ann'"));
    s.ask(Some("bob"), 5).await.unwrap();
    // Requests without an end user count only against the key.
    s.ask(None, 5).await.unwrap();
    let status = s.limiter.status(&s.key, Some("ann")).await;
    let user = status.end_user.unwrap();
    assert_eq!(user.requests.unwrap().remaining, 0);
    assert_eq!(user.quota.unwrap().used, 5);
    assert_eq!(status.requests.unwrap().remaining, 10 - 3);
}

#[tokio::test]
async fn status_shows_what_is_left_and_when_it_resets() {
    let s = Setup::new(KeyLimits {
        rpm: Some(60),
        tpm: Some(6000),
        quota_tokens: Some(1000),
        ..KeyLimits::default()
    });
    s.ask(None, 600).await.unwrap().unwrap().settle(Some(600));
    let now = *s.clock.lock().unwrap();
    let status = s.limiter.status(&s.key, None).await;
    let requests = status.requests.unwrap();
    assert_eq!((requests.limit, requests.remaining), (60, 59));
    assert_eq!(requests.resets_at, now + Duration::seconds(1));
    let tokens = status.tokens.unwrap();
    assert_eq!(tokens.remaining, 5400);
    let quota = status.quota.unwrap();
    assert_eq!((quota.used, quota.remaining), (600, 400));
    assert_eq!(quota.period, QuotaPeriod::Month);
    assert_eq!(
        quota.resets_at,
        Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
    );
    assert_eq!(status.mode, LimiterMode::Local);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["limits"]["rpm"], 60);
    assert_eq!(json["mode"], "local");
}

#[tokio::test]
async fn admin_keys_ignore_the_defaults() {
    let limiter = Limiter::local(
        KeyLimits {
            rpm: Some(1),
            ..KeyLimits::default()
        },
        Arc::new(MemoryStore::new()),
    );
    let admin = KeyRecord::new("root", Role::Admin, &Secret::generate());
    assert!(limiter.effective(&admin).is_empty());
    let user = KeyRecord::new("u", Role::User, &Secret::generate());
    assert_eq!(limiter.effective(&user).rpm, Some(1));
}

#[test]
fn a_keys_card_is_kept_until_its_role_or_limits_change() {
    let defaults = KeyLimits {
        rpm: Some(5),
        ..KeyLimits::default()
    };
    let limiter = Limiter::local(defaults, Arc::new(MemoryStore::new()));
    let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
    let first = limiter.card(&key);
    assert_eq!(first.limits.rpm, Some(5), "the defaults");
    assert!(Arc::ptr_eq(&first, &limiter.card(&key)), "kept");
    // A new record of the same key (the key cache reads it again): the same card.
    assert!(Arc::ptr_eq(&first, &limiter.card(&key.clone())));
    key.limits.tpm = Some(100);
    let second = limiter.card(&key);
    assert_eq!((second.limits.rpm, second.limits.tpm), (Some(5), Some(100)));
    key.limits.rpm = Some(7);
    assert_eq!(limiter.card(&key).limits.rpm, Some(7));
    // An admin key has only its own limits.
    key.role = Role::Admin;
    key.limits = KeyLimits::default();
    assert!(limiter.card(&key).limits.is_empty());
    // Another key of the same limits has its own card.
    let other = KeyRecord::new("other", Role::User, &Secret::generate());
    assert_eq!(&*limiter.card(&other).id, other.id);
}

/// A limiter whose clock stands still: buckets do not refill during a test.
fn still_limiter(defaults: KeyLimits) -> Limiter {
    let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
    Limiter::local_with_clock(defaults, Arc::new(MemoryStore::new()), move || now)
}

/// Counts one request of `key` on this thread: its card (where it is, to tell cards
/// apart), the rpm it shows, and the requests left after it (`None`: refused).
fn count_one(limiter: &Limiter, key: &KeyRecord) -> (usize, Option<u32>, Option<u64>) {
    let card = limiter.card(key);
    let admitted = limiter
        .admit_now(&card, None, 1)
        .expect("nothing to wait for");
    let left = admitted
        .ok()
        .map(|admission| admission.unwrap().windows().0.unwrap().remaining);
    (Arc::as_ptr(&card) as usize, card.limits.rpm, left)
}

#[test]
fn each_thread_keeps_its_own_card_and_sees_a_change_of_limits_and_all_count_together() {
    let limiter = still_limiter(KeyLimits::default());
    let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
    key.limits.rpm = Some(4);
    std::thread::scope(|s| {
        // Another serving thread, asked to count one request of a key at a time.
        let (ask, asked) = std::sync::mpsc::channel::<KeyRecord>();
        let (answer, answers) = std::sync::mpsc::channel();
        let limiter = &limiter;
        s.spawn(move || {
            for key in asked {
                answer.send(count_one(limiter, &key)).unwrap();
            }
        });
        let there = |key: &KeyRecord| {
            ask.send(key.clone()).unwrap();
            answers.recv().unwrap()
        };
        let (here_card, rpm, left) = count_one(limiter, &key);
        assert_eq!((rpm, left), (Some(4), Some(3)));
        let (there_card, rpm, left) = there(&key);
        assert_eq!(
            (rpm, left),
            (Some(4), Some(2)),
            "one bucket for both threads"
        );
        assert_ne!(here_card, there_card, "a card per thread");
        let (card, _, left) = there(&key);
        assert_eq!((card, left), (there_card, Some(1)), "kept by its thread");
        assert_eq!(count_one(limiter, &key).0, here_card);
        // The key's limits change (the key cache has its new record): every thread's
        // card is made again at its next request, and the counts go on.
        key.limits.rpm = Some(10);
        let (card, rpm, left) = there(&key);
        assert_ne!(card, there_card);
        // 4 taken at 15 s each (60 s ahead), one more at 6 s: over a minute ahead.
        assert_eq!((rpm, left), (Some(10), None), "refused: the bucket is full");
        let (card, rpm, _) = count_one(limiter, &key);
        assert_ne!(card, here_card);
        assert_eq!(rpm, Some(10));
        drop(ask);
    });
}

#[test]
fn two_limiters_never_share_a_card_or_a_count() {
    let limiters: Vec<Limiter> = (1..=2 * MAX_LIMITERS_PER_THREAD as u32)
        .map(|rpm| {
            still_limiter(KeyLimits {
                rpm: Some(rpm),
                ..KeyLimits::default()
            })
        })
        .collect();
    // One key, under each limiter's defaults; on one thread, more limiters than it keeps
    // cards of at once.
    let key = KeyRecord::new("k", Role::User, &Secret::generate());
    for round in 0..2 {
        for (i, limiter) in limiters.iter().enumerate() {
            let rpm = i as u32 + 1;
            let (_, shown, left) = count_one(limiter, &key);
            assert_eq!(shown, Some(rpm), "the card of its own limiter");
            let expected = (rpm as u64).checked_sub(round + 1);
            assert_eq!(
                left, expected,
                "its own counters (round {round}, rpm {rpm})"
            );
        }
    }
}

#[test]
fn counts_are_exact_across_threads() {
    // 8 threads at once, each trying 100 requests that it keeps in flight: exactly
    // max_parallel are admitted each round; the requests per minute run out exactly.
    let limiter = still_limiter(KeyLimits::default());
    let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
    key.limits.rpm = Some(1000);
    key.limits.max_parallel = Some(300);
    for expected in [300, 300, 300, 100, 0] {
        // Each thread keeps its requests in flight until every thread has counted.
        let counted = std::sync::Barrier::new(8);
        let admitted: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let card = limiter.card(&key);
                        let held: Vec<_> = (0..100)
                            .filter_map(|_| limiter.admit_now(&card, None, 1)?.ok().flatten())
                            .collect();
                        counted.wait();
                        held.len()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(admitted, expected);
    }
}

#[test]
fn the_fallback_divides_per_minute_and_parallel_limits_but_not_quotas() {
    let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
    key.limits = KeyLimits {
        rpm: Some(60),
        tpm: Some(1000),
        max_parallel: Some(3),
        quota_tokens: Some(500),
        per_user_rpm: Some(1),
        ..KeyLimits::default()
    };
    let limiter = Limiter::local(KeyLimits::default(), Arc::new(MemoryStore::new()));
    let card = limiter.card(&key);
    let plan = Plan::new(&card, Some("u".into()), 1, Utc::now()).divided(4);
    assert_eq!(plan.rpm, Some(15));
    assert_eq!(plan.tpm, Some(250));
    assert_eq!(plan.parallel, Some(1));
    assert_eq!(plan.user_rpm, Some(1), "never below 1");
    assert_eq!(plan.quota, Some(500));
}

#[test]
fn durations_are_written_as_openai_writes_them() {
    for (ms, text) in [
        (20, "20ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
        (3_723_000, "1h2m3s"),
        (3_600_000, "1h0m0s"),
        (1_005, "1.005s"),
        (1_050, "1.05s"),
        (7_200_099, "2h0m0.099s"),
        (0, "0ms"),
    ] {
        assert_eq!(format_duration(ms), text);
    }
}

#[test]
fn end_user_names_are_cut_at_a_character_boundary() {
    let long = "é".repeat(200);
    let cut = cut_end_user(&long);
    assert!(cut.len() <= END_USER_BYTES && cut.len() >= END_USER_BYTES - 1);
    assert_eq!(cut_end_user("ann"), "ann");
}

#[tokio::test]
async fn many_end_users_do_not_grow_memory_without_bound() {
    let s = Setup::new(KeyLimits {
        per_user_rpm: Some(1000),
        ..KeyLimits::default()
    });
    for i in 0..(local_end_user_bound() + 5000) {
        s.ask(Some(&format!("user-{i}")), 1).await.unwrap();
        if i % 10_000 == 0 {
            s.advance(61_000);
        }
    }
    assert!(s.limiter.inner.local.end_users() <= local_end_user_bound() + 10_000);
}

#[tokio::test]
async fn asking_about_end_users_adds_nothing_to_the_counters() {
    // `/v1/me?user=…` with made-up names: each is read, none is kept.
    let s = Setup::new(KeyLimits {
        per_user_quota_tokens: Some(1000),
        ..KeyLimits::default()
    });
    for i in 0..50 {
        let status = s.limiter.status(&s.key, Some(&format!("nobody-{i}"))).await;
        assert!(status.end_user.is_some());
    }
    assert_eq!(s.limiter.inner.local.end_users(), 0);
}

fn local_end_user_bound() -> usize {
    local::MAX_END_USERS
}

#[cfg(feature = "redis")]
mod shared_counters {
    use std::time::{Duration, Instant};

    use super::*;

    const REDIS: &str = "redis://127.0.0.1:6379";

    fn prefix() -> String {
        format!("llmgate-test:{:x}:", rand::random::<u64>())
    }

    fn user_key(limits: KeyLimits) -> KeyRecord {
        let mut key = KeyRecord::new("k", Role::User, &Secret::generate());
        key.limits = limits;
        key
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admit(limiter: &Limiter, key: &KeyRecord) -> Admitted {
        limiter.admit(&limiter.card(key), None, 10).await
    }

    /// A TCP proxy to Redis that the test can stop (closing every connection) and start
    /// again on the same port.
    struct Proxy {
        port: u16,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Proxy {
        /// On `port` again after [`stop`](Self::stop): retried for a while, as a
        /// process that another test forked meanwhile holds a copy of the old listener
        /// until it execs.
        async fn start(port: u16) -> Self {
            let started = Instant::now();
            let listener = loop {
                match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(listener) => break listener,
                    Err(e) if started.elapsed() < Duration::from_secs(5) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("port {port}: {e}"),
                }
            };
            let port = listener.local_addr().unwrap().port();
            let task = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    connections.spawn(async move {
                        if let Ok(mut redis) =
                            tokio::net::TcpStream::connect("127.0.0.1:6379").await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut redis).await;
                        }
                    });
                }
            });
            Self {
                port,
                task: Some(task),
            }
        }

        async fn stop(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    #[tokio::test]
    #[ignore = "needs Redis"]
    async fn replicas_on_one_redis_share_one_limit() {
        let prefix = prefix();
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let replicas: Vec<Limiter> = (0..2)
            .map(|_| {
                Limiter::shared_under(&prefix, REDIS, KeyLimits::default(), store.clone(), 2)
                    .unwrap()
            })
            .collect();
        until("both replicas use Redis", || {
            replicas.iter().all(Limiter::is_shared)
        })
        .await;
        assert_eq!(replicas[0].mode(), LimiterMode::Shared);
        let key = user_key(KeyLimits {
            rpm: Some(10),
            max_parallel: Some(20),
            quota_tokens: Some(1_000_000),
            ..KeyLimits::default()
        });
        let mut admitted = 0;
        let mut held = Vec::new();
        for i in 0..30 {
            match admit(&replicas[i % 2], &key).await {
                Ok(admission) => {
                    admitted += 1;
                    if held.len() < 3 {
                        held.push(admission);
                    }
                }
                Err(refusal) => assert_eq!(refusal.reason(), "requests"),
            }
        }
        assert!(
            (10..=11).contains(&admitted),
            "admitted {admitted} of rpm 10 on two replicas"
        );
        // 3 held in flight: the others were freed as they were dropped.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = replicas[1].status(&key, None).await;
        assert_eq!(status.in_flight.unwrap().current, 3);
        assert_eq!(status.requests.unwrap().remaining, 0);
        assert_eq!(status.quota.unwrap().used, 10 * admitted as u64);
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = replicas[0].status(&key, None).await;
        assert_eq!(
            status.in_flight.unwrap().current,
            0,
            "places freed in Redis"
        );
    }

    #[tokio::test]
    #[ignore = "needs Redis"]
    async fn an_admission_whose_answer_is_lost_frees_its_place_in_redis() {
        // The script runs in Redis, then its caller goes away (a client that left, or
        // a call past its timeout): the place it took must not stay taken.
        let prefix = prefix();
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let replicas: Vec<Limiter> = (0..2)
            .map(|_| {
                Limiter::shared_under(&prefix, REDIS, KeyLimits::default(), store.clone(), 2)
                    .unwrap()
            })
            .collect();
        until("both replicas use Redis", || {
            replicas.iter().all(Limiter::is_shared)
        })
        .await;
        let key = user_key(KeyLimits {
            max_parallel: Some(100),
            ..KeyLimits::default()
        });
        for _ in 0..20 {
            // Polled until its call is sent, then dropped.
            let mut admission = std::pin::pin!(admit(&replicas[0], &key));
            let _ = futures_util::poll!(admission.as_mut());
            tokio::task::yield_now().await;
            let _ = futures_util::poll!(admission.as_mut());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = replicas[1].status(&key, None).await;
        assert_eq!(
            status.in_flight.unwrap().current,
            0,
            "no place is left taken by an admission nobody holds"
        );
    }

    #[tokio::test]
    #[ignore = "needs Redis"]
    async fn a_shared_quota_starts_from_the_stored_usage_and_overshoots_by_one_request() {
        let prefix = prefix();
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let key = user_key(KeyLimits {
            quota_tokens: Some(1000),
            per_user_rpm: Some(2),
            ..KeyLimits::default()
        });
        let mut row = crate::storage::RequestRecord {
            at: Utc::now(),
            key_id: key.id.clone(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            model: None,
            status: 200,
            prompt_tokens: Some(400),
            completion_tokens: Some(300),
            latency_ms: 1,
            first_byte_ms: None,
            end_user: None,
        };
        crate::storage::UsageStore::record(&*store, std::slice::from_mut(&mut row))
            .await
            .unwrap();
        let replicas: Vec<Limiter> = (0..2)
            .map(|_| {
                Limiter::shared_under(&prefix, REDIS, KeyLimits::default(), store.clone(), 2)
                    .unwrap()
            })
            .collect();
        until("both replicas use Redis", || {
            replicas.iter().all(Limiter::is_shared)
        })
        .await;
        // 700 used: admitted at 700, 800, 900 and 1000 would be refused.
        let mut admitted = 0;
        for i in 0..10 {
            let limiter = &replicas[i % 2];
            match limiter.admit(&limiter.card(&key), None, 50).await {
                Ok(Some(admission)) => {
                    admission.settle(Some(100));
                    admitted += 1;
                    // Settling is sent in the background.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => unreachable!("the key has a quota"),
                Err(refusal) => assert!(refusal.is_quota()),
            }
        }
        assert_eq!(admitted, 3);
        let used = replicas[1].status(&key, None).await.quota.unwrap().used;
        assert_eq!(used, 1000, "at most one request over: {used}");
        // End users' rates are shared too.
        let ann = Some("ann");
        let other_key = user_key(KeyLimits {
            per_user_rpm: Some(2),
            ..KeyLimits::default()
        });
        let cards = [replicas[0].card(&other_key), replicas[1].card(&other_key)];
        assert!(replicas[0].admit(&cards[0], ann, 1).await.is_ok());
        assert!(replicas[1].admit(&cards[1], ann, 1).await.is_ok());
        let refused = replicas[0].admit(&cards[0], ann, 1).await.unwrap_err();
        assert_eq!(refused.limit, Limit::UserRequests);
        assert!(replicas[1].admit(&cards[1], Some("bob"), 1).await.is_ok());
    }

    #[tokio::test]
    #[ignore = "needs Redis"]
    async fn in_redis_debt_settled_after_the_bucket_expired_is_owed_and_unknown_counts_are_0_on_quotas(
    ) {
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let limiter =
            Limiter::shared_under(&prefix(), REDIS, KeyLimits::default(), store, 1).unwrap();
        until("Redis is used", || limiter.is_shared()).await;
        // 60 000 a minute: 10 tokens refill in 10 ms, and the bucket's Redis key
        // expires a second after it is full again.
        let key = user_key(KeyLimits {
            tpm: Some(60_000),
            quota_tokens: Some(1_000_000),
            ..KeyLimits::default()
        });
        let card = limiter.card(&key);
        let long = limiter.admit(&card, None, 10).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // The answer used two minutes' tokens: owed in full, though the key expired.
        long.settle(Some(120_010));
        let mut refused = None;
        for _ in 0..50 {
            match limiter.admit(&card, None, 10).await {
                Err(refusal) => {
                    refused = Some(refusal);
                    break;
                }
                // Settling is sent in the background.
                Ok(admission) => {
                    admission.unwrap().settle(Some(10));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let refused = refused.expect("the debt was dropped");
        assert_eq!(refused.reason(), "tokens");
        assert!(refused.retry_ms > 50_000, "{}", refused.retry_ms);
        // The quota counted 120 010 (settled) and nothing for a request whose count is
        // unknown.
        let other = user_key(KeyLimits {
            quota_tokens: Some(1000),
            ..KeyLimits::default()
        });
        let card = limiter.card(&other);
        let huge = limiter.admit(&card, None, 1_000_000_000);
        huge.await.unwrap().unwrap().settle(None);
        until_used(&limiter, &other, 0).await;
        let used = limiter.status(&key, None).await.quota.unwrap().used;
        assert!(used >= 120_010 && used % 10 == 0, "{used}");
    }

    async fn until_used(limiter: &Limiter, key: &KeyRecord, used: u64) {
        let started = Instant::now();
        loop {
            let now = limiter.status(key, None).await.quota.unwrap().used;
            if now == used {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "used {now}, not {used}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_means_local_limits_divided_by_the_replicas() {
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        // Nothing listens on port 1.
        let limiter = Limiter::shared_under(
            &prefix(),
            "redis://127.0.0.1:1",
            KeyLimits::default(),
            store,
            4,
        )
        .unwrap();
        assert_eq!(limiter.mode(), LimiterMode::Fallback);
        assert!(!limiter.is_shared());
        let key = user_key(KeyLimits {
            rpm: Some(20),
            ..KeyLimits::default()
        });
        let mut admitted = 0;
        for _ in 0..20 {
            if admit(&limiter, &key).await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5, "20 a minute over 4 replicas");
        assert!(Limiter::shared(
            "not a url",
            KeyLimits::default(),
            Arc::new(MemoryStore::new()),
            1
        )
        .is_err());
    }

    #[tokio::test]
    #[ignore = "needs Redis"]
    async fn a_replica_falls_back_while_redis_is_away_and_shares_again_when_it_returns() {
        let mut proxy = Proxy::start(0).await;
        let url = format!("redis://127.0.0.1:{}", proxy.port);
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let limiter =
            Limiter::shared_under(&prefix(), &url, KeyLimits::default(), store, 2).unwrap();
        until("the limiter uses Redis", || limiter.is_shared()).await;
        let key = user_key(KeyLimits {
            rpm: Some(10),
            ..KeyLimits::default()
        });
        admit(&limiter, &key).await.unwrap();

        proxy.stop().await;
        let started = Instant::now();
        // Never an error: counted locally, with half the limit.
        let mut admitted = 0;
        for _ in 0..10 {
            if admit(&limiter, &key).await.is_ok() {
                admitted += 1;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(limiter.mode(), LimiterMode::Fallback);
        assert_eq!(admitted, 5, "10 a minute over 2 replicas");

        let _proxy = Proxy::start(proxy.port).await;
        until("the limiter uses Redis again", || limiter.is_shared()).await;
        // The shared bucket kept its one request.
        let status = limiter.status(&key, None).await;
        assert_eq!(status.mode, LimiterMode::Shared);
        assert_eq!(status.requests.unwrap().remaining, 9);
    }
}
