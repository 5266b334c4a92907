//! The streaming benchmark (`bench/stream.sh`): an upstream that streams like a model
//! (`stream-upstream`) and a load generator that holds thousands of streams open through
//! a proxy and measures what the proxy adds to each chunk (`stream-load`).
//!
//! The two share one clock, the machine's wall clock in microseconds: the upstream stamps
//! every chunk with the time it sent it, so the load generator can tell the time the
//! proxy added to each gap between chunks from the time the model took.

pub mod chunk;
pub mod proc;
pub mod sse;
pub mod stats;

/// Runs `task` on a multi-threaded Tokio runtime of `threads` workers (at least one):
/// what both binaries' `main` does.
pub fn block_on<F: std::future::Future>(threads: usize, task: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("a Tokio runtime")
        .block_on(task)
}
