//! Whether a model fits: what it needs (its GGUF file, the KV cache of its context and
//! the server's buffers, read from the GGUF header) against what is free (RAM, or GPU
//! memory for a GPU model), less a reserve.

use std::path::PathBuf;

use llmgate_core::config::RunnerKind;
use llmgate_core::runner::gguf::read_gguf_info;

/// What loading `path` with `n_ctx` is estimated to take, in bytes: on the GPU when
/// `gpu` (weights, KV cache, compute buffers), else in RAM (all of it). A file whose
/// header cannot be read counts as its size.
pub async fn estimate(path: PathBuf, n_ctx: Option<u32>, runner: RunnerKind, gpu: bool) -> u64 {
    tokio::task::spawn_blocking(move || match read_gguf_info(&path) {
        Ok(info) => {
            let estimate = info.memory_estimate_for(runner, n_ctx);
            if gpu {
                estimate.device_bytes()
            } else {
                estimate.total_bytes()
            }
        }
        Err(err) => {
            tracing::debug!(path = %path.display(), error = %err, "no GGUF header: counting the file's size");
            std::fs::metadata(&path).map_or(0, |m| m.len())
        }
    })
    .await
    .unwrap_or(0)
}

/// Memory free now, in bytes: RAM, or the first GPU's when `gpu`; `None` when the
/// system does not say (then only `memory_limit_mb` bounds the models).
pub fn free_bytes(gpu: bool) -> Option<u64> {
    let free = llmgate_core::system::free_memory();
    if gpu {
        free.gpus.first().map(|g| g.free_bytes)
    } else {
        (free.ram_total_bytes > 0).then_some(free.ram_available_bytes)
    }
}

/// Mebibytes, for messages.
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}
