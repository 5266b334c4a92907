//! Models from the Hugging Face Hub: `llmgate pull OWNER/NAME[:FILE.gguf]`.
//!
//! - [`ModelSource`] reads what the user typed: a local `.gguf` path or a repository.
//! - [`HubSettings`] come from the standard variables (`HF_ENDPOINT`, `HF_HOME`,
//!   `HF_TOKEN`, `HF_HUB_OFFLINE`), so llmgate shares the cache and login of the Python
//!   tools.
//! - [`HubClient::fetch_gguf`] finds the file in the cache or downloads it with
//!   [hf-hub](https://docs.rs/hf-hub/0.4), picking one with [`pick_gguf`] when none is
//!   named, reporting [`DownloadProgress`] as bytes arrive, and resuming a download
//!   that broke.
//!
//! We use hf-hub 0.4 rather than 1.x: 0.4 resumes interrupted downloads (1.0 restarts
//! plain HTTP downloads from zero) and needs neither the xet stack nor a second
//! `reqwest`.
//!
//! ```no_run
//! use llmgate_core::hub::{HubClient, HubSettings, ModelSource};
//!
//! # async fn pull() -> Result<(), llmgate_core::hub::HubError> {
//! let source: ModelSource = "Qwen/Qwen2.5-0.5B-Instruct-GGUF".parse()?;
//! let ModelSource::Hub { repo, file } = source else { return Ok(()) };
//! let client = HubClient::new(HubSettings::from_env())?;
//! let fetched = client
//!     .fetch_gguf(&repo, file.as_deref(), &|p| {
//!         if let Some(total) = p.total {
//!             eprint!("\r{} {}%", p.file, p.downloaded * 100 / total.max(1));
//!         }
//!     })
//!     .await?;
//! println!("{} is at {}", fetched.file, fetched.path.display());
//! # Ok(()) }
//! ```

mod client;
mod error;
mod pick;
mod settings;
mod source;

#[cfg(any(test, feature = "test-util"))]
pub mod mock;

pub use client::{DownloadProgress, Fetched, HubClient};
pub use error::HubError;
pub use pick::pick_gguf;
pub use settings::{HubSettings, DEFAULT_CHUNK_SIZE, DEFAULT_ENDPOINT};
pub use source::ModelSource;
