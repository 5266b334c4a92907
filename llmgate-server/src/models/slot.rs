//! One model behind the gateway: its settings, where it is in its life, the requests it
//! serves and those waiting for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llmgate_core::config::ModelConfig;
use llmgate_core::hub::DownloadProgress;
use llmgate_core::proxy::Proxy;
use llmgate_core::runner::{ModelRunner, RunnerStatus};
use tokio::sync::watch;

use super::fair::{FairQueue, Permit};
use super::{unix_millis, ModelState, ModelView, Origin};
use crate::commands::model::{Reporter, Stage, TerminalReporter};

/// Set-up lines kept for the console.
const SETUP_LINES: usize = 200;

/// Where a model is, behind its lock.
#[derive(Debug)]
pub(crate) struct Life {
    pub state: ModelState,
    pub message: String,
    pub percent: Option<f64>,
    pub setup_log: VecDeque<String>,
    pub runner: Option<Arc<dyn ModelRunner>>,
    /// What the model is estimated to take in memory, once it was measured.
    pub memory_bytes: Option<u64>,
    /// When the current load began (for its duration and for "set-up is long").
    pub load_started: Option<Instant>,
    /// Counts loads; a waiter knows whether the failure it sees is of its own load.
    pub load_generation: u64,
    /// The last load failed for want of memory (not a broken model).
    pub no_room: bool,
    /// Its memory is the GPU's (else RAM).
    pub on_gpu: bool,
}

/// One model: settings, life, requests.
#[derive(Debug)]
pub struct Slot {
    pub(crate) config: ModelConfig,
    pub(crate) origin: Origin,
    pub(crate) name: Arc<str>,
    /// Forwards to this model's server (remote: set at once; local: while it runs).
    pub(crate) proxy: Proxy,
    pub(crate) life: Mutex<Life>,
    /// Bumped on every change of life; waiters look again.
    pub(crate) changes: watch::Sender<u64>,
    /// Requests being served (a stream counts until its body ends).
    pub(crate) in_flight: AtomicU32,
    /// Requests waiting for the model to load or for a free place.
    pub(crate) queued: AtomicU32,
    /// Places for requests at once and the requests waiting for one, when
    /// `max_concurrency` is set.
    pub(crate) places: Option<Arc<FairQueue>>,
    /// Milliseconds since the Unix epoch of the last request's start or end (0: never).
    pub(crate) last_used_ms: AtomicU64,
    /// Requests may go straight to the server.
    pub(crate) ready: AtomicBool,
    /// Set-up lines also go to the terminal (the models `up`/`serve` start).
    pub(crate) echo: Option<TerminalReporter>,
    /// Removed from the list: it never loads again.
    pub(crate) retired: AtomicBool,
}

impl Slot {
    pub(crate) fn new(config: ModelConfig, origin: Origin, echo: bool) -> Self {
        let remote = config.is_remote();
        let places = config
            .max_concurrency
            .map(|n| Arc::new(FairQueue::new(n, config.queue)));
        Self {
            name: Arc::from(config.name.as_str()),
            config,
            origin,
            proxy: Proxy::without_upstream(),
            life: Mutex::new(Life {
                state: if remote {
                    ModelState::Ready
                } else {
                    ModelState::Stopped
                },
                message: if remote {
                    "forwarding to its upstream".into()
                } else {
                    "not loaded".into()
                },
                percent: None,
                setup_log: VecDeque::new(),
                runner: None,
                memory_bytes: None,
                load_started: None,
                load_generation: 0,
                no_room: false,
                on_gpu: false,
            }),
            changes: watch::channel(0).0,
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            places,
            last_used_ms: AtomicU64::new(0),
            ready: AtomicBool::new(remote),
            echo: echo.then(TerminalReporter::default),
            retired: AtomicBool::new(false),
        }
    }

    /// The model's canonical name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether llmgate runs this model (not an `upstream` one).
    pub fn is_local(&self) -> bool {
        !self.config.is_remote()
    }

    pub(crate) fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells waiters to look again.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn set_state(&self, state: ModelState, message: impl Into<String>) {
        {
            let mut life = self.life();
            life.state = state;
            life.message = message.into();
            if state != ModelState::Downloading {
                life.percent = None;
            }
        }
        self.changed();
    }

    /// The running model server, if any.
    pub fn runner(&self) -> Option<Arc<dyn ModelRunner>> {
        self.life().runner.clone()
    }

    /// Whether nothing is being served or waiting.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.queued.load(Ordering::SeqCst) == 0
    }

    pub(crate) fn touch(&self) {
        self.last_used_ms.store(unix_millis(), Ordering::Relaxed);
    }

    /// A place for one request, if the model answers now and has room: no waiting.
    pub(crate) fn try_lease(self: &Arc<Self>) -> Option<Lease> {
        if !self.ready.load(Ordering::SeqCst) {
            return None;
        }
        let permit = match &self.places {
            Some(places) => {
                // Someone waiting (for a load too) goes first.
                if self.queued.load(Ordering::SeqCst) > 0 {
                    return None;
                }
                Some(places.try_acquire()?)
            }
            None => None,
        };
        self.enter(permit)
    }

    /// Counts a request in, then checks the model still answers: an unload sets `ready`
    /// false before it counts the requests in flight, so one of the two sees the other.
    pub(crate) fn enter(self: &Arc<Self>, permit: Option<Permit>) -> Option<Lease> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let lease = Lease {
            slot: self.clone(),
            _permit: permit,
        };
        // `last_used` is set when the request ends: while it is in flight the model is not
        // idle anyway.
        self.ready.load(Ordering::SeqCst).then_some(lease)
    }

    /// Where the model is now, its server's own state included, and what it is doing
    /// when that differs from what the registry last said.
    fn current(life: &Life) -> (ModelState, Option<String>) {
        match (&life.runner, life.state) {
            (Some(runner), ModelState::Ready) => match runner.status() {
                RunnerStatus::Restarting { attempt, reason } => (
                    ModelState::Loading,
                    Some(format!("restart {attempt}: {reason}")),
                ),
                RunnerStatus::Failed { reason } => (ModelState::Failed, Some(reason)),
                _ => (ModelState::Ready, None),
            },
            (_, state) => (state, None),
        }
    }

    /// Where the model is now, its server's own state included.
    pub(crate) fn state(&self) -> ModelState {
        Self::current(&self.life()).0
    }

    /// What the console shows.
    pub(crate) fn view(&self) -> ModelView {
        let life = self.life();
        let mut log: Vec<String> = life.setup_log.iter().cloned().collect();
        if let Some(runner) = &life.runner {
            log.extend(runner.log_tail(50));
        }
        let (state, said) = Self::current(&life);
        let message = said.unwrap_or_else(|| life.message.clone());
        let last = self.last_used_ms.load(Ordering::Relaxed);
        let config = &self.config;
        ModelView {
            name: config.name.clone(),
            aliases: config.aliases.clone(),
            kind: if config.is_remote() {
                "upstream"
            } else {
                "local"
            },
            source: config.source.clone(),
            upstream: config.upstream.clone(),
            runner: life.runner.as_ref().map(|r| r.kind()),
            backend: config.backend,
            state,
            message,
            percent: life.percent,
            log,
            memory_bytes: life.memory_bytes,
            pid: life.runner.as_ref().and_then(|r| r.pid()),
            last_used: (last > 0)
                .then(|| chrono::DateTime::from_timestamp_millis(last as i64))
                .flatten(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            ttl_secs: config.ttl_secs,
            preload: config.preload,
            max_concurrency: config.max_concurrency,
            max_queue: config.max_queue,
            queue: config.queue,
            origin: self.origin,
        }
    }

    fn push_line(life: &mut Life, line: String) {
        if life.setup_log.len() == SETUP_LINES {
            life.setup_log.pop_front();
        }
        life.setup_log.push_back(line);
    }
}

impl Reporter for Slot {
    fn step(&self, stage: Stage, message: &str) {
        if let Some(terminal) = &self.echo {
            terminal.step(stage, message);
        }
        // On the terminal already when it echoes there: the log line would say it twice.
        if self.echo.is_some() {
            tracing::debug!(model = %self.name, "{message}");
        } else {
            tracing::info!(model = %self.name, "{message}");
        }
        {
            let mut life = self.life();
            life.state = match stage {
                Stage::SettingUp => ModelState::SettingUp,
                Stage::GettingModel => ModelState::Downloading,
                Stage::Starting => ModelState::Loading,
                Stage::Stopping => ModelState::Unloading,
            };
            life.message = message.to_owned();
            Self::push_line(&mut life, format!("==> {message}"));
        }
        self.changed();
    }

    fn detail(&self, line: &str) {
        if let Some(terminal) = &self.echo {
            terminal.detail(line);
        }
        let mut life = self.life();
        Self::push_line(&mut life, line.to_owned());
    }

    fn download(&self, progress: &DownloadProgress) {
        if let Some(terminal) = &self.echo {
            terminal.download(progress);
        }
        let mut life = self.life();
        life.state = ModelState::Downloading;
        life.message = format!("downloading {}", progress.file);
        life.percent = progress
            .total
            .filter(|t| *t > 0)
            .map(|total| (progress.downloaded as f64 * 100.0 / total as f64).min(100.0));
    }
}

/// A request's place at a model: while it lives, the model is not stopped. Dropped when
/// the response body ends (or the client leaves).
#[derive(Debug)]
pub struct Lease {
    slot: Arc<Slot>,
    _permit: Option<Permit>,
}

impl Lease {
    /// The model the request went to.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.touch();
        // An unload (which clears `ready` first) may be waiting for the last request.
        if self.slot.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && !self.slot.ready.load(Ordering::SeqCst)
        {
            self.slot.changed();
        }
    }
}

/// Counts a request as waiting for a model while it lives.
pub(crate) struct Waiting(Arc<Slot>);

impl Waiting {
    /// `None` when the model's queue is full.
    pub(crate) fn join(slot: &Arc<Slot>) -> Option<Self> {
        let max = slot.config.max_queue;
        let mut current = slot.queued.load(Ordering::SeqCst);
        loop {
            if current >= max {
                return None;
            }
            match slot.queued.compare_exchange(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Self(slot.clone())),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
        self.0.changed();
    }
}
