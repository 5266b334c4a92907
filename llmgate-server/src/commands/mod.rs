//! What each subcommand does.

pub mod keys;
pub mod model;
pub mod serve;
pub mod usage;

use std::path::PathBuf;
use std::sync::Arc;

use llmgate_core::config::GatewayConfig;
use llmgate_core::storage::{PostgresStore, SqliteStore, Storage, StorageError};

/// How a listing command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for a person.
    Table,
    /// JSON for a program.
    Json,
}

impl Output {
    /// [`Output::Json`] when `--json` was given, else [`Output::Table`].
    pub fn json_if(json_flag: bool) -> Self {
        if json_flag {
            Self::Json
        } else {
            Self::Table
        }
    }
}

/// Why the configured store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// Connecting to PostgreSQL failed.
    #[error(transparent)]
    Postgres(StorageError),
    /// The SQLite file could not be opened or created.
    #[error("cannot open the database {}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why not.
        #[source]
        source: StorageError,
    },
}

/// Opens the configured store: PostgreSQL when `database_url` is set (several gateway
/// replicas can share it), else the data directory's SQLite file (created on first use).
pub async fn open_store(config: &GatewayConfig) -> Result<Arc<dyn Storage>, OpenStoreError> {
    if let Some(url) = &config.database_url {
        return PostgresStore::connect(url)
            .await
            .map(|store| Arc::new(store) as Arc<dyn Storage>)
            .map_err(OpenStoreError::Postgres);
    }
    let path = config.database_path();
    SqliteStore::open(&path)
        .await
        .map(|store| Arc::new(store) as Arc<dyn Storage>)
        .map_err(|source| OpenStoreError::Sqlite { path, source })
}
