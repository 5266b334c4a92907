//! llama.cpp's own `llama-server` binary.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde_json::json;

use super::local_server::LocalServer;
use super::process::{Launch, RestartPolicy};
use super::{ModelRunner, ModelSpec, RunnerError, RunnerStatus};

/// `llama-server` for one model, supervised.
#[derive(Debug, Clone)]
pub struct LlamaServerRunner {
    binary: PathBuf,
    spec: ModelSpec,
    server: LocalServer,
}

impl LlamaServerRunner {
    /// A runner using `binary`.
    pub fn new(binary: impl Into<PathBuf>, spec: ModelSpec) -> Self {
        Self {
            binary: binary.into(),
            spec,
            server: LocalServer::new("llama-server", "/health"),
        }
    }

    /// `llama-server` from `PATH`, if there is one.
    pub fn find_on_path() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("llama-server"))
            .find(|candidate| is_executable(candidate))
    }

    /// The server's arguments.
    pub fn server_args(spec: &ModelSpec, port: u16) -> Vec<String> {
        let mut args = vec![
            "--model".to_owned(),
            spec.model.to_string_lossy().into_owned(),
            "--alias".to_owned(),
            spec.alias(),
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--port".to_owned(),
            port.to_string(),
        ];
        match spec.gpu_layers {
            Some(layers) => {
                let layers = if layers < 0 { 999 } else { layers };
                args.extend(["--n-gpu-layers".to_owned(), layers.to_string()]);
            }
            None if spec.backend.offloads_to_gpu() => {
                args.extend(["--n-gpu-layers".to_owned(), "999".to_owned()]);
            }
            None => {}
        }
        if let Some(n_ctx) = spec.n_ctx {
            args.extend(["--ctx-size".to_owned(), n_ctx.to_string()]);
        }
        args.extend(spec.extra_args.iter().cloned());
        args
    }
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    path.is_file()
}

#[async_trait]
impl ModelRunner for LlamaServerRunner {
    fn kind(&self) -> &'static str {
        "llama-server"
    }

    async fn start(&self) -> Result<(), RunnerError> {
        let launch = |port| Launch {
            program: self.binary.clone(),
            args: Self::server_args(&self.spec, port),
            env: vec![],
            ready_url: self.server.health_url(port),
            ready_timeout: self.spec.ready_timeout,
        };
        self.server
            .start(&self.spec, launch, RestartPolicy::default())
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
        self.server.supervisor().log_tail(lines)
    }

    async fn stop(&self) {
        self.server.supervisor().stop().await;
    }

    fn pid(&self) -> Option<u32> {
        self.server.supervisor().pid()
    }

    async fn count_tokens(&self, text: &str) -> Result<u64, RunnerError> {
        // llama-server's /tokenize adds no BOS by default; a prompt gets one.
        let answer = self
            .server
            .post_json("/tokenize", &json!({"content": text, "add_special": true}))
            .await?;
        answer["tokens"]
            .as_array()
            .map(|t| t.len() as u64)
            .ok_or_else(|| RunnerError::Http(format!("unexpected tokenize answer: {answer}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Backend;

    #[test]
    fn offloads_on_gpu_backends_and_binds_loopback() {
        let spec = ModelSpec {
            backend: Backend::Cuda,
            ..ModelSpec::new("/m/x.gguf")
        };
        let args = LlamaServerRunner::server_args(&spec, 9000);
        let joined = args.join(" ");
        assert!(joined.contains("--host 127.0.0.1 --port 9000"), "{joined}");
        assert!(joined.contains("--n-gpu-layers 999"), "{joined}");
        let cpu = LlamaServerRunner::server_args(&ModelSpec::new("/m/x.gguf"), 9000).join(" ");
        assert!(!cpu.contains("--n-gpu-layers"), "{cpu}");
    }
}
