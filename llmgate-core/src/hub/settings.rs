//! [`HubSettings`]: the Hub, the cache and the token, from the standard `HF_*` variables.

use std::fmt;
use std::path::PathBuf;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Bytes per download request: an interrupted download resumes from the last complete
/// chunk, and each chunk is held in memory until it is written. hf-hub's own default.
pub const DEFAULT_CHUNK_SIZE: usize = 10_000_000;

/// Where models come from and where they are kept.
///
/// [`HubSettings::from_env`] reads the variables the Python `huggingface_hub` library
/// reads, so llmgate and Python tools share one cache and one login.
#[derive(Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The Hub's base URL (`HF_ENDPOINT`; default [`DEFAULT_ENDPOINT`]), without a
    /// trailing `/`.
    pub endpoint: String,
    /// The hub cache folder: `HF_HUB_CACHE`, else `$HF_HOME/hub`, with `HF_HOME`
    /// defaulting to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
    pub cache_dir: PathBuf,
    /// Access token for gated and private models: `HF_TOKEN`, else the token file that
    /// `huggingface-cli login` writes (`$HF_HOME/token`, or `HF_TOKEN_PATH`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use only the cache and never touch the network.
    pub offline: bool,
    /// Bytes per download request; see [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: usize,
}

impl fmt::Debug for HubSettings {
    /// Never prints the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("chunk_size", &self.chunk_size)
            .finish()
    }
}

impl HubSettings {
    /// Settings from the process environment; see [`HubSettings::from_vars`].
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Settings from variables looked up with `get` (tests pass a map, not the
    /// environment). Empty values count as unset. Reads the token file when no token
    /// variable is set.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| get(name).filter(|value| !value.trim().is_empty());
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                // No home at all (a bare container): a cache in the working directory
                // still works, and the path in error messages shows where it went.
                let home = get("HOME").or_else(|| get("USERPROFILE"));
                home.map_or_else(|| PathBuf::from("."), PathBuf::from)
                    .join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty());
        let offline = get("HF_HUB_OFFLINE").is_some_and(|value| {
            matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            endpoint,
            cache_dir,
            token,
            offline,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_are_the_public_hub_and_the_home_cache() {
        let s = settings(&[("HOME", "/home/ada")]);
        assert_eq!(s.endpoint, "https://huggingface.co");
        assert_eq!(
            s.cache_dir,
            PathBuf::from("/home/ada/.cache/huggingface/hub")
        );
        assert_eq!(s.token, None);
        assert!(!s.offline);
        assert_eq!(s.chunk_size, DEFAULT_CHUNK_SIZE);
    }

    #[test]
    fn standard_variables_override() {
        let s = settings(&[
            ("HOME", "/home/ada"),
            ("HF_ENDPOINT", "http://mirror.local:8080/"),
            ("HF_HOME", "/data/hf"),
            ("HF_TOKEN", "hf_abc"),
        ]);
        assert_eq!(s.endpoint, "http://mirror.local:8080");
        assert_eq!(s.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!(s.token.as_deref(), Some("hf_abc"));

        let s = settings(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/fast/hub")]);
        assert_eq!(s.cache_dir, PathBuf::from("/fast/hub"));
        let s = settings(&[("HOME", "/home/ada"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(s.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn offline_takes_the_usual_truthy_values() {
        for value in ["1", "true", "TRUE", "yes", "on"] {
            assert!(settings(&[("HF_HUB_OFFLINE", value)]).offline, "{value}");
        }
        for value in ["0", "false", "", "no"] {
            assert!(!settings(&[("HF_HUB_OFFLINE", value)]).offline, "{value}");
        }
    }

    #[test]
    fn token_from_the_login_file_and_never_in_debug() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
        let s = settings(&[("HF_HOME", home.path().to_str().unwrap())]);
        assert_eq!(s.token.as_deref(), Some("hf_from_file"));
        // The variable wins over the file; an empty variable does not.
        let s = settings(&[
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_TOKEN", "hf_env"),
        ]);
        assert_eq!(s.token.as_deref(), Some("hf_env"));
        let s = settings(&[("HF_HOME", home.path().to_str().unwrap()), ("HF_TOKEN", "")]);
        assert_eq!(s.token.as_deref(), Some("hf_from_file"));

        let debug = format!("{s:?}");
        assert!(!debug.contains("hf_from_file") && debug.contains("redacted"));
    }
}
