//! llama-cpp-python's OpenAI-compatible server, in a virtual environment llmgate
//! manages, built for the chosen backend.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::local_server::LocalServer;
use super::process::{Launch, RestartPolicy, Supervisor};
use super::setup_lock;
use super::{Backend, ModelRunner, ModelSpec, RunnerError, RunnerStatus};

/// The llama-cpp-python release llmgate installs.
pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";

/// Written into a virtual environment once it is complete: which backend it was built
/// for, so it is reused for that backend only.
const MARKER: &str = "llmgate-env.json";

/// Started instead of `python -m llama_cpp.server`: it stops the server when llmgate's
/// process is gone (even after a SIGKILL, which llmgate cannot intercept), then runs the
/// server module as `-m` would.
const BOOTSTRAP: &str = r#"
import os, runpy, sys, threading, time
parent = os.getppid()
def watch_parent():
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)
threading.Thread(target=watch_parent, daemon=True).start()
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"#;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    backend: Backend,
    llama_cpp_python: String,
    cmake_args: Option<String>,
}

impl Marker {
    /// What an environment or a cached wheel built now for `backend` is.
    fn for_backend(backend: Backend) -> Self {
        Self {
            backend,
            llama_cpp_python: LLAMA_CPP_PYTHON_VERSION.into(),
            cmake_args: backend.cmake_args(),
        }
    }
}

/// A ready virtual environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonEnv {
    /// The environment's directory.
    pub dir: PathBuf,
    /// The backend it was built for.
    pub backend: Backend,
}

impl PythonEnv {
    /// Its Python interpreter.
    pub fn python(&self) -> PathBuf {
        python_in(&self.dir)
    }
}

fn python_in(dir: &Path) -> PathBuf {
    if cfg!(windows) {
        dir.join("Scripts").join("python.exe")
    } else {
        dir.join("bin").join("python")
    }
}

/// Creates and reuses llmgate's virtual environments: one per backend, under `root`.
/// Built wheels are kept in `wheel_cache` (per backend) so a new environment does not
/// compile llama.cpp again.
#[derive(Debug, Clone)]
pub struct PythonEnvManager {
    /// Where the environments live (`<data dir>/python` by default).
    pub root: PathBuf,
    /// Where built wheels are kept (`~/.cache/llmgate/wheels` by default).
    pub wheel_cache: PathBuf,
    /// The Python that creates environments (`python3` by default).
    pub base_python: PathBuf,
}

impl PythonEnvManager {
    /// The environment directory for a backend.
    pub fn env_dir(&self, backend: Backend) -> PathBuf {
        self.root.join(format!("llama-cpp-python-{backend}"))
    }

    /// The `pip install` (or `pip wheel`) environment for a backend: `CMAKE_ARGS` and
    /// `FORCE_CMAKE` whenever the backend has build flags.
    pub fn build_env(backend: Backend) -> Vec<(String, String)> {
        match backend.cmake_args() {
            Some(args) => vec![
                ("CMAKE_ARGS".into(), args),
                ("FORCE_CMAKE".into(), "1".into()),
            ],
            None => vec![],
        }
    }

    /// An environment for `backend`, reused when one was built for it; otherwise built
    /// (with progress lines to `say`). An environment built for another backend is
    /// never used: it is rebuilt.
    pub async fn ensure(
        &self,
        backend: Backend,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<PythonEnv, RunnerError> {
        let dir = self.env_dir(backend);
        let wanted = Marker::for_backend(backend);
        let ready =
            |dir: &Path| read_marker(dir).as_ref() == Some(&wanted) && python_in(dir).exists();
        if ready(&dir) {
            return Ok(PythonEnv { dir, backend });
        }
        // One builder at a time for an environment: two models of one backend loading at
        // once, or two gateways sharing the directory, would otherwise remove and create
        // it under each other. The lock goes with the file (and with the process).
        std::fs::create_dir_all(&self.root)
            .map_err(|e| setup_io("the environment directory", e))?;
        let lock = self.root.join(format!(".llama-cpp-python-{backend}.lock"));
        let held = setup_lock::hold(&lock, &dir, say)
            .await
            .map_err(|e| setup_io(&format!("the lock file {}", lock.display()), e))?;
        // Built by whoever held the lock before.
        if ready(&dir) {
            return Ok(PythonEnv { dir, backend });
        }
        match read_marker(&dir) {
            Some(found) => {
                say(&format!(
                    "The environment in {} was built for {} (llama-cpp-python {}); rebuilding it for {backend}.",
                    dir.display(),
                    found.backend,
                    found.llama_cpp_python
                ));
                remove_dir(&dir).await?;
            }
            None if dir.exists() => {
                say(&format!(
                    "{} is incomplete; creating it again.",
                    dir.display()
                ));
                remove_dir(&dir).await?;
            }
            None => {}
        }
        self.create(&dir, backend, &held, say).await?;
        write_marker(&dir, &wanted)?;
        Ok(PythonEnv { dir, backend })
    }

    /// The cached wheels of `backend`, emptied first when they were built with other
    /// flags (or by a version of llmgate that did not mark its builds): a wheel is reused
    /// only for the exact build it was made by.
    async fn wheel_dir(&self, backend: Backend) -> Result<PathBuf, RunnerError> {
        let wheels = self.wheel_cache.join(backend.as_str());
        if wheels.exists() && read_marker(&wheels) != Some(Marker::for_backend(backend)) {
            remove_dir(&wheels).await?;
        }
        std::fs::create_dir_all(&wheels).map_err(|e| setup_io("the wheel cache", e))?;
        Ok(wheels)
    }

    async fn create(
        &self,
        dir: &Path,
        backend: Backend,
        held: &setup_lock::Held,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), RunnerError> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| setup_io("the environment directory", e))?;
        say(&format!(
            "Creating a Python environment in {}…",
            dir.display()
        ));
        run(
            held.share_with(&mut Command::new(&self.base_python))
                .map_err(|e| setup_io("the set-up lock", e))?
                .arg("-m")
                .arg("venv")
                .arg(dir),
            say,
            &format!(
                "a virtual environment (is {} a Python 3.9+ with venv?)",
                self.base_python.display()
            ),
        )
        .await?;
        let python = python_in(dir);
        // Environments of other roots may share the wheel cache: it has a lock of its own,
        // held until the wheel is built.
        std::fs::create_dir_all(&self.wheel_cache).map_err(|e| setup_io("the wheel cache", e))?;
        let wheel_lock = self.wheel_cache.join(format!(".{backend}.lock"));
        let wheels_held =
            setup_lock::hold(&wheel_lock, &self.wheel_cache.join(backend.as_str()), say)
                .await
                .map_err(|e| setup_io(&format!("the lock file {}", wheel_lock.display()), e))?;
        let wheels = self.wheel_dir(backend).await?;
        let build = Marker::for_backend(backend);
        if !has_wheel(&wheels) {
            say(&format!(
                "Building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} for {backend} (compiling llama.cpp takes 5 to 20 minutes; it is done once and cached in {})…",
                wheels.display()
            ));
            // --no-cache-dir: pip's own wheel cache does not know the backend and would
            // hand a CPU build to a CUDA environment.
            let mut wheel = Command::new(&python);
            // One lock fits in its standard input: the wheel cache's, which the build
            // writes into. (If the gateway is killed, the next one may make the
            // environment again meanwhile, then waits here for this build.)
            wheels_held
                .share_with(&mut wheel)
                .map_err(|e| setup_io("the set-up lock", e))?;
            run(
                wheel
                    .args([
                        "-m",
                        "pip",
                        "wheel",
                        "--no-deps",
                        "--no-cache-dir",
                        "--progress-bar",
                        "off",
                        "-w",
                    ])
                    .arg(&wheels)
                    .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"))
                    .envs(Self::build_env(backend)),
                say,
                &format!("llama-cpp-python for {backend}{}", build_hint(backend)),
            )
            .await?;
            write_marker(&wheels, &build)?;
        }
        say(&format!(
            "Installing llama-cpp-python[server] {LLAMA_CPP_PYTHON_VERSION} ({backend})…"
        ));
        run(
            held.share_with(&mut Command::new(&python))
                .map_err(|e| setup_io("the set-up lock", e))?
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--progress-bar",
                    "off",
                    "--find-links",
                ])
                .arg(&wheels)
                .arg(format!(
                    "llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}"
                ))
                .envs(Self::build_env(backend)),
            say,
            "llama-cpp-python's server dependencies (is PyPI reachable?)",
        )
        .await?;
        if backend.offloads_to_gpu() {
            let output = Command::new(&python)
                .args([
                    "-c",
                    "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())",
                ])
                .output()
                .await
                .map_err(|e| setup_io("the GPU check", e))?;
            if String::from_utf8_lossy(&output.stdout).trim() != "True" {
                return Err(setup_err(
                    &format!("llama-cpp-python for {backend}"),
                    format!(
                        "the build has no GPU offload, so it would silently run on the CPU{}",
                        build_hint(backend)
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn build_hint(backend: Backend) -> &'static str {
    match backend {
        Backend::Cpu => " (a C/C++ compiler is needed)",
        Backend::Cuda => " (needs the CUDA toolkit: nvcc on PATH or CUDACXX set)",
        Backend::Metal => " (needs macOS with Xcode command-line tools)",
        Backend::Openblas => " (needs OpenBLAS headers, e.g. apt-get install libopenblas-dev)",
    }
}

fn setup_err(what: &str, reason: String) -> RunnerError {
    RunnerError::Setup {
        what: what.to_owned(),
        reason,
        source: None,
    }
}

/// A set-up step that failed with a system error, which is kept as the source.
fn setup_io(what: &str, error: std::io::Error) -> RunnerError {
    RunnerError::Setup {
        what: what.to_owned(),
        reason: error.to_string(),
        source: Some(error),
    }
}

fn read_marker(dir: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(dir.join(MARKER)).ok()?).ok()
}

fn write_marker(dir: &Path, marker: &Marker) -> Result<(), RunnerError> {
    let bytes = serde_json::to_vec_pretty(marker).expect("marker serializes");
    std::fs::write(dir.join(MARKER), bytes).map_err(|e| setup_io("the build marker", e))
}

/// How long a removal keeps trying while something still writes into the directory (a
/// set-up command left running by a gateway that was killed).
const REMOVE_TRIES: u32 = 40;
const REMOVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

async fn remove_dir(dir: &Path) -> Result<(), RunnerError> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Files still appearing in it; any other failure will not go away.
            Err(e)
                if e.kind() == std::io::ErrorKind::DirectoryNotEmpty
                    && tries + 1 < REMOVE_TRIES =>
            {
                tries += 1;
                tokio::time::sleep(REMOVE_PAUSE).await;
            }
            Err(e) => return Err(setup_io(&format!("removing {}", dir.display()), e)),
        }
    }
}

fn has_wheel(dir: &Path) -> bool {
    let prefix = format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-");
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
    })
}

/// Runs a set-up command, passing its output to `say` line by line; the error carries
/// the last lines.
async fn run(
    command: &mut Command,
    say: &(dyn Fn(&str) + Send + Sync),
    what: &str,
) -> Result<(), RunnerError> {
    // Standard input: the set-up lock (`setup_lock::Held::share_with`), which reads empty.
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| setup_io(what, e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut tail = std::collections::VecDeque::new();
    while let Some(line) = rx.recv().await {
        say(&format!("  {line}"));
        if tail.len() == 8 {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().await.map_err(|e| setup_io(what, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(setup_err(
            what,
            format!("{status}; last output: {}", Vec::from(tail).join(" | ")),
        ))
    }
}

/// `python -m llama_cpp.server` for one model, supervised.
#[derive(Debug, Clone)]
pub struct LlamaCppPythonRunner {
    env: PythonEnv,
    spec: ModelSpec,
    server: LocalServer,
    policy: RestartPolicy,
}

impl LlamaCppPythonRunner {
    /// A runner for `spec` in a ready environment (see [`PythonEnvManager::ensure`]).
    pub fn new(env: PythonEnv, spec: ModelSpec) -> Self {
        Self {
            env,
            spec,
            server: LocalServer::new("llama-cpp-python", "/v1/models"),
            policy: RestartPolicy::default(),
        }
    }

    /// Replaces the restart policy.
    pub fn with_policy(mut self, policy: RestartPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The supervised process (its pid, its state).
    pub fn supervisor(&self) -> &Supervisor {
        self.server.supervisor()
    }

    /// The server's command-line arguments (after the bootstrap).
    pub fn server_args(spec: &ModelSpec, port: u16) -> Vec<String> {
        let mut args = vec![
            "--model".to_owned(),
            spec.model.to_string_lossy().into_owned(),
            "--model_alias".to_owned(),
            spec.alias(),
            // Never reachable without the gateway.
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            // Otherwise any new request (a health probe included) cuts a running stream short.
            "--interrupt_requests".to_owned(),
            "false".to_owned(),
        ];
        match spec.gpu_layers {
            Some(layers) => args.extend(["--n_gpu_layers".to_owned(), layers.to_string()]),
            None if spec.backend.offloads_to_gpu() => {
                args.extend(["--n_gpu_layers".to_owned(), "-1".to_owned()]);
            }
            None => {}
        }
        if let Some(format) = &spec.chat_format {
            args.extend(["--chat_format".to_owned(), format.clone()]);
        }
        if let Some(n_ctx) = spec.n_ctx {
            args.extend(["--n_ctx".to_owned(), n_ctx.to_string()]);
        }
        args.extend(spec.extra_args.iter().cloned());
        args
    }

    /// How the process is started on `port`.
    pub fn launch(&self, port: u16) -> Launch {
        let mut args = vec!["-c".to_owned(), BOOTSTRAP.to_owned()];
        args.extend(Self::server_args(&self.spec, port));
        Launch {
            program: self.env.python(),
            args,
            env: vec![("PYTHONUNBUFFERED".into(), "1".into())],
            ready_url: self.server.health_url(port),
            ready_timeout: self.spec.ready_timeout,
        }
    }
}

#[async_trait]
impl ModelRunner for LlamaCppPythonRunner {
    fn kind(&self) -> &'static str {
        "llama-cpp-python"
    }

    async fn start(&self) -> Result<(), RunnerError> {
        self.server
            .start(&self.spec, |port| self.launch(port), self.policy)
            .await
    }

    fn base_url(&self) -> Option<String> {
        self.server.base_url()
    }

    fn status(&self) -> RunnerStatus {
        self.server.status()
    }

    async fn healthy(&self) -> bool {
        self.server.healthy().await
    }

    fn log_tail(&self, lines: usize) -> Vec<String> {
        self.supervisor().log_tail(lines)
    }

    async fn stop(&self) {
        self.supervisor().stop().await;
    }

    fn pid(&self) -> Option<u32> {
        self.supervisor().pid()
    }

    async fn count_tokens(&self, text: &str) -> Result<u64, RunnerError> {
        let answer = self
            .server
            .post_json("/extras/tokenize/count", &json!({"input": text}))
            .await?;
        answer["count"]
            .as_u64()
            .ok_or_else(|| RunnerError::Http(format!("unexpected tokenize answer: {answer}")))
    }

    fn chat_format(&self) -> Option<String> {
        self.spec.chat_format.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_python_that_cannot_run_is_named_with_its_system_error_kept() {
        let dir = tempfile::tempdir().unwrap();
        let manager = PythonEnvManager {
            root: dir.path().join("envs"),
            wheel_cache: dir.path().join("wheels"),
            base_python: dir.path().join("no-such-python"),
        };
        let err = manager.ensure(Backend::Cpu, &|_| {}).await.unwrap_err();
        assert!(err.to_string().starts_with("setting up "), "{err}");
        let source = std::error::Error::source(&err).expect("the spawn error is kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound, "{err}");
    }

    fn spec(backend: Backend) -> ModelSpec {
        ModelSpec {
            backend,
            ..ModelSpec::new("/models/gemma-3-270m-q4_k_m.gguf")
        }
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].as_str())
    }

    #[test]
    fn the_server_binds_loopback_and_never_interrupts_streams() {
        let args = LlamaCppPythonRunner::server_args(&spec(Backend::Cpu), 41234);
        assert_eq!(value_of(&args, "--host"), Some("127.0.0.1"));
        assert_eq!(value_of(&args, "--port"), Some("41234"));
        assert_eq!(value_of(&args, "--interrupt_requests"), Some("false"));
        assert_eq!(value_of(&args, "--chat_format"), Some("gemma"));
        assert_eq!(
            value_of(&args, "--model_alias"),
            Some("gemma-3-270m-q4_k_m")
        );
        assert_eq!(
            value_of(&args, "--n_gpu_layers"),
            None,
            "no offload on the CPU backend"
        );
    }

    #[test]
    fn gpu_backends_offload_every_layer_and_cpu_ones_do_not() {
        for backend in [Backend::Cuda, Backend::Metal] {
            let args = LlamaCppPythonRunner::server_args(&spec(backend), 1);
            assert_eq!(value_of(&args, "--n_gpu_layers"), Some("-1"), "{backend}");
        }
        let args = LlamaCppPythonRunner::server_args(&spec(Backend::Openblas), 1);
        assert_eq!(value_of(&args, "--n_gpu_layers"), None);
    }

    #[test]
    fn each_backend_builds_with_its_own_cmake_args() {
        let cmake_args = |backend| {
            let env = PythonEnvManager::build_env(backend);
            env.iter()
                .find(|(name, _)| name == "CMAKE_ARGS")
                .map(|(_, value)| value.clone())
        };
        assert_eq!(cmake_args(Backend::Cpu), Backend::Cpu.cmake_args());
        assert!(cmake_args(Backend::Cuda)
            .unwrap()
            .starts_with("-DGGML_CUDA=on"));
        assert!(PythonEnvManager::build_env(Backend::Cuda)
            .contains(&("FORCE_CMAKE".into(), "1".into())));
        assert_eq!(cmake_args(Backend::Metal).unwrap(), "-DGGML_METAL=on");
        assert!(cmake_args(Backend::Openblas)
            .unwrap()
            .starts_with("-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"));
    }

    #[tokio::test]
    async fn a_wheel_is_reused_only_for_the_build_that_made_it() {
        let dir = tempfile::tempdir().unwrap();
        let manager = PythonEnvManager {
            root: dir.path().join("python"),
            wheel_cache: dir.path().join("wheels"),
            base_python: "python3".into(),
        };
        let wheel =
            format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-py3-none-linux_x86_64.whl");
        let cpu = dir.path().join("wheels/cpu");
        // A wheel from before builds were marked (possibly built with AMX): thrown away.
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join(&wheel), "old").unwrap();
        assert!(!has_wheel(&manager.wheel_dir(Backend::Cpu).await.unwrap()));

        // One marked as built by these flags: kept.
        std::fs::write(cpu.join(&wheel), "new").unwrap();
        write_marker(&cpu, &Marker::for_backend(Backend::Cpu)).unwrap();
        assert!(has_wheel(&manager.wheel_dir(Backend::Cpu).await.unwrap()));

        // One marked with other flags: thrown away.
        let mut other = Marker::for_backend(Backend::Cpu);
        other.cmake_args = Some("-DGGML_NATIVE=ON".into());
        write_marker(&cpu, &other).unwrap();
        assert!(!has_wheel(&manager.wheel_dir(Backend::Cpu).await.unwrap()));
    }

    /// Two models of one backend loading at once (or two gateways on one directory)
    /// build its environment once: the second waits, then uses it. Without the lock
    /// both ran `venv` into the same directory and removed it under each other.
    #[cfg(unix)]
    #[tokio::test]
    async fn an_environment_is_built_once_when_asked_for_twice_at_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("venvs-made");
        // A base Python whose `-m venv DIR` takes a second and makes a Python whose
        // `-m pip wheel … -w DIR` leaves a wheel there and `-m pip install` does nothing.
        let python = dir.path().join("python3");
        std::fs::write(
            &python,
            format!(
                r#"#!/bin/sh
echo made >> "{counter}"
sleep 1
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'EOS'
#!/bin/sh
if [ "$3" = wheel ]; then
  while [ "$1" != "-w" ]; do shift; done
  touch "$2/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-py3-none-any.whl"
fi
EOS
chmod +x "$3/bin/python"
"#,
                counter = counter.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        let manager = PythonEnvManager {
            root: dir.path().join("envs"),
            wheel_cache: dir.path().join("wheels"),
            base_python: python,
        };
        let said = std::sync::Mutex::new(Vec::<String>::new());
        let say = |line: &str| said.lock().unwrap().push(line.to_owned());
        let (a, b) = tokio::join!(
            manager.ensure(Backend::Cpu, &say),
            manager.ensure(Backend::Cpu, &say)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.dir, b.dir);
        assert!(a.python().exists());
        let made = std::fs::read_to_string(&counter).unwrap();
        assert_eq!(
            made.lines().count(),
            1,
            "venv ran {} times",
            made.lines().count()
        );
        let said = said.into_inner().unwrap();
        assert!(
            said.iter()
                .any(|l| l.starts_with("Waiting for another llmgate")),
            "{said:?}"
        );
        // Asked again, it is reused as it is.
        assert_eq!(
            manager.ensure(Backend::Cpu, &|_| {}).await.unwrap().dir,
            a.dir
        );
        assert_eq!(
            std::fs::read_to_string(&counter).unwrap().lines().count(),
            1
        );
    }

    #[test]
    fn environments_are_kept_apart_per_backend() {
        let manager = PythonEnvManager {
            root: "/d/python".into(),
            wheel_cache: "/c".into(),
            base_python: "python3".into(),
        };
        assert_ne!(
            manager.env_dir(Backend::Cpu),
            manager.env_dir(Backend::Cuda)
        );
        assert!(manager
            .env_dir(Backend::Cuda)
            .ends_with("llama-cpp-python-cuda"));
    }

    #[tokio::test]
    async fn an_environment_built_for_another_backend_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let manager = PythonEnvManager {
            root: dir.path().join("python"),
            wheel_cache: dir.path().join("wheels"),
            // A Python that cannot make environments: reaching creation fails fast.
            base_python: dir.path().join("no-python"),
        };
        // An environment claiming to be the CPU build sits where the CUDA one belongs.
        let cuda_dir = manager.env_dir(Backend::Cuda);
        std::fs::create_dir_all(cuda_dir.join("bin")).unwrap();
        std::fs::write(cuda_dir.join("bin/python"), "").unwrap();
        let cpu_marker = Marker {
            backend: Backend::Cpu,
            llama_cpp_python: LLAMA_CPP_PYTHON_VERSION.into(),
            cmake_args: None,
        };
        std::fs::write(
            cuda_dir.join(MARKER),
            serde_json::to_vec(&cpu_marker).unwrap(),
        )
        .unwrap();

        let said = std::sync::Mutex::new(Vec::<String>::new());
        let result = manager
            .ensure(Backend::Cuda, &|line| {
                said.lock().unwrap().push(line.to_owned())
            })
            .await;
        assert!(
            matches!(result, Err(RunnerError::Setup { .. })),
            "{result:?}"
        );
        let said = said.into_inner().unwrap().join("\n");
        assert!(
            said.contains("was built for cpu") && said.contains("rebuilding it for cuda"),
            "{said}"
        );
        assert!(
            !cuda_dir.join(MARKER).exists(),
            "the mismatched environment is gone"
        );

        // A matching marker is reused without any set-up.
        std::fs::create_dir_all(cuda_dir.join("bin")).unwrap();
        std::fs::write(cuda_dir.join("bin/python"), "").unwrap();
        let cuda_marker = Marker::for_backend(Backend::Cuda);
        std::fs::write(
            cuda_dir.join(MARKER),
            serde_json::to_vec(&cuda_marker).unwrap(),
        )
        .unwrap();
        let env = manager.ensure(Backend::Cuda, &|_| {}).await.unwrap();
        assert_eq!(
            env,
            PythonEnv {
                dir: cuda_dir,
                backend: Backend::Cuda
            }
        );
    }
}
