//! Command-line arguments (clap only; no logic).
//!
//! A flag left out is `None`, so that the config file and the environment still apply
//! (see [`crate::settings`]); the defaults the help shows come from the constants of
//! [`llmgate_core::config`], which the settings use too.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Arg, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use llmgate_core::config::{
    RunnerKind, DEFAULT_DATA_DIR, DEFAULT_HEADER_READ_TIMEOUT_SECS, DEFAULT_IDLE_TIMEOUT_SECS,
    DEFAULT_KEY_CACHE_TTL_MS, DEFAULT_LISTEN, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MODEL_READY_TIMEOUT_SECS, DEFAULT_PYTHON, DEFAULT_SHUTDOWN_TIMEOUT_SECS,
    DEFAULT_UPSTREAM_TIMEOUT_SECS, DEFAULT_USAGE_QUEUE_MAX,
};
use llmgate_core::limits::QuotaPeriod;
use llmgate_core::runner::Backend;

/// llmgate: share an OpenAI-compatible model server safely, with per-user API keys and
/// exact per-key usage.
#[derive(Debug, Parser)]
#[command(name = "llmgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Directory for the database and other state
    #[arg(long, global = true, env = "LLMGATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with settings; flags and LLMGATE_* variables override it
    #[arg(long, global = true, env = "LLMGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// PostgreSQL URL instead of the SQLite file, for several gateway replicas
    #[arg(
        long,
        global = true,
        env = "LLMGATE_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line as clap sees it, each default written into its option's help.
    pub fn command_with_defaults() -> clap::Command {
        let mut command = Self::command().mut_arg("data_dir", |arg| {
            with_default(arg, &format!("./{DEFAULT_DATA_DIR}"))
        });
        command = command.mut_subcommand("up", |up| {
            let about = up.get_about().map(ToString::to_string).unwrap_or_default();
            up.about(format!("{about}, on port {}", DEFAULT_LISTEN.port()))
        });
        for name in ["up", "serve"] {
            command = command.mut_subcommand(name, |mut serve| {
                for (id, default) in serve_defaults() {
                    serve = serve.mut_arg(id, |arg| with_default(arg, &default));
                }
                serve
            });
        }
        command
    }

    /// Parses `args` (the program name first); `--help` shows the defaults.
    pub fn try_parse_with_defaults(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Self, clap::Error> {
        let mut matches: ArgMatches = Self::command_with_defaults().try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches)
    }
}

/// What `serve` and `up` do when an option is given nowhere: `(argument id, default)`.
fn serve_defaults() -> [(&'static str, String); 14] {
    [
        ("replicas", "1".to_owned()),
        ("listen", DEFAULT_LISTEN.to_string()),
        (
            "upstream_timeout_secs",
            DEFAULT_UPSTREAM_TIMEOUT_SECS.to_string(),
        ),
        ("max_body_bytes", DEFAULT_MAX_BODY_BYTES.to_string()),
        ("key_cache_ttl_ms", DEFAULT_KEY_CACHE_TTL_MS.to_string()),
        (
            "header_read_timeout_secs",
            DEFAULT_HEADER_READ_TIMEOUT_SECS.to_string(),
        ),
        ("idle_timeout_secs", DEFAULT_IDLE_TIMEOUT_SECS.to_string()),
        ("max_connections", DEFAULT_MAX_CONNECTIONS.to_string()),
        (
            "shutdown_timeout_secs",
            DEFAULT_SHUTDOWN_TIMEOUT_SECS.to_string(),
        ),
        ("usage_queue_max", DEFAULT_USAGE_QUEUE_MAX.to_string()),
        ("backend", Backend::default().to_string()),
        ("runner", RunnerKind::default().to_string()),
        ("python", DEFAULT_PYTHON.to_owned()),
        (
            "model_ready_timeout_secs",
            DEFAULT_MODEL_READY_TIMEOUT_SECS.to_string(),
        ),
    ]
}

/// Appends `[default: …]` to the help, as clap does for a `default_value`, without
/// giving the option a value: a flag left out must not hide the file's setting.
fn with_default(arg: Arg, default: &str) -> Arg {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    arg.help(format!("{help} [default: {default}]"))
}

/// A value as given on the command line or in its LLMGATE_* variable: parsed, or why it
/// could not be. The settings report a bad value together with every other bad
/// setting, instead of clap stopping at it alone.
pub type Given<T> = Result<T, BadValue>;

/// A value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    /// The value as given.
    pub value: String,
    /// What the parser said.
    pub reason: String,
}

/// Parses a value without failing the command line (see [`Given`]).
fn given<T>(raw: &str) -> Result<Given<T>, std::convert::Infallible>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Ok(raw.parse::<T>().map_err(|e| BadValue {
        value: raw.to_owned(),
        reason: e.to_string(),
    }))
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set up everything and run: the model server (default: an instruction-tuned model,
    /// SmolLM2 135M Instruct, on the CPU) and the gateway in front of it
    Up(ServeArgs),
    /// Run the gateway in front of an OpenAI-compatible upstream, or of a --model
    Serve(ServeArgs),
    /// Download a model from Hugging Face into the local cache
    Pull {
        /// owner/name, or owner/name:file.gguf (without a file, a Q4_K_M GGUF is picked)
        #[arg(value_name = "REPO[:FILE]")]
        model: String,
    },
    /// Create, list and revoke API keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show usage per key
    Usage {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// The gateway's options and how it was launched, for `serve` and `up`.
    pub fn gateway(&self) -> Option<(&ServeArgs, Launch)> {
        match self {
            Command::Up(args) => Some((args, Launch::Up)),
            Command::Serve(args) => Some((args, Launch::Serve)),
            _ => None,
        }
    }
}

/// How the gateway was launched: the two commands run the same gateway and differ only
/// in what they do for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `llmgate up`: the default model when none is named, and on the first start a user
    /// key to call it with.
    Up,
    /// `llmgate serve`: only what it is told.
    Serve,
}

/// Options of `llmgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Base URL of the OpenAI-compatible upstream, e.g. http://127.0.0.1:8000
    #[arg(long, env = "LLMGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Address to listen on
    #[arg(long, env = "LLMGATE_LISTEN", value_name = "ADDR", value_parser = given::<SocketAddr>)]
    pub listen: Option<Given<SocketAddr>>,

    /// Key the gateway sends to the upstream (for a hosted API)
    #[arg(
        long,
        env = "LLMGATE_UPSTREAM_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub upstream_key: Option<String>,

    /// Seconds to wait for the upstream's response headers
    #[arg(long, env = "LLMGATE_UPSTREAM_TIMEOUT_SECS", value_name = "SECS", value_parser = given::<u64>)]
    pub upstream_timeout_secs: Option<Given<u64>>,

    /// Largest request body accepted, in bytes
    #[arg(long, env = "LLMGATE_MAX_BODY_BYTES", value_name = "BYTES", value_parser = given::<u64>)]
    pub max_body_bytes: Option<Given<u64>>,

    /// Threads that serve requests [default: one per core]
    #[arg(long, env = "LLMGATE_WORKERS", value_name = "N", value_parser = given::<u64>)]
    pub workers: Option<Given<u64>>,

    /// How long key lookups are cached, in milliseconds
    #[arg(long, env = "LLMGATE_KEY_CACHE_TTL_MS", value_name = "MS", value_parser = given::<u64>)]
    pub key_cache_ttl_ms: Option<Given<u64>>,

    /// Seconds a client may take to send a request's head
    #[arg(long, env = "LLMGATE_HEADER_READ_TIMEOUT_SECS", value_name = "SECS", value_parser = given::<u64>)]
    pub header_read_timeout_secs: Option<Given<u64>>,

    /// Seconds a connection may stay open with no request in flight
    #[arg(long, env = "LLMGATE_IDLE_TIMEOUT_SECS", value_name = "SECS", value_parser = given::<u64>)]
    pub idle_timeout_secs: Option<Given<u64>>,

    /// Connections open at once (fewer than the default if open files are limited)
    #[arg(long, env = "LLMGATE_MAX_CONNECTIONS", value_name = "N", value_parser = given::<u64>)]
    pub max_connections: Option<Given<u64>>,

    /// Seconds requests in flight get to finish on SIGTERM before their connections are
    /// closed
    #[arg(long, env = "LLMGATE_SHUTDOWN_TIMEOUT_SECS", value_name = "SECS", value_parser = given::<u64>)]
    pub shutdown_timeout_secs: Option<Given<u64>>,

    /// Serve /metrics without a key (by default it needs an admin key)
    #[arg(long, env = "LLMGATE_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// Usage records kept in memory while the database is down; older ones are spilled
    /// to DATA_DIR/usage-spill.jsonl
    #[arg(long, env = "LLMGATE_USAGE_QUEUE_MAX", value_name = "RECORDS", value_parser = given::<u64>)]
    pub usage_queue_max: Option<Given<u64>>,

    /// Redis that keeps the key limits' counters for every replica, e.g.
    /// redis://127.0.0.1:6379 [default: each process counts on its own]
    #[arg(
        long,
        env = "LLMGATE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// How many replicas share the limits: while Redis is unreachable each enforces this
    /// share of every limit
    #[arg(long, env = "LLMGATE_REPLICAS", value_name = "N", value_parser = given::<u32>)]
    pub replicas: Option<Given<u32>>,

    /// The model to run.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Options for a model llmgate runs itself.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face repo (owner/name or owner/name:file.gguf), or a model
    /// known by name: default (SmolLM2 135M Instruct) or gemma-3-270m (Gemma 3 270M base)
    #[arg(long, env = "LLMGATE_MODEL", value_name = "MODEL")]
    pub model: Option<String>,

    /// Backend llama.cpp is built for: cpu, cuda, metal or openblas
    #[arg(long, env = "LLMGATE_BACKEND", value_name = "BACKEND", value_parser = given::<Backend>)]
    pub backend: Option<Given<Backend>>,

    /// Chat format, e.g. gemma or chatml [default: gemma for Gemma models, chatml for
    /// SmolLM2]
    #[arg(long, env = "LLMGATE_CHAT_FORMAT", value_name = "FORMAT")]
    pub chat_format: Option<String>,

    /// Context length [default: the server's]
    #[arg(long, env = "LLMGATE_N_CTX", value_name = "TOKENS", value_parser = given::<u32>)]
    pub n_ctx: Option<Given<u32>>,

    /// Model server: llama-cpp-python or llama-server
    #[arg(long, env = "LLMGATE_RUNNER", value_name = "RUNNER", value_parser = given::<RunnerKind>)]
    pub runner: Option<Given<RunnerKind>>,

    /// Python used to create llmgate's virtual environments
    #[arg(long, env = "LLMGATE_PYTHON", value_name = "PYTHON")]
    pub python: Option<PathBuf>,

    /// Where the virtual environments live [default: DATA_DIR/python]
    #[arg(long, env = "LLMGATE_PYTHON_ENV_DIR", value_name = "DIR")]
    pub python_env_dir: Option<PathBuf>,

    /// Where built wheels and the default model are cached [default: ~/.cache/llmgate]
    #[arg(long, env = "LLMGATE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Seconds the model server may take to load the model
    #[arg(long, env = "LLMGATE_MODEL_READY_TIMEOUT_SECS", value_name = "SECS", value_parser = given::<u64>)]
    pub model_ready_timeout_secs: Option<Given<u64>>,
}

/// `llmgate keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once)
    Create {
        /// Who or what the key is for (unique among active keys)
        name: String,
        /// Make it an admin key (manages keys, reads everyone's usage)
        #[arg(long)]
        admin: bool,
        /// Its limits (those left out come from the config's [key_defaults])
        #[command(flatten)]
        limits: LimitArgs,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Change a key's limits, name or expiry; a running gateway applies them within a
    /// second
    Update {
        /// The key's id (key_…) or its name
        #[arg(value_name = "ID|NAME")]
        key: String,
        /// A new name
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The limits to set
        #[command(flatten)]
        limits: LimitArgs,
        /// Unset a limit (back to the default) or the expiry: rpm, tpm, models,
        /// max-parallel, quota, quota-period, weight, per-user-rpm, per-user-quota,
        /// expires; repeatable
        #[arg(long, value_name = "FIELD", value_parser = given::<ClearField>)]
        clear: Vec<Given<ClearField>>,
        /// Print the key as JSON
        #[arg(long)]
        json: bool,
    },
    /// Give a key a new secret (same id, limits and usage) and print it; the old secret
    /// keeps working for --grace seconds
    Rotate {
        /// The key's id (key_…) or its name
        #[arg(value_name = "ID|NAME")]
        key: String,
        /// Seconds the old secret keeps working (at most 30 days)
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        grace: u64,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List keys
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name; a running gateway refuses it within a second
    Revoke {
        /// The key's id (key_…) or its name
        #[arg(value_name = "ID|NAME")]
        key: String,
    },
}

/// A key's limits on the command line (`keys create`, `keys update`); a flag left out
/// leaves the limit as it is.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Requests per minute
    #[arg(long, value_name = "N")]
    pub rpm: Option<u32>,
    /// Tokens (prompt and completion) per minute
    #[arg(long, value_name = "N")]
    pub tpm: Option<u64>,
    /// Models it may use: names or globs, comma-separated (e.g. gemma-*,smollm2)
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Requests in flight at once
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<u32>,
    /// Tokens per quota period
    #[arg(long, value_name = "TOKENS")]
    pub quota: Option<u64>,
    /// The quota's period, calendar UTC: day, week or month [default: month]
    #[arg(long, value_name = "PERIOD")]
    pub quota_period: Option<QuotaPeriod>,
    /// Its share of a busy model against other keys (1 to 1000) [default: 1]
    #[arg(long, value_name = "N")]
    pub weight: Option<u32>,
    /// Requests per minute for each end user of the key
    #[arg(long, value_name = "N")]
    pub per_user_rpm: Option<u32>,
    /// Tokens per quota period for each end user of the key
    #[arg(long, value_name = "TOKENS")]
    pub per_user_quota: Option<u64>,
    /// When the key stops working: a time (2027-01-31T00:00:00Z) or a duration from now
    /// (30d, 12h, 45m)
    #[arg(long, value_name = "WHEN")]
    pub expires: Option<String>,
}

/// What `keys update --clear` can unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearField {
    /// `rpm`
    Rpm,
    /// `tpm`
    Tpm,
    /// `models`
    Models,
    /// `max-parallel`
    MaxParallel,
    /// `quota`
    Quota,
    /// `quota-period`
    QuotaPeriod,
    /// `weight`
    Weight,
    /// `per-user-rpm`
    PerUserRpm,
    /// `per-user-quota`
    PerUserQuota,
    /// `expires`
    Expires,
}

impl std::str::FromStr for ClearField {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.replace('_', "-").as_str() {
            "rpm" => Self::Rpm,
            "tpm" => Self::Tpm,
            "models" => Self::Models,
            "max-parallel" => Self::MaxParallel,
            "quota" | "quota-tokens" => Self::Quota,
            "quota-period" => Self::QuotaPeriod,
            "weight" => Self::Weight,
            "per-user-rpm" => Self::PerUserRpm,
            "per-user-quota" | "per-user-quota-tokens" => Self::PerUserQuota,
            "expires" | "expires-at" => Self::Expires,
            other => {
                return Err(format!(
                    "'{other}' is not a field: rpm, tpm, models, max-parallel, quota, quota-period, weight, per-user-rpm, per-user-quota or expires"
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help_of(subcommand: &str) -> String {
        let err = Cli::try_parse_with_defaults(["llmgate", subcommand, "--help"]).unwrap_err();
        err.render().to_string()
    }

    #[test]
    fn the_help_shows_each_default_from_its_constant() {
        let help = help_of("serve");
        for expected in [
            format!("Address to listen on [default: {DEFAULT_LISTEN}]"),
            format!("[default: {DEFAULT_UPSTREAM_TIMEOUT_SECS}]"),
            format!("in bytes [default: {DEFAULT_MAX_BODY_BYTES}]"),
            format!("in milliseconds [default: {DEFAULT_KEY_CACHE_TTL_MS}]"),
            format!("[default: {DEFAULT_MODEL_READY_TIMEOUT_SECS}]"),
            format!("[default: {DEFAULT_USAGE_QUEUE_MAX}]"),
            format!("[default: ./{DEFAULT_DATA_DIR}]"),
            "[default: llama-cpp-python]".to_owned(),
        ] {
            assert!(help.contains(&expected), "no '{expected}' in:\n{help}");
        }
        assert!(help_of("up").contains(&format!("[default: {DEFAULT_LISTEN}]")));
        let err = Cli::try_parse_with_defaults(["llmgate", "--help"]).unwrap_err();
        let overview = err.render().to_string();
        let port = format!(
            "the gateway in front of it, on port {}",
            DEFAULT_LISTEN.port()
        );
        assert!(overview.contains(&port), "{overview}");
    }

    #[test]
    fn a_flag_left_out_has_no_value() {
        let cli = Cli::try_parse_with_defaults(["llmgate", "serve"]).unwrap();
        let Command::Serve(serve) = cli.command else {
            unreachable!()
        };
        assert_eq!(serve.listen, None);
        assert_eq!(serve.upstream_timeout_secs, None);
        assert_eq!(serve.model.backend, None);
        assert_eq!(cli.data_dir, None);
    }
}
