//! The gateway's settings: parsed once, validated once, with a default for every option
//! that works on a laptop.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::limits::KeyLimits;
use crate::proxy::ProxyConfig;
use crate::runner::Backend;

/// A setting that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No upstream was given.
    #[error("no upstream: pass --upstream URL or --model MODEL (or set LLMGATE_UPSTREAM / LLMGATE_MODEL, or `upstream` / `model` / [[models]] in the config file)")]
    MissingUpstream,
    /// The upstream is not an http(s) URL.
    #[error("upstream '{upstream}' is not a URL like http://127.0.0.1:8000: {reason}")]
    BadUpstream {
        /// The upstream as given.
        upstream: String,
        /// What is wrong with it.
        reason: String,
        /// The URI parser's error, when it could not read it at all.
        #[source]
        source: Option<http::uri::InvalidUri>,
    },
    /// The database URL is not a PostgreSQL one.
    #[error("database_url must start with postgres:// or postgresql:// (leave it unset for the SQLite file in the data directory)")]
    BadDatabaseUrl,
    /// The Redis URL is not one.
    #[error("redis_url must start with redis://, rediss:// or redis+unix:// (leave it unset for limits counted in this process)")]
    BadRedisUrl,
    /// A value of `[key_defaults]` that cannot work.
    #[error("{0}")]
    BadKeyDefaults(String),
    /// A `[[models]]` entry that cannot work.
    #[error("model '{name}': {reason}")]
    BadModel {
        /// The entry's name (or its position, when it has none).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A number is out of range.
    #[error("{name} must be {rule} (got {value})")]
    OutOfRange {
        /// The option.
        name: &'static str,
        /// The rule it breaks.
        rule: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Every setting that cannot work, in the order the options are listed; never empty.
#[derive(Debug)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// The problems, one per option.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// The problems, owned.
    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

impl fmt::Display for ConfigErrors {
    /// One line per problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// The name of the model that `--upstream` adds to the list.
pub const FLAG_UPSTREAM_NAME: &str = "upstream";

/// The largest `usage_queue_max`: about 3 GB of records in memory.
const MAX_USAGE_QUEUE: u64 = 10_000_000;

/// Everything `llmgate serve` needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// Threads that serve requests, each an event loop of its own; by default one per
    /// core. More threads than cores cost CPU per request (docs/benchmarks.md).
    pub workers: Option<u64>,
    /// Base URL of the OpenAI-compatible upstream.
    pub upstream: Option<String>,
    /// A key the gateway sends to the upstream (for a hosted API).
    pub upstream_key: Option<String>,
    /// Seconds to wait for the upstream's response headers.
    pub upstream_timeout_secs: u64,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
    /// Directory for the database and other state.
    pub data_dir: PathBuf,
    /// How long a key lookup is cached, in milliseconds; a key revoked by another
    /// process is refused after at most this long.
    pub key_cache_ttl_ms: u64,
    /// A model to run instead of forwarding to `upstream`: a GGUF path or a Hugging Face
    /// repo id (`owner/name` or `owner/name:file.gguf`).
    pub model: Option<String>,
    /// Which model server runs it.
    pub runner: RunnerKind,
    /// The backend llama.cpp is built for.
    pub backend: Backend,
    /// The chat format (llama-cpp-python's `--chat_format`); by default `gemma` for
    /// Gemma models and the server's own guess for others.
    pub chat_format: Option<String>,
    /// Context length for the model; the server's default when unset.
    pub n_ctx: Option<u32>,
    /// Seconds the model server may take to load the model.
    pub model_ready_timeout_secs: u64,
    /// The Python that creates llmgate's virtual environments.
    pub python: PathBuf,
    /// Where the virtual environments live (default: `<data_dir>/python`).
    pub python_env_dir: Option<PathBuf>,
    /// Where built wheels and the default model are cached (default:
    /// `$XDG_CACHE_HOME/llmgate` or `~/.cache/llmgate`).
    pub cache_dir: Option<PathBuf>,
    /// The `llama-server` binary for `runner = "llama-server"` (default: from `PATH`).
    pub llama_server: Option<PathBuf>,
    /// Serve `/metrics` without a key (default: it needs an admin key).
    pub metrics_public: bool,
    /// PostgreSQL instead of the SQLite file, e.g. `postgres://llmgate@db/llmgate`, for
    /// several gateway replicas sharing keys and usage.
    pub database_url: Option<String>,
    /// Seconds a client may take to send a request's head, from its first byte.
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight.
    pub idle_timeout_secs: u64,
    /// Connections open at once (default: [`DEFAULT_MAX_CONNECTIONS`], fewer when the
    /// process may not open enough files for them).
    pub max_connections: Option<u64>,
    /// Seconds requests in flight get to finish after SIGTERM/SIGINT before their
    /// connections are closed.
    pub shutdown_timeout_secs: u64,
    /// Usage records that wait in memory while the database is down or slow; older ones
    /// go to `<data_dir>/usage-spill.jsonl` and are written when it is back.
    pub usage_queue_max: u64,
    /// The models behind the gateway (the TOML `[[models]]` table); `model` or
    /// `upstream` add one more ([`GatewayConfig::model_list`]).
    pub models: Vec<ModelConfig>,
    /// The model a request that names none goes to (default: the first in the list).
    pub default_model: Option<String>,
    /// How many local models may run at once; the least recently used idle one is stopped
    /// to start another (default: as many as fit in memory).
    pub max_loaded_models: Option<u32>,
    /// Memory (MiB) left free for everything else when llmgate decides whether a model
    /// fits in RAM.
    pub memory_reserve_mb: u64,
    /// GPU memory (MiB) left free when deciding whether a GPU model fits.
    pub gpu_memory_reserve_mb: u64,
    /// At most this much memory (MiB) for the local models together, whatever is free
    /// (default: no cap beyond what is free).
    pub memory_limit_mb: Option<u64>,
    /// Limits for every user key, where the key sets none of its own (the TOML
    /// `[key_defaults]` table). Admin keys have only their own.
    pub key_defaults: KeyLimits,
    /// Redis that keeps the limits' counters for every replica, e.g.
    /// `redis://127.0.0.1:6379`; without it each process counts for itself.
    pub redis_url: Option<String>,
    /// How many replicas share the limits: while Redis cannot be reached, each replica
    /// enforces this share of every limit on its own.
    pub replicas: u32,
    /// The completion tokens a request that sets no `max_tokens` is assumed to ask for,
    /// when it is admitted against a `tpm` limit (the real count settles it later).
    pub estimated_completion_tokens: u64,
}

/// One model behind the gateway: a local GGUF file llmgate runs, or an `upstream` it
/// forwards to. Clients pick it by sending its `name` (or an alias) as `model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// What clients send as `model`.
    pub name: String,
    /// Other names for the same model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// A GGUF path or a Hugging Face repo (`owner/name` or `owner/name:file.gguf`), or
    /// `default` for llmgate's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Which model server runs it (default: the gateway's `runner`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerKind>,
    /// The backend llama.cpp is built for (default: the gateway's `backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// The chat format (llama-cpp-python's `--chat_format`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_format: Option<String>,
    /// Context length; the model server's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<u32>,
    /// Layers offloaded to the GPU (`-1`: all); by default all on a GPU backend, none on
    /// the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_layers: Option<i32>,
    /// More arguments for the model server, passed as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// An OpenAI-compatible server llmgate does not run (vLLM, Ollama, a hosted API),
    /// instead of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// A key llmgate sends to that upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<String>,
    /// Stop the model after this many seconds without a request (0: never).
    #[serde(default)]
    pub ttl_secs: u64,
    /// Start the model with the gateway, and never stop it to make room for another.
    #[serde(default)]
    pub preload: bool,
    /// Requests the model server is given at once; the rest wait in the gateway (default:
    /// no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Requests that may wait for the model beyond `max_concurrency`; more get 503 with
    /// `Retry-After`.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// The order in which requests waiting for a place are served: weighted turns
    /// between keys (`fair`, the default) or arrival order (`fifo`).
    #[serde(default, skip_serializing_if = "QueuePolicy::is_fair")]
    pub queue: QueuePolicy,
}

/// How a busy model's waiting requests take their turns ([`ModelConfig::queue`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// Turns go round the keys that wait, each key's requests in their order, a key of
    /// `weight` w taking w turns for another's one: a key with many requests waiting
    /// does not hold up a key that sends one.
    #[default]
    Fair,
    /// First come, first served, whoever sent them.
    Fifo,
}

impl QueuePolicy {
    /// Whether this is the default, [`QueuePolicy::Fair`].
    pub fn is_fair(&self) -> bool {
        *self == Self::Fair
    }

    /// Its name in the configuration: `fair` or `fifo`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fair => "fair",
            Self::Fifo => "fifo",
        }
    }
}

/// Default of [`ModelConfig::max_queue`].
pub const DEFAULT_MAX_QUEUE: u32 = 256;

fn default_max_queue() -> u32 {
    DEFAULT_MAX_QUEUE
}

/// The longest model name or alias accepted: what the store keeps
/// ([`storage::MAX_MODEL_BYTES`](crate::storage::MAX_MODEL_BYTES)).
pub const MAX_MODEL_NAME_LEN: usize = crate::storage::MAX_MODEL_BYTES;

impl ModelConfig {
    /// A local model named `name` served from `source`, with every other setting at its
    /// default.
    pub fn local(name: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::named(name)
        }
    }

    /// A model forwarded to `upstream`, with every other setting at its default.
    pub fn remote(name: impl Into<String>, upstream: impl Into<String>) -> Self {
        Self {
            upstream: Some(upstream.into()),
            ..Self::named(name)
        }
    }

    fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
            source: None,
            runner: None,
            backend: None,
            chat_format: None,
            n_ctx: None,
            gpu_layers: None,
            args: Vec::new(),
            upstream: None,
            upstream_key: None,
            ttl_secs: 0,
            preload: false,
            max_concurrency: None,
            max_queue: DEFAULT_MAX_QUEUE,
            queue: QueuePolicy::Fair,
        }
    }

    /// Whether llmgate forwards to a server it does not run.
    pub fn is_remote(&self) -> bool {
        self.upstream.is_some()
    }

    /// The entry's name and aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// Every problem of this entry on its own (not against the others).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for name in self.names() {
            if name.trim().is_empty() || name.trim() != name {
                problems.push(format!(
                    "the name or alias '{name}' must be non-empty, without surrounding spaces"
                ));
            } else if name.len() > MAX_MODEL_NAME_LEN || name.chars().any(char::is_control) {
                problems.push(format!(
                    "names and aliases are at most {MAX_MODEL_NAME_LEN} bytes, without control characters"
                ));
            }
        }
        match (&self.source, &self.upstream) {
            (Some(_), Some(_)) => problems.push("give either source or upstream, not both".into()),
            (None, None) => problems.push(
                "give source (a GGUF path or Hugging Face owner/name) or upstream (a URL)".into(),
            ),
            (None, Some(upstream)) => {
                if let Err(err) = parse_upstream(upstream) {
                    problems.push(err.to_string());
                }
            }
            (Some(_), None) => {
                if self.upstream_key.is_some() {
                    problems.push("upstream_key is for upstream models only".into());
                }
            }
        }
        if self.max_queue == 0 {
            problems.push(
                "max_queue must be at least 1 (a request for a stopped model waits in it while the model loads)"
                    .into(),
            );
        }
        if self.max_concurrency == Some(0) {
            problems.push("max_concurrency must be at least 1 (leave it out for no limit)".into());
        }
        if self.ttl_secs > 365 * 86_400 {
            problems.push("ttl_secs must be at most a year (0: never stop)".into());
        }
        problems
    }

    /// The proxy settings of an `upstream` model.
    pub fn proxy(&self, timeout: Duration) -> Result<ProxyConfig, ConfigError> {
        let upstream = self
            .upstream
            .as_deref()
            .ok_or(ConfigError::MissingUpstream)?;
        Ok(ProxyConfig {
            upstream: parse_upstream(upstream)?,
            upstream_key: self.upstream_key.clone().map(Secret::new),
            timeout,
        })
    }
}

/// The name of the model that `model` / `upstream` (the one-model flags) add to the list.
pub fn flag_model_name(source: &str) -> String {
    let path = std::path::Path::new(source);
    let last = source.rsplit(['/', ':']).next().unwrap_or(source);
    let stem = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        path.file_stem().and_then(|s| s.to_str()).unwrap_or(last)
    } else {
        last
    };
    let stem = stem.strip_suffix(".gguf").unwrap_or(stem);
    if stem.is_empty() {
        source.to_owned()
    } else {
        stem.to_owned()
    }
}

fn parse_upstream(raw: &str) -> Result<Uri, ConfigError> {
    let uri: Uri =
        raw.parse()
            .map_err(|source: http::uri::InvalidUri| ConfigError::BadUpstream {
                upstream: raw.into(),
                reason: source.to_string(),
                source: Some(source),
            })?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(ConfigError::BadUpstream {
            upstream: raw.into(),
            reason: "it needs http:// or https:// and a host".into(),
            source: None,
        }),
    }
}

/// Default of [`GatewayConfig::listen`]: this machine only, port 8080.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default of [`GatewayConfig::data_dir`], relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "llmgate-data";
/// Default of [`GatewayConfig::upstream_timeout_secs`] (the proxy's own default).
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = crate::proxy::DEFAULT_UPSTREAM_TIMEOUT.as_secs();
/// Default of [`GatewayConfig::max_body_bytes`]: 16 MiB, room for a long conversation
/// or an audio upload ([`AuthUsageLayer`](crate::auth_usage::AuthUsageLayer)'s own).
pub const DEFAULT_MAX_BODY_BYTES: u64 = crate::auth_usage::DEFAULT_MAX_BODY_BYTES as u64;
/// Default of [`GatewayConfig::key_cache_ttl_ms`] (the same as
/// [`KeyCache::new`](crate::auth::KeyCache::new)'s).
pub const DEFAULT_KEY_CACHE_TTL_MS: u64 = crate::auth::DEFAULT_KEY_TTL.as_millis() as u64;
/// Default of [`GatewayConfig::model_ready_timeout_secs`]: the runners' own
/// ([`runner::DEFAULT_READY_TIMEOUT`](crate::runner::DEFAULT_READY_TIMEOUT)).
pub const DEFAULT_MODEL_READY_TIMEOUT_SECS: u64 = crate::runner::DEFAULT_READY_TIMEOUT.as_secs();
/// Default of [`GatewayConfig::python`].
pub const DEFAULT_PYTHON: &str = "python3";
/// Default of [`GatewayConfig::header_read_timeout_secs`]: a real client sends a request
/// head in one write; nginx allows 60 s, uvicorn's idle limit is 5 s.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Default of [`GatewayConfig::idle_timeout_secs`] (nginx's keep-alive is 75 s; client
/// pools such as httpx drop idle connections after 5 s).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default of [`GatewayConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Default of [`GatewayConfig::shutdown_timeout_secs`].
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
/// Default of [`GatewayConfig::estimated_completion_tokens`].
pub const DEFAULT_ESTIMATED_COMPLETION_TOKENS: u64 =
    crate::limits::DEFAULT_ESTIMATED_COMPLETION_TOKENS;
/// The most replicas [`GatewayConfig::replicas`] may name.
pub const MAX_REPLICAS: u32 = 1000;
/// Default of [`GatewayConfig::usage_queue_max`] (the recorder's own default).
pub const DEFAULT_USAGE_QUEUE_MAX: u64 = crate::usage::DEFAULT_QUEUE_MAX as u64;

/// Which program serves a local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunnerKind {
    /// `python -m llama_cpp.server` in a managed virtual environment.
    #[default]
    LlamaCppPython,
    /// llama.cpp's `llama-server` binary.
    LlamaServer,
}

impl RunnerKind {
    /// `llama-cpp-python` or `llama-server`, as in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LlamaCppPython => "llama-cpp-python",
            Self::LlamaServer => "llama-server",
        }
    }
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::LlamaCppPython, Self::LlamaServer]
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown runner '{s}': expected llama-cpp-python or llama-server")
            })
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            workers: None,
            upstream: None,
            upstream_key: None,
            upstream_timeout_secs: DEFAULT_UPSTREAM_TIMEOUT_SECS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            key_cache_ttl_ms: DEFAULT_KEY_CACHE_TTL_MS,
            model: None,
            runner: RunnerKind::default(),
            backend: Backend::default(),
            chat_format: None,
            n_ctx: None,
            model_ready_timeout_secs: DEFAULT_MODEL_READY_TIMEOUT_SECS,
            python: PathBuf::from(DEFAULT_PYTHON),
            python_env_dir: None,
            cache_dir: None,
            llama_server: None,
            metrics_public: false,
            database_url: None,
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT_SECS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            max_connections: None,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            usage_queue_max: DEFAULT_USAGE_QUEUE_MAX,
            models: Vec::new(),
            default_model: None,
            max_loaded_models: None,
            memory_reserve_mb: DEFAULT_MEMORY_RESERVE_MB,
            gpu_memory_reserve_mb: DEFAULT_GPU_MEMORY_RESERVE_MB,
            memory_limit_mb: None,
            key_defaults: KeyLimits::default(),
            redis_url: None,
            replicas: 1,
            estimated_completion_tokens: DEFAULT_ESTIMATED_COMPLETION_TOKENS,
        }
    }
}

/// Default of [`GatewayConfig::memory_reserve_mb`]: room for the system and llmgate.
pub const DEFAULT_MEMORY_RESERVE_MB: u64 = 512;
/// Default of [`GatewayConfig::gpu_memory_reserve_mb`]: room for the CUDA context and
/// other programs' buffers.
pub const DEFAULT_GPU_MEMORY_RESERVE_MB: u64 = 512;

impl GatewayConfig {
    /// Checks every option and reports every one that cannot work, each saying what to
    /// fix, so that a person fixes a file in one go.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.upstream.is_some() || (self.model.is_none() && self.models.is_empty()) {
            errors.extend(self.upstream_uri().err());
        }
        errors.extend(self.validate_models());
        errors.extend(self.validate_database().err());
        errors.extend(self.validate_limits());
        let ranges: [(&'static str, u64, u64, u64, &'static str); 12] = [
            (
                "workers",
                self.workers.unwrap_or(1),
                1,
                1024,
                "between 1 and 1024",
            ),
            (
                "upstream_timeout_secs",
                self.upstream_timeout_secs,
                1,
                86_400,
                "between 1 and 86400",
            ),
            (
                "max_body_bytes",
                self.max_body_bytes,
                1,
                1 << 32,
                "between 1 and 4294967296",
            ),
            (
                "key_cache_ttl_ms",
                self.key_cache_ttl_ms,
                0,
                60_000,
                "between 0 and 60000",
            ),
            (
                "model_ready_timeout_secs",
                self.model_ready_timeout_secs,
                1,
                86_400,
                "between 1 and 86400",
            ),
            (
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                1,
                3_600,
                "between 1 and 3600",
            ),
            (
                "idle_timeout_secs",
                self.idle_timeout_secs,
                1,
                86_400,
                "between 1 and 86400",
            ),
            (
                "max_connections",
                self.max_connections.unwrap_or(1),
                1,
                1_000_000,
                "between 1 and 1000000",
            ),
            (
                "shutdown_timeout_secs",
                self.shutdown_timeout_secs,
                0,
                86_400,
                "between 0 and 86400",
            ),
            (
                "usage_queue_max",
                self.usage_queue_max,
                1,
                MAX_USAGE_QUEUE,
                "between 1 and 10000000",
            ),
            (
                "replicas",
                u64::from(self.replicas),
                1,
                u64::from(MAX_REPLICAS),
                "between 1 and 1000",
            ),
            (
                "estimated_completion_tokens",
                self.estimated_completion_tokens,
                1,
                crate::storage::MAX_TOKENS_PER_REQUEST,
                "between 1 and 1000000000",
            ),
        ];
        for (name, value, min, max, rule) in ranges {
            if value < min || value > max {
                errors.push(ConfigError::OutOfRange { name, rule, value });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The models behind the gateway: `[[models]]`, then the one that `model` or
    /// `upstream` names (a one-entry list when only those are given), named after its
    /// file or repo ([`flag_model_name`]), or `upstream`.
    pub fn model_list(&self) -> Vec<ModelConfig> {
        let mut list = self.models.clone();
        let flags = match (&self.model, &self.upstream) {
            (_, Some(upstream)) => Some(ModelConfig {
                upstream_key: self.upstream_key.clone(),
                ..ModelConfig::remote(FLAG_UPSTREAM_NAME, upstream.clone())
            }),
            (Some(model), None) => Some(ModelConfig {
                runner: Some(self.runner),
                backend: Some(self.backend),
                chat_format: self.chat_format.clone(),
                n_ctx: self.n_ctx,
                preload: true,
                ..ModelConfig::local(flag_model_name(model), model.clone())
            }),
            (None, None) => None,
        };
        if let Some(mut entry) = flags {
            // A `[[models]]` entry of the same name wins; the flag's model keeps a free name.
            let taken = |n: &str| list.iter().any(|m: &ModelConfig| m.names().any(|x| x == n));
            if taken(&entry.name) {
                let base = entry.name.clone();
                entry.name = (2..)
                    .map(|i| format!("{base}-{i}"))
                    .find(|n| !taken(n))
                    .expect("a free name");
            }
            list.push(entry);
        }
        list
    }

    fn validate_models(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            let name = if model.name.is_empty() {
                format!("#{}", i + 1)
            } else {
                model.name.clone()
            };
            let mut problems = model.problems();
            for n in model.names() {
                if !seen.insert(n.to_owned()) {
                    problems.push(format!("the name '{n}' is used twice"));
                }
            }
            errors.extend(problems.into_iter().map(|reason| ConfigError::BadModel {
                name: name.clone(),
                reason,
            }));
        }
        if let Some(default) = &self.default_model {
            if !self
                .model_list()
                .iter()
                .any(|m| m.names().any(|n| n == default))
            {
                errors.push(ConfigError::BadModel {
                    name: default.clone(),
                    reason: "default_model names no model in the list".into(),
                });
            }
        }
        if self.max_loaded_models == Some(0) {
            errors.push(ConfigError::OutOfRange {
                name: "max_loaded_models",
                rule: "at least 1 (leave it out for no limit)",
                value: 0,
            });
        }
        errors
    }

    fn validate_limits(&self) -> Vec<ConfigError> {
        let mut errors: Vec<ConfigError> = self
            .key_defaults
            .problems("key_defaults")
            .into_iter()
            .map(ConfigError::BadKeyDefaults)
            .collect();
        if let Some(url) = &self.redis_url {
            if !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
            {
                errors.push(ConfigError::BadRedisUrl);
            }
        }
        errors
    }

    /// Checks `database_url` (also for the `keys` and `usage` commands).
    pub fn validate_database(&self) -> Result<(), ConfigError> {
        match &self.database_url {
            Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
                Err(ConfigError::BadDatabaseUrl)
            }
            _ => Ok(()),
        }
    }

    /// The upstream as a URI.
    pub fn upstream_uri(&self) -> Result<Uri, ConfigError> {
        parse_upstream(
            self.upstream
                .as_deref()
                .ok_or(ConfigError::MissingUpstream)?,
        )
    }

    /// The SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("llmgate.db")
    }

    /// Where the virtual environments live.
    pub fn python_env_dir(&self) -> PathBuf {
        self.python_env_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("python"))
    }

    /// Where wheels and the default model are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(default_cache_dir)
    }
}

/// `$XDG_CACHE_HOME/llmgate`, else `~/.cache/llmgate`, else `./.llmgate-cache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("llmgate");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("llmgate"),
        None => PathBuf::from(".llmgate-cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_once_an_upstream_is_given() {
        let mut config = GatewayConfig::default();
        let errors = config.validate().unwrap_err().into_vec();
        assert!(
            matches!(errors[..], [ConfigError::MissingUpstream]),
            "{errors:?}"
        );
        config.upstream = Some("http://127.0.0.1:8000".into());
        config.validate().unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn errors_name_the_option_to_fix() {
        let config = GatewayConfig {
            upstream: Some("localhost:8000".into()),
            ..Default::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("http://"));
        let config = GatewayConfig {
            upstream: Some("http://h".into()),
            upstream_timeout_secs: 0,
            ..Default::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("upstream_timeout_secs"));
    }

    #[test]
    fn a_model_queues_fairly_unless_it_says_fifo() {
        let file = r#"
            [[models]]
            name = "shared"
            upstream = "http://127.0.0.1:9"
            max_concurrency = 1

            [[models]]
            name = "batch"
            upstream = "http://127.0.0.1:9"
            queue = "fifo"
        "#;
        let config = toml::from_str::<GatewayConfig>(file).unwrap();
        assert_eq!(config.models[0].queue, QueuePolicy::Fair);
        assert_eq!(config.models[1].queue, QueuePolicy::Fifo);
        // Kept as the admin API stores it: the default is left out, settings stored
        // before the field existed still read.
        let stored = serde_json::to_value(&config.models[0]).unwrap();
        assert!(stored.get("queue").is_none(), "{stored}");
        let fifo = serde_json::to_value(&config.models[1]).unwrap();
        assert_eq!(fifo["queue"], "fifo");
        let err = toml::from_str::<GatewayConfig>(
            "[[models]]\nname = \"x\"\nupstream = \"http://127.0.0.1:9\"\nqueue = \"lifo\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("fifo"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_on_a_line_of_its_own() {
        let config = GatewayConfig {
            upstream: Some("ftp://h".into()),
            database_url: Some("mysql://db".into()),
            max_body_bytes: 0,
            usage_queue_max: 0,
            ..Default::default()
        };
        let text = config.validate().unwrap_err().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("ftp://h"), "{text}");
        assert!(lines[1].contains("database_url"), "{text}");
        assert!(lines[2].contains("max_body_bytes"), "{text}");
        assert!(lines[3].contains("usage_queue_max"), "{text}");
    }

    #[test]
    fn unknown_fields_in_a_file_are_refused() {
        let err = toml::from_str::<GatewayConfig>("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listn"));
    }

    #[test]
    fn key_defaults_come_from_a_table_and_bad_values_name_their_field() {
        let config: GatewayConfig = toml::from_str(
            "upstream = \"http://127.0.0.1:1\"\nredis_url = \"redis://127.0.0.1:6379\"\nreplicas = 3\n\
             [key_defaults]\nrpm = 60\nmodels = [\"gemma-*\"]\nquota_tokens = 1000\nquota_period = \"day\"\n",
        )
        .unwrap();
        assert_eq!(config.key_defaults.rpm, Some(60));
        assert_eq!(
            config.key_defaults.period(),
            crate::limits::QuotaPeriod::Day
        );
        assert_eq!(config.replicas, 3);
        assert!(config.validate().is_ok());
        assert!(toml::from_str::<GatewayConfig>("[key_defaults]\nrpmm = 1\n").is_err());

        let bad = GatewayConfig {
            upstream: Some("http://127.0.0.1:1".into()),
            redis_url: Some("127.0.0.1:6379".into()),
            replicas: 0,
            key_defaults: KeyLimits {
                rpm: Some(0),
                ..KeyLimits::default()
            },
            ..GatewayConfig::default()
        };
        let text = bad.validate().unwrap_err().to_string();
        for expected in ["key_defaults.rpm", "redis_url", "replicas"] {
            assert!(text.contains(expected), "no {expected} in {text}");
        }
    }
}
