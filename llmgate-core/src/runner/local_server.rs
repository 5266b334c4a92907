//! A model server process on a loopback port under a [`Supervisor`]: what the
//! llama-cpp-python and llama-server runners share.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::http::LocalHttp;
use super::process::{Launch, RestartPolicy, Supervisor};
use super::{ModelSpec, RunnerError, RunnerStatus};

#[derive(Debug, Clone)]
pub(crate) struct LocalServer {
    port: Arc<Mutex<Option<u16>>>,
    supervisor: Supervisor,
    http: LocalHttp,
    /// Answers 2xx while the server is up, e.g. `/v1/models`.
    health_path: &'static str,
}

impl LocalServer {
    pub(crate) fn new(name: &str, health_path: &'static str) -> Self {
        Self {
            port: Arc::default(),
            supervisor: Supervisor::new(name),
            http: LocalHttp::default(),
            health_path,
        }
    }

    /// Checks the model file, takes the port, starts the process and waits until it is
    /// ready.
    pub(crate) async fn start(
        &self,
        spec: &ModelSpec,
        launch: impl FnOnce(u16) -> Launch,
        policy: RestartPolicy,
    ) -> Result<(), RunnerError> {
        if !spec.model.is_file() {
            return Err(RunnerError::ModelMissing(spec.model.clone()));
        }
        let port = choose_port(spec.port)?;
        *self.port.lock().unwrap() = Some(port);
        self.supervisor.start(launch(port), policy).await
    }

    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    pub(crate) fn base_url(&self) -> Option<String> {
        self.port
            .lock()
            .unwrap()
            .map(|port| format!("http://127.0.0.1:{port}"))
    }

    pub(crate) fn health_url(&self, port: u16) -> String {
        format!("http://127.0.0.1:{port}{}", self.health_path)
    }

    pub(crate) fn status(&self) -> RunnerStatus {
        self.supervisor.status()
    }

    pub(crate) async fn healthy(&self) -> bool {
        let Some(base) = self.base_url() else {
            return false;
        };
        self.http
            .get_status(
                &format!("{base}{}", self.health_path),
                Duration::from_secs(5),
            )
            .await
            .is_ok_and(|s| s.is_success())
    }

    /// `POST path` with a JSON body on the running server.
    pub(crate) async fn post_json(&self, path: &str, body: &Value) -> Result<Value, RunnerError> {
        let base = self.base_url().ok_or(RunnerError::NotRunning)?;
        self.http
            .post_json(&format!("{base}{path}"), body, Duration::from_secs(30))
            .await
            .map_err(RunnerError::Request)
    }
}

/// A free port on 127.0.0.1 (the OS picks; the listener is closed again at once).
fn free_port() -> Result<u16, RunnerError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| RunnerError::Failed(format!("no free port: {e}")))
}

/// The configured port, checked to be free, or a free one.
pub(crate) fn choose_port(wanted: Option<u16>) -> Result<u16, RunnerError> {
    match wanted {
        Some(port) => match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => Ok(port),
            Err(_) => Err(RunnerError::PortInUse(port)),
        },
        None => free_port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_with_a_clear_error() {
        let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = choose_port(Some(port)).unwrap_err();
        assert!(err.to_string().contains(&format!("port {port}")), "{err}");
        assert_ne!(choose_port(None).unwrap(), 0);
    }
}
