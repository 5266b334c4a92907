//! The models behind the gateway: a list of local models llmgate runs and upstreams it
//! forwards to, each picked by the `model` a request names. Local models load on the
//! first request for them, stop after `ttl_secs` idle, and make room for each other
//! within the memory that is free; requests beyond a model's `max_concurrency` wait here,
//! not in the model server.

mod fair;
mod memory;
mod route;
mod slot;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::StatusCode;
use llmgate_core::config::{GatewayConfig, ModelConfig, QueuePolicy};
use llmgate_core::error::ApiError;
use llmgate_core::proxy::ProxyConfig;
use llmgate_core::runner::{Backend, ModelRunner, RunnerTokenCounter};
use llmgate_core::storage::{ModelStore, StorageError, StoredModel};
use llmgate_core::usage::{TokenCounter, TokenUsage};
use llmgate_core::BoxError;
use serde::Serialize;
use serde_json::Value;

pub use fair::Requester;
pub use route::{ModelRouter, RouteFuture, RoutedBody};
pub use slot::{Lease, Slot};

use crate::commands::model::{launch_model, prepare_model, ModelSpecExtras, Reporter, Stage};
use memory::mib;

/// Where a model is in its life; the console and `/metrics` read it by its snake_case
/// name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Not running (a local model that has not been asked for, or was unloaded).
    Stopped,
    /// Its runtime (virtual environment, packages) is being set up.
    SettingUp,
    /// Its file is being downloaded or fetched from the cache.
    Downloading,
    /// Its server is loading it.
    Loading,
    /// It answers (an upstream model always is).
    Ready,
    /// Its server is being stopped.
    Unloading,
    /// Set-up or its server failed; the message says why.
    Failed,
}

impl ModelState {
    /// Every state, in the order of a model's life.
    pub const ALL: [ModelState; 7] = [
        Self::Stopped,
        Self::SettingUp,
        Self::Downloading,
        Self::Loading,
        Self::Ready,
        Self::Unloading,
        Self::Failed,
    ];

    /// The name the console and `/metrics` use, e.g. `setting_up`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::SettingUp => "setting_up",
            Self::Downloading => "downloading",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Unloading => "unloading",
            Self::Failed => "failed",
        }
    }

    /// A load is under way.
    pub fn is_loading(self) -> bool {
        matches!(self, Self::SettingUp | Self::Downloading | Self::Loading)
    }
}

/// Where a model in the list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The config file's `[[models]]`.
    Config,
    /// `--model` / `--upstream` (or `model` / `upstream` in the file).
    Flags,
    /// Added or changed through the admin API.
    Admin,
}

/// Where the models say what a set-up is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// In the console and the log only.
    ConsoleOnly,
    /// The models that start with the gateway also on the terminal, with a progress bar
    /// for downloads (`llmgate up` and `serve`).
    AlsoOnTerminal,
}

/// What the console shows about one model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelView {
    /// What clients send as `model`.
    pub name: String,
    /// Other names for it.
    pub aliases: Vec<String>,
    /// `local` (llmgate runs it) or `upstream`.
    pub kind: &'static str,
    /// Its GGUF path or Hugging Face repo (local models).
    pub source: Option<String>,
    /// Its URL (upstream models).
    pub upstream: Option<String>,
    /// The model server's kind, while one runs.
    pub runner: Option<&'static str>,
    /// Its backend, when set for this model.
    pub backend: Option<Backend>,
    /// Where it is in its life.
    pub state: ModelState,
    /// What is happening, in words.
    pub message: String,
    /// Progress of a download, 0–100.
    pub percent: Option<f64>,
    /// Recent set-up lines and model server output.
    pub log: Vec<String>,
    /// What it is estimated to take in memory, once known.
    pub memory_bytes: Option<u64>,
    /// Its server's process id, while one runs.
    pub pid: Option<u32>,
    /// When a request last started or ended.
    pub last_used: Option<chrono::DateTime<chrono::Utc>>,
    /// Requests being served.
    pub in_flight: u32,
    /// Requests waiting for it.
    pub queued: u32,
    /// Seconds idle before it stops (0: never).
    pub ttl_secs: u64,
    /// Started with the gateway and never stopped for another.
    pub preload: bool,
    /// Requests it is given at once.
    pub max_concurrency: Option<u32>,
    /// Requests that may wait beyond that.
    pub max_queue: u32,
    /// The order waiting requests are served in.
    pub queue: QueuePolicy,
    /// Where it comes from.
    pub origin: Origin,
}

/// `GET /admin/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsView {
    /// The model a request that names none goes to.
    pub default_model: Option<String>,
    /// How many local models may run at once.
    pub max_loaded_models: Option<u32>,
    /// Memory now, as the loader sees it.
    pub memory: MemoryView,
    /// Every model, in list order.
    pub models: Vec<ModelView>,
}

/// The memory the loader decides with.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryView {
    /// RAM free now.
    pub ram_available_bytes: Option<u64>,
    /// Kept free for everything else.
    pub reserve_bytes: u64,
    /// The cap on the local models together, if set.
    pub limit_bytes: Option<u64>,
    /// What the running local models are estimated to take.
    pub models_bytes: u64,
}

/// Why a request gets no model.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No model by that name or alias.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    Unknown(String),
    /// The list is empty.
    #[error(
        "No model is configured: add one with POST /admin/models or [[models]] in the config file."
    )]
    NoModels,
    /// Set-up (a download, a runtime build) takes minutes: the client should come back.
    #[error("Model `{name}` is loading: {message}. Try again in a little while.")]
    SettingUp {
        /// The model.
        name: String,
        /// What it is doing.
        message: String,
    },
    /// It did not answer within `model_ready_timeout_secs`.
    #[error("Model `{name}` did not become ready within {secs} s; it is still loading.")]
    NotReady {
        /// The model.
        name: String,
        /// The wait.
        secs: u64,
    },
    /// Its load failed.
    #[error("Model `{name}` could not be started: {message}")]
    LoadFailed {
        /// The model.
        name: String,
        /// Why.
        message: String,
    },
    /// Not enough memory even with every idle model stopped.
    #[error("{0}")]
    NoRoom(String),
    /// Too many requests wait for it already.
    #[error("Model `{name}` has {queued} requests waiting; try again shortly.")]
    QueueFull {
        /// The model.
        name: String,
        /// How many wait.
        queued: u32,
    },
    /// Waited longer than the upstream timeout for a free place.
    #[error("Model `{name}` stayed busy for {secs} s; try again shortly.")]
    Busy {
        /// The model.
        name: String,
        /// The wait.
        secs: u64,
    },
}

impl RouteError {
    /// The answer a client gets, and the seconds it should wait before trying again.
    pub fn to_api(&self) -> (ApiError, Option<u64>) {
        let unavailable = |code: &'static str| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some(code),
                self.to_string(),
            )
        };
        match self {
            Self::Unknown(model) => (ApiError::model_not_found(model), None),
            Self::NoModels => (unavailable("no_model"), Some(30)),
            Self::SettingUp { .. } => (unavailable("model_loading"), Some(10)),
            Self::NotReady { .. } => (unavailable("model_not_ready"), Some(10)),
            Self::LoadFailed { .. } => (unavailable("model_load_failed"), Some(30)),
            Self::NoRoom(_) => (unavailable("insufficient_memory"), Some(30)),
            Self::QueueFull { .. } => (unavailable("model_overloaded"), Some(1)),
            Self::Busy { .. } => (unavailable("model_overloaded"), Some(1)),
        }
    }
}

/// Why an admin change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No model by that name.
    #[error("The model `{0}` does not exist.")]
    Unknown(String),
    /// The settings cannot work.
    #[error("{0}")]
    Invalid(String),
    /// A name or alias is taken.
    #[error("The name `{0}` is already used by another model.")]
    Taken(String),
    /// Starting it failed at once.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The change could not be kept in the database.
    #[error("the change could not be stored")]
    Store(#[source] llmgate_core::storage::StorageError),
}

/// The models in list order, with their names and aliases.
#[derive(Debug, Default)]
struct Catalog {
    slots: Vec<Arc<Slot>>,
    /// Looked up for every model call: a fast hash (the names are the admin's).
    by_name: HashMap<String, usize, foldhash::fast::RandomState>,
    /// The slot a request without a model goes to.
    default: Option<usize>,
    /// The one model `--upstream` or `--model` gave, alone in the list: it takes any name.
    catch_all: bool,
    /// That model has no aliases either: every name goes to it as it is, no lookup needed.
    any_name_as_is: bool,
}

impl Catalog {
    fn new(slots: Vec<Arc<Slot>>, default_model: Option<&str>) -> Self {
        let mut by_name = HashMap::with_hasher(foldhash::fast::RandomState::default());
        for (i, slot) in slots.iter().enumerate() {
            for name in slot.config.names() {
                by_name.entry(name.to_owned()).or_insert(i);
            }
        }
        let default = match default_model {
            Some(name) => by_name.get(name).copied(),
            None => None,
        }
        .or((!slots.is_empty()).then_some(0));
        let catch_all = slots.len() == 1 && slots[0].origin == Origin::Flags;
        let any_name_as_is = catch_all && slots[0].config.aliases.is_empty();
        Self {
            slots,
            by_name,
            default,
            catch_all,
            any_name_as_is,
        }
    }

    fn find(&self, name: &str) -> Option<&Arc<Slot>> {
        self.by_name.get(name).map(|&i| &self.slots[i])
    }
}

/// Every model behind the gateway, and the rules for loading and stopping them.
#[derive(Debug)]
pub struct Registry {
    base: GatewayConfig,
    catalog: RwLock<Arc<Catalog>>,
    /// One load decides at a time whether it fits (and what to stop for it).
    admission: tokio::sync::Mutex<()>,
    /// Where loads run: the runtime that made the registry, not a serving loop.
    runtime: tokio::runtime::Handle,
    hooks: RwLock<Option<Arc<dyn ModelEvents>>>,
    /// Where admin changes are kept across restarts (and shared by replicas).
    store: RwLock<Option<Arc<dyn ModelStore>>>,
    /// When each stored change applied here was made (ms since the epoch): what the
    /// database holds is the last write (whichever replica made it, whatever its clock),
    /// applied once when it differs from this.
    applied: std::sync::Mutex<HashMap<String, i64>>,
    /// Models out of the list whose servers may still be draining (stopped at shutdown).
    retired: std::sync::Mutex<Vec<Arc<Slot>>>,
}

/// What the registry tells the rest of the gateway (metrics, persistence).
pub trait ModelEvents: Send + Sync + std::fmt::Debug {
    /// The list changed; these are the canonical names now.
    fn names_changed(&self, _names: &[String]) {}
    /// A model loaded in `seconds`.
    fn loaded(&self, _model: &str, _seconds: f64) {}
    /// A model was stopped to make room for another.
    fn evicted(&self, _model: &str) {}
}

impl Registry {
    /// The registry of `config.model_list()`, with nothing loaded yet. Call it on the
    /// runtime that is to run the model servers; then [`Registry::start`].
    pub fn new(config: GatewayConfig, progress: Progress) -> Arc<Self> {
        let echo = progress == Progress::AlsoOnTerminal;
        let slots = config
            .model_list()
            .into_iter()
            .map(|model| {
                let origin = if config.models.iter().any(|m| m.name == model.name) {
                    Origin::Config
                } else {
                    Origin::Flags
                };
                let preload = model.preload;
                Arc::new(Slot::new(model, origin, echo && preload))
            })
            .collect::<Vec<_>>();
        for slot in &slots {
            connect_remote(slot, &config);
        }
        let catalog = Catalog::new(slots, config.default_model.as_deref());
        Arc::new(Self {
            base: config,
            catalog: RwLock::new(Arc::new(catalog)),
            admission: tokio::sync::Mutex::new(()),
            runtime: tokio::runtime::Handle::current(),
            hooks: RwLock::new(None),
            store: RwLock::new(None),
            applied: std::sync::Mutex::new(HashMap::new()),
            retired: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Who hears of loads, evictions and list changes.
    pub fn set_events(&self, events: Arc<dyn ModelEvents>) {
        events.names_changed(&self.names());
        *self.hooks.write().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    fn events(&self) -> Option<Arc<dyn ModelEvents>> {
        self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the `preload` models in the background and the idle-unload timer.
    pub fn start(self: &Arc<Self>) {
        for slot in self.slots() {
            if slot.config.preload && slot.is_local() {
                self.begin_load(&slot);
            }
        }
        let weak = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 1u64.. {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.unload_idle().await;
                // Other replicas' changes, every 5 s.
                if n % 10 == 0 {
                    registry.sync().await;
                }
            }
        });
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every model, in list order.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.catalog().slots.clone()
    }

    /// The canonical names, in list order.
    pub fn names(&self) -> Vec<String> {
        self.catalog()
            .slots
            .iter()
            .map(|s| s.config.name.clone())
            .collect()
    }

    /// Whether `/v1/models` goes to the one upstream instead of being answered from the
    /// list (`--upstream` alone: the upstream knows its models).
    pub fn lists_upstream_models(&self) -> bool {
        let catalog = self.catalog();
        catalog.catch_all && !catalog.slots[0].is_local()
    }

    /// The model for a request naming `requested` (or none).
    pub fn route(&self, requested: Option<&str>) -> Result<Arc<Slot>, RouteError> {
        self.resolve(requested).map(|route| route.slot)
    }

    /// The model for a request naming `requested` (or none), and the name its usage goes
    /// under when that is not the one the client sent: the canonical name for an alias
    /// or for no name; none for the one model of the flags taking any name (the client's
    /// name stays).
    pub fn resolve(&self, requested: Option<&str>) -> Result<Route, RouteError> {
        let catalog = self.catalog();
        let found = match requested {
            Some(_) if catalog.any_name_as_is => Some((&catalog.slots[0], false)),
            Some(name) => match catalog.find(name) {
                Some(slot) => Some((slot, name != slot.name())),
                None if catalog.catch_all => Some((&catalog.slots[0], false)),
                None => None,
            },
            None => catalog.default.map(|i| {
                (
                    &catalog.slots[i],
                    !catalog.catch_all || catalog.slots[i].is_local(),
                )
            }),
        };
        match found {
            Some((slot, renamed)) => Ok(Route {
                served: renamed.then(|| slot.name.clone()),
                slot: slot.clone(),
            }),
            None if catalog.slots.is_empty() => Err(RouteError::NoModels),
            None => Err(RouteError::Unknown(
                requested.unwrap_or_default().to_owned(),
            )),
        }
    }

    /// The model `name` names, by name or alias.
    pub fn find(&self, name: &str) -> Option<Arc<Slot>> {
        self.catalog().find(name).cloned()
    }

    /// A place at `slot` for one request of `requester`: waits for it to load (starting
    /// the load if needed) and for a free place, in turn with other keys (the model's
    /// `queue`), within the limits.
    pub async fn lease(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        requester: &Requester,
    ) -> Result<Lease, RouteError> {
        let mut slot = slot.clone();
        loop {
            match self.lease_at(&slot, requester).await {
                // New settings replaced the model while the request waited: wait for the
                // model under its new settings; only a removed model is unknown.
                Err(RouteError::Unknown(name)) if slot.retired.load(Ordering::SeqCst) => {
                    match self.find(&name) {
                        Some(next) if !Arc::ptr_eq(&next, &slot) => slot = next,
                        _ => return Err(RouteError::Unknown(name)),
                    }
                }
                other => return other,
            }
        }
    }

    async fn lease_at(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        requester: &Requester,
    ) -> Result<Lease, RouteError> {
        if let Some(lease) = slot.try_lease() {
            return Ok(lease);
        }
        let waiting = slot::Waiting::join(slot).ok_or_else(|| RouteError::QueueFull {
            name: slot.name().to_owned(),
            queued: slot.queued.load(Ordering::Relaxed),
        })?;
        loop {
            self.ensure_ready(slot).await?;
            let permit = match &slot.places {
                Some(places) => {
                    let wait = Duration::from_secs(self.base.upstream_timeout_secs);
                    match tokio::time::timeout(wait, places.acquire(requester)).await {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            return Err(RouteError::Busy {
                                name: slot.name().to_owned(),
                                secs: wait.as_secs(),
                            })
                        }
                    }
                }
                None => None,
            };
            if let Some(lease) = slot.enter(permit) {
                drop(waiting);
                return Ok(lease);
            }
            // Unloaded between the two: wait for it again.
        }
    }

    /// Waits until `slot` answers, starting its load if nobody has.
    async fn ensure_ready(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<(), RouteError> {
        let timeout = Duration::from_secs(self.base.model_ready_timeout_secs);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = slot.changes.subscribe();
        let mut my_load = None;
        loop {
            if slot.retired.load(Ordering::SeqCst) {
                return Err(RouteError::Unknown(slot.name().to_owned()));
            }
            if slot.ready.load(Ordering::SeqCst) {
                return Ok(());
            }
            if !slot.is_local() {
                // An upstream model is ready from the start, unless its URL cannot work.
                return Err(RouteError::LoadFailed {
                    name: slot.name().to_owned(),
                    message: slot.life().message.clone(),
                });
            }
            {
                let life = slot.life();
                match life.state {
                    ModelState::Stopped => {
                        drop(life);
                        my_load = Some(self.begin_load(slot));
                    }
                    ModelState::Failed => {
                        if my_load == Some(life.load_generation) {
                            return Err(if life.no_room {
                                RouteError::NoRoom(life.message.clone())
                            } else {
                                RouteError::LoadFailed {
                                    name: slot.name().to_owned(),
                                    message: life.message.clone(),
                                }
                            });
                        }
                        drop(life);
                        my_load = Some(self.begin_load(slot));
                    }
                    ModelState::SettingUp | ModelState::Downloading => {
                        my_load.get_or_insert(life.load_generation);
                        let long = life
                            .load_started
                            .is_some_and(|t| t.elapsed() > SETUP_IS_LONG);
                        if long {
                            let percent = life
                                .percent
                                .map(|p| format!(" ({p:.0} %)"))
                                .unwrap_or_default();
                            return Err(RouteError::SettingUp {
                                name: slot.name().to_owned(),
                                message: format!("{}{percent}", life.message.to_lowercase()),
                            });
                        }
                    }
                    ModelState::Loading => {
                        my_load.get_or_insert(life.load_generation);
                    }
                    ModelState::Ready | ModelState::Unloading => {}
                }
            }
            let wait = if slot.life().state.is_loading() {
                // Look again when set-up turns long.
                Duration::from_millis(500)
            } else {
                timeout
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(RouteError::NotReady {
                    name: slot.name().to_owned(),
                    secs: timeout.as_secs(),
                });
            }
            let _ = tokio::time::timeout((deadline - now).min(wait), changes.changed()).await;
        }
    }

    /// Starts loading `slot` unless a load is under way; returns the load's number.
    fn begin_load(self: &Arc<Self>, slot: &Arc<Slot>) -> u64 {
        let generation = {
            let mut life = slot.life();
            // A load under way is shared; an unload under way finishes first (its
            // waiters then start the next load).
            if life.state.is_loading()
                || life.state == ModelState::Ready
                || life.state == ModelState::Unloading
            {
                return life.load_generation;
            }
            life.load_generation += 1;
            life.state = ModelState::SettingUp;
            life.message = "preparing".into();
            life.percent = None;
            life.setup_log.clear();
            life.load_started = Some(Instant::now());
            life.no_room = false;
            life.load_generation
        };
        slot.changed();
        let registry = self.clone();
        let slot = slot.clone();
        self.runtime.spawn(async move {
            registry.load(&slot).await;
        });
        generation
    }

    /// The gateway-wide settings with a model's own over them.
    fn config_for(&self, model: &ModelConfig) -> GatewayConfig {
        let mut config = self.base.clone();
        config.model = model.source.clone();
        config.runner = model.runner.unwrap_or(config.runner);
        config.backend = model.backend.unwrap_or(config.backend);
        config.chat_format = model.chat_format.clone().or(config.chat_format);
        config.n_ctx = model.n_ctx.or(config.n_ctx);
        config
    }

    async fn load(self: &Arc<Self>, slot: &Arc<Slot>) {
        let started = Instant::now();
        let config = self.config_for(&slot.config);
        let extras = ModelSpecExtras {
            gpu_layers: slot.config.gpu_layers,
            args: slot.config.args.clone(),
            alias: Some(slot.config.name.clone()),
        };
        let result = async {
            let prepared = prepare_model(&config, &extras, slot.as_ref())
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let gpu = config.backend.offloads_to_gpu() && slot.config.gpu_layers != Some(0);
            let needed = memory::estimate(
                prepared.model_file.clone(),
                config.n_ctx,
                config.runner,
                gpu,
            )
            .await;
            if let Err(err) = self.admit(slot, needed, gpu).await {
                slot.life().no_room = true;
                return Err(err.to_string());
            }
            let runner = launch_model(prepared.runner, &config, slot.as_ref())
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let address = runner.base_url().unwrap_or_default();
            let uri = address
                .parse()
                .map_err(|e| format!("bad model server address {address}: {e}"))?;
            let mut proxy = ProxyConfig::new(uri);
            proxy.timeout = Duration::from_secs(config.upstream_timeout_secs);
            Ok::<_, String>((runner, proxy))
        }
        .await;
        match result {
            Ok((runner, proxy)) => {
                if let Err(err) = slot.proxy.set_upstream(Some(proxy)) {
                    runner.stop().await;
                    self.fail(slot, crate::error_chain(&err));
                    return;
                }
                {
                    let mut life = slot.life();
                    if slot.retired.load(Ordering::SeqCst) {
                        drop(life);
                        slot.proxy.set_upstream(None).ok();
                        runner.stop().await;
                        slot.set_state(ModelState::Stopped, "removed");
                        return;
                    }
                    life.runner = Some(runner);
                    life.state = ModelState::Ready;
                    life.message = "ready".into();
                    life.percent = None;
                }
                slot.touch();
                slot.ready.store(true, Ordering::SeqCst);
                slot.changed();
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(model = %slot.name(), seconds, "model loaded");
                if let Some(events) = self.events() {
                    events.loaded(slot.name(), seconds);
                }
            }
            Err(message) => self.fail(slot, message),
        }
    }

    fn fail(&self, slot: &Slot, message: String) {
        tracing::error!(model = %slot.name(), error = %message, "the model could not be started");
        {
            let mut life = slot.life();
            life.memory_bytes = None;
        }
        slot.set_state(ModelState::Failed, message);
    }

    /// Makes room for `needed` bytes, stopping the least recently used idle models that
    /// are not preloaded, or says what holds the memory.
    async fn admit(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        needed: u64,
        gpu: bool,
    ) -> Result<(), RouteError> {
        let _one_at_a_time = self.admission.lock().await;
        loop {
            // Only models in the same memory (RAM or GPU) make room for each other.
            let others: Vec<Arc<Slot>> = self
                .slots()
                .into_iter()
                .filter(|s| !Arc::ptr_eq(s, slot) && s.is_local())
                .filter(|s| {
                    let life = s.life();
                    life.memory_bytes.is_some() && life.on_gpu == gpu
                })
                .collect();
            let held: u64 = others.iter().filter_map(|s| s.life().memory_bytes).sum();
            // Models still loading have not taken their memory yet: count it for them.
            let loading: u64 = others
                .iter()
                .filter(|s| s.life().state.is_loading())
                .filter_map(|s| s.life().memory_bytes)
                .sum();
            let reserve = if gpu {
                self.base.gpu_memory_reserve_mb
            } else {
                self.base.memory_reserve_mb
            } << 20;
            let mut free = memory::free_bytes(gpu).map_or(u64::MAX, |f| {
                f.saturating_sub(reserve).saturating_sub(loading)
            });
            if let Some(limit) = self.base.memory_limit_mb {
                free = free.min((limit << 20).saturating_sub(held));
            }
            let count_ok = self
                .base
                .max_loaded_models
                .is_none_or(|max| (others.len() as u64) < u64::from(max));
            if count_ok && needed <= free {
                let mut life = slot.life();
                life.memory_bytes = Some(needed);
                life.on_gpu = gpu;
                return Ok(());
            }
            let victim = others
                .iter()
                .filter(|s| !s.config.preload && s.idle() && s.life().state == ModelState::Ready)
                .min_by_key(|s| s.last_used_ms.load(Ordering::Relaxed))
                .cloned();
            match victim {
                Some(victim) => {
                    if self.unload(&victim, Unload::IfIdle).await {
                        tracing::info!(model = %victim.name(), for_model = %slot.name(), "evicted to make room");
                        if let Some(events) = self.events() {
                            events.evicted(victim.name());
                        }
                    }
                }
                None => {
                    let holders = if others.is_empty() {
                        "no other model is loaded".to_owned()
                    } else {
                        let list = others
                            .iter()
                            .map(|s| {
                                let why = if s.config.preload {
                                    "preloaded"
                                } else if !s.idle() {
                                    "in use"
                                } else {
                                    "loading"
                                };
                                format!(
                                    "{} ({} MiB, {why})",
                                    s.name(),
                                    mib(s.life().memory_bytes.unwrap_or(0))
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        format!("held by {list}")
                    };
                    let holders = if count_ok {
                        holders
                    } else {
                        format!(
                            "max_loaded_models ({}) are loaded, {holders}",
                            self.base.max_loaded_models.unwrap_or(0)
                        )
                    };
                    return Err(RouteError::NoRoom(format!(
                        "Model `{}` needs about {} MiB but {} MiB is free; {holders}.",
                        slot.name(),
                        mib(needed),
                        if free == u64::MAX { 0 } else { mib(free) },
                    )));
                }
            }
        }
    }

    /// Stops `slot`'s server. [`Unload::IfIdle`] gives up (false) when a request is in
    /// flight or waiting; [`Unload::Drain`] waits for the requests in flight to end.
    async fn unload(&self, slot: &Arc<Slot>, how: Unload) -> bool {
        if !slot.is_local() {
            return false;
        }
        {
            let mut life = slot.life();
            if life.state != ModelState::Ready && !(how == Unload::Now && life.runner.is_some()) {
                return false;
            }
            slot.ready.store(false, Ordering::SeqCst);
            if how == Unload::IfIdle && !slot.idle() {
                slot.ready.store(true, Ordering::SeqCst);
                drop(life);
                // A waiter may have seen `ready` false for this moment.
                slot.changed();
                return false;
            }
            life.state = ModelState::Unloading;
            life.message = "stopping".into();
        }
        slot.changed();
        if how == Unload::Drain {
            let mut changes = slot.changes.subscribe();
            while slot.in_flight.load(Ordering::SeqCst) > 0 {
                let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
            }
        }
        slot.proxy.set_upstream(None).ok();
        let runner = {
            let mut life = slot.life();
            life.memory_bytes = None;
            life.runner.take()
        };
        if let Some(runner) = runner {
            runner.stop().await;
        }
        slot.set_state(ModelState::Stopped, "not loaded");
        tracing::info!(model = %slot.name(), "model stopped");
        true
    }

    /// Stops the models idle for longer than their `ttl_secs`.
    async fn unload_idle(&self) {
        let now = unix_millis();
        for slot in self.slots() {
            let ttl = slot.config.ttl_secs;
            if ttl == 0 || !slot.is_local() || !slot.ready.load(Ordering::Relaxed) {
                continue;
            }
            let last = slot.last_used_ms.load(Ordering::Relaxed);
            if slot.idle()
                && now.saturating_sub(last) >= ttl * 1000
                && self.unload(&slot, Unload::IfIdle).await
            {
                tracing::info!(model = %slot.name(), ttl, "unloaded after its idle time");
            }
        }
    }

    /// Stops every model server (the gateway is stopping).
    pub async fn stop_all(&self) {
        let retired: Vec<Arc<Slot>> = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for slot in self.slots().into_iter().chain(retired) {
            if slot.runner().is_some() {
                slot.step(
                    Stage::Stopping,
                    &format!("Stopping the model server of {}", slot.name()),
                );
                self.unload(&slot, Unload::Now).await;
            }
        }
    }

    /// What `/admin/models` shows.
    pub fn view(&self) -> ModelsView {
        let slots = self.slots();
        let models: Vec<ModelView> = slots.iter().map(|s| s.view()).collect();
        ModelsView {
            default_model: self.catalog().default.map(|i| slots[i].config.name.clone()),
            max_loaded_models: self.base.max_loaded_models,
            memory: MemoryView {
                ram_available_bytes: memory::free_bytes(false),
                reserve_bytes: self.base.memory_reserve_mb << 20,
                limit_bytes: self.base.memory_limit_mb.map(|m| m << 20),
                models_bytes: models.iter().filter_map(|m| m.memory_bytes).sum(),
            },
            models,
        }
    }

    /// One model's view.
    pub fn view_of(&self, name: &str) -> Result<ModelView, ChangeError> {
        self.find(name)
            .map(|s| s.view())
            .ok_or_else(|| ChangeError::Unknown(name.to_owned()))
    }

    /// Starts loading a model now (the admin's Load button).
    pub fn load_now(self: &Arc<Self>, name: &str) -> Result<ModelView, ChangeError> {
        let slot = self
            .find(name)
            .ok_or_else(|| ChangeError::Unknown(name.to_owned()))?;
        if slot.is_local() {
            self.begin_load(&slot);
        }
        Ok(slot.view())
    }

    /// Stops a model once its requests in flight end (the admin's Unload button).
    pub async fn unload_now(&self, name: &str) -> Result<ModelView, ChangeError> {
        let slot = self
            .find(name)
            .ok_or_else(|| ChangeError::Unknown(name.to_owned()))?;
        self.unload(&slot, Unload::Drain).await;
        Ok(slot.view())
    }

    /// Adds a model ([`Put::New`]) or gives one new settings ([`Put::Replace`]); the
    /// change is stored first, so it survives a restart.
    pub async fn put(
        self: &Arc<Self>,
        model: ModelConfig,
        how: Put,
    ) -> Result<Arc<Slot>, ChangeError> {
        self.check(&model, how)?;
        if let Some(store) = self.model_store() {
            let settings =
                serde_json::to_string(&model).map_err(|e| ChangeError::Invalid(e.to_string()))?;
            let at = chrono::Utc::now();
            store
                .store_model(&StoredModel {
                    name: model.name.clone(),
                    settings: Some(settings),
                    updated_at: at,
                })
                .await
                .map_err(ChangeError::Store)?;
            self.mark_applied(&model.name, at.timestamp_millis());
        }
        self.put_now(model, how, Origin::Admin)
    }

    fn mark_applied(&self, name: &str, at: i64) {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), at);
    }

    /// Applies the changes in the store that this gateway has not applied yet (another
    /// replica's); the registry does it every few seconds once started.
    pub async fn sync(self: &Arc<Self>) {
        let Some(store) = self.model_store() else {
            return;
        };
        match store.stored_models().await {
            Ok(stored) => self.apply_stored(stored),
            Err(err) => tracing::debug!(error = %err, "model changes not read; trying again later"),
        }
    }

    fn apply_stored(self: &Arc<Self>, stored: Vec<StoredModel>) {
        for stored in stored {
            let at = stored.updated_at.timestamp_millis();
            {
                let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
                if applied.get(&stored.name) == Some(&at) {
                    continue;
                }
            }
            self.mark_applied(&stored.name, at);
            let exists = self
                .catalog()
                .slots
                .iter()
                .any(|s| s.config.name == stored.name);
            match stored.settings {
                None if exists => {
                    let _ = self.remove_now(&stored.name);
                }
                None => {}
                Some(settings) => match serde_json::from_str::<ModelConfig>(&settings) {
                    Ok(model) => {
                        let how = if exists { Put::Replace } else { Put::New };
                        if let Err(err) = self.put_now(model, how, Origin::Admin) {
                            tracing::warn!(model = %stored.name, error = %err, "a stored model's settings no longer apply; skipped");
                        }
                    }
                    Err(_) => {
                        tracing::warn!(model = %stored.name, "a stored model's settings cannot be read; skipped");
                    }
                },
            }
        }
    }

    fn model_store(&self) -> Option<Arc<dyn ModelStore>> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies the changes admins made before (kept in `store`), and keeps later ones
    /// there. Call it before [`Registry::start`].
    pub async fn restore(self: &Arc<Self>, store: Arc<dyn ModelStore>) -> Result<(), StorageError> {
        self.apply_stored(store.stored_models().await?);
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
        Ok(())
    }

    /// Whether `model` can be put as `how` says.
    fn check(&self, model: &ModelConfig, how: Put) -> Result<(), ChangeError> {
        Self::check_in(&self.catalog(), model, how)
    }

    fn check_in(catalog: &Catalog, model: &ModelConfig, how: Put) -> Result<(), ChangeError> {
        let problems = model.problems();
        if !problems.is_empty() {
            return Err(ChangeError::Invalid(problems.join("; ")));
        }
        let exists = catalog.slots.iter().any(|s| s.config.name == model.name);
        match (how, exists) {
            (Put::New, true) => return Err(ChangeError::Taken(model.name.clone())),
            (Put::Replace, false) => return Err(ChangeError::Unknown(model.name.clone())),
            _ => {}
        }
        for name in model.names() {
            if catalog
                .slots
                .iter()
                .any(|s| s.config.name != model.name && s.config.names().any(|n| n == name))
            {
                return Err(ChangeError::Taken(name.to_owned()));
            }
        }
        Ok(())
    }

    fn put_now(
        self: &Arc<Self>,
        model: ModelConfig,
        how: Put,
        origin: Origin,
    ) -> Result<Arc<Slot>, ChangeError> {
        let (slot, old) = {
            let mut guard = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            Self::check_in(&guard, &model, how)?;
            let mut slots = guard.slots.clone();
            let existing = slots.iter().position(|s| s.config.name == model.name);
            // New settings keep where the model came from (the one model of the flags
            // keeps taking any name).
            let origin = existing.map_or(origin, |i| slots[i].origin);
            let slot = Arc::new(Slot::new(model, origin, false));
            connect_remote(&slot, &self.base);
            let old = match existing {
                Some(i) => Some(std::mem::replace(&mut slots[i], slot.clone())),
                None => {
                    slots.push(slot.clone());
                    None
                }
            };
            *guard = Arc::new(Catalog::new(slots, self.base.default_model.as_deref()));
            (slot, old)
        };
        if let Some(old) = old {
            self.retire(old);
        }
        if let Some(events) = self.events() {
            events.names_changed(&self.names());
        }
        if slot.config.preload && slot.is_local() {
            self.begin_load(&slot);
        }
        Ok(slot)
    }

    /// Removes a model (also across restarts); its server stops once its requests end.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<(), ChangeError> {
        if self.find(name).is_none_or(|s| s.config.name != name) {
            return Err(ChangeError::Unknown(name.to_owned()));
        }
        if let Some(store) = self.model_store() {
            let at = chrono::Utc::now();
            store
                .store_model(&StoredModel {
                    name: name.to_owned(),
                    settings: None,
                    updated_at: at,
                })
                .await
                .map_err(ChangeError::Store)?;
            self.mark_applied(name, at.timestamp_millis());
        }
        self.remove_now(name)
    }

    fn remove_now(self: &Arc<Self>, name: &str) -> Result<(), ChangeError> {
        let old = {
            let mut guard = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            let mut slots = guard.slots.clone();
            let i = slots
                .iter()
                .position(|s| s.config.name == name)
                .ok_or_else(|| ChangeError::Unknown(name.to_owned()))?;
            let old = slots.remove(i);
            *guard = Arc::new(Catalog::new(slots, self.base.default_model.as_deref()));
            old
        };
        self.retire(old);
        if let Some(events) = self.events() {
            events.names_changed(&self.names());
        }
        Ok(())
    }

    /// A slot out of the list: waiters are told, its server stops after its requests.
    fn retire(self: &Arc<Self>, slot: Arc<Slot>) {
        {
            // Under the lock a finishing load publishes under: it sees this, or this
            // sees its runner.
            let _life = slot.life();
            slot.retired.store(true, Ordering::SeqCst);
        }
        slot.changed();
        {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.retain(|s| s.runner().is_some());
            retired.push(slot.clone());
        }
        let registry = self.clone();
        self.runtime.spawn(async move {
            registry.unload(&slot, Unload::Drain).await;
        });
    }

    /// The settings a model has now.
    pub fn config_of(&self, name: &str) -> Option<ModelConfig> {
        self.find(name).map(|s| s.config.clone())
    }

    /// Each running model server: its model and process id.
    pub fn servers(&self) -> Vec<(String, Arc<dyn ModelRunner>)> {
        self.slots()
            .iter()
            .filter_map(|s| s.runner().map(|r| (s.config.name.clone(), r)))
            .collect()
    }
}

/// Where [`Registry::resolve`] sends a request.
#[derive(Debug)]
pub struct Route {
    /// The model.
    pub slot: Arc<Slot>,
    /// The name usage goes under, when not the one the client sent.
    pub served: Option<Arc<str>>,
}

/// How [`Registry::put`] treats a model of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// A new model: the name must be free.
    New,
    /// New settings for an existing model.
    Replace,
}

/// How [`Registry::unload`] treats requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unload {
    /// Only when nothing is in flight or waiting (eviction, idle time).
    IfIdle,
    /// Wait for the requests in flight to end (an admin's unload, a removal).
    Drain,
    /// At once (the gateway is stopping).
    Now,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Set-up (a runtime build, a download) that takes longer than this answers requests
/// with 503 and `Retry-After` instead of keeping them waiting for minutes.
const SETUP_IS_LONG: Duration = Duration::from_secs(2);

/// Points an upstream model's proxy at its server.
fn connect_remote(slot: &Slot, base: &GatewayConfig) {
    if !slot.config.is_remote() {
        return;
    }
    let timeout = Duration::from_secs(base.upstream_timeout_secs);
    match slot
        .config
        .proxy(timeout)
        .map_err(|e| e.to_string())
        .and_then(|p| slot.proxy.set_upstream(Some(p)).map_err(|e| e.to_string()))
    {
        Ok(()) => {}
        Err(message) => {
            slot.ready.store(false, Ordering::SeqCst);
            slot.set_state(ModelState::Failed, message);
        }
    }
}

impl Registry {
    /// Each model's state and requests, for `/metrics`.
    pub fn gauges(&self) -> Vec<crate::metrics::ModelGauge> {
        self.slots()
            .iter()
            .map(|slot| crate::metrics::ModelGauge {
                name: slot.config.name.clone(),
                state: slot.state().as_str(),
                in_flight: u64::from(slot.in_flight.load(Ordering::Relaxed)),
                queued: u64::from(slot.queued.load(Ordering::Relaxed)),
            })
            .collect()
    }
}

impl ModelEvents for crate::metrics::Metrics {
    fn names_changed(&self, names: &[String]) {
        self.set_model_names(names.iter().cloned());
    }

    fn loaded(&self, model: &str, seconds: f64) {
        self.model_loaded(model, seconds);
    }

    fn evicted(&self, model: &str) {
        self.model_evicted(model);
    }
}

#[async_trait]
impl TokenCounter for Registry {
    /// Counts with the tokenizer of the model that served the request.
    async fn count(&self, request: &Value, completion: &str) -> Result<TokenUsage, BoxError> {
        let requested = request.get("model").and_then(Value::as_str);
        let slot = self.route(requested).map_err(|e| e.to_string())?;
        let runner = slot.runner().ok_or("the model is not running")?;
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
        for state in ModelState::ALL {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
    }

    #[tokio::test]
    async fn requests_go_by_name_or_alias_and_unknown_names_are_refused() {
        let config = GatewayConfig {
            models: vec![
                ModelConfig {
                    aliases: vec!["gpt-4o".into()],
                    ..ModelConfig::remote("chat", "http://127.0.0.1:9")
                },
                ModelConfig::remote("coder", "http://127.0.0.1:9"),
            ],
            default_model: Some("coder".into()),
            ..GatewayConfig::default()
        };
        let registry = Registry::new(config, Progress::ConsoleOnly);
        assert_eq!(registry.route(Some("chat")).unwrap().name(), "chat");
        assert_eq!(registry.route(Some("gpt-4o")).unwrap().name(), "chat");
        assert_eq!(registry.route(None).unwrap().name(), "coder");
        let err = registry.route(Some("gpt-5")).unwrap_err();
        let (api, _) = err.to_api();
        assert_eq!(api.status, StatusCode::NOT_FOUND);
        assert_eq!(api.code, Some("model_not_found"));
    }

    #[tokio::test]
    async fn a_long_set_up_answers_503_at_once_and_a_short_one_is_waited_for() {
        let config = GatewayConfig {
            models: vec![ModelConfig::local("big", "/nowhere/big.gguf")],
            ..GatewayConfig::default()
        };
        let registry = Registry::new(config, Progress::ConsoleOnly);
        let slot = registry.find("big").unwrap();
        {
            let mut life = slot.life();
            life.state = ModelState::Downloading;
            life.message = "Downloading big.gguf".into();
            life.percent = Some(45.0);
            life.load_started = Some(Instant::now() - Duration::from_secs(3));
        }
        let err = registry
            .lease(&slot, &Requester::anonymous())
            .await
            .unwrap_err();
        let (api, retry_after) = err.to_api();
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.code, Some("model_loading"));
        assert!(
            api.message.contains("downloading big.gguf (45 %)"),
            "{}",
            api.message
        );
        assert_eq!(retry_after, Some(10));
        assert_eq!(slot.queued.load(Ordering::SeqCst), 0, "it left the queue");

        // Just begun: the request waits for the load instead.
        slot.life().load_started = Some(Instant::now());
        let waited = tokio::time::timeout(
            Duration::from_millis(300),
            registry.lease(&slot, &Requester::anonymous()),
        )
        .await;
        assert!(waited.is_err(), "still waiting");
    }

    #[tokio::test]
    async fn the_one_upstream_of_the_flags_takes_any_name() {
        let config = GatewayConfig {
            upstream: Some("http://127.0.0.1:9".into()),
            ..GatewayConfig::default()
        };
        let registry = Registry::new(config, Progress::ConsoleOnly);
        assert_eq!(registry.route(Some("gpt-4o")).unwrap().name(), "upstream");
        assert!(registry.lists_upstream_models());
        // Usage goes under the name the client sent, whichever it is (or none).
        for requested in [Some("gpt-4o"), Some("upstream"), None] {
            let route = registry.resolve(requested).unwrap();
            assert_eq!(route.slot.name(), "upstream");
            assert_eq!(route.served, None, "{requested:?}");
        }
    }
}
