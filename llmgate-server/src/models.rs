//! The model llmgate runs, switchable at run time: set-up and download happen in the
//! background, with their progress kept for the console, while the gateway keeps
//! serving.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use llmgate_core::config::GatewayConfig;
use llmgate_core::hub::DownloadProgress;
use llmgate_core::proxy::{Proxy, ProxyConfig, ProxyError};
use llmgate_core::runner::{Backend, ModelRunner, RunnerStatus, RunnerTokenCounter};
use llmgate_core::usage::{TokenCounter, TokenUsage};
use llmgate_core::BoxError;
use serde::Serialize;
use serde_json::Value;

use crate::commands::model::{start_model, Reporter, Stage, StartError, TerminalReporter};

/// Set-up lines kept for the console.
const SETUP_LINES: usize = 200;

/// Where the model is in its life; the console and `/metrics` read it by its snake_case
/// name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// No model has been asked for.
    None,
    /// The runtime (virtual environment, packages) is being set up.
    SettingUp,
    /// The model is being downloaded or fetched from the cache.
    Downloading,
    /// The model server is loading the model.
    Starting,
    /// The model server answers.
    Ready,
    /// The model server exited and is being started again.
    Restarting,
    /// Set-up or the model server failed; the message says why.
    Failed,
    /// The model server is being stopped.
    Stopping,
    /// The model server was stopped.
    Stopped,
    /// Requests go to the configured `--upstream`; llmgate runs no model.
    External,
}

impl ModelState {
    /// The name the console and `/metrics` use, e.g. `setting_up`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::SettingUp => "setting_up",
            Self::Downloading => "downloading",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::External => "external",
        }
    }

    /// The state of a model server that is running (or not, for `None`).
    pub fn of_runner(status: Option<&RunnerStatus>) -> Self {
        match status {
            None => Self::None,
            Some(RunnerStatus::Stopped) => Self::Stopped,
            Some(RunnerStatus::Starting) => Self::Starting,
            Some(RunnerStatus::Ready) => Self::Ready,
            Some(RunnerStatus::Restarting { .. }) => Self::Restarting,
            Some(RunnerStatus::Failed { .. }) => Self::Failed,
        }
    }
}

impl From<Stage> for ModelState {
    fn from(stage: Stage) -> Self {
        match stage {
            Stage::SettingUp => Self::SettingUp,
            Stage::GettingModel => Self::Downloading,
            Stage::Starting => Self::Starting,
            // A step stops a model only on the way to another one (or out of the
            // gateway); the console counts `setting_up` as busy, and `stopping` not.
            Stage::Stopping => Self::SettingUp,
        }
    }
}

/// Where a manager says what a set-up is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// In the console and the log only.
    ConsoleOnly,
    /// Also on the terminal, with a progress bar for downloads (`llmgate up` and `serve`).
    AlsoOnTerminal,
}

/// What the console shows about the model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelView {
    /// The model asked for (path or repo id; `default` for the default model).
    pub model: Option<String>,
    /// Its backend.
    pub backend: Backend,
    /// The model server's kind, once one runs.
    pub runner: Option<&'static str>,
    /// Where the model is in its life.
    pub state: ModelState,
    /// What is happening, in words.
    pub message: String,
    /// Progress of a download, 0–100.
    pub percent: Option<f64>,
    /// Recent set-up lines and model server output.
    pub log: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    runner: Option<Arc<dyn ModelRunner>>,
    model: Option<String>,
    backend: Backend,
    state: ModelState,
    message: String,
    percent: Option<f64>,
    setup_log: VecDeque<String>,
    busy: bool,
}

/// Runs, replaces and stops the model behind the gateway.
#[derive(Debug)]
pub struct ModelManager {
    config: GatewayConfig,
    proxy: Proxy,
    /// Also say everything on the terminal ([`Progress::AlsoOnTerminal`]).
    echo: Option<TerminalReporter>,
    inner: Mutex<Inner>,
    /// Where set-ups and model servers run: the runtime that made the manager, not the
    /// event loop of whichever request asked for a model (those serve requests).
    runtime: tokio::runtime::Handle,
}

/// Why a model is not running.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A set-up is already running.
    #[error("a model is being set up; wait for it to finish or stop it first")]
    Busy,
    /// Getting or starting the model failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The model server reported an address that is not a URI.
    #[error("bad model server address {address}")]
    Address {
        /// What it reported.
        address: String,
        /// Why it is not a URI.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The proxy could not switch to the model server.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

impl ModelManager {
    /// A manager switching `proxy`'s upstream, saying what it does as `progress` asks.
    /// Call it on the runtime that is to run the model servers.
    pub fn new(config: GatewayConfig, proxy: Proxy, progress: Progress) -> Arc<Self> {
        let external = proxy.has_upstream();
        Arc::new(Self {
            inner: Mutex::new(Inner {
                runner: None,
                model: config.upstream.clone().filter(|_| external),
                backend: config.backend,
                state: if external {
                    ModelState::External
                } else {
                    ModelState::None
                },
                message: if external {
                    "forwarding to the configured upstream".to_owned()
                } else {
                    "no model is running".to_owned()
                },
                percent: None,
                setup_log: VecDeque::new(),
                busy: false,
            }),
            config,
            proxy,
            echo: (progress == Progress::AlsoOnTerminal).then(TerminalReporter::default),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The running model server, if any.
    pub fn runner(&self) -> Option<Arc<dyn ModelRunner>> {
        self.inner.lock().unwrap().runner.clone()
    }

    /// The state for the console.
    pub fn view(&self) -> ModelView {
        let inner = self.inner.lock().unwrap();
        let mut log: Vec<String> = inner.setup_log.iter().cloned().collect();
        let mut state = inner.state;
        let mut message = inner.message.clone();
        if let Some(runner) = &inner.runner {
            log.extend(runner.log_tail(100));
            if !inner.busy {
                let status = runner.status();
                state = ModelState::of_runner(Some(&status));
                message = match status {
                    RunnerStatus::Ready => {
                        format!("serving {}", inner.model.as_deref().unwrap_or("the model"))
                    }
                    RunnerStatus::Starting => "loading the model".into(),
                    RunnerStatus::Restarting { attempt, reason } => {
                        format!("restart {attempt}: {reason}")
                    }
                    RunnerStatus::Failed { reason } => reason,
                    RunnerStatus::Stopped => "stopped".into(),
                };
            }
        }
        ModelView {
            model: inner.model.clone(),
            backend: inner.backend,
            runner: inner.runner.as_ref().map(|r| r.kind()),
            state,
            message,
            percent: inner.percent,
            log,
        }
    }

    /// Starts setting up and running `model` on `backend` in the background; the
    /// previous model (if any) is stopped first.
    pub fn run(
        self: &Arc<Self>,
        model: Option<String>,
        backend: Option<Backend>,
    ) -> Result<ModelView, ModelError> {
        let mut config = self.config.clone();
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.busy {
                return Err(ModelError::Busy);
            }
            inner.busy = true;
            config.model = model.or(config.model);
            config.backend = backend.unwrap_or(config.backend);
            inner.model = config.model.clone();
            inner.backend = config.backend;
            inner.state = ModelState::SettingUp;
            inner.message = "preparing".into();
            inner.percent = None;
            inner.setup_log.clear();
        }
        let manager = self.clone();
        self.runtime.spawn(async move {
            let _ = manager.run_now(config).await;
        });
        Ok(self.view())
    }

    /// Runs a model and waits until it answers (for `llmgate up` and `serve --model`).
    pub async fn run_and_wait(self: &Arc<Self>) -> Result<(), ModelError> {
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.busy {
                return Err(ModelError::Busy);
            }
            inner.busy = true;
            inner.model = self.config.model.clone();
        }
        self.run_now(self.config.clone()).await
    }

    async fn run_now(self: &Arc<Self>, config: GatewayConfig) -> Result<(), ModelError> {
        let previous = self.inner.lock().unwrap().runner.take();
        if let Some(previous) = previous {
            self.proxy.set_upstream(None).ok();
            self.step(Stage::Stopping, "Stopping the previous model");
            previous.stop().await;
        }
        let result = start_model(&config, self.as_ref()).await;
        let mut inner = self.inner.lock().unwrap();
        inner.busy = false;
        inner.percent = None;
        match result {
            Ok(runner) => {
                let address = runner.base_url().unwrap_or_default();
                let mut proxy_config = match address.parse() {
                    Ok(uri) => ProxyConfig::new(uri),
                    Err(source) => {
                        let err = ModelError::Address { address, source };
                        inner.state = ModelState::Failed;
                        inner.message = crate::error_chain(&err);
                        return Err(err);
                    }
                };
                proxy_config.timeout = std::time::Duration::from_secs(config.upstream_timeout_secs);
                self.proxy.set_upstream(Some(proxy_config))?;
                inner.runner = Some(runner);
                inner.state = ModelState::Ready;
                inner.message = "ready".into();
                Ok(())
            }
            Err(err) => {
                let message = crate::error_chain(&err);
                tracing::error!(error = %message, "the model could not be started");
                inner.state = ModelState::Failed;
                inner.message = message;
                Err(err.into())
            }
        }
    }

    /// Stops the model; requests then get 503 until another one runs.
    pub async fn stop(&self) -> ModelView {
        let runner = {
            let mut inner = self.inner.lock().unwrap();
            inner.state = ModelState::Stopping;
            inner.runner.take()
        };
        self.proxy.set_upstream(None).ok();
        if let Some(runner) = runner {
            runner.stop().await;
        }
        {
            let mut inner = self.inner.lock().unwrap();
            inner.state = ModelState::Stopped;
            inner.message = "no model is running".into();
        }
        self.view()
    }

    fn push_line(inner: &mut Inner, line: String) {
        if inner.setup_log.len() == SETUP_LINES {
            inner.setup_log.pop_front();
        }
        inner.setup_log.push_back(line);
    }
}

impl Reporter for ModelManager {
    fn step(&self, stage: Stage, message: &str) {
        if let Some(terminal) = &self.echo {
            // Said once on the terminal; the log has it only when asked for more.
            terminal.step(stage, message);
            tracing::debug!("{message}");
        } else {
            tracing::info!("{message}");
        }
        let mut inner = self.inner.lock().unwrap();
        inner.state = stage.into();
        inner.message = message.to_owned();
        Self::push_line(&mut inner, format!("==> {message}"));
    }

    fn detail(&self, line: &str) {
        if let Some(terminal) = &self.echo {
            terminal.detail(line);
        }
        let mut inner = self.inner.lock().unwrap();
        Self::push_line(&mut inner, line.to_owned());
    }

    fn download(&self, progress: &DownloadProgress) {
        if let Some(terminal) = &self.echo {
            terminal.download(progress);
        }
        let mut inner = self.inner.lock().unwrap();
        inner.state = ModelState::Downloading;
        inner.message = format!("downloading {}", progress.file);
        inner.percent = progress
            .total
            .filter(|t| *t > 0)
            .map(|total| (progress.downloaded as f64 * 100.0 / total as f64).min(100.0));
    }
}

#[async_trait]
impl TokenCounter for ModelManager {
    async fn count(&self, request: &Value, completion: &str) -> Result<TokenUsage, BoxError> {
        let runner = self.runner().ok_or("no model is running")?;
        RunnerTokenCounter::new(runner)
            .count(request, completion)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_keep_the_names_the_console_reads() {
        let all = [
            (ModelState::None, "none"),
            (ModelState::SettingUp, "setting_up"),
            (ModelState::Downloading, "downloading"),
            (ModelState::Starting, "starting"),
            (ModelState::Ready, "ready"),
            (ModelState::Restarting, "restarting"),
            (ModelState::Failed, "failed"),
            (ModelState::Stopping, "stopping"),
            (ModelState::Stopped, "stopped"),
            (ModelState::External, "external"),
        ];
        for (state, name) in all {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(state.as_str(), name);
        }
    }

    #[tokio::test]
    async fn a_step_shows_the_state_of_its_stage_and_its_message() {
        let manager = ModelManager::new(
            GatewayConfig::default(),
            Proxy::without_upstream(),
            Progress::ConsoleOnly,
        );
        let steps = [
            (
                Stage::SettingUp,
                "Python environment for the cpu backend",
                ModelState::SettingUp,
            ),
            (
                Stage::GettingModel,
                "Model: owner/name from Hugging Face",
                ModelState::Downloading,
            ),
            (
                Stage::Starting,
                "Starting the model server (llama-server, cpu); loading the model",
                ModelState::Starting,
            ),
            (
                Stage::Stopping,
                "Stopping the previous model",
                ModelState::SettingUp,
            ),
        ];
        for (stage, message, state) in steps {
            manager.step(stage, message);
            let view = manager.view();
            assert_eq!(view.state, state, "{message}");
            assert_eq!(view.message, message);
            assert_eq!(view.log.last(), Some(&format!("==> {message}")));
        }
    }
}
