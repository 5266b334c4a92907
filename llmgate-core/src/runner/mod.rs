//! Model servers whose life the gateway manages.
//!
//! A [`ModelRunner`] starts a model server for a [`ModelSpec`], reports its base URL,
//! health and [`RunnerStatus`], keeps a tail of its log, stops it, and counts tokens
//! with the model's own tokenizer (for streams whose server reports no usage).
//!
//! Runners, one file each:
//! - [`LlamaCppPythonRunner`]: `python -m llama_cpp.server` in a virtual environment
//!   llmgate manages, for the `cpu`, `cuda`, `metal` and `openblas` backends;
//! - [`LlamaServerRunner`]: llama.cpp's `llama-server` binary;
//! - [`ExternalRunner`]: an OpenAI-compatible server that is already running.
//!
//! Processes are supervised by [`process::Supervisor`]: readiness with a timeout,
//! captured output, restarts with backoff, and SIGTERM-then-SIGKILL on stop.
//!
//! [`gguf`] reads a model file's header to estimate, before a start, how much memory
//! the server will take for it.

#[cfg(feature = "runner")]
mod chat_template;
#[cfg(feature = "runner")]
mod default_model;
#[cfg(feature = "runner")]
mod external;
#[cfg(feature = "runner")]
pub mod gguf;
#[cfg(feature = "runner")]
mod http;
#[cfg(feature = "runner")]
mod llama_cpp_python;
#[cfg(feature = "runner")]
mod llama_server;
#[cfg(feature = "runner")]
mod local_server;
#[cfg(feature = "runner")]
pub mod process;
#[cfg(feature = "runner")]
mod setup_lock;
#[cfg(feature = "runner")]
mod token_counter;

use std::fmt;
#[cfg(feature = "runner")]
use std::path::PathBuf;
#[cfg(feature = "runner")]
use std::time::Duration;

#[cfg(feature = "runner")]
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[cfg(feature = "runner")]
pub use chat_template::format_chat_prompt;
#[cfg(feature = "runner")]
pub use default_model::{
    builtin_model, BuiltinModel, PypiSource, BUILTIN_MODELS, DEFAULT_MODEL, GEMMA_3_270M,
};
#[cfg(feature = "runner")]
pub use external::ExternalRunner;
#[cfg(feature = "runner")]
pub use http::LocalHttpError;
#[cfg(feature = "runner")]
pub use llama_cpp_python::{
    LlamaCppPythonRunner, PythonEnv, PythonEnvManager, LLAMA_CPP_PYTHON_VERSION,
};
#[cfg(feature = "runner")]
pub use llama_server::LlamaServerRunner;
#[cfg(feature = "runner")]
pub use process::RunnerStatus;
#[cfg(feature = "runner")]
pub use token_counter::RunnerTokenCounter;

#[cfg(feature = "runner")]
/// Why a runner could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// Setting up the runtime (virtual environment, packages) failed.
    #[error("setting up {what} failed: {reason}")]
    Setup {
        /// What was being set up.
        what: String,
        /// What went wrong, with what to do about it.
        reason: String,
        /// The system error behind it, when there is one (a program that would not
        /// start, a directory that could not be made).
        #[source]
        source: Option<std::io::Error>,
    },
    /// The model file does not exist.
    #[error("model file {0} does not exist")]
    ModelMissing(PathBuf),
    /// The requested port is taken.
    #[error("port {0} on 127.0.0.1 is already in use; choose another one or leave it unset")]
    PortInUse(u16),
    /// The server did not become ready, or crashed too often.
    #[error("the model server failed: {0}")]
    Failed(String),
    /// The operation needs a running server.
    #[error("the model server is not running")]
    NotRunning,
    /// The model server cannot do what was asked, or answered nonsense.
    #[error("model server request failed: {0}")]
    Http(String),
    /// A request to the model server got no usable answer.
    #[error("model server request failed: {0}")]
    Request(#[from] LocalHttpError),
}

/// How long a model server has to get ready by default: a first load reads the whole
/// model from a cold disk (and a CUDA build may compile kernels), which takes minutes
/// for a large model. Compiled without the `runner` feature too, as the settings' default.
pub const DEFAULT_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The compute backend llama.cpp is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Plain CPU.
    #[default]
    Cpu,
    /// NVIDIA GPUs (needs the CUDA toolkit to build).
    Cuda,
    /// Apple GPUs.
    Metal,
    /// CPU with OpenBLAS for prompt processing.
    Openblas,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 4] = [
        Backend::Cpu,
        Backend::Cuda,
        Backend::Metal,
        Backend::Openblas,
    ];

    /// `cpu`, `cuda`, `metal` or `openblas`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Metal => "metal",
            Backend::Openblas => "openblas",
        }
    }

    /// `CMAKE_ARGS` that build llama.cpp for this backend.
    ///
    /// On x86-64, llama.cpp is built for the machine it runs on (`-march=native`) but
    /// without AMX: llama-cpp-python 0.3.36's native AMX kernels die with SIGILL on the
    /// first token on CPUs that report AMX (Sapphire Rapids and later Xeons, seen in a
    /// VM), even with the tile permission granted.
    pub fn cmake_args(self) -> Option<String> {
        const NO_AMX: &str = "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
             -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'";
        let backend = match self {
            Backend::Cpu => None,
            Backend::Cuda => Some("-DGGML_CUDA=on"),
            // Apple's GPUs: no x86 flags.
            Backend::Metal => return Some("-DGGML_METAL=on".to_owned()),
            Backend::Openblas => Some("-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"),
        };
        let no_amx = cfg!(target_arch = "x86_64").then_some(NO_AMX);
        let args: Vec<&str> = backend.into_iter().chain(no_amx).collect();
        (!args.is_empty()).then(|| args.join(" "))
    }

    /// Whether layers are offloaded to a GPU.
    pub fn offloads_to_gpu(self) -> bool {
        matches!(self, Backend::Cuda | Backend::Metal)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown backend '{s}': expected cpu, cuda, metal or openblas"))
    }
}

#[cfg(feature = "runner")]
/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The GGUF file.
    pub model: PathBuf,
    /// The name clients see in `/v1/models` (default: the file name without `.gguf`).
    pub alias: Option<String>,
    /// llama-cpp-python's `--chat_format` (e.g. `gemma`, `chatml`); `None` lets the
    /// server guess from the GGUF metadata.
    pub chat_format: Option<String>,
    /// Context length; `None` for the server's default.
    pub n_ctx: Option<u32>,
    /// The backend.
    pub backend: Backend,
    /// A fixed port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// How long to wait for the server to answer.
    pub ready_timeout: Duration,
    /// Layers offloaded to the GPU (`-1`: all); `None`: all on a GPU backend, none on
    /// the CPU.
    pub gpu_layers: Option<i32>,
    /// More arguments for the server, after llmgate's own.
    pub extra_args: Vec<String>,
}

#[cfg(feature = "runner")]
impl ModelSpec {
    /// A spec for a model file with defaults: CPU, a free port,
    /// [`DEFAULT_READY_TIMEOUT`] to get ready, and the chat format guessed from the file name
    /// ([`default_chat_format`]).
    pub fn new(model: impl Into<PathBuf>) -> Self {
        let model = model.into();
        Self {
            chat_format: default_chat_format(&model),
            model,
            alias: None,
            n_ctx: None,
            backend: Backend::Cpu,
            port: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            gpu_layers: None,
            extra_args: Vec::new(),
        }
    }

    /// The model name clients see.
    pub fn alias(&self) -> String {
        self.alias.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
        })
    }
}

#[cfg(feature = "runner")]
/// The chat format to use when none is configured, from the file name:
/// - Gemma GGUFs need `gemma`: with the template llama-cpp-python 0.3.x guesses from
///   their metadata, chat requests come back empty.
/// - SmolLM and SmolLM2 (the default model) get `chatml`, the format they were trained
///   on, which [`format_chat_prompt`] rebuilds exactly (so streamed usage is exact).
///   SmolLM2's own GGUF template adds a stock system prompt when none is given; with it
///   SmolLM2 135M Instruct (Q4_1, llama-cpp-python 0.3.36, temperature 0) answers "What
///   is the capital of France?" with a list of French words, with `chatml` "The capital
///   of France is Paris." SmolLM3 has a template of its own and is left to the server.
/// - Other models: let the server decide.
pub fn default_chat_format(model: &std::path::Path) -> Option<String> {
    let name = model.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.contains("gemma") {
        Some("gemma".to_owned())
    } else if name.contains("smollm2") || name.contains("smollm-") {
        Some("chatml".to_owned())
    } else {
        None
    }
}

#[cfg(feature = "runner")]
/// A model server the gateway starts, watches and stops.
#[async_trait]
pub trait ModelRunner: Send + Sync {
    /// The runner's kind, e.g. `llama-cpp-python`.
    fn kind(&self) -> &'static str;
    /// Starts the server; returns once it answers (or fails).
    async fn start(&self) -> Result<(), RunnerError>;
    /// Where the OpenAI-compatible API is, e.g. `http://127.0.0.1:41234`.
    fn base_url(&self) -> Option<String>;
    /// The current state.
    fn status(&self) -> RunnerStatus;
    /// Whether the server answers right now.
    async fn healthy(&self) -> bool;
    /// The last `lines` lines of the server's output.
    fn log_tail(&self, lines: usize) -> Vec<String>;
    /// Stops the server (SIGTERM, then SIGKILL after a grace period).
    async fn stop(&self);
    /// Tokens in `text` by the model's tokenizer, including any BOS token the server
    /// adds to a prompt.
    async fn count_tokens(&self, text: &str) -> Result<u64, RunnerError>;
    /// The chat format prompts are built with, for counting prompt tokens.
    fn chat_format(&self) -> Option<String> {
        None
    }

    /// The server's process id, when llmgate runs it.
    fn pid(&self) -> Option<u32> {
        None
    }
}

#[cfg(feature = "runner")]
impl fmt::Debug for dyn ModelRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelRunner({}, {:?})", self.kind(), self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_and_know_their_build_flags() {
        assert_eq!("CUDA".parse::<Backend>().unwrap(), Backend::Cuda);
        assert!("rocm"
            .parse::<Backend>()
            .unwrap_err()
            .contains("cpu, cuda, metal or openblas"));
        let args = |b: Backend| b.cmake_args().unwrap_or_default();
        assert!(args(Backend::Cuda).starts_with("-DGGML_CUDA=on"));
        assert_eq!(args(Backend::Metal), "-DGGML_METAL=on");
        assert!(args(Backend::Openblas).starts_with("-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"));
        for backend in [Backend::Cpu, Backend::Cuda, Backend::Openblas] {
            // Each flag is one word for CMake once the shell-style quotes are read.
            let amx_off = args(backend)
                .contains("-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'");
            assert_eq!(amx_off, cfg!(target_arch = "x86_64"), "{backend}");
        }
        assert!(Backend::Cuda.offloads_to_gpu() && Backend::Metal.offloads_to_gpu());
        assert!(!Backend::Cpu.offloads_to_gpu() && !Backend::Openblas.offloads_to_gpu());
    }

    #[cfg(feature = "runner")]
    #[test]
    fn gemma_models_get_the_gemma_chat_format() {
        let spec = ModelSpec::new("/m/gemma-3-270m-q4_k_m.gguf");
        assert_eq!(spec.chat_format.as_deref(), Some("gemma"));
        assert_eq!(spec.alias(), "gemma-3-270m-q4_k_m");
        assert_eq!(ModelSpec::new("/m/qwen2.5-0.5b.gguf").chat_format, None);
    }

    #[cfg(feature = "runner")]
    #[test]
    fn smollm_models_get_chatml_but_smollm3_is_left_to_the_server() {
        let format = |file: &str| ModelSpec::new(file).chat_format;
        for file in [
            "/m/SmolLM2-135M-Instruct.Q4_1.gguf",
            "/m/smollm2-360m-instruct-q8_0.gguf",
            "/m/SmolLM-135M-Instruct.Q4_K_M.gguf",
        ] {
            assert_eq!(format(file).as_deref(), Some("chatml"), "{file}");
        }
        assert_eq!(format("/m/SmolLM3-3B-Q4_K_M.gguf"), None);
    }

    #[cfg(feature = "runner")]
    #[test]
    fn a_spec_waits_as_long_for_its_model_as_the_gateway_does() {
        let gateway = crate::config::GatewayConfig::default();
        assert_eq!(
            ModelSpec::new("/m/a.gguf").ready_timeout,
            Duration::from_secs(gateway.model_ready_timeout_secs)
        );
    }
}
