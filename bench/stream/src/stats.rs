//! The few statistics the load generator reports, and the upstream's intervals.

/// The value at percentile `p` (0–100) of `sorted` by the nearest-rank method; 0 for none.
pub fn percentile(sorted: &[i32], p: f64) -> i32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the path between the upstream and the client added to each gap between two
/// chunks of one stream: the gap as received less the gap as sent, in µs. `chunks` holds
/// (received, sent) times in the order received; a chunk held back shows as a positive
/// value (and the one after it, caught up, as a negative one).
pub fn added_gaps(chunks: &[(u64, u64)]) -> impl Iterator<Item = i64> + '_ {
    chunks.windows(2).map(|pair| {
        let received = pair[1].0 as i64 - pair[0].0 as i64;
        let sent = pair[1].1 as i64 - pair[0].1 as i64;
        received - sent
    })
}

/// Intervals between an upstream's chunks, uniform in `[min, max]` ms, from a small
/// seeded generator (xorshift64*): each stream its own, reproducible sequence.
#[derive(Debug, Clone)]
pub struct Intervals {
    state: u64,
    min_us: u64,
    span_us: u64,
}

impl Intervals {
    /// Intervals in `[min_ms, max_ms]` from `seed`.
    pub fn new(seed: u64, min_ms: u64, max_ms: u64) -> Self {
        let (min_ms, max_ms) = (min_ms.min(max_ms), min_ms.max(max_ms));
        Self {
            // Never 0, the one state xorshift cannot leave.
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            min_us: min_ms * 1000,
            span_us: (max_ms - min_ms) * 1000 + 1,
        }
    }

    /// The next interval, in µs.
    pub fn next_us(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let random = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        self.min_us + (random >> 11) % self.span_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<i32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&values, 100.0), 100);
        assert_eq!(percentile(&values, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn a_chunk_held_back_shows_as_added_delay_and_the_schedule_does_not() {
        // Sent 30 ms apart, then 45 ms; the second arrives 5 ms late.
        let chunks = [(1_000, 500), (36_000, 30_500), (76_000, 75_500)];
        assert_eq!(added_gaps(&chunks).collect::<Vec<_>>(), [5_000, -5_000]);
        // Delivered as sent, whatever the transit time: nothing added.
        let steady = [(10_100, 10_000), (40_100, 40_000), (90_100, 90_000)];
        assert!(added_gaps(&steady).all(|gap| gap == 0));
    }

    #[test]
    fn intervals_stay_in_range_cover_it_and_repeat_per_seed() {
        let mut intervals = Intervals::new(3, 20, 50);
        let values: Vec<u64> = (0..10_000).map(|_| intervals.next_us()).collect();
        assert!(values.iter().all(|v| (20_000..=50_000).contains(v)));
        assert!(values.iter().any(|v| *v < 21_000) && values.iter().any(|v| *v > 49_000));
        let mean = values.iter().sum::<u64>() / values.len() as u64;
        assert!((33_000..37_000).contains(&mean), "mean {mean} µs");
        let mut again = Intervals::new(3, 20, 50);
        assert_eq!(again.next_us(), values[0]);
        assert_ne!(Intervals::new(4, 20, 50).next_us(), values[0]);
        assert_eq!(Intervals::new(9, 25, 25).next_us(), 25_000);
    }
}
