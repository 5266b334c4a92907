//! Starting and stopping the built `llmgate` for the tests in this folder.

#![allow(dead_code)] // each test file uses a part

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `GET url` with `key`, its JSON answer.
pub async fn get_json(url: impl reqwest::IntoUrl, key: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_llmgate");

/// A running `llmgate`.
pub struct Started {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The whole "llmgate listening on …" line.
    pub listening: String,
    /// What it printed on stdout before that line (keys shown once, instructions).
    pub printed: Vec<String>,
}

/// Spawns `command` with stdout piped here and waits up to `within` for it to listen;
/// its stdout is drained from then on so it never blocks on a full pipe.
pub async fn start(mut command: Command, within: Duration) -> Started {
    let mut child = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("llmgate starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let listening = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("llmgate listening on ") {
                return line;
            }
            printed.push(line);
        }
        panic!("llmgate exited before listening: {printed:#?}");
    })
    .await
    .unwrap_or_else(|_| panic!("llmgate listens within {within:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = listening
        .strip_prefix("llmgate listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    Started {
        child,
        url,
        listening,
        printed,
    }
}

/// The first key printed after the line containing `marker`.
pub fn key_after(printed: &[String], marker: &str) -> Option<String> {
    let at = printed.iter().position(|l| l.contains(marker))?;
    printed[at..].iter().find_map(|l| {
        l.trim()
            .strip_prefix("sk-lg-")
            .map(|k| format!("sk-lg-{k}"))
    })
}

/// SIGTERM, then its exit status (within `grace`).
pub async fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    let pid = child.id().unwrap().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(grace, child.wait())
        .await
        .expect("llmgate stops after SIGTERM")
        .unwrap()
}

/// The admin key [`serve_fronting`] starts gateways with.
pub const ADMIN: &str = "sk-lg-testsadminkey00000000000000000000000000";

/// A gateway started by [`serve_fronting`].
pub struct Gateway {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`, for raw sockets.
    pub addr: String,
}

/// `llmgate serve --upstream UPSTREAM` on a free port of 127.0.0.1, with [`ADMIN`] as
/// its admin key and `env` set.
pub async fn serve_fronting(data_dir: &Path, upstream: &str, env: &[(&str, &str)]) -> Gateway {
    let mut command = Command::new(BIN);
    command
        .args([
            "serve",
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("LLMGATE_LOG", "warn")
        .env("LLMGATE_ADMIN_KEY", ADMIN)
        .stderr(Stdio::inherit());
    for (k, v) in env {
        command.env(k, v);
    }
    let started = start(command, Duration::from_secs(30)).await;
    Gateway {
        addr: started.url.trim_start_matches("http://").to_owned(),
        child: started.child,
        url: started.url,
    }
}

/// A user key made over the admin API.
pub struct Key {
    pub secret: String,
    pub id: String,
}

/// Creates the user key `name` on the gateway at `url`, as [`ADMIN`].
pub async fn create_key(url: &str, name: &str) -> Key {
    let created: Value = reqwest::Client::new()
        .post(format!("{url}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Key {
        secret: created["key"].as_str().unwrap().to_owned(),
        id: created["id"].as_str().unwrap().to_owned(),
    }
}

/// What `llmgate usage --json` says of the key `name`, read from the data directory
/// (the gateway stopped); `Value::Null` when the key has no usage.
pub async fn usage_of(data_dir: &Path, name: &str) -> Value {
    let output = Command::new(BIN)
        .args(["usage", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "llmgate usage: {output:?}");
    let usage: Value = serde_json::from_slice(&output.stdout).unwrap();
    usage
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// A fresh database on the test PostgreSQL (LLMGATE_TEST_POSTGRES, else
/// 127.0.0.1:5432, user root, database test), dropped by [`TestDatabase::drop`].
pub struct TestDatabase {
    admin: sqlx::PgPool,
    name: String,
    /// `postgres://user@` of the server's URL.
    user: String,
    /// `host:port` of the server.
    pub server: String,
}

impl TestDatabase {
    /// Creates `llmgate_<prefix>_<random>`.
    pub async fn create(prefix: &str) -> Self {
        let server_url = std::env::var("LLMGATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
        let admin = sqlx::PgPool::connect(&server_url).await.expect(
            "PostgreSQL for the tests (LLMGATE_TEST_POSTGRES or 127.0.0.1:5432, database test)",
        );
        let name = format!("llmgate_{prefix}_{}", rand::random::<u64>());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        let authority = server_url
            .split_once("://")
            .map_or(server_url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap();
        let (user, server) = match authority.rsplit_once('@') {
            Some((user, server)) => (format!("postgres://{user}@"), server.to_owned()),
            None => ("postgres://".to_owned(), authority.to_owned()),
        };
        Self {
            admin,
            name,
            user,
            server,
        }
    }

    /// The database's URL, through `host:port`.
    pub fn url_via(&self, server: &str) -> String {
        format!("{}{server}/{}", self.user, self.name)
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        self.url_via(&self.server)
    }

    /// Drops the database.
    pub async fn drop(self) {
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}

/// A llama-cpp-python environment under `root` (as `--python-env-dir` lays them out,
/// marker included) whose `llama_cpp.server` is the stand-in
/// `tests/fixtures/fake_llama_cpp_server.py`: `llmgate up --python-env-dir ROOT` runs
/// its real set-up and runner code with no build and no model. The stand-in's "model
/// file" says how it behaves (`ok`: answers).
pub fn fake_llama_cpp_env(root: &Path) {
    use llmgate_core::runner::{Backend, LLAMA_CPP_PYTHON_VERSION};
    let env = root.join("llama-cpp-python-cpu");
    let status = std::process::Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&env)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "python3 -m venv");
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
        include_str!("../../../tests/fixtures/fake_llama_cpp_server.py"),
    )
    .unwrap();
    let marker = json!({
        "backend": "cpu",
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "cmake_args": Backend::Cpu.cmake_args(),
    });
    std::fs::write(env.join("llmgate-env.json"), marker.to_string()).unwrap();
}

/// `path` as a TOML basic string, for the config files the tests write.
pub fn toml_string(path: &Path) -> String {
    serde_json::to_string(&path.to_string_lossy()).unwrap()
}
