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

use cli::{Cli, Command};

/// Exit status for bad flags or settings.
pub const EXIT_USAGE: i32 = 2;

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
    let (serve_args, up) = match &cli.command {
        Command::Serve(args) => (Some(args), false),
        Command::Up(args) => (Some(args), true),
        _ => (None, false),
    };
    let config = match settings::load(&cli, serve_args, up) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return EXIT_USAGE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if serve_args.is_some() {
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
    let status = runtime.block_on(run(cli.command, config));
    // Exit now, as the gateway always has, rather than wait for blocking tasks.
    runtime.shutdown_background();
    status
}

async fn run(command: Command, config: llmgate_core::config::GatewayConfig) -> i32 {
    let outcome = match command {
        Command::Serve(_) => commands::serve::run(config, false).await,
        Command::Up(_) => commands::serve::run(config, true).await,
        Command::Pull { model } => commands::model::pull(&config, &model).await,
        Command::Keys(command) => match commands::open_store(&config).await {
            Ok(store) => {
                let outcome = commands::keys::run(store.as_ref(), command).await;
                store.close().await;
                outcome
            }
            Err(e) => Err(e),
        },
        Command::Usage { json } => match commands::open_store(&config).await {
            Ok(store) => {
                let outcome = commands::usage::run(store.as_ref(), store.as_ref(), json).await;
                store.close().await;
                outcome
            }
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("error: {message}");
            1
        }
    }
}
