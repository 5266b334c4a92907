//! Settings in layers: the config file, then LLMGATE_* variables and flags (clap reads
//! both; flags win), each over the defaults.

use std::path::Path;

use llmgate_core::config::GatewayConfig;

use crate::cli::{Cli, ServeArgs};

/// What `--model` means when `llmgate up` is given none: Gemma 3 270M, Q4_K_M.
pub const DEFAULT_MODEL: &str = "default";

/// Builds and validates the settings. The error is one line that says what to fix.
pub fn load(cli: &Cli, serve: Option<&ServeArgs>, up: bool) -> Result<GatewayConfig, String> {
    let mut config = match &cli.config {
        Some(path) => read_file(path)?,
        None => GatewayConfig::default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(url) = &cli.database_url {
        config.database_url = Some(url.clone());
    }
    config.validate_database().map_err(|e| e.to_string())?;
    if let Some(args) = serve {
        if let Some(upstream) = &args.upstream {
            config.upstream = Some(upstream.clone());
        }
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if let Some(key) = &args.upstream_key {
            config.upstream_key = Some(key.clone());
        }
        if let Some(secs) = args.upstream_timeout_secs {
            config.upstream_timeout_secs = secs;
        }
        if let Some(bytes) = args.max_body_bytes {
            config.max_body_bytes = bytes;
        }
        if let Some(workers) = args.workers {
            config.workers = Some(workers);
        }
        if let Some(ms) = args.key_cache_ttl_ms {
            config.key_cache_ttl_ms = ms;
        }
        if let Some(secs) = args.header_read_timeout_secs {
            config.header_read_timeout_secs = secs;
        }
        if let Some(secs) = args.idle_timeout_secs {
            config.idle_timeout_secs = secs;
        }
        if let Some(n) = args.max_connections {
            config.max_connections = Some(n);
        }
        if let Some(secs) = args.shutdown_timeout_secs {
            config.shutdown_timeout_secs = secs;
        }
        if args.metrics_public {
            config.metrics_public = true;
        }
        if let Some(records) = args.usage_queue_max {
            config.usage_queue_max = records;
        }
        let model = &args.model;
        if let Some(m) = &model.model {
            config.model = Some(m.clone());
        }
        if let Some(backend) = model.backend {
            config.backend = backend;
        }
        if let Some(format) = &model.chat_format {
            config.chat_format = Some(format.clone());
        }
        if let Some(n_ctx) = model.n_ctx {
            config.n_ctx = Some(n_ctx);
        }
        if let Some(runner) = model.runner {
            config.runner = runner;
        }
        if let Some(python) = &model.python {
            config.python = python.clone();
        }
        if let Some(dir) = &model.python_env_dir {
            config.python_env_dir = Some(dir.clone());
        }
        if let Some(dir) = &model.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        if let Some(secs) = model.model_ready_timeout_secs {
            config.model_ready_timeout_secs = secs;
        }
        if up && config.model.is_none() && config.upstream.is_none() {
            // `up` runs the default model; `serve` needs to be told what to front.
            config.model = Some(DEFAULT_MODEL.to_owned());
        }
        config.validate().map_err(|e| e.to_string())?;
    }
    Ok(config)
}

fn read_file(path: &Path) -> Result<GatewayConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start].matches('\n').count() + 1)
            .map_or(String::new(), |line| format!(", line {line}"));
        format!(
            "config file {}{line}: {}",
            path.display(),
            e.message().trim()
        )
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Command;

    fn serve_config(args: &[&str]) -> Result<GatewayConfig, String> {
        let cli = Cli::try_parse_from(
            ["llmgate", "serve", "--upstream", "http://127.0.0.1:1"]
                .iter()
                .chain(args),
        )
        .unwrap();
        let Command::Serve(serve) = &cli.command else {
            unreachable!()
        };
        load(&cli, Some(serve), false)
    }

    #[test]
    fn the_usage_queue_bound_has_a_default_a_flag_and_a_range() {
        assert_eq!(
            serve_config(&[]).unwrap().usage_queue_max,
            llmgate_core::config::DEFAULT_USAGE_QUEUE_MAX
        );
        assert_eq!(
            serve_config(&["--usage-queue-max", "500"])
                .unwrap()
                .usage_queue_max,
            500
        );
        let err = serve_config(&["--usage-queue-max", "0"]).unwrap_err();
        assert!(err.contains("usage_queue_max"), "{err}");
    }
}
