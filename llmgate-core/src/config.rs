//! The gateway's settings: parsed once, validated once, with a default for every option
//! that works on a laptop.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::proxy::ProxyConfig;
use crate::runner::Backend;

/// A setting that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No upstream was given.
    #[error("no upstream: pass --upstream URL or --model MODEL (or set LLMGATE_UPSTREAM / LLMGATE_MODEL, or `upstream` / `model` in the config file)")]
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
        }
    }
}

impl GatewayConfig {
    /// Checks every option and reports every one that cannot work, each saying what to
    /// fix, so that a person fixes a file in one go.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.model.is_none() || self.upstream.is_some() {
            errors.extend(self.upstream_uri().err());
        }
        errors.extend(self.validate_database().err());
        let ranges: [(&'static str, u64, u64, u64, &'static str); 10] = [
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
        let raw = self
            .upstream
            .as_deref()
            .ok_or(ConfigError::MissingUpstream)?;
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

    /// The proxy settings.
    pub fn proxy(&self) -> Result<ProxyConfig, ConfigError> {
        Ok(ProxyConfig {
            upstream: self.upstream_uri()?,
            upstream_key: self.upstream_key.clone().map(Secret::new),
            timeout: Duration::from_secs(self.upstream_timeout_secs),
        })
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
}
