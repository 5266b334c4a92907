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
