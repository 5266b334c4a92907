//! `llmgate serve`: the gateway.

use std::time::Duration;

use llmgate_core::auth::{KeyCache, KeyRecord, Role, Secret};
use llmgate_core::config::GatewayConfig;
use llmgate_core::proxy::Proxy;
use llmgate_core::storage::KeyStore;
use llmgate_core::usage::UsageRecorder;

use axum::serve::ListenerExt;

use crate::app::{app, AppState};

/// The environment variable that supplies the first admin key instead of generating one.
pub const ADMIN_KEY_ENV: &str = "LLMGATE_ADMIN_KEY";

/// Runs the gateway until SIGINT or SIGTERM, then drains the usage queue.
pub async fn run(config: GatewayConfig) -> Result<(), String> {
    let proxy =
        Proxy::new(config.proxy().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let store = super::open_store(&config).await?;
    ensure_admin_key(
        store.as_ref(),
        std::env::var(ADMIN_KEY_ENV).ok(),
        config.listen,
    )
    .await?;

    let (recorder, writer) = UsageRecorder::start(store.clone());
    let keys = KeyCache::with_ttl(
        store.clone(),
        Duration::from_millis(config.key_cache_ttl_ms),
    );
    let state = AppState {
        keys,
        usage: store.clone(),
        recorder,
    };
    let router = app(state, proxy, config.max_body_bytes as usize);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}: {e} (choose another --listen address)",
                config.listen
            )
        })?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!(
        "llmgate listening on http://{local} (upstream {})",
        config.upstream.as_deref().unwrap_or("-")
    );
    tracing::info!(%local, "listening");

    // No Nagle delay: streamed tokens are small writes that must go out at once.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    tracing::info!("shutting down: writing queued usage");
    writer.shutdown().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// On first start there is no admin key: take the operator's (`LLMGATE_ADMIN_KEY`) or
/// create one and print it, once.
pub async fn ensure_admin_key(
    store: &dyn KeyStore,
    from_env: Option<String>,
    listen: std::net::SocketAddr,
) -> Result<(), String> {
    let keys = store.list_keys().await.map_err(|e| e.to_string())?;
    if let Some(raw) = from_env {
        let secret = Secret::new(raw.trim());
        if !secret.is_well_formed() {
            return Err(format!(
                "{ADMIN_KEY_ENV} must be 'sk-lg-' followed by at least 32 letters or digits"
            ));
        }
        match store
            .key_by_hash(&secret.hash())
            .await
            .map_err(|e| e.to_string())?
        {
            Some(key) if key.revoked_at.is_some() => {
                return Err(format!(
                    "{ADMIN_KEY_ENV} names a key that was revoked; set a new one"
                ));
            }
            Some(key) if key.role != Role::Admin => {
                return Err(format!(
                    "{ADMIN_KEY_ENV} names a key whose role is '{}', not admin",
                    key.role.as_str()
                ));
            }
            Some(_) => {}
            None => {
                let name = free_name(&keys, "admin");
                store
                    .insert_key(&KeyRecord::new(name, Role::Admin, &secret), &secret.hash())
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!("admin key from {ADMIN_KEY_ENV} stored");
            }
        }
        return Ok(());
    }
    if keys
        .iter()
        .any(|k| k.role == Role::Admin && k.revoked_at.is_none())
    {
        return Ok(());
    }
    let secret = Secret::generate();
    let record = KeyRecord::new(free_name(&keys, "admin"), Role::Admin, &secret);
    store
        .insert_key(&record, &secret.hash())
        .await
        .map_err(|e| e.to_string())?;
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };
    println!(
        "\nCreated the first admin key. It is shown only this once; keep it safe:\n\n    {}\n\n\
         Create a key for each user with:\n    curl -X POST http://{host}:{port}/admin/keys -H 'Authorization: Bearer <admin key>' -d '{{\"name\":\"alice\"}}'\n\
         or: llmgate keys create alice\n",
        secret.expose(),
        port = listen.port(),
    );
    Ok(())
}

fn free_name(keys: &[KeyRecord], base: &str) -> String {
    let taken = |name: &str| {
        keys.iter()
            .any(|k| k.revoked_at.is_none() && k.name == name)
    };
    if !taken(base) {
        return base.to_owned();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .expect("some name is free")
}
