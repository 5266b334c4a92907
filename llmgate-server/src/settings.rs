//! Settings in layers, merged here and nowhere else: the defaults, then the config file,
//! then LLMGATE_* variables and flags (clap reads both; flags win). Every setting that
//! cannot work is reported, not just the first.

use std::fmt;
use std::path::{Path, PathBuf};

use llmgate_core::config::{ConfigError, GatewayConfig};

use crate::cli::{BadValue, Cli, Given, Launch, ServeArgs};

/// What `--model` means when `llmgate up` is given none: the built-in
/// [`llmgate_core::runner::DEFAULT_MODEL`], an instruction-tuned model.
pub const DEFAULT_MODEL: &str = "default";

/// One setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file cannot be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not TOML, or one of its settings is unknown or malformed.
    #[error("config file {}{}: {message}", path.display(), line.map_or(String::new(), |n| format!(", line {n}")))]
    File {
        /// The file.
        path: PathBuf,
        /// Where, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A flag (or its LLMGATE_* variable) has a value that does not parse.
    #[error("invalid value '{}' for --{flag}: {}", given.value, given.reason)]
    Flag {
        /// The flag, without its dashes.
        flag: &'static str,
        /// The value and what is wrong with it.
        given: BadValue,
    },
    /// A value, from wherever it came, is out of range or malformed.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Every setting that cannot work; never empty.
#[derive(Debug)]
pub struct SettingsErrors(Vec<SettingsError>);

impl SettingsErrors {
    /// The problems, in the order of the file and then of the options.
    pub fn iter(&self) -> std::slice::Iter<'_, SettingsError> {
        self.0.iter()
    }
}

impl fmt::Display for SettingsErrors {
    /// One line per problem, each with its cause.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&crate::error_chain(error))?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsErrors {}

/// Builds and validates the settings for `cli`'s command: the gateway's (`serve`, `up`)
/// in full, the others' (which only open the store) as far as they use them.
pub fn load(cli: &Cli) -> Result<GatewayConfig, SettingsErrors> {
    let mut errors = Vec::new();
    let mut config = match &cli.config {
        Some(path) => match read_file(path, &mut errors) {
            Some(config) => config,
            // Without the file, what the other settings would be is unknown.
            None => return Err(SettingsErrors(errors)),
        },
        None => GatewayConfig::default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(url) = &cli.database_url {
        config.database_url = Some(url.clone());
    }
    match cli.command.gateway() {
        Some((args, launch)) => {
            apply_serve_flags(&mut config, args, &mut errors);
            if launch == Launch::Up
                && config.model.is_none()
                && config.upstream.is_none()
                && config.models.is_empty()
            {
                // `up` runs the default model; `serve` needs to be told what to front.
                config.model = Some(DEFAULT_MODEL.to_owned());
            }
            if let Err(invalid) = config.validate() {
                errors.extend(invalid.into_iter().map(SettingsError::Invalid));
            }
        }
        None => errors.extend(config.validate_database().err().map(SettingsError::Invalid)),
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(SettingsErrors(errors))
    }
}

/// The `serve`/`up` flags (and their LLMGATE_* variables) over what the file said; a
/// value that does not parse is reported and leaves the setting as it was.
fn apply_serve_flags(
    config: &mut GatewayConfig,
    args: &ServeArgs,
    errors: &mut Vec<SettingsError>,
) {
    let mut given = |flag: &'static str, value: &Option<Given<u64>>| -> Option<u64> {
        parsed(errors, flag, value)
    };
    if let Some(secs) = given("upstream-timeout-secs", &args.upstream_timeout_secs) {
        config.upstream_timeout_secs = secs;
    }
    if let Some(bytes) = given("max-body-bytes", &args.max_body_bytes) {
        config.max_body_bytes = bytes;
    }
    if let Some(workers) = given("workers", &args.workers) {
        config.workers = Some(workers);
    }
    if let Some(ms) = given("key-cache-ttl-ms", &args.key_cache_ttl_ms) {
        config.key_cache_ttl_ms = ms;
    }
    if let Some(secs) = given("header-read-timeout-secs", &args.header_read_timeout_secs) {
        config.header_read_timeout_secs = secs;
    }
    if let Some(secs) = given("idle-timeout-secs", &args.idle_timeout_secs) {
        config.idle_timeout_secs = secs;
    }
    if let Some(n) = given("max-connections", &args.max_connections) {
        config.max_connections = Some(n);
    }
    if let Some(secs) = given("shutdown-timeout-secs", &args.shutdown_timeout_secs) {
        config.shutdown_timeout_secs = secs;
    }
    if let Some(records) = given("usage-queue-max", &args.usage_queue_max) {
        config.usage_queue_max = records;
    }
    let model = &args.model;
    if let Some(secs) = given("model-ready-timeout-secs", &model.model_ready_timeout_secs) {
        config.model_ready_timeout_secs = secs;
    }
    if let Some(upstream) = &args.upstream {
        config.upstream = Some(upstream.clone());
    }
    if let Some(listen) = parsed(errors, "listen", &args.listen) {
        config.listen = listen;
    }
    if let Some(key) = &args.upstream_key {
        config.upstream_key = Some(key.clone());
    }
    if let Some(url) = &args.redis_url {
        config.redis_url = Some(url.clone());
    }
    if let Some(replicas) = parsed(errors, "replicas", &args.replicas) {
        config.replicas = replicas;
    }
    if args.metrics_public {
        config.metrics_public = true;
    }
    if let Some(m) = &model.model {
        config.model = Some(m.clone());
    }
    if let Some(backend) = parsed(errors, "backend", &model.backend) {
        config.backend = backend;
    }
    if let Some(format) = &model.chat_format {
        config.chat_format = Some(format.clone());
    }
    if let Some(n_ctx) = parsed(errors, "n-ctx", &model.n_ctx) {
        config.n_ctx = Some(n_ctx);
    }
    if let Some(runner) = parsed(errors, "runner", &model.runner) {
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
}

/// The value of `--flag` when it was given and parses; a value that does not parse is
/// added to `errors`.
fn parsed<T: Clone>(
    errors: &mut Vec<SettingsError>,
    flag: &'static str,
    value: &Option<Given<T>>,
) -> Option<T> {
    match value.as_ref()? {
        Ok(value) => Some(value.clone()),
        Err(given) => {
            errors.push(SettingsError::Flag {
                flag,
                given: given.clone(),
            });
            None
        }
    }
}

/// The file's settings over the defaults. A setting that is unknown or malformed is
/// reported and left at its default, so that the other settings are still checked;
/// `None` when the file cannot be read or is not TOML.
fn read_file(path: &Path, errors: &mut Vec<SettingsError>) -> Option<GatewayConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(source) => {
            errors.push(SettingsError::Read {
                path: path.to_owned(),
                source,
            });
            return None;
        }
    };
    let file_error = |line: Option<usize>, message: &str| SettingsError::File {
        path: path.to_owned(),
        line,
        message: message.trim().to_owned(),
    };
    let table: toml::Table = match toml::from_str(&text) {
        Ok(table) => table,
        Err(e) => {
            let line = e
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1);
            errors.push(file_error(line, e.message()));
            return None;
        }
    };
    // The settings are independent of one another, so each can be tried on its own.
    let mut usable = toml::Table::new();
    for (key, value) in table {
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        match toml::Value::Table(alone).try_into::<GatewayConfig>() {
            Ok(_) => {
                usable.insert(key, value);
            }
            Err(e) => {
                let message = e.message();
                let message = if message.contains(&format!("`{key}`")) {
                    message.to_owned()
                } else {
                    format!("{key}: {message}")
                };
                errors.push(file_error(line_of_key(&text, &key), &message));
            }
        }
    }
    let config = toml::Value::Table(usable)
        .try_into()
        .expect("settings that parse alone parse together");
    Some(config)
}

/// The line of the file where `key` is set: `key = …`, or the header of its table
/// (`[key]`, `[[key]]`).
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let header = line
                .trim_start_matches('[')
                .trim_end()
                .trim_end_matches(']');
            if line.starts_with('[') && header.trim() == key {
                return true;
            }
            let rest = line
                .strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| line.strip_prefix(&format!("'{key}'")));
            rest.is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|index| index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_config(args: &[&str]) -> Result<GatewayConfig, SettingsErrors> {
        let cli = Cli::try_parse_with_defaults(
            ["llmgate", "serve", "--upstream", "http://127.0.0.1:1"]
                .iter()
                .chain(args),
        )
        .unwrap();
        load(&cli)
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
        let err = serve_config(&["--usage-queue-max", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("usage_queue_max"), "{err}");
    }

    #[test]
    fn key_limits_settings_come_from_the_file_and_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("llmgate.toml");
        std::fs::write(
            &file,
            "replicas = 2\nredis_url = \"redis://file:6379\"\n[key_defaults]\nrpm = 30\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let config = serve_config(&["--config", file]).unwrap();
        assert_eq!(config.key_defaults.rpm, Some(30));
        assert_eq!(config.replicas, 2);
        assert_eq!(config.redis_url.as_deref(), Some("redis://file:6379"));
        let config = serve_config(&[
            "--config",
            file,
            "--replicas",
            "3",
            "--redis-url",
            "redis://flag:6379",
        ])
        .unwrap();
        assert_eq!(config.replicas, 3);
        assert_eq!(config.redis_url.as_deref(), Some("redis://flag:6379"));

        std::fs::write(
            dir.path().join("bad.toml"),
            "[key_defaults]\nrpm = 0\nburst = 3\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.toml");
        let errors = serve_config(&["--config", bad.to_str().unwrap(), "--replicas", "none"])
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains("line 1") && errors.contains("burst"),
            "{errors}"
        );
        assert!(errors.contains("--replicas"), "{errors}");
        std::fs::write(&bad, "[key_defaults]\nrpm = 0\n").unwrap();
        let errors = serve_config(&["--config", bad.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains("key_defaults.rpm must be at least 1"),
            "{errors}"
        );
    }

    #[test]
    fn every_bad_setting_of_the_file_and_the_flags_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("llmgate.toml");
        std::fs::write(
            &file,
            "max_body_bytes = 0\nlisten = \"nowhere\"\nupstrem = \"http://h\"\nworkers = 2\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let errors = serve_config(&[
            "--config",
            file,
            "--idle-timeout-secs",
            "0",
            "--n-ctx",
            "lots",
        ])
        .unwrap_err();
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].contains("line 2") && lines[0].contains("listen"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("line 3") && lines[1].contains("upstrem"),
            "{lines:#?}"
        );
        assert!(
            lines[2].starts_with("invalid value 'lots' for --n-ctx: "),
            "{lines:#?}"
        );
        assert!(lines[3].contains("max_body_bytes"), "{lines:#?}");
        assert!(lines[4].contains("idle_timeout_secs"), "{lines:#?}");
    }
}
