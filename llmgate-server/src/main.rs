//! `llmgate`: see `llmgate --help`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

// Many small, short-lived allocations per request: mimalloc handles them with less
// contention and fewer cycles than the system allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    llmgate_server::allocator::keep_freed_memory_a_while();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LLMGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: in a file or a pipe (systemd, docker logs, a
        // test) they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let status = llmgate_server::main_with_args(std::env::args_os().collect());
    std::process::exit(status);
}
