//! An OpenAI-compatible server that runs on its own (vLLM, Ollama, a hosted API):
//! llmgate only forwards to it.

use std::time::Duration;

use async_trait::async_trait;

use super::http::LocalHttp;
use super::{ModelRunner, RunnerError, RunnerStatus};

/// A server llmgate does not start or stop.
#[derive(Debug, Clone)]
pub struct ExternalRunner {
    base_url: String,
    http: LocalHttp,
}

impl ExternalRunner {
    /// A runner for the server at `base_url`.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            http: LocalHttp::default(),
        }
    }

    fn models_url(&self) -> String {
        let base = self.base_url.strip_suffix("/v1").unwrap_or(&self.base_url);
        format!("{base}/v1/models")
    }
}

#[async_trait]
impl ModelRunner for ExternalRunner {
    fn kind(&self) -> &'static str {
        "external"
    }

    async fn start(&self) -> Result<(), RunnerError> {
        Ok(())
    }

    fn base_url(&self) -> Option<String> {
        Some(self.base_url.clone())
    }

    fn status(&self) -> RunnerStatus {
        RunnerStatus::Ready
    }

    async fn healthy(&self) -> bool {
        // A hosted API may want a key for /v1/models: any HTTP answer means it is up.
        self.http
            .get_status(&self.models_url(), Duration::from_secs(5))
            .await
            .is_ok()
    }

    fn log_tail(&self, _lines: usize) -> Vec<String> {
        Vec::new()
    }

    async fn stop(&self) {}

    async fn count_tokens(&self, _text: &str) -> Result<u64, RunnerError> {
        Err(RunnerError::Http(
            "an external server offers no tokenizer".into(),
        ))
    }
}
