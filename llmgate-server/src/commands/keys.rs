//! `llmgate keys …`: works on the data directory directly, server running or not.

use llmgate_core::auth::{now_millis, KeyRecord, Role, Secret};
use llmgate_core::storage::{KeyStore, StorageError};
use serde_json::json;

use super::Output;
use crate::cli::KeysCommand;
use crate::routes::keys::validate_name;

/// Why a `keys` subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The new key's name is not allowed; the message says which names are.
    #[error("{0}")]
    BadName(String),
    /// No active key has that id or name.
    #[error("no active key with id or name '{0}' (see 'llmgate keys list')")]
    NoSuchKey(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StorageError),
}

/// Runs a `keys` subcommand.
pub async fn run(store: &dyn KeyStore, command: KeysCommand) -> Result<(), KeysError> {
    match command {
        KeysCommand::Create { name, admin, json } => {
            let role = if admin { Role::Admin } else { Role::User };
            create(store, name, role, Output::json_if(json)).await
        }
        KeysCommand::List { json } => list(store, Output::json_if(json)).await,
        KeysCommand::Revoke { key } => revoke(store, &key).await,
    }
}

async fn create(
    store: &dyn KeyStore,
    name: String,
    role: Role,
    output: Output,
) -> Result<(), KeysError> {
    validate_name(&name).map_err(|e| KeysError::BadName(e.message.to_string()))?;
    let secret = Secret::generate();
    let record = KeyRecord::new(name, role, &secret);
    store.insert_key(&record, &secret.hash()).await?;
    if output == Output::Json {
        let out = json!({"id": record.id, "name": record.name, "role": role, "prefix": record.prefix, "key": secret.expose()});
        println!("{out}");
    } else {
        eprintln!(
            "Created {} key '{}' ({}). Its secret, shown only this once:",
            role.as_str(),
            record.name,
            record.id
        );
        println!("{}", secret.expose());
    }
    Ok(())
}

async fn list(store: &dyn KeyStore, output: Output) -> Result<(), KeysError> {
    let keys = store.list_keys().await?;
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&keys).expect("keys serialize")
        );
        return Ok(());
    }
    println!(
        "{:<22} {:<20} {:<6} {:<11} {:<17} STATUS",
        "ID", "NAME", "ROLE", "PREFIX", "CREATED"
    );
    for key in keys {
        let status = match key.revoked_at {
            Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
            None if !key.is_active(now_millis()) => "expired".to_owned(),
            None => "active".to_owned(),
        };
        println!(
            "{:<22} {:<20} {:<6} {:<11} {:<17} {status}",
            key.id,
            key.name,
            key.role.as_str(),
            format!("{}…", key.prefix),
            key.created_at.format("%Y-%m-%d %H:%M"),
        );
    }
    Ok(())
}

async fn revoke(store: &dyn KeyStore, id_or_name: &str) -> Result<(), KeysError> {
    let keys = store.list_keys().await?;
    let key = keys
        .iter()
        .find(|k| k.id == id_or_name && k.revoked_at.is_none())
        .or_else(|| {
            keys.iter()
                .find(|k| k.name == id_or_name && k.revoked_at.is_none())
        })
        .ok_or_else(|| KeysError::NoSuchKey(id_or_name.to_owned()))?;
    store.revoke_key(&key.id, now_millis()).await?;
    println!("Revoked key '{}' ({}).", key.name, key.id);
    Ok(())
}
