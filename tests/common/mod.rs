//! Helpers for llmgate's integration tests: a gateway on a real socket in front of the
//! mock upstream, with an admin and a user key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llmgate_core::auth::{KeyCache, KeyRecord, Role, Secret};
use llmgate_core::config::GatewayConfig;
use llmgate_core::storage::{KeyStore, SqliteStore};
pub use llmgate_core::test_util::{MockUpstream, SeenRequest};
use llmgate_core::usage::{RecorderOptions, UsageRecorder, UsageWriter};
use llmgate_server::app::{app, AppState};
use llmgate_server::http::ConnectionLimits;
use llmgate_server::metrics::Metrics;
use llmgate_server::models::{Progress, Registry};
use serde_json::Value;

/// Options for [`Gateway::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Upstream URL (default: the mock's).
    pub upstream: Option<String>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Upstream timeout.
    pub timeout: Duration,
    /// Where the model manager finds Python environments.
    pub python_env_dir: Option<PathBuf>,
    /// Served on this many event loops by `http::serve_on_loops`, as `llmgate serve`
    /// serves; by default on the test's runtime by `http::serve`.
    pub loops: Option<usize>,
    /// `[[models]]`, besides the mock upstream (named `upstream`).
    pub models: Vec<llmgate_core::config::ModelConfig>,
    /// `memory_limit_mb`.
    pub memory_limit_mb: Option<u64>,
    /// `max_loaded_models`.
    pub max_loaded_models: Option<u32>,
    /// The `llama-server` binary (a stand-in, in tests).
    pub llama_server: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            upstream: None,
            max_body_bytes: llmgate_core::config::DEFAULT_MAX_BODY_BYTES as usize,
            timeout: Duration::from_secs(30),
            python_env_dir: None,
            loops: None,
            models: Vec::new(),
            memory_limit_mb: None,
            max_loaded_models: None,
            llama_server: None,
        }
    }
}

/// A running gateway with a SQLite store in a temporary directory.
#[derive(Debug)]
pub struct Gateway {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// An admin key.
    pub admin: Secret,
    /// A user key named "alice".
    pub alice: Secret,
    /// Alice's key id.
    pub alice_id: String,
    /// The store.
    pub store: Arc<SqliteStore>,
    /// The mock upstream.
    pub upstream: MockUpstream,
    /// An HTTP client.
    pub http: reqwest::Client,
    writer: Option<UsageWriter>,
    server: tokio::task::JoinHandle<()>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
    /// The database file.
    pub db_path: PathBuf,
}

impl Gateway {
    /// A gateway with default options in front of a fresh mock.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// A gateway with the given options.
    pub async fn start_with(options: Options) -> Self {
        let upstream = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("llmgate.db");
        let store = Arc::new(SqliteStore::open(&db_path).await.unwrap());
        let admin = add_key(store.as_ref(), "root", Role::Admin).await.0;
        let (alice, alice_id) = add_key(store.as_ref(), "alice", Role::User).await;

        let upstream_url = options
            .upstream
            .clone()
            .unwrap_or_else(|| upstream.url.clone());
        let gateway_config = GatewayConfig {
            upstream: Some(upstream_url.clone()),
            upstream_timeout_secs: options.timeout.as_secs().max(1),
            python_env_dir: options.python_env_dir.clone(),
            model_ready_timeout_secs: 20,
            models: options.models.clone(),
            memory_limit_mb: options.memory_limit_mb,
            max_loaded_models: options.max_loaded_models,
            llama_server: options.llama_server.clone(),
            data_dir: dir.path().to_owned(),
            ..GatewayConfig::default()
        };
        let models = Registry::new(gateway_config, Progress::ConsoleOnly);
        models.restore(store.clone()).await.unwrap();
        models.start();
        let metrics = Arc::new(Metrics::default());
        let gauges = models.clone();
        metrics.set_model_gauges(Arc::new(move || gauges.gauges()));
        models.set_events(metrics.clone());
        let recording = RecorderOptions {
            counter: None,
            observer: Some(metrics.clone()),
            ..RecorderOptions::default()
        };
        let (recorder, writer) = UsageRecorder::start_with(store.clone(), recording);
        let state = AppState::new(
            KeyCache::new(store.clone()),
            store.clone(),
            recorder,
            metrics,
            models,
        )
        .unwrap();
        let router = app(state, options.max_body_bytes);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (shutdown, shutdown_asked) = tokio::sync::oneshot::channel::<()>();
        let shutdown_asked = async move {
            let _ = shutdown_asked.await;
        };
        let server = match options.loops {
            None => tokio::spawn(llmgate_server::http::serve(
                listener,
                router,
                shutdown_asked,
            )),
            Some(loops) => tokio::spawn(async move {
                llmgate_server::http::serve_on_loops(
                    listener,
                    router,
                    loops,
                    ConnectionLimits::default(),
                    shutdown_asked,
                )
                .await
                .expect("the serving loops start");
            }),
        };
        Self {
            url: format!("http://{addr}"),
            admin,
            alice,
            alice_id,
            store,
            upstream,
            http: reqwest::Client::new(),
            writer: Some(writer),
            server,
            shutdown: Some(shutdown),
            _dir: dir,
            db_path,
        }
    }

    /// Stops accepting, lets the requests in flight finish (as on SIGTERM), then
    /// writes all queued usage.
    pub async fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.server)
            .await
            .expect("the server stops once its requests are done")
            .expect("the server task ends without a panic");
        if let Some(writer) = self.writer.take() {
            writer.shutdown().await;
        }
    }

    /// Stops the server and writes all queued usage.
    pub async fn stop(&mut self) {
        self.server.abort();
        if let Some(writer) = self.writer.take() {
            writer.shutdown().await;
        }
    }

    /// A POST with a bearer key and a JSON body.
    pub fn post(&self, path: &str, key: &Secret, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key.expose())
            .json(body)
    }

    /// A GET with a bearer key.
    pub fn get(&self, path: &str, key: &Secret) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key.expose())
    }

    /// A GET with a bearer key; its JSON answer, whatever the status.
    pub async fn get_json(&self, path: &str, key: &Secret) -> Value {
        self.get(path, key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A POST with a bearer key and a JSON body; its JSON answer, whatever the status.
    pub async fn post_json(&self, path: &str, key: &Secret, body: &Value) -> Value {
        self.post(path, key, body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A GET whose answer is read to the end and dropped.
    pub async fn get_drained(&self, path: &str, key: &Secret) {
        self.get(path, key)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }

    /// A POST whose answer is read to the end and dropped.
    pub async fn post_drained(&self, path: &str, key: &Secret, body: &Value) {
        self.post(path, key, body)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }

    /// `GET /admin/usage/{key_id}` as JSON.
    pub async fn usage_of(&self, key_id: &str) -> Value {
        let response = self
            .get(&format!("/admin/usage/{key_id}"), &self.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `GET /admin/usage/{key_id}/requests` as JSON: the key's rows, newest first.
    pub async fn requests_of(&self, key_id: &str) -> Value {
        self.get_json(&format!("/admin/usage/{key_id}/requests"), &self.admin)
            .await
    }

    /// Waits until a key's request count reaches `n` (records settle as bodies end).
    pub async fn wait_for_requests(&self, key_id: &str, n: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let usage = self.usage_of(key_id).await;
            if usage["requests"].as_u64() == Some(n) {
                return usage;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "usage never reached {n} requests: {usage}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Adds a key to a store; returns its secret and id.
pub async fn add_key(store: &dyn KeyStore, name: &str, role: Role) -> (Secret, String) {
    let secret = Secret::generate();
    let record = KeyRecord::new(name, role, &secret);
    store.insert_key(&record, &secret.hash()).await.unwrap();
    (secret, record.id)
}

/// The body of an OpenAI-shaped error, checked for shape.
pub async fn openai_error(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.expect("error body is JSON");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    body
}

/// A ready llama-cpp-python environment for the CPU backend under `root` (as llmgate
/// lays them out, marker included) whose `llama_cpp.server` is a stand-in
/// (`tests/fixtures/fake_llama_cpp_server.py`): the real runner code runs, without a
/// model.
pub fn fake_llama_cpp_env(root: &std::path::Path) -> llmgate_core::runner::PythonEnv {
    use llmgate_core::runner::{Backend, PythonEnv, LLAMA_CPP_PYTHON_VERSION};
    let env = root.join("llama-cpp-python-cpu");
    let status = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&env)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let site = std::fs::read_dir(env.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages/llama_cpp/server");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("../__init__.py"), "").unwrap();
    std::fs::write(site.join("__init__.py"), "").unwrap();
    std::fs::write(
        site.join("__main__.py"),
        include_str!("../fixtures/fake_llama_cpp_server.py"),
    )
    .unwrap();
    let marker = serde_json::json!({
        "backend": "cpu",
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "cmake_args": Backend::Cpu.cmake_args(),
    });
    std::fs::write(env.join("llmgate-env.json"), marker.to_string()).unwrap();
    PythonEnv {
        dir: env,
        backend: Backend::Cpu,
    }
}
