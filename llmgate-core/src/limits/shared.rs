//! Counters in Redis, shared by every replica ([`Limiter::shared`](super::Limiter::shared)).
//!
//! One Lua script checks and counts an admission in one round trip (EVALSHA; the script
//! is sent once per connection). It reads Redis's own clock (`TIME`), so replicas whose
//! clocks differ still share one bucket. Settling a request's tokens and freeing its
//! place in flight are sent in the background, off the request path. Every key is under
//! `llmgate:` and expires: buckets when full again, quota counts a day after their
//! period, places in flight (a sorted set of request ids by start time) after
//! [`IN_FLIGHT_STALE`], so that a replica that dies holding places does not hold them
//! for ever.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::bucket::Window;
use super::local::Local;
use super::{Granted, Inner, Limit, Limiter, Peek, Plan, Refusal, Settled};

/// The longest a Redis call may take before the request is counted locally instead. A
/// local Redis answers in well under a millisecond; 250 ms leaves room for a machine
/// under load (at 100 ms a busy 2-core test machine fell back now and then) while a
/// hung Redis still delays only the requests of one quarter second.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a first connection (or a reconnection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the background task checks that Redis answers.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A place in flight older than this is dropped (a replica died holding it).
pub(super) const IN_FLIGHT_STALE: Duration = Duration::from_secs(30 * 60);
/// How long a quota count outlives its period.
const QUOTA_KEEP_SECS: i64 = 24 * 3600;

/// Not connected yet: counted locally, nothing said yet.
const STARTING: u8 = 0;
/// Counted in Redis.
const UP: u8 = 1;
/// Counted locally, said in the log.
const DOWN: u8 = 2;

const ADMIT: &str = r#"
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W = 60000
local rpm, tpm, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local par, id, stale = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local quota, urpm, uquota = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local function tat_of(key)
  local v = redis.call('GET', key)
  local tat = 0
  if v then tat = tonumber(v) end
  if tat < now then tat = now end
  return tat
end
local function window(tat, limit)
  local ahead = tat - now
  local rem = math.floor((W - ahead) / (W / limit))
  if rem < 0 then rem = 0 end
  if rem > limit then rem = limit end
  return rem, math.ceil(ahead)
end
local function take(tat, limit, n)
  local interval = W / limit
  local need = n
  if need > limit then need = limit end
  local over = tat + need * interval - now - W
  if over > 0.000001 then return nil, math.max(1, math.ceil(over)) end
  return tat + n * interval, 0
end

local missing = 0
if quota > 0 and redis.call('EXISTS', KEYS[4]) == 0 then missing = missing + 1 end
if uquota > 0 and redis.call('EXISTS', KEYS[6]) == 0 then missing = missing + 2 end
if mode == 'admit' and missing > 0 then return {2, missing} end

local rtat, ttat, urtat = now, now, now
if rpm > 0 then rtat = tat_of(KEYS[1]) end
if tpm > 0 then ttat = tat_of(KEYS[2]) end
if urpm > 0 then urtat = tat_of(KEYS[5]) end
local rrem, rreset, trem, treset = -1, 0, -1, 0
if rpm > 0 then rrem, rreset = window(rtat, rpm) end
if tpm > 0 then trem, treset = window(ttat, tpm) end
local inflight = 0
if par > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - stale)
  inflight = redis.call('ZCARD', KEYS[3])
end
local qused, uqused = -1, -1
if quota > 0 then qused = tonumber(redis.call('GET', KEYS[4]) or '-1') end
if uquota > 0 then uqused = tonumber(redis.call('GET', KEYS[6]) or '-1') end

if mode == 'peek' then
  local urrem, urreset = -1, 0
  if urpm > 0 then urrem, urreset = window(urtat, urpm) end
  return {3, inflight, qused, uqused, rrem, rreset, trem, treset, urrem, urreset}
end

local function refuse(which, allowed, used, retry)
  return {1, which, allowed, used, retry, rrem, rreset, trem, treset}
end
if quota > 0 and qused >= quota then return refuse(1, quota, qused, 0) end
if par > 0 and inflight >= par then return refuse(2, par, inflight, 1000) end
local nr, nt, nur, retry
if rpm > 0 then
  nr, retry = take(rtat, rpm, 1)
  if not nr then return refuse(3, rpm, rpm - rrem, retry) end
end
if tpm > 0 then
  nt, retry = take(ttat, tpm, cost)
  if not nt then return refuse(4, tpm, tpm - trem, retry) end
end
if urpm > 0 then
  nur, retry = take(urtat, urpm, 1)
  if not nur then
    local urrem = window(urtat, urpm)
    return refuse(5, urpm, urpm - urrem, retry)
  end
end
if uquota > 0 and uqused >= uquota then return refuse(6, uquota, uqused, 0) end

local function store(key, tat)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
if nr then store(KEYS[1], nr); rrem, rreset = window(nr, rpm) end
if nt then store(KEYS[2], nt); trem, treset = window(nt, tpm) end
if nur then store(KEYS[5], nur) end
if par > 0 then
  redis.call('ZADD', KEYS[3], now, id)
  redis.call('PEXPIRE', KEYS[3], stale)
end
if quota > 0 then redis.call('INCRBY', KEYS[4], cost) end
if uquota > 0 then redis.call('INCRBY', KEYS[6], cost) end
return {0, 0, 0, 0, 0, rrem, rreset, trem, treset}
"#;

const SETTLE: &str = r#"
local tpm, delta, qdelta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  -- Debt counts from now when the bucket refilled (or expired) since the admission.
  if delta > 0 and tat < now then tat = now end
  tat = tat + delta * 60000 / tpm
  if tat > now then
    redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  else
    redis.call('DEL', KEYS[1])
  end
end
if qdelta ~= 0 then
  for i = 2, 3 do
    if ARGV[i + 2] == '1' and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], qdelta)
    end
  end
end
return 0
"#;

pub(super) struct Shared {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    /// [`STARTING`], [`UP`] or [`DOWN`].
    state: AtomicU8,
    replicas: u32,
    prefix: String,
    admit: Script,
    settle: Script,
    next_id: AtomicU64,
    replica_id: u64,
}

impl Shared {
    pub(super) fn new(client: redis::Client, replicas: u32, prefix: String) -> Self {
        Self {
            client,
            connection: Mutex::new(None),
            state: AtomicU8::new(STARTING),
            replicas: replicas.max(1),
            prefix,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            next_id: AtomicU64::new(0),
            replica_id: rand::random(),
        }
    }

    pub(super) fn replicas(&self) -> u32 {
        self.replicas
    }

    pub(super) fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Starts the background task that connects and checks Redis every second; it ends
    /// when the limiter is dropped.
    pub(super) fn start(&self, inner: Weak<Inner>) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(watch(inner));
            }
            Err(_) => {
                let spawned = std::thread::Builder::new()
                    .name("llmgate-redis".into())
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(runtime) => runtime.block_on(watch(inner)),
                            Err(err) => {
                                tracing::error!(error = %err, "cannot start the Redis connection's runtime; limits stay local")
                            }
                        }
                    });
                if let Err(err) = spawned {
                    tracing::error!(error = %err, "cannot start the Redis connection's thread; limits stay local");
                }
            }
        }
    }

    /// A call failed or timed out: count locally until the probe finds Redis again.
    pub(super) fn went_down(&self, local: &Local) {
        let before = self.state.swap(DOWN, Ordering::Relaxed);
        if before == UP {
            local.clear();
        }
        if before != DOWN {
            tracing::warn!(
                replicas = self.replicas,
                "Redis does not answer: limits are counted by this replica alone, each divided by {}",
                self.replicas
            );
        }
    }

    fn came_up(&self, local: &Local) {
        if self.state.swap(UP, Ordering::Relaxed) != UP {
            local.clear();
            tracing::info!("limits are counted in Redis, shared by every replica");
        }
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connects if need be, then pings.
    async fn probe(&self, local: &Local) {
        let connection = match self.connection() {
            Some(connection) => connection,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(CALL_TIMEOUT)
                    .set_number_of_retries(1);
                let connect = ConnectionManager::new_with_config(self.client.clone(), config);
                match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
                    Ok(Ok(connection)) => {
                        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(connection.clone());
                        connection
                    }
                    _ => {
                        self.went_down(local);
                        return;
                    }
                }
            }
        };
        let mut connection = connection;
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(CALL_TIMEOUT * 5, ping).await {
            Ok(Ok(_)) => self.came_up(local),
            _ => self.went_down(local),
        }
    }

    fn keys(&self, plan: &Plan) -> [String; 6] {
        let p = &self.prefix;
        let key = plan.key();
        let start = plan.period_start_secs();
        let user = plan.user.as_deref().unwrap_or("");
        let k = key.len();
        [
            format!("{p}r:{key}"),
            format!("{p}t:{key}"),
            format!("{p}p:{key}"),
            format!("{p}q:{key}:{start}"),
            format!("{p}ur:{k}:{key}:{user}"),
            format!("{p}uq:{k}:{key}:{start}:{user}"),
        ]
    }

    async fn run(&self, mode: &str, plan: &Plan, id: &str, quotas: bool) -> Result<Vec<i64>, ()> {
        let mut connection = self.connection().ok_or(())?;
        let mut call = self.admit.prepare_invoke();
        for key in self.keys(plan) {
            call.key(key);
        }
        call.arg(mode)
            .arg(plan.rpm.unwrap_or(0))
            .arg(plan.tpm.unwrap_or(0))
            .arg(plan.cost)
            .arg(plan.parallel.unwrap_or(0))
            .arg(id)
            .arg(IN_FLIGHT_STALE.as_millis() as u64)
            .arg(plan.quota.filter(|_| quotas).unwrap_or(0))
            .arg(plan.user_rpm.unwrap_or(0))
            .arg(plan.user_quota.filter(|_| quotas).unwrap_or(0));
        match tokio::time::timeout(CALL_TIMEOUT, call.invoke_async::<Vec<i64>>(&mut connection))
            .await
        {
            Ok(Ok(reply)) if !reply.is_empty() => Ok(reply),
            Ok(Ok(_)) => Err(()),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "Redis call failed");
                Err(())
            }
            Err(_) => Err(()),
        }
    }

    /// Checks and counts `plan` in Redis. `Err(())` when Redis did not answer in time.
    pub(super) async fn admit(
        &self,
        plan: &Plan,
        limiter: &Limiter,
    ) -> Result<Result<Granted, Box<Refusal>>, ()> {
        let id = format!(
            "{:x}-{:x}",
            self.replica_id,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        // The script may have taken a place in flight even when its answer is lost (a
        // timeout, or this future dropped by a client that left): unless the place is
        // handed to the admission below, it is freed, else it would hold one of the
        // key's `max_parallel` on every replica until it goes stale.
        let mut place = PlaceGuard {
            shared: self,
            plan,
            id: plan.parallel.map(|_| id.clone()),
        };
        let mut quotas = true;
        let mut reply = self.run("admit", plan, &id, quotas).await?;
        if reply[0] == 2 {
            // The first request of the period (or of this Redis): its quota counts start
            // from what the store holds.
            let missing = reply.get(1).copied().unwrap_or(0);
            quotas = self.start_quotas(plan, limiter, missing).await?;
            reply = self.run("admit", plan, &id, quotas).await?;
            if reply[0] == 2 {
                reply = self.run("admit", plan, &id, false).await?;
            }
        }
        let window = |limit: Option<u64>, remaining: i64, reset: i64| {
            limit.filter(|_| remaining >= 0).map(|limit| Window {
                limit,
                remaining: remaining as u64,
                reset_ms: reset.max(0) as u64,
            })
        };
        let at = |i: usize| reply.get(i).copied().unwrap_or(0);
        let requests = window(plan.rpm, at(5), at(6));
        let tokens = window(plan.tpm, at(7), at(8));
        if at(0) == 1 {
            place.id = None; // refused: the script took nothing
        }
        match at(0) {
            0 => Ok(Ok(Granted {
                requests,
                tokens,
                in_flight: place.id.take(),
            })),
            1 => {
                let limit = match at(1) {
                    1 => Limit::Quota,
                    2 => Limit::Parallel,
                    3 => Limit::Requests,
                    4 => Limit::Tokens,
                    5 => Limit::UserRequests,
                    _ => Limit::UserQuota,
                };
                let now = chrono::Utc::now().timestamp_millis() as f64;
                let retry = match limit {
                    Limit::Quota | Limit::UserQuota => plan.until_period_end_ms(now),
                    _ => at(4).max(1) as u64,
                };
                let requested = match limit {
                    Limit::Tokens | Limit::Quota | Limit::UserQuota => plan.cost,
                    _ => 1,
                };
                let mut refusal = Refusal::new(
                    limit,
                    plan,
                    at(2).max(0) as u64,
                    at(3).max(0) as u64,
                    requested,
                    retry,
                );
                refusal.requests = requests;
                refusal.tokens = tokens;
                Ok(Err(refusal))
            }
            _ => Err(()),
        }
    }

    /// Sets the quota counts Redis lacks (`missing`: 1 the key's, 2 the end user's)
    /// from the store. `Ok(false)` when the store could not say: the request is then
    /// admitted without its quotas.
    async fn start_quotas(&self, plan: &Plan, limiter: &Limiter, missing: i64) -> Result<bool, ()> {
        let keys = self.keys(plan);
        let ttl =
            (plan.period_end.timestamp() - chrono::Utc::now().timestamp()).max(0) + QUOTA_KEEP_SECS;
        let mut pipe = redis::pipe();
        for (bit, user, key) in [(1, None, &keys[3]), (2, plan.user.as_deref(), &keys[5])] {
            if missing & bit == 0 {
                continue;
            }
            let Some(used) = limiter.tokens_since(plan, user).await else {
                return Ok(false);
            };
            pipe.cmd("SET")
                .arg(key)
                .arg(used)
                .arg("NX")
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        let mut connection = self.connection().ok_or(())?;
        match tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => Ok(true),
            _ => Err(()),
        }
    }

    /// What Redis holds for `plan`, counting nothing.
    pub(super) async fn peek(&self, plan: &Plan, limiter: &Limiter) -> Result<Peek, ()> {
        let reply = self.run("peek", plan, "", true).await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(-1);
        let window = |limit: Option<u64>, remaining: i64, reset: i64| {
            limit.filter(|_| remaining >= 0).map(|limit| Window {
                limit,
                remaining: remaining as u64,
                reset_ms: reset.max(0) as u64,
            })
        };
        let used = |value: i64| (value >= 0).then_some(value as u64);
        let mut peek = Peek {
            in_flight: at(1).max(0) as u32,
            quota_used: used(at(2)),
            user_quota_used: used(at(3)),
            requests: window(plan.rpm, at(4), at(5)),
            tokens: window(plan.tpm, at(6), at(7)),
            user_requests: window(plan.user_rpm, at(8), at(9)),
        };
        // Not counted in Redis yet: what the store says.
        if plan.quota.is_some() && peek.quota_used.is_none() {
            peek.quota_used = limiter.tokens_since(plan, None).await;
        }
        if let (Some(user), Some(_), None) = (&plan.user, plan.user_quota, peek.user_quota_used) {
            peek.user_quota_used = limiter.tokens_since(plan, Some(user)).await;
        }
        Ok(peek)
    }

    /// Frees a place in flight, in the background.
    pub(super) fn release(&self, plan: &Plan, id: String) {
        let Some(mut connection) = self.connection() else {
            return;
        };
        let key = format!("{}p:{}", self.prefix, plan.key());
        spawn(async move {
            let mut command = redis::cmd("ZREM");
            command.arg(key).arg(id);
            let zrem = command.query_async::<i64>(&mut connection);
            if tokio::time::timeout(CALL_TIMEOUT * 10, zrem).await.is_err() {
                tracing::debug!("Redis did not free a place in flight; it expires");
            }
        });
    }

    /// Corrects the `tpm` bucket and the quota counts, in the background.
    pub(super) fn settle(&self, plan: &Plan, settled: Settled) {
        let Some(mut connection) = self.connection() else {
            return;
        };
        let keys = self.keys(plan);
        let script = self.settle.clone();
        let tpm = plan.tpm.unwrap_or(0);
        let flag = |on: bool| if on { "1" } else { "0" };
        let (quota, user_quota) = (flag(plan.quota.is_some()), flag(plan.user_quota.is_some()));
        spawn(async move {
            let mut call = script.prepare_invoke();
            call.key(&keys[1])
                .key(&keys[3])
                .key(&keys[5])
                .arg(tpm)
                .arg(settled.tokens)
                .arg(settled.quota)
                .arg(quota)
                .arg(user_quota);
            let settled = call.invoke_async::<i64>(&mut connection);
            if !matches!(
                tokio::time::timeout(CALL_TIMEOUT * 10, settled).await,
                Ok(Ok(_))
            ) {
                tracing::debug!("Redis did not take a request's settled tokens");
            }
        });
    }
}

/// Frees the place in flight an admission may have taken in Redis, unless taken out
/// (`id` set to `None`) by an admission that holds it.
struct PlaceGuard<'a> {
    shared: &'a Shared,
    plan: &'a Plan,
    id: Option<String>,
}

impl Drop for PlaceGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.release(self.plan, id);
        }
    }
}

fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}

/// Connects, then checks Redis every second while the limiter lives.
async fn watch(inner: Weak<Inner>) {
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            let Some(shared) = &inner.shared else { return };
            shared.probe(&inner.local).await;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
