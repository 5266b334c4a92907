//! What each subcommand does.

pub mod keys;
pub mod model;
pub mod serve;
pub mod usage;

use std::sync::Arc;

use llmgate_core::config::GatewayConfig;
use llmgate_core::storage::{PostgresStore, SqliteStore, Storage};

/// Opens the configured store: PostgreSQL when `database_url` is set (several gateway
/// replicas can share it), else the data directory's SQLite file (created on first use).
pub async fn open_store(config: &GatewayConfig) -> Result<Arc<dyn Storage>, String> {
    if let Some(url) = &config.database_url {
        return PostgresStore::connect(url)
            .await
            .map(|store| Arc::new(store) as Arc<dyn Storage>)
            .map_err(|e| e.to_string());
    }
    let path = config.database_path();
    SqliteStore::open(&path)
        .await
        .map(|store| Arc::new(store) as Arc<dyn Storage>)
        .map_err(|e| format!("cannot open the database {}: {e}", path.display()))
}
