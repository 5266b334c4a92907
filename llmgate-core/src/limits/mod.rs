//! Fair use: what each key may use ([`KeyLimits`], set per key and as defaults) and the
//! [`Limiter`] that enforces it.
//!
//! [`AuthUsageLayer::limiter`](crate::AuthUsageLayer::limiter) gives the metering layer
//! a limiter. Each request of a key with limits is then checked, after its key and body
//! are read, in this order: the token quota of the period, the requests in flight,
//! requests per minute, tokens per minute, then the same for the end user the request
//! names. All or nothing: a refused request takes nothing from any counter. Then the
//! model allow-list: a model the key may not use is counted and answered as one that
//! does not exist (the same 404, with the same rate headers), so that a key cannot tell
//! the two apart.
//!
//! - **Per-minute limits** (`rpm`, `tpm`, `per_user_rpm`) are token buckets: a burst of
//!   the limit, then the limit / 60 each second. A request takes the *estimate* of its
//!   tokens from the `tpm` bucket (its body's bytes / 4, plus its `max_tokens` or the
//!   configured completion estimate); when its answer ends the bucket is settled with the
//!   real count, so it may go into debt. An answer whose count stays unknown (a client
//!   that left, an upstream that reports none) keeps its estimate, capped at the `tpm`.
//! - **Quotas** (`quota_tokens`, `per_user_quota_tokens`) count the tokens of a calendar
//!   period (UTC). A request is admitted while the count is below the quota; the count
//!   holds settled requests and the estimates of those in flight; an answer whose count
//!   stays unknown counts 0, as the store counts it. It starts from the store
//!   ([`UsageStore::tokens_since`]) the first time a key is seen in a period.
//! - **`max_parallel`** counts requests from admission until their response body ends or
//!   the client leaves.
//!
//! [`Limiter::local`] keeps the counters in the process: right for one replica.
//! [`Limiter::shared`] (feature `redis`) keeps them in Redis, one script run per
//! admission, so that every replica sees the same counts; while Redis is unreachable
//! each replica falls back to local counters with every per-minute and parallel limit
//! divided by the number of replicas, and returns to Redis when it answers again.

mod bucket;
mod local;
mod settings;
#[cfg(feature = "redis")]
mod shared;
mod status;

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

pub use settings::{glob_matches, KeyLimits, QuotaPeriod, MAX_MODEL_PATTERNS, MAX_WEIGHT};
pub use status::{EndUserStatus, InFlightStatus, LimitStatus, QuotaStatus, WindowStatus};

pub(crate) use bucket::Window;

use crate::auth::{KeyRecord, Role};
use crate::storage::{UsageStore, MAX_END_USER_BYTES as END_USER_BYTES};
use local::{KeyCounters, Local};

/// The completion tokens a request is assumed to ask for when it sets no `max_tokens`
/// (or `max_completion_tokens`), for the `tpm` estimate.
pub const DEFAULT_ESTIMATED_COMPLETION_TOKENS: u64 = 256;

/// How long the store may take to say how many tokens a key used in the period, before a
/// request is admitted without its quota checked (and the next one asks again).
const QUOTA_LOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed read of the tokens used in a period, how long requests are admitted
/// without their quota before the store is asked again: a store that hangs must not
/// make every request wait [`QUOTA_LOAD_TIMEOUT`].
const QUOTA_LOAD_PAUSE_MS: i64 = 10_000;
/// Keys whose [`KeyCard`] a thread keeps at once; past it they are all forgotten (and
/// made again on their next request). As many as the key cache holds.
const MAX_CARDS: usize = 100_000;
/// Limiters whose cards a thread keeps at once (a process has one; tests make many):
/// past it, the cards of the one it saw first are forgotten.
const MAX_LIMITERS_PER_THREAD: usize = 4;

/// The effective limits of the request's key, which the metering layer puts in the
/// request's extensions when it has a [`Limiter`]: a router can list only the models
/// the key may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective(pub Arc<KeyLimits>);

/// In the extensions of a response the limiter refused: which limit, one of
/// `"requests"`, `"tokens"`, `"quota"` or `"parallel"` (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// Where a [`Limiter`] keeps its counters now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimiterMode {
    /// In this process ([`Limiter::local`]).
    Local,
    /// In Redis, shared by every replica.
    Shared,
    /// In this process while Redis is unreachable, with the limits divided by the
    /// number of replicas.
    Fallback,
}

impl LimiterMode {
    /// `"local"`, `"shared"` or `"fallback"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimiterMode::Local => "local",
            LimiterMode::Shared => "shared",
            LimiterMode::Fallback => "fallback",
        }
    }
}

/// Why a [`Limiter`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The Redis URL does not parse (the URL itself is not repeated: it may hold a
    /// password).
    #[cfg(feature = "redis")]
    #[error("the Redis URL is not valid: {0}")]
    RedisUrl(#[source] redis::RedisError),
}

/// Enforces every key's limits. Cheap to clone: clones share their counters.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    /// Which limiter of the process this is: the cards each thread keeps are kept by
    /// it, so that two limiters never share one.
    id: u64,
    defaults: KeyLimits,
    usage: Arc<dyn UsageStore>,
    estimate: AtomicU64,
    /// Until when (ms since the epoch) quota counts are not read from the store, after
    /// a failed read.
    quota_reads_paused_until: AtomicI64,
    local: Local,
    /// Redis, for a shared limiter.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    shared: Option<SharedCounters>,
    clock: Clock,
}

#[cfg(feature = "redis")]
type SharedCounters = shared::Shared;
#[cfg(not(feature = "redis"))]
type SharedCounters = std::convert::Infallible;

/// Shared with the cards, which settle requests without the limiter.
type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The ids of limiters: the next one made takes this one.
static NEXT_LIMITER_ID: AtomicU64 = AtomicU64::new(1);

/// A map keyed by key ids: foldhash, several times cheaper per lookup than SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A key's `rpm` and `tpm` as the values of `x-ratelimit-limit-{requests,tokens}`, each
/// with the limit it shows: made once per key (its [`KeyCard`]), so that an answer
/// shares them instead of writing and checking them again.
pub(crate) type LimitValues = [Option<(u64, http::HeaderValue)>; 2];

/// What every request of a key starts from, kept between its requests: its id, its
/// effective limits (shared by the request's [`Effective`]), their header values, and
/// its counters (which its [`Admission`] releases and settles through it). Made again
/// when the key's role or limits change.
///
/// Each thread keeps its own cards ([`Limiter::card`]): what a request clones and drops
/// of its card (its reference count, its limits', its header values') is then memory
/// no other thread writes. Only the counters are the same for every thread.
pub(crate) struct KeyCard {
    /// The limiter that made it.
    limiter: u64,
    /// What it was made from: the card holds while the key still has these.
    role: Role,
    own: KeyLimits,
    id: String,
    /// The limits that apply to the key ([`Limiter::effective`]).
    pub(crate) limits: Arc<KeyLimits>,
    /// Its `rpm` and `tpm` as the values of `x-ratelimit-limit-*`.
    pub(crate) limit_values: LimitValues,
    /// The key's counters in this process.
    counters: Arc<KeyCounters>,
    /// The limiter's clock, for settling.
    clock: Clock,
}

impl std::fmt::Debug for KeyCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCard")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A thread's cards, by limiter and key id.
struct ThreadCards {
    limiters: Vec<(u64, HashMap<String, Arc<KeyCard>>)>,
}

impl ThreadCards {
    /// The cards `limiter` keeps in this thread.
    fn of(&mut self, limiter: u64) -> &mut HashMap<String, Arc<KeyCard>> {
        let at = match self.limiters.iter().position(|(id, _)| *id == limiter) {
            Some(at) => at,
            None => {
                if self.limiters.len() >= MAX_LIMITERS_PER_THREAD {
                    self.limiters.remove(0);
                }
                self.limiters.push((limiter, HashMap::default()));
                self.limiters.len() - 1
            }
        };
        &mut self.limiters[at].1
    }
}

thread_local! {
    /// This thread's cards: finding a key's card takes no lock, and its reference count
    /// is this thread's alone.
    static CARDS: RefCell<ThreadCards> = const {
        RefCell::new(ThreadCards {
            limiters: Vec::new(),
        })
    };
}

impl KeyCard {
    /// Whether the card still holds for `key`, the key it is kept under.
    fn holds_for(&self, key: &KeyRecord) -> bool {
        self.role == key.role && self.own == key.limits
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("mode", &self.mode())
            .field("defaults", &self.inner.defaults)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// In-process counters: right for one replica.
    pub fn local(defaults: KeyLimits, usage: Arc<dyn UsageStore>) -> Self {
        Self::build(defaults, usage, Arc::new(Utc::now), None)
    }

    /// Counters in Redis shared by every replica. While Redis is unreachable, local
    /// counters with each per-minute and parallel limit divided by `replicas` (said once
    /// in the log at each change), back to Redis when it answers again: a request never
    /// fails for Redis. Fails only for a URL that does not parse; the connection is made
    /// in the background (on the current Tokio runtime, or a thread of its own).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn shared(
        redis_url: &str,
        defaults: KeyLimits,
        usage: Arc<dyn UsageStore>,
        replicas: u32,
    ) -> Result<Self, LimitError> {
        Self::shared_under("llmgate:", redis_url, defaults, usage, replicas)
    }

    /// [`shared`](Self::shared), with every Redis key starting with `prefix` (tests keep
    /// apart that way).
    #[cfg(feature = "redis")]
    pub(crate) fn shared_under(
        prefix: &str,
        redis_url: &str,
        defaults: KeyLimits,
        usage: Arc<dyn UsageStore>,
        replicas: u32,
    ) -> Result<Self, LimitError> {
        let client = redis::Client::open(redis_url).map_err(LimitError::RedisUrl)?;
        let shared = shared::Shared::new(client, replicas, prefix.to_owned());
        let limiter = Self::build(defaults, usage, Arc::new(Utc::now), Some(shared));
        if let Some(shared) = &limiter.inner.shared {
            shared.start(Arc::downgrade(&limiter.inner));
        }
        Ok(limiter)
    }

    fn build(
        defaults: KeyLimits,
        usage: Arc<dyn UsageStore>,
        clock: Clock,
        shared: Option<SharedCounters>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT_LIMITER_ID.fetch_add(1, Ordering::Relaxed),
                defaults,
                usage,
                estimate: AtomicU64::new(DEFAULT_ESTIMATED_COMPLETION_TOKENS),
                quota_reads_paused_until: AtomicI64::new(0),
                local: Local::default(),
                shared,
                clock,
            }),
        }
    }

    /// A local limiter whose time is `clock`'s, for tests.
    #[cfg(test)]
    pub(crate) fn local_with_clock(
        defaults: KeyLimits,
        usage: Arc<dyn UsageStore>,
        clock: impl Fn() -> DateTime<Utc> + Send + Sync + 'static,
    ) -> Self {
        Self::build(defaults, usage, Arc::new(clock), None)
    }

    /// The completion tokens assumed for a request that sets no `max_tokens`
    /// ([`DEFAULT_ESTIMATED_COMPLETION_TOKENS`] unless set).
    pub fn with_token_estimate(self, default_max_tokens: u64) -> Self {
        self.inner
            .estimate
            .store(default_max_tokens, Ordering::Relaxed);
        self
    }

    /// The limits of every user key that sets none of its own.
    pub fn defaults(&self) -> &KeyLimits {
        &self.inner.defaults
    }

    /// Whether anything limits `key` (its own limits, or the defaults for a user key):
    /// when not, the layer skips the limiter altogether.
    pub(crate) fn limits_anything(&self, key: &KeyRecord) -> bool {
        !key.limits.is_empty() || (key.role == Role::User && !self.inner.defaults.is_empty())
    }

    /// The limits that apply to `key`: its own, then the defaults for a user key; an
    /// admin key has only its own.
    pub fn effective(&self, key: &KeyRecord) -> KeyLimits {
        match key.role {
            Role::Admin => key.limits.clone(),
            Role::User => key.limits.or(&self.inner.defaults),
        }
    }

    /// `key`'s card: its effective limits and its counters, kept by this thread from
    /// the key's last request on it while its role and limits are the same (the
    /// defaults never change). A change is seen by every thread at once: each compares
    /// its card with the key as the key cache has it now.
    pub(crate) fn card(&self, key: &KeyRecord) -> Arc<KeyCard> {
        let kept = CARDS.try_with(|cards| {
            let mut cards = cards.try_borrow_mut().ok()?;
            let cards = cards.of(self.inner.id);
            if let Some(card) = cards.get(key.id.as_str()) {
                if card.holds_for(key) {
                    return Some(card.clone());
                }
            }
            let card = self.make_card(key);
            if cards.len() >= MAX_CARDS && !cards.contains_key(key.id.as_str()) {
                cards.clear();
            }
            cards.insert(key.id.clone(), card.clone());
            Some(card)
        });
        // A thread being torn down keeps no cards.
        kept.ok().flatten().unwrap_or_else(|| self.make_card(key))
    }

    fn make_card(&self, key: &KeyRecord) -> Arc<KeyCard> {
        let limits = self.effective(key);
        let value = |limit: u64| Some((limit, http::HeaderValue::from(limit)));
        Arc::new(KeyCard {
            limiter: self.inner.id,
            role: key.role,
            own: key.limits.clone(),
            id: key.id.clone(),
            limit_values: [
                limits.rpm.and_then(|rpm| value(rpm.into())),
                limits.tpm.and_then(value),
            ],
            limits: Arc::new(limits),
            counters: self.inner.local.counters(&key.id),
            clock: self.inner.clock.clone(),
        })
    }

    /// Whether the counters are shared by the replicas right now (false for a local
    /// limiter and while a shared one falls back).
    pub fn is_shared(&self) -> bool {
        self.mode() == LimiterMode::Shared
    }

    /// Where the counters are kept right now.
    pub fn mode(&self) -> LimiterMode {
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.inner.shared {
            return if shared.is_up() {
                LimiterMode::Shared
            } else {
                LimiterMode::Fallback
            };
        }
        LimiterMode::Local
    }

    /// What `key` (and `end_user` of it, when given) may still use, and when each limit
    /// resets. Counts nothing.
    pub async fn status(&self, key: &KeyRecord, end_user: Option<&str>) -> LimitStatus {
        let card = self.card(key);
        let now = (self.inner.clock)();
        let plan = Plan::new(&card, end_user.map(cut_end_user).map(str::to_owned), 0, now);
        let peek = self.peek(&plan).await;
        status::build((*card.limits).clone(), self.mode(), &plan, peek, now)
    }

    /// The estimated tokens of a request whose body has `body_len` bytes and asks for at
    /// most `max_tokens` completion tokens.
    pub(crate) fn estimate(&self, body_len: usize, max_tokens: Option<u64>) -> u64 {
        let prompt = (body_len as u64).div_ceil(4);
        let completion = max_tokens.unwrap_or_else(|| self.inner.estimate.load(Ordering::Relaxed));
        prompt.saturating_add(completion.min(crate::storage::MAX_TOKENS_PER_REQUEST))
    }

    /// Checks and counts one request of the key of `card` (its [`card`](Self::card)).
    pub(crate) async fn admit(
        &self,
        card: &Arc<KeyCard>,
        end_user: Option<&str>,
        tokens: u64,
    ) -> Admitted {
        debug_assert_eq!(card.limiter, self.inner.id, "a card of another limiter");
        if !card.limits.counts() {
            return Ok(None);
        }
        let plan = self.plan(card, end_user, tokens);
        #[cfg(feature = "redis")]
        let plan = match &self.inner.shared {
            None => plan,
            Some(shared) => {
                if shared.is_up() {
                    match shared.admit(&plan, self).await {
                        Ok(Ok(granted)) => {
                            let backend = Backend::Shared(self.clone());
                            return Ok(Some(self.admission(plan, backend, granted)));
                        }
                        Ok(Err(refusal)) => return Err(refusal),
                        Err(()) => shared.went_down(&self.inner.local),
                    }
                }
                plan.divided(shared.replicas())
            }
        };
        self.load_quotas(&plan).await;
        self.admit_local(plan)
    }

    /// [`admit`](Self::admit) without a future, when nothing has to be waited for: a
    /// local limiter whose quotas for the request are counted already (nearly every
    /// request). `None` when the request must go through `admit`.
    pub(crate) fn admit_now(
        &self,
        card: &Arc<KeyCard>,
        end_user: Option<&str>,
        tokens: u64,
    ) -> Option<Admitted> {
        debug_assert_eq!(card.limiter, self.inner.id, "a card of another limiter");
        if !card.limits.counts() {
            return Some(Ok(None));
        }
        if self.inner.shared.is_some() {
            return None;
        }
        let plan = self.plan(card, end_user, tokens);
        if (plan.quota.is_some() || plan.user_quota.is_some())
            && self.inner.local.quotas_to_load(&plan) != (false, false)
        {
            return None;
        }
        Some(self.admit_local(plan))
    }

    fn plan(&self, card: &Arc<KeyCard>, end_user: Option<&str>, tokens: u64) -> Plan {
        let now = (self.inner.clock)();
        let limits = &card.limits;
        let user = end_user
            .filter(|_| limits.per_user_rpm.is_some() || limits.per_user_quota_tokens.is_some())
            .map(str::to_owned);
        Plan::new(card, user, tokens, now)
    }

    fn admit_local(&self, plan: Plan) -> Admitted {
        let granted = self.inner.local.admit(&plan, millis(plan.at))?;
        Ok(Some(self.admission(plan, Backend::Local, granted)))
    }

    /// Boxed where it is made: the request's usage guard keeps it boxed, and an
    /// `Admission` is large enough that every move of it on the way there costs a copy.
    fn admission(&self, plan: Plan, backend: Backend, granted: Granted) -> Box<Admission> {
        Box::new(Admission {
            plan,
            backend,
            granted,
            released: false,
        })
    }

    /// Reads the tokens used in the period for the quotas not yet counted locally.
    async fn load_quotas(&self, plan: &Plan) {
        if plan.quota.is_none() && plan.user_quota.is_none() {
            return;
        }
        let (key, user) = self.inner.local.quotas_to_load(plan);
        if key {
            if let Some(used) = self.tokens_since(plan, None).await {
                self.inner.local.set_quota(plan, None, used);
            }
        }
        if let (true, Some(user)) = (user, &plan.user) {
            if let Some(used) = self.tokens_since(plan, Some(user)).await {
                self.inner.local.set_quota(plan, Some(user), used);
            }
        }
    }

    /// The tokens the store counts for the key (or an end user of it) in the period;
    /// `None` when it cannot say now.
    pub(crate) async fn tokens_since(&self, plan: &Plan, user: Option<&str>) -> Option<u64> {
        let now = (self.inner.clock)().timestamp_millis();
        let paused = &self.inner.quota_reads_paused_until;
        if now < paused.load(Ordering::Relaxed) {
            return None;
        }
        let read = self
            .inner
            .usage
            .tokens_since(plan.key(), user, plan.period_start);
        let error = match tokio::time::timeout(QUOTA_LOAD_TIMEOUT, read).await {
            Ok(Ok(used)) => return Some(used),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {QUOTA_LOAD_TIMEOUT:?}"),
        };
        paused.store(now + QUOTA_LOAD_PAUSE_MS, Ordering::Relaxed);
        tracing::warn!(key_id = %plan.key(), error = %error, "cannot read the tokens used in the quota period; quotas are not checked for {} s", QUOTA_LOAD_PAUSE_MS / 1000);
        None
    }

    async fn peek(&self, plan: &Plan) -> Peek {
        #[cfg(feature = "redis")]
        if let Some(shared) = &self.inner.shared {
            if shared.is_up() {
                match shared.peek(plan, self).await {
                    Ok(peek) => return peek,
                    Err(()) => shared.went_down(&self.inner.local),
                }
            }
            let plan = plan.clone().divided(shared.replicas());
            return self.peek_local(&plan).await;
        }
        self.peek_local(plan).await
    }

    /// The local counters of `plan`; a quota not counted yet is read from the store
    /// without being kept, so that asking about end users (`/v1/me?user=…`) adds
    /// nothing to the counters.
    async fn peek_local(&self, plan: &Plan) -> Peek {
        let mut peek = self.inner.local.peek(plan, millis((self.inner.clock)()));
        if plan.quota.is_some() && peek.quota_used.is_none() {
            peek.quota_used = self.tokens_since(plan, None).await;
        }
        if let (Some(user), Some(_), None) = (&plan.user, plan.user_quota, peek.user_quota_used) {
            peek.user_quota_used = self.tokens_since(plan, Some(user)).await;
        }
        peek
    }
}

/// Milliseconds since the Unix epoch, as the buckets count.
fn millis(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64
}

/// `name` cut to [`END_USER_BYTES`] at a character boundary.
pub(crate) fn cut_end_user(name: &str) -> &str {
    if name.len() <= END_USER_BYTES {
        return name;
    }
    let mut end = END_USER_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// What one request is checked against: the effective limits that count, the key, the
/// end user, the estimate.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The key's card (this thread's): its id and its counters.
    card: Arc<KeyCard>,
    user: Option<String>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    cost: u64,
    parallel: Option<u32>,
    quota: Option<u64>,
    user_rpm: Option<u64>,
    user_quota: Option<u64>,
    period: QuotaPeriod,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    /// When it was made: the instant the local counters check it at.
    at: DateTime<Utc>,
}

impl Plan {
    fn new(card: &Arc<KeyCard>, user: Option<String>, cost: u64, now: DateTime<Utc>) -> Self {
        let limits = &*card.limits;
        let period = limits.period();
        let has_user = user.is_some();
        // Calendar arithmetic only for a key with a quota.
        let counts_period =
            limits.quota_tokens.is_some() || (has_user && limits.per_user_quota_tokens.is_some());
        let (period_start, period_end) = if counts_period {
            (period.start(now), period.end(now))
        } else {
            (now, now)
        };
        Self {
            card: card.clone(),
            user,
            rpm: limits.rpm.map(u64::from),
            tpm: limits.tpm,
            // Never more than a minute's tokens: the estimate stays charged when the real
            // count is unknown (a client that left), and one request naming a huge
            // `max_tokens` must not lock its key (or a shared key's other users) out
            // for longer than that.
            cost: limits.tpm.map_or(cost, |tpm| cost.min(tpm)),
            parallel: limits.max_parallel,
            quota: limits.quota_tokens,
            user_rpm: limits.per_user_rpm.map(u64::from).filter(|_| has_user),
            user_quota: limits.per_user_quota_tokens.filter(|_| has_user),
            period,
            period_start,
            period_end,
            at: now,
        }
    }

    /// The plan with each per-minute and parallel limit divided by `replicas` (at least
    /// 1 each): what one replica enforces alone while the shared counters are out of
    /// reach. Quotas stay whole: their counts start from the shared store.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn divided(mut self, replicas: u32) -> Self {
        let n = u64::from(replicas.max(1));
        let cut = |limit: u64| (limit / n).max(1);
        self.rpm = self.rpm.map(cut);
        self.tpm = self.tpm.map(cut);
        self.user_rpm = self.user_rpm.map(cut);
        self.parallel = self.parallel.map(|p| (p / replicas.max(1)).max(1));
        self
    }

    /// The key's id.
    fn key(&self) -> &str {
        &self.card.id
    }

    /// The key's counters in this process.
    fn counters(&self) -> &KeyCounters {
        &self.card.counters
    }

    fn period_start_secs(&self) -> i64 {
        self.period_start.timestamp()
    }

    fn until_period_end_ms(&self, now_ms: f64) -> u64 {
        (self.period_end.timestamp_millis() as f64 - now_ms).max(1000.0) as u64
    }
}

/// What the counters hold for a plan, without counting.
#[derive(Debug, Clone, Default)]
pub(crate) struct Peek {
    requests: Option<Window>,
    tokens: Option<Window>,
    in_flight: u32,
    quota_used: Option<u64>,
    user_requests: Option<Window>,
    user_quota_used: Option<u64>,
}

/// What an admitted request took.
#[derive(Debug, Clone, Default)]
pub(crate) struct Granted {
    /// The `rpm` bucket after it: for the `x-ratelimit-*-requests` headers.
    pub(crate) requests: Option<Window>,
    /// The `tpm` bucket after it.
    pub(crate) tokens: Option<Window>,
    /// Counted in flight (under this id in Redis).
    in_flight: Option<String>,
}

/// Where an admission was counted.
#[derive(Debug)]
enum Backend {
    /// In the key's counters in this process, which its plan's card holds: no clone of
    /// the limiter (whose reference count every thread would write).
    Local,
    /// In Redis.
    #[cfg(feature = "redis")]
    Shared(Limiter),
}

/// A request the limiter admitted: releases its place in flight when dropped (or
/// [`release`](Self::release)d), and settles its tokens with [`settle`](Self::settle).
pub(crate) struct Admission {
    plan: Plan,
    backend: Backend,
    granted: Granted,
    released: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("key", &self.plan.key())
            .field("backend", &self.backend)
            .field("granted", &self.granted)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// The `rpm` and `tpm` buckets as this request left them.
    pub(crate) fn windows(&self) -> (Option<Window>, Option<Window>) {
        (self.granted.requests, self.granted.tokens)
    }

    /// The request is over (its body ended or its client left): its place in flight is
    /// free. Its tokens may be counted later.
    pub(crate) fn release(&mut self) {
        let Some(id) = self.take_place() else { return };
        match &self.backend {
            Backend::Local => self.plan.counters().release(),
            #[cfg(feature = "redis")]
            Backend::Shared(limiter) => {
                if let Some(shared) = &limiter.inner.shared {
                    shared.release(&self.plan, id);
                }
            }
        }
        #[cfg(not(feature = "redis"))]
        let _ = id;
    }

    /// The place in flight this admission still holds, taken out (once).
    fn take_place(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.released, true) {
            return None;
        }
        self.granted.in_flight.take()
    }

    /// The request is over and used `tokens` (prompt and completion; `None` when
    /// unknown): its place in flight is free, and the `tpm` bucket and the quotas are
    /// corrected by the difference from the estimate. An unknown count keeps the
    /// estimate in the `tpm` bucket (capped at the tpm, so a client that leaves cannot
    /// lock its key out for long) and counts 0 for the quotas, as the store counts it:
    /// a huge `max_tokens` whose answer is never counted must not use up a quota.
    pub(crate) fn settle(mut self, tokens: Option<u64>) {
        let place = self.take_place();
        let plan = &self.plan;
        let cost = plan.cost as i64;
        let (on_tokens, on_quota) = match tokens {
            Some(real) => (real as i64 - cost, real as i64 - cost),
            None => (0, -cost),
        };
        let settled = Settled {
            tokens: if plan.tpm.is_some() { on_tokens } else { 0 },
            quota: if plan.quota.is_some() || plan.user_quota.is_some() {
                on_quota
            } else {
                0
            },
        };
        match &self.backend {
            Backend::Local => {
                if place.is_none() && settled.is_nothing() {
                    return;
                }
                // The clock only for debt, which is taken from now.
                let now = if settled.tokens > 0 {
                    millis((plan.card.clock)())
                } else {
                    0.0
                };
                plan.counters().settle(plan, place.is_some(), settled, now);
            }
            #[cfg(feature = "redis")]
            Backend::Shared(limiter) => {
                if let Some(shared) = &limiter.inner.shared {
                    if let Some(id) = place {
                        shared.release(plan, id);
                    }
                    if !settled.is_nothing() {
                        shared.settle(plan, settled);
                    }
                }
            }
        }
    }
}

/// What [`Limiter::admit`] answers: the request's admission (`None` when nothing counts
/// for its key), or why it is refused.
pub(crate) type Admitted = Result<Option<Box<Admission>>, Box<Refusal>>;

/// What settling a request corrects, in tokens: the `tpm` bucket and the quotas (each
/// positive when the request used more than it was charged at admission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    tokens: i64,
    quota: i64,
}

impl Settled {
    fn is_nothing(self) -> bool {
        self.tokens == 0 && self.quota == 0
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Quota,
    Parallel,
    Requests,
    Tokens,
    UserRequests,
    UserQuota,
}

/// Why a request was refused, with what the client is told.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) limit: Limit,
    /// The limit's value.
    pub(crate) allowed: u64,
    /// What is used of it.
    pub(crate) used: u64,
    /// What the request asked for.
    pub(crate) requested: u64,
    /// When it may be tried again.
    pub(crate) retry_ms: u64,
    pub(crate) end_user: Option<String>,
    pub(crate) period: QuotaPeriod,
    /// The buckets, for the `x-ratelimit-*` headers.
    pub(crate) requests: Option<Window>,
    pub(crate) tokens: Option<Window>,
}

impl Refusal {
    fn new(
        limit: Limit,
        plan: &Plan,
        allowed: u64,
        used: u64,
        requested: u64,
        retry_ms: u64,
    ) -> Box<Self> {
        Box::new(Self {
            limit,
            allowed,
            used,
            requested,
            retry_ms: retry_ms.max(1),
            end_user: plan.user.clone(),
            period: plan.period,
            requests: None,
            tokens: None,
        })
    }

    /// The reason in [`Refused`]: `requests`, `tokens`, `quota` or `parallel`.
    pub(crate) fn reason(&self) -> &'static str {
        match self.limit {
            Limit::Quota | Limit::UserQuota => "quota",
            Limit::Parallel => "parallel",
            Limit::Requests | Limit::UserRequests => "requests",
            Limit::Tokens => "tokens",
        }
    }

    /// Whether the quota is what is exhausted (`insufficient_quota`), not a rate.
    pub(crate) fn is_quota(&self) -> bool {
        matches!(self.limit, Limit::Quota | Limit::UserQuota)
    }

    /// OpenAI's error `type` for it: `requests`, `tokens` or `insufficient_quota`.
    pub(crate) fn kind(&self) -> &'static str {
        match self.limit {
            Limit::Quota | Limit::UserQuota => "insufficient_quota",
            Limit::Tokens => "tokens",
            _ => "requests",
        }
    }

    /// The sentence the client reads, in OpenAI's words where it has some.
    pub(crate) fn message(&self) -> String {
        let wait = format_duration(self.retry_ms);
        let who = match &self.end_user {
            Some(user) => format!(" for end user '{user}'"),
            None => String::new(),
        };
        let (Limit::Quota | Limit::UserQuota) = self.limit else {
            let what = match self.limit {
                Limit::Parallel => "requests in flight at once",
                Limit::Tokens => "tokens per min (TPM)",
                _ => "requests per min (RPM)",
            };
            return format!(
                "Rate limit reached{who} on {what}: Limit {}, Used {}, Requested {}. Please try again in {wait}.",
                self.allowed, self.used, self.requested
            );
        };
        format!(
            "You exceeded your current quota{who}: {} of {} tokens this {} are used. It resets in {wait}.",
            self.used,
            self.allowed,
            self.period.as_str()
        )
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `1.5s`,
/// `6m0s`, `1h2m3s`.
pub(crate) fn format_duration(ms: u64) -> String {
    let mut text = String::new();
    let _ = write_duration(&mut text, ms);
    text
}

/// [`format_duration`] into `out` (a header's buffer). Numbers are written with
/// `itoa`, not the formatting machinery: it runs on every answer to a limited key.
pub(crate) fn write_duration(out: &mut impl std::fmt::Write, ms: u64) -> std::fmt::Result {
    let mut n = itoa::Buffer::new();
    if ms < 1000 {
        out.write_str(n.format(ms))?;
        return out.write_str("ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    if hours > 0 {
        out.write_str(n.format(hours))?;
        out.write_str("h")?;
    }
    if hours > 0 || minutes > 0 {
        out.write_str(n.format(minutes))?;
        out.write_str("m")?;
    }
    let (seconds, millis) = (rest / 1000, rest % 1000);
    out.write_str(n.format(seconds))?;
    // The fraction without its trailing zeros: `.5`, `.25`, `.125`.
    let (fraction, digits) = match millis {
        0 => (0, 0),
        m if m % 100 == 0 => (m / 100, 1),
        m if m % 10 == 0 => (m / 10, 2),
        m => (m, 3),
    };
    if digits > 0 {
        out.write_str(".")?;
        let text = n.format(fraction);
        for _ in text.len()..digits {
            out.write_str("0")?;
        }
        out.write_str(text)?;
    }
    out.write_str("s")
}

/// An instant `ms` after `now`.
fn after(now: DateTime<Utc>, ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(now.timestamp_millis().saturating_add(ms as i64))
        .single()
        .unwrap_or(now)
}

#[cfg(test)]
mod tests;
