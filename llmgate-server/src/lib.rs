//! The `llmgate` binary's parts: command line, settings, the HTTP app and its routes.
//! `main.rs` only parses and dispatches.

pub mod allocator;
pub mod app;
pub mod cli;
pub mod commands;
pub mod console;
pub mod http;
pub mod metrics;
pub mod models;
pub mod routes;
pub mod settings;

use cli::{Cli, Command, Launch};
use commands::Output;

/// Exit status for bad flags or settings.
pub const EXIT_USAGE: i32 = 2;

/// Why a command failed, by command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// `serve` or `up`.
    #[error(transparent)]
    Serve(#[from] commands::serve::ServeError),
    /// `pull`.
    #[error(transparent)]
    Pull(#[from] commands::model::StartError),
    /// `keys`.
    #[error(transparent)]
    Keys(#[from] commands::keys::KeysError),
    /// Opening the store, for `keys` and `usage`.
    #[error(transparent)]
    OpenStore(#[from] commands::OpenStoreError),
    /// `usage`.
    #[error(transparent)]
    Usage(#[from] llmgate_core::storage::StorageError),
}

/// `err` and its causes on one line, `outer: inner: innermost`. A message that already
/// quotes the root cause is complete as it is (core errors write theirs that way); other
/// causes are added unless an outer message quotes them.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut causes = Vec::new();
    let mut source = err.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if causes
        .last()
        .is_some_and(|root| text.contains(root.as_str()))
    {
        return text;
    }
    for cause in causes {
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Parses the command line and runs it on a Tokio runtime with the configured number of
/// worker threads; returns the process's exit status.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_with_defaults(args) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help or --version
            let _ = err.print();
            return 0;
        }
        Err(err) => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{first} (see 'llmgate --help')");
            return EXIT_USAGE;
        }
    };
    let config = match settings::load(&cli) {
        Ok(config) => config,
        Err(errors) => {
            for line in errors.to_string().lines() {
                eprintln!("error: {line}");
            }
            return EXIT_USAGE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.command.gateway().is_some() {
        // The gateway serves requests on threads of its own (`http::serve_on_loops`);
        // this runtime runs the rest: accepting, the usage writer, model servers.
        runtime.worker_threads(1);
    } else if let Some(workers) = config.workers.filter(|&n| n > 0) {
        // `serve` and `up` have refused 0 already; for other commands a 0 in the file is ignored.
        runtime.worker_threads(workers as usize);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return 1;
        }
    };
    if cli.command.gateway().is_some() {
        // This runtime's work follows the requests: the usage writer, the access log.
        runtime.spawn(allocator::give_back_freed_memory_when_quiet(
            http::requests_begun,
        ));
    }
    let status = runtime.block_on(async {
        match run(cli.command, config).await {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("error: {}", error_chain(&err));
                1
            }
        }
    });
    // Exit now, as the gateway always has, rather than wait for blocking tasks.
    runtime.shutdown_background();
    status
}

async fn run(
    command: Command,
    config: llmgate_core::config::GatewayConfig,
) -> Result<(), CommandError> {
    match command {
        Command::Serve(_) => commands::serve::run(config, Launch::Serve).await?,
        Command::Up(_) => commands::serve::run(config, Launch::Up).await?,
        Command::Pull { model } => commands::model::pull(&model).await?,
        Command::Keys(command) => {
            let store = commands::open_store(&config).await?;
            let outcome = commands::keys::run(store.as_ref(), command).await;
            store.close().await;
            outcome?
        }
        Command::Usage { json } => {
            let store = commands::open_store(&config).await?;
            let outcome =
                commands::usage::run(store.as_ref(), store.as_ref(), Output::json_if(json)).await;
            store.close().await;
            outcome?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Plain(&'static str, #[source] Option<Box<Plain>>);

    fn chain(links: &[&'static str]) -> Plain {
        links
            .iter()
            .rev()
            .fold(None, |inner, text| Some(Plain(text, inner.map(Box::new))))
            .unwrap()
    }

    #[test]
    fn causes_are_added_once() {
        assert_eq!(
            error_chain(&chain(&["cannot open the database x", "disk full"])),
            "cannot open the database x: disk full"
        );
        // The outer message quotes the root cause: the layers between add nothing.
        assert_eq!(
            error_chain(&chain(&[
                "cannot reach h (refused): check the network",
                "error sending request",
                "refused"
            ])),
            "cannot reach h (refused): check the network"
        );
        assert_eq!(
            error_chain(&chain(&[
                "cannot listen on a: in use (choose another)",
                "in use"
            ])),
            "cannot listen on a: in use (choose another)"
        );
    }
}
