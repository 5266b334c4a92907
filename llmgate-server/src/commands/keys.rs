//! `llmgate keys …`: works on the data directory directly, server running or not.

use llmgate_core::auth::{now_millis, KeyRecord, Role, Secret};
use llmgate_core::storage::KeyStore;
use serde_json::json;

use crate::cli::KeysCommand;
use crate::routes::keys::validate_name;

/// Runs a `keys` subcommand.
pub async fn run(store: &dyn KeyStore, command: KeysCommand) -> Result<(), String> {
    match command {
        KeysCommand::Create { name, admin, json } => create(store, name, admin, json).await,
        KeysCommand::List { json } => list(store, json).await,
        KeysCommand::Revoke { key } => revoke(store, &key).await,
    }
}

async fn create(
    store: &dyn KeyStore,
    name: String,
    admin: bool,
    as_json: bool,
) -> Result<(), String> {
    validate_name(&name).map_err(|e| e.message.to_string())?;
    let role = if admin { Role::Admin } else { Role::User };
    let secret = Secret::generate();
    let record = KeyRecord::new(name, role, &secret);
    store
        .insert_key(&record, &secret.hash())
        .await
        .map_err(|e| e.to_string())?;
    if as_json {
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

async fn list(store: &dyn KeyStore, as_json: bool) -> Result<(), String> {
    let keys = store.list_keys().await.map_err(|e| e.to_string())?;
    if as_json {
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

async fn revoke(store: &dyn KeyStore, id_or_name: &str) -> Result<(), String> {
    let keys = store.list_keys().await.map_err(|e| e.to_string())?;
    let key = keys
        .iter()
        .find(|k| k.id == id_or_name && k.revoked_at.is_none())
        .or_else(|| {
            keys.iter()
                .find(|k| k.name == id_or_name && k.revoked_at.is_none())
        })
        .ok_or_else(|| {
            format!("no active key with id or name '{id_or_name}' (see 'llmgate keys list')")
        })?;
    store
        .revoke_key(&key.id, now_millis())
        .await
        .map_err(|e| e.to_string())?;
    println!("Revoked key '{}' ({}).", key.name, key.id);
    Ok(())
}
