//! Counters in this process: [`Limiter::local`](super::Limiter::local), and a shared
//! limiter's fallback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::bucket::Bucket;
use super::{Granted, Limit, Peek, Plan, Refusal, Settled};

/// A map keyed by names: foldhash, several times cheaper per lookup than the standard
/// SipHash, and still seeded per process (clients choose end users' names).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// End users counted at once beyond which those with nothing to remember (a full
/// bucket, no quota count) are forgotten: clients name end users, so their number must
/// not grow without bound. A forgotten quota count is read from the store again.
pub(super) const MAX_END_USERS: usize = 100_000;

/// Every key's counters. A request locks only its own key's [`KeyCounters`], which its
/// card holds: two serving threads write the same memory only when they count the same
/// key, and then one cache line of it.
#[derive(Debug, Default)]
pub(super) struct Local {
    /// Each key's counters, by key id: locked only to find a key's counters (for a new
    /// card), to prune end users and to clear.
    keys: Mutex<HashMap<Box<str>, Arc<KeyCounters>>>,
    /// End users counted at once, over every key (kept exact only at each prune: two
    /// threads that add end users while a prune runs may leave it off by their number).
    end_users: AtomicUsize,
    /// The count of end users at which they are pruned next.
    prune_at: AtomicUsize,
}

/// One key's counters, the same for every thread (each thread's card of the key holds
/// them). Aligned to a cache line, so that no other memory shares the line its lock
/// and buckets are on: a request writes that line and none besides.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct KeyCounters {
    entry: Mutex<KeyEntry>,
}

/// `repr(C)`: what every request writes (the buckets, the requests in flight) first, on
/// the line of the lock.
#[derive(Debug, Default)]
#[repr(C)]
struct KeyEntry {
    requests: Bucket,
    tokens: Bucket,
    in_flight: u32,
    quota: Option<Quota>,
    users: HashMap<String, UserEntry>,
}

#[derive(Debug, Default)]
struct UserEntry {
    requests: Bucket,
    quota: Option<Quota>,
}

/// Tokens counted in one quota period (settled, plus the estimates of requests in
/// flight).
#[derive(Debug, Clone, Copy)]
struct Quota {
    period_start: i64,
    used: u64,
}

impl Quota {
    fn used_in(quota: &Option<Quota>, period_start: i64) -> Option<u64> {
        quota
            .filter(|q| q.period_start == period_start)
            .map(|q| q.used)
    }
}

/// Locks `mutex`: a panic while counting leaves numbers, never a broken invariant, so a
/// poisoned lock goes on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Local {
    /// The counters of the key `key_id`, made the first time it is asked for (by its
    /// first card).
    pub(super) fn counters(&self, key_id: &str) -> Arc<KeyCounters> {
        let mut keys = lock(&self.keys);
        if let Some(counters) = keys.get(key_id) {
            return counters.clone();
        }
        let counters = Arc::<KeyCounters>::default();
        keys.insert(key_id.into(), counters.clone());
        counters
    }

    /// End users counted now.
    pub(super) fn end_users(&self) -> usize {
        self.end_users.load(Ordering::Relaxed)
    }

    /// Forgets every count (the counters live elsewhere from now on, or start again).
    /// Each key's counters are emptied where they are: the keys' cards keep them.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(super) fn clear(&self) {
        let keys = lock(&self.keys);
        for counters in keys.values() {
            *counters.lock() = KeyEntry::default();
        }
        self.end_users.store(0, Ordering::Relaxed);
        self.prune_at.store(0, Ordering::Relaxed);
    }

    /// Whether the key's quota and the end user's must be read from the store first.
    pub(super) fn quotas_to_load(&self, plan: &Plan) -> (bool, bool) {
        let entry = plan.counters().lock();
        let start = plan.period_start_secs();
        let key = plan.quota.is_some() && Quota::used_in(&entry.quota, start).is_none();
        let user = match (&plan.user, plan.user_quota) {
            (Some(user), Some(_)) => entry
                .users
                .get(user)
                .and_then(|u| Quota::used_in(&u.quota, start))
                .is_none(),
            _ => false,
        };
        (key, user)
    }

    /// The tokens the store counts in the period, unless counted here already.
    pub(super) fn set_quota(&self, plan: &Plan, user: Option<&str>, used: u64) {
        let start = plan.period_start_secs();
        let mut entry = plan.counters().lock();
        let entry = &mut *entry;
        let quota = match user {
            None => &mut entry.quota,
            Some(user) => {
                if !entry.users.contains_key(user) {
                    self.end_users.fetch_add(1, Ordering::Relaxed);
                }
                &mut entry.users.entry(user.to_owned()).or_default().quota
            }
        };
        if Quota::used_in(quota, start).is_none() {
            *quota = Some(Quota {
                period_start: start,
                used,
            });
        }
    }

    /// Checks every limit of `plan` in order and counts the request only if all pass.
    pub(super) fn admit(&self, plan: &Plan, now: f64) -> Result<Granted, Box<Refusal>> {
        let start = plan.period_start_secs();
        if plan.user.is_some() && self.end_users() >= self.prune_at().max(MAX_END_USERS) {
            self.prune(now);
        }
        let mut entry = plan.counters().lock();
        let entry = &mut *entry;
        let refuse = |limit, allowed, used, requested, retry_ms, entry: &KeyEntry| {
            let mut refusal = Refusal::new(limit, plan, allowed, used, requested, retry_ms);
            refusal.requests = plan.rpm.map(|rpm| entry.requests.window(rpm, now));
            refusal.tokens = plan.tpm.map(|tpm| entry.tokens.window(tpm, now));
            Err(refusal)
        };
        if let Some(quota) = plan.quota {
            if let Some(used) = Quota::used_in(&entry.quota, start) {
                if used >= quota {
                    let retry = plan.until_period_end_ms(now);
                    return refuse(Limit::Quota, quota, used, plan.cost, retry, entry);
                }
            }
        }
        if let Some(max) = plan.parallel {
            if entry.in_flight >= max {
                return refuse(
                    Limit::Parallel,
                    max.into(),
                    entry.in_flight.into(),
                    1,
                    1000,
                    entry,
                );
            }
        }
        let mut requests = None;
        if let Some(rpm) = plan.rpm {
            match entry.requests.try_take(rpm, 1, now) {
                Ok(tat) => requests = Some(tat),
                Err(short) => {
                    let used = rpm - short.window.remaining;
                    return refuse(Limit::Requests, rpm, used, 1, short.retry_ms, entry);
                }
            }
        }
        let mut tokens = None;
        if let Some(tpm) = plan.tpm {
            match entry.tokens.try_take(tpm, plan.cost, now) {
                Ok(tat) => tokens = Some(tat),
                Err(short) => {
                    let used = tpm - short.window.remaining;
                    return refuse(Limit::Tokens, tpm, used, plan.cost, short.retry_ms, entry);
                }
            }
        }
        let mut user_requests = None;
        if let (Some(user), true) = (
            &plan.user,
            plan.user_rpm.is_some() || plan.user_quota.is_some(),
        ) {
            if !entry.users.contains_key(user) {
                self.end_users.fetch_add(1, Ordering::Relaxed);
                entry.users.insert(user.clone(), UserEntry::default());
            }
            let user_entry = &entry.users[user];
            if let Some(rpm) = plan.user_rpm {
                match user_entry.requests.try_take(rpm, 1, now) {
                    Ok(tat) => user_requests = Some(tat),
                    Err(short) => {
                        let used = rpm - short.window.remaining;
                        return refuse(Limit::UserRequests, rpm, used, 1, short.retry_ms, entry);
                    }
                }
            }
            if let Some(quota) = plan.user_quota {
                if let Some(used) = Quota::used_in(&user_entry.quota, start) {
                    if used >= quota {
                        let retry = plan.until_period_end_ms(now);
                        return refuse(Limit::UserQuota, quota, used, plan.cost, retry, entry);
                    }
                }
            }
        }
        // Everything passed: count it.
        let mut granted = Granted::default();
        if let (Some(rpm), Some(tat)) = (plan.rpm, requests) {
            entry.requests.tat = tat;
            granted.requests = Some(entry.requests.window(rpm, now));
        }
        if let (Some(tpm), Some(tat)) = (plan.tpm, tokens) {
            entry.tokens.tat = tat;
            granted.tokens = Some(entry.tokens.window(tpm, now));
        }
        if plan.parallel.is_some() {
            entry.in_flight += 1;
            granted.in_flight = Some(String::new());
        }
        if let Some(q) = entry.quota.as_mut().filter(|q| q.period_start == start) {
            q.used = q.used.saturating_add(plan.cost);
        }
        if let Some(user) = &plan.user {
            if let Some(u) = entry.users.get_mut(user) {
                if let Some(tat) = user_requests {
                    u.requests.tat = tat;
                }
                if let Some(q) = u.quota.as_mut().filter(|q| q.period_start == start) {
                    q.used = q.used.saturating_add(plan.cost);
                }
            }
        }
        Ok(granted)
    }

    /// What the counters hold for `plan`.
    pub(super) fn peek(&self, plan: &Plan, now: f64) -> Peek {
        let start = plan.period_start_secs();
        let entry = plan.counters().lock();
        let user = plan.user.as_ref().and_then(|u| entry.users.get(u));
        let empty = Bucket::default();
        Peek {
            requests: plan.rpm.map(|rpm| entry.requests.window(rpm, now)),
            tokens: plan.tpm.map(|tpm| entry.tokens.window(tpm, now)),
            in_flight: entry.in_flight,
            quota_used: Quota::used_in(&entry.quota, start),
            user_requests: plan
                .user_rpm
                .map(|rpm| user.map_or(&empty, |u| &u.requests).window(rpm, now)),
            user_quota_used: user.and_then(|u| Quota::used_in(&u.quota, start)),
        }
    }

    fn prune_at(&self) -> usize {
        self.prune_at.load(Ordering::Relaxed)
    }

    /// Forgets end users with nothing to remember; prunes again only once as many more
    /// are counted, so that pruning costs O(1) per request on average. Takes the keys'
    /// lock, then each key's in turn (never the other way round).
    fn prune(&self, now: f64) {
        let keys = lock(&self.keys);
        // Another thread may have pruned while this one waited.
        if self.end_users() < self.prune_at().max(MAX_END_USERS) {
            return;
        }
        let mut kept = 0;
        for counters in keys.values() {
            let mut entry = counters.lock();
            entry
                .users
                .retain(|_, u| !u.requests.is_full(now) || u.quota.is_some_and(|q| q.used > 0));
            kept += entry.users.len();
        }
        if kept >= MAX_END_USERS {
            // Still too many with something to remember: forget quota counts too (they
            // are read from the store again).
            kept = 0;
            for counters in keys.values() {
                let mut entry = counters.lock();
                entry.users.retain(|_, u| !u.requests.is_full(now));
                kept += entry.users.len();
            }
        }
        self.end_users.store(kept, Ordering::Relaxed);
        self.prune_at
            .store((kept * 2).max(MAX_END_USERS), Ordering::Relaxed);
    }
}

impl KeyCounters {
    fn lock(&self) -> MutexGuard<'_, KeyEntry> {
        lock(&self.entry)
    }

    /// A request counted in flight is over.
    pub(super) fn release(&self) {
        let mut entry = self.lock();
        entry.in_flight = entry.in_flight.saturating_sub(1);
    }

    /// A request is over: its place in flight is free (`release`), and it used
    /// `tokens` more (or fewer, when negative) than its `tpm` estimate and `quota` more
    /// or fewer than its quotas counted: one lock for all of it.
    pub(super) fn settle(&self, plan: &Plan, release: bool, settled: Settled, now: f64) {
        let start = plan.period_start_secs();
        let mut entry = self.lock();
        let entry = &mut *entry;
        if release {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
        if let (Some(tpm), true) = (plan.tpm, settled.tokens != 0) {
            entry.tokens.adjust(tpm, settled.tokens, now);
        }
        if settled.quota == 0 {
            return;
        }
        let apply = |quota: &mut Option<Quota>| {
            if let Some(q) = quota.as_mut().filter(|q| q.period_start == start) {
                q.used = q.used.saturating_add_signed(settled.quota);
            }
        };
        apply(&mut entry.quota);
        if let Some(user) = plan.user.as_ref().and_then(|u| entry.users.get_mut(u)) {
            apply(&mut user.quota);
        }
    }
}
