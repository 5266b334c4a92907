//! [`HubError`]: everything that can stop a model from arriving.

use std::path::PathBuf;

use crate::BoxError;

/// Why a model could not be found, listed or downloaded.
///
/// The messages are shown to the person who ran `llmgate pull REPO[:FILE]`: each says
/// what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The text names neither a GGUF file nor a Hub repository.
    #[error(
        "'{input}' is neither a .gguf file nor a Hugging Face model: give a path to a .gguf \
         file, or OWNER/NAME[:FILE.gguf] (for example Qwen/Qwen2.5-0.5B-Instruct-GGUF)"
    )]
    InvalidSource {
        /// What was given.
        input: String,
    },
    /// The endpoint setting is not an HTTP(S) URL.
    #[error("HF_ENDPOINT '{endpoint}' is not an http:// or https:// URL")]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
    },
    /// The Hub knows no such repository (or hides a private one from us).
    #[error(
        "model '{repo}' was not found on {endpoint}: check the OWNER/NAME spelling; if the \
         model is private, set HF_TOKEN to an access token that can read it"
    )]
    RepoNotFound {
        /// The repository asked for.
        repo: String,
        /// The Hub that was asked.
        endpoint: String,
    },
    /// The repository exists but has no file of that name.
    #[error("{}", file_not_found(repo, file, available))]
    FileNotFound {
        /// The repository.
        repo: String,
        /// The file asked for.
        file: String,
        /// The GGUF files the repository does have.
        available: Vec<String>,
    },
    /// The repository has no GGUF file to pick.
    #[error(
        "'{repo}' has no .gguf file, and llmgate runs GGUF models: look for a GGUF \
         conversion of this model on the Hub (its name usually ends in -GGUF)"
    )]
    NoGguf {
        /// The repository.
        repo: String,
    },
    /// Offline mode is on and the model is not in the cache.
    #[error(
        "{} is not in the model cache ({}) and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE \
         (or set it to 0) to download it, or point HF_HOME at a cache that has it",
        describe(repo, file.as_deref()), cache_dir.display()
    )]
    NotCachedOffline {
        /// The repository.
        repo: String,
        /// The file, when one was named.
        file: Option<String>,
        /// The cache that was searched.
        cache_dir: PathBuf,
    },
    /// The repository is gated or private and we have no token, or one without access.
    #[error("{}", unauthorized(repo, *token_sent))]
    Unauthorized {
        /// The repository.
        repo: String,
        /// Whether an access token was sent (and refused).
        token_sent: bool,
    },
    /// The Hub could not be reached at all.
    #[error(
        "cannot reach {endpoint} ({reason}): check the network connection, or HF_ENDPOINT if \
         you use a mirror"
    )]
    Network {
        /// The Hub that was asked.
        endpoint: String,
        /// The deepest cause, e.g. "Connection refused (os error 111)".
        reason: String,
        /// What the connection attempt reported.
        #[source]
        source: BoxError,
    },
    /// A download started but the connection broke; what arrived is kept.
    #[error(
        "the download of '{file}' from {repo} was interrupted ({reason}); run the same \
         command again to resume where it stopped"
    )]
    Interrupted {
        /// The repository.
        repo: String,
        /// The file being downloaded.
        file: String,
        /// The deepest cause of the break.
        reason: String,
        /// What broke.
        #[source]
        source: BoxError,
    },
    /// Reading or writing the cache failed.
    #[error("cannot use the model cache: {0}")]
    Io(#[from] std::io::Error),
    /// The Hub (or whatever answers at HF_ENDPOINT) or the HTTP client failed in a way
    /// not listed above; the message says what happened, the source how.
    #[error("{message}")]
    Failed {
        /// What happened, with what to do about it.
        message: String,
        /// The error that caused it.
        #[source]
        source: BoxError,
    },
    /// Anything else; the message says what happened.
    #[error("{0}")]
    Other(String),
}

fn describe(repo: &str, file: Option<&str>) -> String {
    match file {
        Some(file) => format!("{repo}:{file}"),
        None => format!("no GGUF file of {repo}"),
    }
}

fn file_not_found(repo: &str, file: &str, available: &[String]) -> String {
    if available.is_empty() {
        format!("'{file}' is not in {repo}, which has no .gguf file at all")
    } else {
        format!(
            "'{file}' is not in {repo}; its GGUF files are: {} (pull one with {repo}:FILE, \
             or give just {repo} to let llmgate pick)",
            available.join(", ")
        )
    }
}

fn unauthorized(repo: &str, token_sent: bool) -> String {
    if token_sent {
        format!(
            "the access token (HF_TOKEN) cannot read '{repo}': if the model is gated, accept \
             its license on the model page with the account the token belongs to; otherwise \
             check that the token is valid and has read access"
        )
    } else {
        format!(
            "'{repo}' is gated or private and needs a Hugging Face access token: create one \
             at https://huggingface.co/settings/tokens, set HF_TOKEN=hf_..., and for a gated \
             model accept its license on the model page"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_tell_the_user_what_to_do() {
        let missing = HubError::FileNotFound {
            repo: "o/m".into(),
            file: "x.gguf".into(),
            available: vec!["a-Q4_K_M.gguf".into(), "a-Q8_0.gguf".into()],
        };
        let text = missing.to_string();
        assert!(text.contains("x.gguf") && text.contains("a-Q4_K_M.gguf, a-Q8_0.gguf"));

        let offline = HubError::NotCachedOffline {
            repo: "o/m".into(),
            file: Some("x.gguf".into()),
            cache_dir: "/c".into(),
        };
        assert!(offline.to_string().contains("HF_HUB_OFFLINE"));
        assert!(offline.to_string().contains("o/m:x.gguf"));

        let gated = HubError::Unauthorized {
            repo: "o/m".into(),
            token_sent: false,
        };
        assert!(gated.to_string().contains("set HF_TOKEN"));
        let refused = HubError::Unauthorized {
            repo: "o/m".into(),
            token_sent: true,
        };
        assert!(refused.to_string().contains("accept its license"));
    }
}
