//! Per-minute limits as token buckets, kept as one number each (GCRA).
//!
//! A bucket of `limit` per minute holds at most `limit` and refills `limit / 60` per
//! second: a burst of `limit`, then a steady `limit / 60` per second. Instead of a level
//! and a time, it keeps one instant, the *theoretical arrival time* (`tat`): when the
//! bucket will be full again. Each unit taken pushes it `60 s / limit` later; a bucket is
//! full when `tat <= now`. The same arithmetic runs in the Redis script
//! (`shared.rs`), so local and shared counters agree.

/// The window of a per-minute limit, in milliseconds.
pub(crate) const WINDOW_MS: f64 = 60_000.0;

/// A per-minute limit's bucket state: when it is full again, in milliseconds since the
/// Unix epoch (0 or any past instant: full).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Bucket {
    pub(crate) tat: f64,
}

/// What a bucket shows a client: the `x-ratelimit-*` figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// The limit per minute.
    pub(crate) limit: u64,
    /// What may be taken now.
    pub(crate) remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub(crate) reset_ms: u64,
}

/// A take that did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Short {
    /// Milliseconds until it would fit.
    pub(crate) retry_ms: u64,
    /// What the bucket shows now.
    pub(crate) window: Window,
}

impl Bucket {
    fn interval(limit: u64) -> f64 {
        WINDOW_MS / limit.max(1) as f64
    }

    /// The bucket as seen at `now`.
    pub(crate) fn window(&self, limit: u64, now: f64) -> Window {
        let ahead = (self.tat - now).max(0.0);
        let remaining = ((WINDOW_MS - ahead) / Self::interval(limit)).floor();
        Window {
            limit,
            remaining: remaining.clamp(0.0, limit as f64) as u64,
            reset_ms: ahead.ceil() as u64,
        }
    }

    /// Takes `n` if the bucket has room for it, and returns what it shows afterwards
    /// (the limiter checks every bucket with [`try_take`](Self::try_take) before it
    /// takes from any).
    #[cfg(test)]
    pub(crate) fn take(&mut self, limit: u64, n: u64, now: f64) -> Result<Window, Short> {
        let next = self.try_take(limit, n, now)?;
        self.tat = next;
        Ok(self.window(limit, now))
    }

    /// The state a take of `n` would leave, without taking it. More than the whole
    /// bucket is taken once the bucket is full (it goes into debt): a request larger than
    /// the limit is not refused for ever.
    pub(crate) fn try_take(&self, limit: u64, n: u64, now: f64) -> Result<f64, Short> {
        let interval = Self::interval(limit);
        let start = self.tat.max(now);
        let needed = start + n.min(limit) as f64 * interval;
        // A small tolerance: float steps must not refuse the last unit of a bucket.
        let over = needed - now - WINDOW_MS;
        if over > 1e-6 {
            return Err(Short {
                retry_ms: over.ceil().max(1.0) as u64,
                window: self.window(limit, now),
            });
        }
        Ok(start + n as f64 * interval)
    }

    /// Gives back `-delta` (a settled request used less than taken) or takes `delta`
    /// more at `now` (it used more: the bucket may go into debt). Debt is taken from
    /// `now` when the bucket has refilled since the request was admitted, so that an
    /// answer longer than the refill time is charged in full.
    pub(crate) fn adjust(&mut self, limit: u64, delta: i64, now: f64) {
        if delta > 0 {
            self.tat = self.tat.max(now);
        }
        self.tat += delta as f64 * Self::interval(limit);
    }

    /// Whether the bucket is full at `now` (nothing to remember).
    pub(crate) fn is_full(&self, now: f64) -> bool {
        self.tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_the_limit_then_the_refill_rate() {
        let mut bucket = Bucket::default();
        let t0 = 1_000_000.0;
        for i in 0..60 {
            let w = bucket.take(60, 1, t0).expect("the burst fits");
            assert_eq!(w.remaining, 59 - i);
        }
        let short = bucket.take(60, 1, t0).unwrap_err();
        assert_eq!(short.retry_ms, 1000, "one request refills each second");
        assert_eq!(short.window.remaining, 0);
        assert_eq!(short.window.reset_ms, 60_000);
        assert!(bucket.take(60, 1, t0 + 999.0).is_err());
        assert!(bucket.take(60, 1, t0 + 1000.0).is_ok());
        // A minute later it is full again.
        let w = bucket.window(60, t0 + 61_000.0);
        assert_eq!((w.remaining, w.reset_ms), (60, 0));
        assert!(bucket.is_full(t0 + 61_000.0));
    }

    #[test]
    fn a_refused_take_changes_nothing() {
        let mut bucket = Bucket::default();
        bucket.take(1000, 900, 0.0).unwrap();
        let before = bucket;
        let short = bucket.take(1000, 300, 0.0).unwrap_err();
        assert_eq!(bucket, before);
        // 200 more must refill: 200 × 60 ms.
        assert_eq!(short.retry_ms, 12_000);
        assert_eq!(short.window.remaining, 100);
    }

    #[test]
    fn settling_gives_back_or_goes_into_debt() {
        let mut bucket = Bucket::default();
        bucket.take(600, 500, 0.0).unwrap();
        bucket.adjust(600, -400, 0.0); // used 100 of the 500 estimated
        assert_eq!(bucket.window(600, 0.0).remaining, 500);
        bucket.adjust(600, 900, 0.0); // used far more than estimated
        let w = bucket.window(600, 0.0);
        assert_eq!(w.remaining, 0);
        assert!(w.reset_ms > 60_000, "in debt: {w:?}");
        assert!(bucket.take(600, 1, 0.0).is_err());
    }

    #[test]
    fn debt_settled_after_the_bucket_refilled_is_charged_in_full() {
        // 600 a minute: 100 ms a token. A request took 10 at t=0 and its answer, 60 s
        // later, counted 610: the bucket had refilled, and all 600 more are owed now.
        let mut bucket = Bucket::default();
        bucket.take(600, 10, 0.0).unwrap();
        bucket.adjust(600, 600, 60_000.0);
        let w = bucket.window(600, 60_000.0);
        assert_eq!((w.remaining, w.reset_ms), (0, 60_000));
        // Giving back on a full bucket leaves it full.
        let mut full = Bucket::default();
        full.adjust(600, -50, 1_000.0);
        assert_eq!(full.window(600, 1_000.0).remaining, 600);
    }

    #[test]
    fn a_request_larger_than_the_limit_passes_a_full_bucket_and_leaves_debt() {
        let mut bucket = Bucket::default();
        assert!(bucket.take(100, 250, 0.0).is_ok());
        assert!(bucket.take(100, 1, 60_000.0).is_err());
        assert!(bucket.take(100, 1, 150_000.0).is_ok());
    }
}
