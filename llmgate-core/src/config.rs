//! The gateway's settings: parsed once, validated once, with a default for every option
//! that works on a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::proxy::ProxyConfig;

/// A setting that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No upstream was given.
    #[error("no upstream: pass --upstream URL (or set LLMGATE_UPSTREAM, or `upstream` in the config file)")]
    MissingUpstream,
    /// The upstream is not an http(s) URL.
    #[error("upstream '{0}' is not a URL like http://127.0.0.1:8000: {1}")]
    BadUpstream(String, String),
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

/// Everything `llmgate serve` needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: None,
            upstream_key: None,
            upstream_timeout_secs: 600,
            max_body_bytes: 16 * 1024 * 1024,
            data_dir: PathBuf::from("llmgate-data"),
            key_cache_ttl_ms: 500,
        }
    }
}

impl GatewayConfig {
    /// Checks every option; the error says what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.upstream_uri()?;
        let ranges: [(&'static str, u64, u64, u64, &'static str); 3] = [
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
        ];
        for (name, value, min, max, rule) in ranges {
            if value < min || value > max {
                return Err(ConfigError::OutOfRange { name, rule, value });
            }
        }
        Ok(())
    }

    /// The upstream as a URI.
    pub fn upstream_uri(&self) -> Result<Uri, ConfigError> {
        let raw = self
            .upstream
            .as_deref()
            .ok_or(ConfigError::MissingUpstream)?;
        let uri: Uri = raw.parse().map_err(|e: http::uri::InvalidUri| {
            ConfigError::BadUpstream(raw.into(), e.to_string())
        })?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(uri),
            _ => Err(ConfigError::BadUpstream(
                raw.into(),
                "it needs http:// or https:// and a host".into(),
            )),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_once_an_upstream_is_given() {
        let mut config = GatewayConfig::default();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::MissingUpstream)
        ));
        config.upstream = Some("http://127.0.0.1:8000".into());
        config.validate().unwrap();
        assert_eq!(config.listen.port(), 8080);
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
    fn unknown_fields_in_a_file_are_refused() {
        let err = toml::from_str::<GatewayConfig>("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listn"));
    }
}
