//! Tuning of mimalloc, the binary's allocator.

use std::ffi::c_long;

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_e` (`include/mimalloc.h`; the
/// `-sys` crate names the options around it but not this one).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long memory mimalloc no longer uses stays with the process before it goes back
/// to the OS, in milliseconds (mimalloc's default: 10).
pub const PURGE_DELAY_MS: c_long = 1000;

/// Lets freed memory stay with the process for [`PURGE_DELAY_MS`] instead of 10 ms.
/// Under a steady stream of requests the memory given back is wanted again at once, and
/// each page asked back costs a page fault and zeroing: with the default the gateway
/// spent about 4 % more CPU per request (docs/benchmarks.md). An idle gateway still
/// gives its memory back, a second later. Call first thing in `main`.
#[allow(unsafe_code)]
pub fn keep_freed_memory_a_while() {
    // SAFETY: a plain C call that stores an integer option; any thread may make it.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
}

/// The purge delay in force, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> c_long {
    // SAFETY: a plain C call that reads an integer option.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

/// Gives the OS back the memory the calling thread's heap holds freed. mimalloc does
/// this by itself only when the thread allocates or frees again (and then only for what
/// was freed at least [`PURGE_DELAY_MS`] before), so a serving thread that goes quiet
/// after a load would keep what the load used until its next request: 8–13 MiB after 32
/// connections for 5 s (docs/benchmarks.md).
#[allow(unsafe_code)]
pub fn give_back_freed_memory() {
    // SAFETY: a plain C call on the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Runs on a thread's runtime for as long as it lives: once the thread has been quiet
/// for a whole [`PURGE_DELAY_MS`] (`work` has not moved: a count of what the thread has
/// begun), calls [`give_back_freed_memory`] once, and again only after the next quiet
/// period. A busy thread is left alone: what it frees it wants again at once.
pub async fn give_back_freed_memory_when_quiet(work: impl Fn() -> u64) {
    let period = std::time::Duration::from_millis(PURGE_DELAY_MS.unsigned_abs());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = work();
    let mut given_back = true;
    loop {
        tick.tick().await;
        let now = work();
        if now != seen {
            seen = now;
            given_back = false;
        } else if !given_back {
            give_back_freed_memory();
            given_back = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_the_option_set() {
        assert_eq!(
            purge_delay_ms(),
            10,
            "option {PURGE_DELAY} is not purge_delay (default 10 ms)"
        );
        keep_freed_memory_a_while();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }
}
