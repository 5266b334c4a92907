//! Work that follows the requests without being on their path (writing usage, SQLite's
//! threads) runs at a lower CPU priority than the threads that serve requests: on a
//! machine with few cores, a serving thread woken for a request otherwise waits for a
//! core behind a batch of usage being written, and that wait is the gateway's tail
//! latency at low load (docs/benchmarks.md). The serving threads and the thread that
//! accepts connections keep the priority llmgate was started with; under a load that
//! keeps every core busy, the background still gets its share (a nice value, not an idle
//! class), so usage is written, only later.

use std::sync::Arc;

use llmgate_core::storage::UsageStore;
use llmgate_core::usage::{RecorderOptions, UsageRecorder, UsageWriter};
use tokio::sync::oneshot;

/// The nice value of the background threads: 10 (weight 110 against a serving thread's
/// 1 024). Raising a nice value needs no privilege; a process started nicer than this
/// keeps its own value.
pub const BACKGROUND_NICE: i32 = 10;

/// Raises the calling thread's nice value to [`BACKGROUND_NICE`] (Linux; a no-op
/// elsewhere, and where the kernel refuses).
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let this = Some(rustix::thread::gettid());
        if getpriority_process(this).is_ok_and(|now| now < BACKGROUND_NICE) {
            if let Err(err) = setpriority_process(this, BACKGROUND_NICE) {
                tracing::debug!(error = %err, "cannot lower the usage writer's priority");
            }
        }
    }
}

/// Keeps the usage writer's thread running; dropping it ends the thread, so drop it
/// only once [`UsageWriter::shutdown`] has returned.
#[derive(Debug)]
pub struct UsageThread {
    _stop: oneshot::Sender<()>,
}

/// Starts the usage recorder's writer on a thread of its own (`llmgate-usage`, at
/// [`BACKGROUND_NICE`], with a single-threaded runtime): what it spawns, its spill
/// file's blocking writes and the SQLite connections it opens, run there or on threads
/// that inherit its priority.
pub async fn start_usage_writer(
    store: Arc<dyn UsageStore>,
    options: RecorderOptions,
) -> std::io::Result<(UsageRecorder, UsageWriter, UsageThread)> {
    let (started_tx, started_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("llmgate-usage".into())
        .spawn(move || {
            lower_this_thread();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started_tx.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async move {
                let _ = started_tx.send(Ok(UsageRecorder::start_with(store, options)));
                tokio::spawn(crate::allocator::give_back_freed_memory_when_quiet(
                    crate::http::requests_begun,
                ));
                // Until the server is done with the writer (or gone).
                let _ = stop_rx.await;
            });
        })?;
    let (recorder, writer) = started_rx
        .await
        .map_err(|_| std::io::Error::other("the usage writer's thread ended as it started"))??;
    Ok((recorder, writer, UsageThread { _stop: stop_tx }))
}
