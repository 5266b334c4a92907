//! `llmgate keys …`: works on the data directory directly, server running or not.

use chrono::{DateTime, Duration, Utc};
use llmgate_core::auth::{now_millis, KeyRecord, Role, Secret};
use llmgate_core::limits::KeyLimits;
use llmgate_core::storage::{KeyStore, KeyUpdate, LimitField, LimitsPatch, StorageError};
use serde_json::json;

use super::Output;
use crate::cli::{ClearField, KeysCommand, LimitArgs};
use crate::routes::keys::{validate_name, MAX_ROTATION_GRACE_SECS};

/// Why a `keys` subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The new key's name is not allowed; the message says which names are.
    #[error("{0}")]
    BadName(String),
    /// A limit, the expiry or the grace is not allowed; the message says why.
    #[error("{0}")]
    BadValue(String),
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
        KeysCommand::Create {
            name,
            admin,
            limits,
            json,
        } => {
            let role = if admin { Role::Admin } else { Role::User };
            create(store, name, role, &limits, Output::json_if(json)).await
        }
        KeysCommand::List { json } => list(store, Output::json_if(json)).await,
        KeysCommand::Revoke { key } => revoke(store, &key).await,
        KeysCommand::Update {
            key,
            name,
            limits,
            clear,
            json,
        } => {
            let clear = clear
                .into_iter()
                .map(|given| {
                    given.map_err(|bad| {
                        KeysError::BadValue(format!("--clear {}: {}", bad.value, bad.reason))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            update(store, &key, name, &limits, &clear, Output::json_if(json)).await
        }
        KeysCommand::Rotate { key, grace, json } => {
            rotate(store, &key, grace, Output::json_if(json)).await
        }
    }
}

/// The limits the flags set (the others unset).
fn flag_limits(flags: &LimitArgs) -> KeyLimits {
    let mut limits = KeyLimits::default();
    fn set<T>(own: &mut Option<T>, flag: Option<T>) {
        if flag.is_some() {
            *own = flag;
        }
    }
    set(&mut limits.rpm, flags.rpm);
    set(&mut limits.tpm, flags.tpm);
    if let Some(models) = &flags.models {
        limits.models = Some(
            models
                .iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
        );
    }
    set(&mut limits.max_parallel, flags.max_parallel);
    set(&mut limits.quota_tokens, flags.quota);
    if flags.quota_period.is_some() {
        limits.quota_period = flags.quota_period;
    }
    set(&mut limits.weight, flags.weight);
    set(&mut limits.per_user_rpm, flags.per_user_rpm);
    set(&mut limits.per_user_quota_tokens, flags.per_user_quota);
    limits
}

/// The limit `--clear FIELD` unsets; `None` for `expires`, which is no limit.
fn limit_field(field: ClearField) -> Option<LimitField> {
    Some(match field {
        ClearField::Rpm => LimitField::Rpm,
        ClearField::Tpm => LimitField::Tpm,
        ClearField::Models => LimitField::Models,
        ClearField::MaxParallel => LimitField::MaxParallel,
        ClearField::Quota => LimitField::QuotaTokens,
        ClearField::QuotaPeriod => LimitField::QuotaPeriod,
        ClearField::Weight => LimitField::Weight,
        ClearField::PerUserRpm => LimitField::PerUserRpm,
        ClearField::PerUserQuota => LimitField::PerUserQuotaTokens,
        ClearField::Expires => return None,
    })
}

fn checked(limits: KeyLimits) -> Result<KeyLimits, KeysError> {
    let problems = limits.problems("key");
    if problems.is_empty() {
        Ok(limits)
    } else {
        // The flags' names, not the fields'.
        let text = problems
            .join("; ")
            .replace("key.quota_tokens", "--quota")
            .replace("key.per_user_quota_tokens", "--per-user-quota")
            .replace("key.", "--")
            .replace('_', "-");
        Err(KeysError::BadValue(text))
    }
}

/// `--expires` as a time: RFC 3339, or a duration from now (`30d`, `12h`, `45m`).
fn expiry(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, KeysError> {
    let bad = || {
        KeysError::BadValue(format!(
            "--expires {raw}: give a time like 2027-01-31T00:00:00Z or a duration like 30d, 12h or 45m"
        ))
    };
    let at = if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        at.with_timezone(&Utc)
    } else {
        let (number, unit) = raw.split_at(raw.len().saturating_sub(1));
        let n: i64 = number.parse().map_err(|_| bad())?;
        let length = match unit {
            "d" => Duration::try_days(n),
            "h" => Duration::try_hours(n),
            "m" => Duration::try_minutes(n),
            _ => None,
        }
        .ok_or_else(bad)?;
        now.checked_add_signed(length).ok_or_else(bad)?
    };
    if at <= now {
        return Err(KeysError::BadValue(format!(
            "--expires {raw} is in the past"
        )));
    }
    Ok(at)
}

async fn create(
    store: &dyn KeyStore,
    name: String,
    role: Role,
    flags: &LimitArgs,
    output: Output,
) -> Result<(), KeysError> {
    validate_name(&name).map_err(|e| KeysError::BadName(e.message.to_string()))?;
    let limits = checked(flag_limits(flags))?;
    let expires_at = flags
        .expires
        .as_deref()
        .map(|raw| expiry(raw, now_millis()))
        .transpose()?;
    let secret = Secret::generate();
    let mut record = KeyRecord::new(name, role, &secret);
    record.limits = limits;
    record.expires_at = expires_at;
    store.insert_key(&record, &secret.hash()).await?;
    if output == Output::Json {
        let mut out = json!({"id": record.id, "name": record.name, "role": role, "prefix": record.prefix, "expires_at": record.expires_at, "key": secret.expose()});
        if let (Some(out), serde_json::Value::Object(limits)) =
            (out.as_object_mut(), json!(record.limits))
        {
            out.extend(limits);
        }
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
        "{:<22} {:<20} {:<6} {:<11} {:<17} {:<18} LIMITS",
        "ID", "NAME", "ROLE", "PREFIX", "CREATED", "STATUS"
    );
    for key in keys {
        let status = match key.revoked_at {
            Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
            None if !key.is_active(now_millis()) => "expired".to_owned(),
            None => "active".to_owned(),
        };
        println!(
            "{:<22} {:<20} {:<6} {:<11} {:<17} {status:<18} {}",
            key.id,
            key.name,
            key.role.as_str(),
            format!("{}…", key.prefix),
            key.created_at.format("%Y-%m-%d %H:%M"),
            limits_text(&key.limits),
        );
    }
    Ok(())
}

/// A key's own limits on one line, `rpm=60 models=gemma-*,smollm2`; `-` when it has
/// none (a user key then has the defaults').
pub fn limits_text(limits: &KeyLimits) -> String {
    let mut parts = Vec::new();
    let mut add = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            parts.push(format!("{name}={value}"));
        }
    };
    add("models", limits.models.as_ref().map(|m| m.join(",")));
    add("rpm", limits.rpm.map(|n| n.to_string()));
    add("tpm", limits.tpm.map(|n| n.to_string()));
    add("max-parallel", limits.max_parallel.map(|n| n.to_string()));
    add("quota", limits.quota_tokens.map(|n| n.to_string()));
    add(
        "quota-period",
        limits.quota_period.map(|p| p.as_str().to_owned()),
    );
    add("weight", limits.weight.map(|n| n.to_string()));
    add("per-user-rpm", limits.per_user_rpm.map(|n| n.to_string()));
    add(
        "per-user-quota",
        limits.per_user_quota_tokens.map(|n| n.to_string()),
    );
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

/// The active key with this id, else the active key with this name.
async fn find_active(store: &dyn KeyStore, id_or_name: &str) -> Result<KeyRecord, KeysError> {
    let keys = store.list_keys().await?;
    keys.iter()
        .find(|k| k.id == id_or_name && k.revoked_at.is_none())
        .or_else(|| {
            keys.iter()
                .find(|k| k.name == id_or_name && k.revoked_at.is_none())
        })
        .cloned()
        .ok_or_else(|| KeysError::NoSuchKey(id_or_name.to_owned()))
}

async fn update(
    store: &dyn KeyStore,
    id_or_name: &str,
    name: Option<String>,
    flags: &LimitArgs,
    clear: &[ClearField],
    output: Output,
) -> Result<(), KeysError> {
    let key = find_active(store, id_or_name).await?;
    if let Some(name) = &name {
        validate_name(name).map_err(|e| KeysError::BadName(e.message.to_string()))?;
    }
    // A patch the store applies to the key as it is when it writes: a gateway changing
    // other limits of the key at the same time keeps its changes.
    let limits = LimitsPatch {
        clear: clear.iter().copied().filter_map(limit_field).collect(),
        set: checked(flag_limits(flags))?,
    };
    let expires_at = match &flags.expires {
        Some(raw) => Some(Some(expiry(raw, now_millis())?)),
        None if clear.contains(&ClearField::Expires) => Some(None),
        None => None,
    };
    let update = KeyUpdate {
        name,
        expires_at,
        limits,
    };
    let updated = store
        .update_key(&key.id, &update)
        .await?
        .ok_or_else(|| KeysError::NoSuchKey(id_or_name.to_owned()))?;
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&updated).expect("a key serializes")
        );
    } else {
        println!(
            "Updated key '{}' ({}): {}{}",
            updated.name,
            updated.id,
            limits_text(&updated.limits),
            updated
                .expires_at
                .map_or(String::new(), |at| format!(", expires {}", at.to_rfc3339()))
        );
    }
    Ok(())
}

async fn rotate(
    store: &dyn KeyStore,
    id_or_name: &str,
    grace_secs: u64,
    output: Output,
) -> Result<(), KeysError> {
    if grace_secs > MAX_ROTATION_GRACE_SECS {
        return Err(KeysError::BadValue(format!(
            "--grace {grace_secs}: at most {MAX_ROTATION_GRACE_SECS} seconds (30 days)"
        )));
    }
    let key = find_active(store, id_or_name).await?;
    let secret = Secret::generate();
    let old_valid_until = now_millis() + Duration::seconds(grace_secs as i64);
    let rotated = store
        .rotate_key(
            &key.id,
            &secret.hash(),
            &secret.public_prefix(),
            old_valid_until,
        )
        .await?;
    if !rotated {
        return Err(KeysError::NoSuchKey(id_or_name.to_owned()));
    }
    if output == Output::Json {
        let out = json!({"id": key.id, "name": key.name, "role": key.role, "prefix": secret.public_prefix(), "old_valid_until": old_valid_until, "key": secret.expose()});
        println!("{out}");
    } else {
        eprintln!(
            "Rotated key '{}' ({}); the old secret {}. The new secret, shown only this once:",
            key.name,
            key.id,
            if grace_secs == 0 {
                "stops working now".to_owned()
            } else {
                format!("works until {}", old_valid_until.to_rfc3339())
            }
        );
        println!("{}", secret.expose());
    }
    Ok(())
}

async fn revoke(store: &dyn KeyStore, id_or_name: &str) -> Result<(), KeysError> {
    let key = find_active(store, id_or_name).await?;
    store.revoke_key(&key.id, now_millis()).await?;
    println!("Revoked key '{}' ({}).", key.name, key.id);
    Ok(())
}
