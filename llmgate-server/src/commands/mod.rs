//! What each subcommand does.

pub mod keys;
pub mod model;
pub mod serve;
pub mod usage;

use std::sync::Arc;

use llmgate_core::config::GatewayConfig;
use llmgate_core::storage::SqliteStore;

/// Opens the data directory's database (creating it on first use).
pub async fn open_store(config: &GatewayConfig) -> Result<Arc<SqliteStore>, String> {
    let path = config.database_path();
    SqliteStore::open(&path)
        .await
        .map(Arc::new)
        .map_err(|e| format!("cannot open the database {}: {e}", path.display()))
}
