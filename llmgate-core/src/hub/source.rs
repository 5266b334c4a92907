//! [`ModelSource`]: what the user typed to name a model.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::HubError;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file on this machine.
    Local(PathBuf),
    /// A repository on the Hugging Face Hub, and optionally one file in it; with no file,
    /// [`pick_gguf`](super::pick_gguf) chooses.
    Hub {
        /// `OWNER/NAME`.
        repo: String,
        /// A path inside the repository, e.g. `model-Q4_K_M.gguf`.
        file: Option<String>,
    },
}

impl FromStr for ModelSource {
    type Err = HubError;

    /// Reads `path/to/model.gguf`, `OWNER/NAME` or `OWNER/NAME:FILE.gguf`.
    ///
    /// A path wins whenever the text could be one: it exists, starts with `/`, `.` or
    /// `~`, or ends in `.gguf` without the `OWNER/NAME:` form.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let invalid = || HubError::InvalidSource {
            input: input.to_owned(),
        };
        if text.is_empty() {
            return Err(invalid());
        }
        if text.starts_with(['/', '.', '~']) || Path::new(text).exists() {
            return Ok(Self::Local(expand_home(text)));
        }
        if let Some((repo, file)) = text.split_once(':') {
            if is_repo_id(repo) && !file.is_empty() {
                return Ok(Self::Hub {
                    repo: repo.to_owned(),
                    file: Some(file.to_owned()),
                });
            }
        }
        if text.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(Self::Local(PathBuf::from(text)));
        }
        if is_repo_id(text) {
            return Ok(Self::Hub {
                repo: text.to_owned(),
                file: None,
            });
        }
        Err(invalid())
    }
}

impl fmt::Display for ModelSource {
    /// The form [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::Hub { repo, file: None } => f.write_str(repo),
            Self::Hub {
                repo,
                file: Some(file),
            } => write!(f, "{repo}:{file}"),
        }
    }
}

/// Whether `text` is a Hub repository id: `OWNER/NAME` of letters, digits, `-`, `_`, `.`.
pub(crate) fn is_repo_id(text: &str) -> bool {
    let valid_part = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("..")
            && !part.contains("--")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(text.split_once('/'), Some((owner, name)) if valid_part(owner) && valid_part(name))
}

/// `~/x` is the home directory's `x`, as a shell would read it (the CLI may get the text
/// from a config file, where no shell expanded it).
fn expand_home(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, file: Option<&str>) -> ModelSource {
        ModelSource::Hub {
            repo: repo.into(),
            file: file.map(Into::into),
        }
    }

    #[test]
    fn repository_with_and_without_file() {
        assert_eq!(
            "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
                .parse::<ModelSource>()
                .unwrap(),
            hub("Qwen/Qwen2.5-0.5B-Instruct-GGUF", None)
        );
        assert_eq!(
            "unsloth/gemma-3-270m-it-GGUF:gemma-3-270m-it-Q4_K_M.gguf"
                .parse::<ModelSource>()
                .unwrap(),
            hub(
                "unsloth/gemma-3-270m-it-GGUF",
                Some("gemma-3-270m-it-Q4_K_M.gguf")
            )
        );
        // A file in a folder of the repository.
        assert_eq!(
            "o/m:Q8_0/m-Q8_0-00001-of-00002.gguf"
                .parse::<ModelSource>()
                .unwrap(),
            hub("o/m", Some("Q8_0/m-Q8_0-00001-of-00002.gguf"))
        );
    }

    #[test]
    fn paths() {
        for text in [
            "/models/x.gguf",
            "./x.gguf",
            "../models/qwen",
            "x.gguf",
            "MODEL.GGUF",
            "models/x.gguf",
        ] {
            assert!(
                matches!(text.parse::<ModelSource>(), Ok(ModelSource::Local(_))),
                "{text}"
            );
        }
        assert_eq!(
            "models/x.gguf".parse::<ModelSource>().unwrap(),
            ModelSource::Local("models/x.gguf".into())
        );
        let ModelSource::Local(home) = "~/models/x.gguf".parse::<ModelSource>().unwrap() else {
            panic!("not a path");
        };
        assert!(home.ends_with("models/x.gguf"));

        // An existing directory that looks like OWNER/NAME is a path.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("owner")).unwrap();
        std::fs::create_dir(dir.path().join("owner/name")).unwrap();
        let existing = dir.path().join("owner/name");
        let text = existing.to_str().unwrap();
        assert_eq!(
            text.parse::<ModelSource>().unwrap(),
            ModelSource::Local(existing.clone())
        );
    }

    #[test]
    fn nonsense_is_refused_with_a_hint() {
        for text in [
            "",
            "  ",
            "gpt2",
            "a/b/c",
            "owner/",
            "/",
            "o/m:",
            "bad name/x",
        ] {
            let result = text.parse::<ModelSource>();
            if text == "/" {
                // "/" is a path (the root): the runner will say it is not a file.
                assert!(matches!(result, Ok(ModelSource::Local(_))));
                continue;
            }
            let err = result.expect_err(text);
            assert!(err.to_string().contains("OWNER/NAME"), "{err}");
        }
    }

    #[test]
    fn display_reads_back() {
        for text in ["o/m", "o/m:f.gguf", "/x/y.gguf"] {
            let source: ModelSource = text.parse().unwrap();
            assert_eq!(source.to_string(), text);
            assert_eq!(source.to_string().parse::<ModelSource>().unwrap(), source);
        }
    }

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("bartowski/Llama-3.2-1B-Instruct-GGUF"));
        assert!(is_repo_id("a/b_c.d"));
        assert!(!is_repo_id("a"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("a/../b"));
        assert!(!is_repo_id("a/b c"));
        assert!(!is_repo_id("-a/b"));
    }
}
