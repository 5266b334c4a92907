//! [`LimitStatus`]: what a key may still use, for `/v1/me` and the admin views.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{after, KeyLimits, LimiterMode, Peek, Plan, QuotaPeriod, Window};

/// What a key may still use and when each limit resets ([`Limiter::status`](super::Limiter::status)).
/// A limit the key does not have is `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitStatus {
    /// The key's effective limits (its own, then the defaults).
    pub limits: KeyLimits,
    /// Where the counters are kept now.
    pub mode: LimiterMode,
    /// Requests per minute.
    pub requests: Option<WindowStatus>,
    /// Tokens per minute.
    pub tokens: Option<WindowStatus>,
    /// Requests in flight.
    pub in_flight: Option<InFlightStatus>,
    /// The token quota of the period.
    pub quota: Option<QuotaStatus>,
    /// The end user asked about, with the key's per-user limits.
    pub end_user: Option<EndUserStatus>,
}

/// A per-minute limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowStatus {
    /// The limit per minute.
    pub limit: u64,
    /// What may be used now.
    pub remaining: u64,
    /// When all of it may be used again.
    pub resets_at: DateTime<Utc>,
}

/// Requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InFlightStatus {
    /// The most at once.
    pub limit: u32,
    /// How many now.
    pub current: u32,
}

/// A token quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaStatus {
    /// Tokens per period.
    pub tokens: u64,
    /// Tokens used in this period (with the estimates of requests in flight).
    pub used: u64,
    /// Tokens left.
    pub remaining: u64,
    /// The period.
    pub period: QuotaPeriod,
    /// When the next period starts.
    pub resets_at: DateTime<Utc>,
}

/// One end user of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndUserStatus {
    /// The end user, as requests name it.
    pub name: String,
    /// Requests per minute (`per_user_rpm`).
    pub requests: Option<WindowStatus>,
    /// The token quota (`per_user_quota_tokens`).
    pub quota: Option<QuotaStatus>,
}

pub(super) fn build(
    limits: KeyLimits,
    mode: LimiterMode,
    plan: &Plan,
    peek: Peek,
    now: DateTime<Utc>,
) -> LimitStatus {
    let window = |w: Option<Window>| {
        w.map(|w| WindowStatus {
            limit: w.limit,
            remaining: w.remaining,
            resets_at: after(now, w.reset_ms),
        })
    };
    let quota = |tokens: Option<u64>, used: Option<u64>| {
        tokens.map(|tokens| {
            let used = used.unwrap_or(0);
            QuotaStatus {
                tokens,
                used,
                remaining: tokens.saturating_sub(used),
                period: plan.period,
                resets_at: plan.period_end,
            }
        })
    };
    LimitStatus {
        mode,
        requests: window(peek.requests),
        tokens: window(peek.tokens),
        in_flight: plan.parallel.map(|limit| InFlightStatus {
            limit,
            current: peek.in_flight,
        }),
        quota: quota(plan.quota, peek.quota_used),
        end_user: plan.user.as_ref().map(|name| EndUserStatus {
            name: name.clone(),
            requests: window(peek.user_requests),
            quota: quota(plan.user_quota, peek.user_quota_used),
        }),
        limits,
    }
}
