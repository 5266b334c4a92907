//! Supervising a model server process: start, readiness, captured output, restarts with
//! backoff, and a stop that leaves no process behind.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::http::LocalHttp;
use super::RunnerError;

/// Lines of output kept per server.
const LOG_LINES: usize = 1000;

/// Where a model server is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunnerStatus {
    /// Not running.
    Stopped,
    /// Started, not answering yet.
    Starting,
    /// Answering requests.
    Ready,
    /// It exited; it is started again after a pause.
    Restarting {
        /// How many restarts in the current window.
        attempt: u32,
        /// Why it exited.
        reason: String,
    },
    /// Given up.
    Failed {
        /// Why, with the last lines of its output.
        reason: String,
    },
}

/// How to start the process and tell that it is ready.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The URL that answers 2xx once the server is ready.
    pub ready_url: String,
    /// How long readiness may take.
    pub ready_timeout: Duration,
}

/// When to give up restarting.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// More exits than this within `window` and the server is marked failed.
    pub max_restarts: u32,
    /// The window for counting exits.
    pub window: Duration,
    /// First pause before a restart; doubles each time.
    pub initial_backoff: Duration,
    /// Longest pause.
    pub max_backoff: Duration,
    /// Between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(300),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Runs one server process at a time and keeps it running.
#[derive(Debug, Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    name: String,
    status: watch::Sender<RunnerStatus>,
    log: Mutex<VecDeque<String>>,
    pid: Mutex<Option<u32>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Supervisor {
    /// A supervisor for a server called `name` (used in logs).
    pub fn new(name: impl Into<String>) -> Self {
        let (status, _) = watch::channel(RunnerStatus::Stopped);
        let (stop, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                name: name.into(),
                status,
                log: Mutex::new(VecDeque::new()),
                pid: Mutex::new(None),
                stop,
                task: Mutex::new(None),
            }),
        }
    }

    /// Starts the process and returns once it is ready, or with why it is not.
    pub async fn start(&self, launch: Launch, policy: RestartPolicy) -> Result<(), RunnerError> {
        self.stop().await;
        self.shared.stop.send_replace(false);
        self.shared.status.send_replace(RunnerStatus::Starting);
        let mut status = self.shared.status.subscribe();
        let task = tokio::spawn(supervise(self.shared.clone(), launch, policy));
        *self.shared.task.lock().unwrap() = Some(task);
        loop {
            match &*status.borrow_and_update() {
                RunnerStatus::Ready => return Ok(()),
                RunnerStatus::Failed { reason } => return Err(RunnerError::Failed(reason.clone())),
                RunnerStatus::Stopped => {
                    return Err(RunnerError::Failed("stopped while starting".into()))
                }
                RunnerStatus::Starting | RunnerStatus::Restarting { .. } => {}
            }
            if status.changed().await.is_err() {
                return Err(RunnerError::Failed("supervisor ended".into()));
            }
        }
    }

    /// The current state.
    pub fn status(&self) -> RunnerStatus {
        self.shared.status.borrow().clone()
    }

    /// Follows state changes.
    pub fn subscribe(&self) -> watch::Receiver<RunnerStatus> {
        self.shared.status.subscribe()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        *self.shared.pid.lock().unwrap()
    }

    /// The last `lines` lines of output (stdout and stderr, interleaved as they came).
    pub fn log_tail(&self, lines: usize) -> Vec<String> {
        let log = self.shared.log.lock().unwrap();
        log.iter()
            .skip(log.len().saturating_sub(lines))
            .cloned()
            .collect()
    }

    /// Stops the process (SIGTERM to its process group, SIGKILL after the grace period)
    /// and waits until it is gone.
    pub async fn stop(&self) {
        self.shared.stop.send_replace(true);
        let task = self.shared.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Shared {
    fn set(&self, status: RunnerStatus) {
        tracing::info!(server = %self.name, ?status, "model server state");
        self.status.send_replace(status);
    }

    fn push_line(&self, line: String) {
        tracing::debug!(server = %self.name, "{line}");
        let mut log = self.log.lock().unwrap();
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }

    fn recent_output(&self) -> String {
        let log = self.log.lock().unwrap();
        let tail: Vec<&str> = log
            .iter()
            .skip(log.len().saturating_sub(5))
            .map(String::as_str)
            .collect();
        if tail.is_empty() {
            "no output".to_owned()
        } else {
            format!("last output: {}", tail.join(" | "))
        }
    }
}

enum Outcome {
    Exited(String),
    Stopped,
}

async fn supervise(shared: Arc<Shared>, launch: Launch, policy: RestartPolicy) {
    let mut stop = shared.stop.subscribe();
    let http = LocalHttp::default();
    let mut exits: VecDeque<Instant> = VecDeque::new();
    let mut backoff = policy.initial_backoff;
    loop {
        let mut child = match spawn(&shared, &launch) {
            Ok(child) => child,
            Err(err) => {
                shared.set(RunnerStatus::Failed {
                    reason: format!("cannot start {}: {err}", launch.program.display()),
                });
                return;
            }
        };
        let readiness = tokio::select! {
            ready = wait_ready(&http, &launch, &mut child) => Some(ready),
            _ = stop.wait_for(|s| *s) => None,
        };
        let outcome = match readiness {
            None => Outcome::Stopped,
            Some(Ok(())) => {
                shared.set(RunnerStatus::Ready);
                tokio::select! {
                    status = child.wait() => Outcome::Exited(describe_exit(status)),
                    _ = stop.wait_for(|s| *s) => Outcome::Stopped,
                }
            }
            Some(Err(Readiness::Exited(how))) => Outcome::Exited(how),
            Some(Err(Readiness::TimedOut)) => {
                terminate(&shared, &mut child, policy.stop_grace).await;
                shared.set(RunnerStatus::Failed {
                    reason: format!(
                        "did not answer {} within {} s; {}",
                        launch.ready_url,
                        launch.ready_timeout.as_secs(),
                        shared.recent_output()
                    ),
                });
                return;
            }
        };
        let reason = match outcome {
            Outcome::Stopped => {
                terminate(&shared, &mut child, policy.stop_grace).await;
                shared.set(RunnerStatus::Stopped);
                return;
            }
            Outcome::Exited(how) => how,
        };
        *shared.pid.lock().unwrap() = None;
        shared.push_line(format!("[llmgate] the server {reason}"));
        let now = Instant::now();
        exits.push_back(now);
        while exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            exits.pop_front();
        }
        let attempt = exits.len() as u32;
        let reason = format!("{reason}; {}", shared.recent_output());
        if attempt > policy.max_restarts {
            shared.set(RunnerStatus::Failed {
                reason: format!(
                    "exited {attempt} times within {} s: {reason}",
                    policy.window.as_secs()
                ),
            });
            return;
        }
        tracing::warn!(server = %shared.name, %reason, ?backoff, "model server exited; restarting");
        shared.set(RunnerStatus::Restarting { attempt, reason });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => {
                shared.set(RunnerStatus::Stopped);
                return;
            }
        }
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

fn spawn(shared: &Arc<Shared>, launch: &Launch) -> std::io::Result<Child> {
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A backstop: if the supervisor is dropped, the process goes too.
        .kill_on_drop(true);
    // Its own process group: a Ctrl-C in llmgate's terminal reaches llmgate, which
    // then stops the server in order, instead of killing both at once.
    #[cfg(unix)]
    command.process_group(0);
    #[cfg(target_os = "linux")]
    die_with_this_thread(&mut command);
    let mut child = command.spawn()?;
    *shared.pid.lock().unwrap() = child.id();
    shared.push_line(format!(
        "[llmgate] started {} (pid {})",
        launch.program.display(),
        child.id().unwrap_or(0)
    ));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(capture(shared.clone(), out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(capture(shared.clone(), err));
    }
    Ok(child)
}

/// Has `command`'s process killed when the thread that starts it ends, so that a server
/// never outlives an llmgate killed outright (SIGKILL, the OOM killer), holding its
/// memory and port while the next llmgate starts another. The thread is a runtime's
/// (this runs in the supervising task), and a runtime's threads end only with it, when
/// `kill_on_drop` stops the server anyway. (Not so for a worker that a task took over
/// with `block_in_place`, which llmgate never uses: that thread may end later, taking
/// the servers it started with it.)
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_this_thread(command: &mut Command) {
    let starter = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls may be made: prctl(2) and getppid(2) are plain system
    // calls, and nothing here allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // Gone before the line above took effect: the child has another parent.
            // (An errno, not a message: nothing may allocate here.)
            if nix::unistd::getppid().as_raw() as u32 != starter {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

async fn capture(shared: Arc<Shared>, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => shared.push_line(line),
            Ok(None) => return,
            // Not UTF-8: keep reading; llama.cpp prints progress bytes now and then.
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => continue,
            Err(_) => return,
        }
    }
}

enum Readiness {
    Exited(String),
    TimedOut,
}

async fn wait_ready(http: &LocalHttp, launch: &Launch, child: &mut Child) -> Result<(), Readiness> {
    let deadline = Instant::now() + launch.ready_timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Readiness::Exited(describe_exit(Ok(status))));
        }
        if let Ok(status) = http
            .get_status(&launch.ready_url, Duration::from_secs(2))
            .await
        {
            if status.is_success() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Readiness::TimedOut);
        }
        // Often: each poll's wait is added to every cold start (a refused connection or a
        // 503 from a loading server costs next to nothing).
        tokio::time::sleep(READY_POLL).await;
    }
}

/// How often a starting server is asked whether it is ready.
const READY_POLL: Duration = Duration::from_millis(20);

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => format!("exited with {status}"),
        Err(err) => format!("could not be waited for: {err}"),
    }
}

/// SIGTERM to the process group, then SIGKILL if it is still there after `grace`.
async fn terminate(shared: &Shared, child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        *shared.pid.lock().unwrap() = None;
        return;
    }
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            *shared.pid.lock().unwrap() = None;
            shared.push_line("[llmgate] stopped".into());
            return;
        }
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let _ = child.kill().await;
    *shared.pid.lock().unwrap() = None;
    shared.push_line("[llmgate] killed after the grace period".into());
}
