//! `llmgate serve`: the gateway.

use std::sync::Arc;
use std::time::Duration;

use llmgate_core::auth::{KeyCache, KeyRecord, Role, Secret};
use llmgate_core::config::GatewayConfig;
use llmgate_core::limits::Limiter;
use llmgate_core::storage::{KeyStore, Storage, StorageError, UsageStore};
use llmgate_core::usage::{RecorderOptions, UsageRecorder};

use super::OpenStoreError;
use crate::app::{app, AppState};
use crate::cli::Launch;
use crate::metrics::Metrics;
use crate::models::{Progress, Registry};

/// The environment variable that supplies the first admin key instead of generating one.
pub const ADMIN_KEY_ENV: &str = "LLMGATE_ADMIN_KEY";

/// Why the gateway could not start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    OpenStore(#[from] OpenStoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StorageError),
    /// `LLMGATE_ADMIN_KEY` is not a key.
    #[error("{ADMIN_KEY_ENV} must be 'sk-lg-' followed by at least 32 letters or digits")]
    MalformedAdminKey,
    /// `LLMGATE_ADMIN_KEY` names a revoked key.
    #[error("{ADMIN_KEY_ENV} names a key that was revoked; set a new one")]
    RevokedAdminKey,
    /// `LLMGATE_ADMIN_KEY` names a key that is not an admin key.
    #[error("{ADMIN_KEY_ENV} names a key whose role is '{role}', not admin")]
    NotAnAdminKey {
        /// The key's role.
        role: &'static str,
    },
    /// The listen address is taken or not ours.
    #[error("cannot listen on {address}: {source} (choose another --listen address)")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no address.
    #[error("cannot read the address the gateway listens on")]
    LocalAddress(#[source] std::io::Error),
    /// The system monitor could not start.
    #[error(transparent)]
    Monitor(#[from] llmgate_core::system::SystemError),
    /// The Redis URL cannot be used.
    #[error("redis_url {url}: {reason}")]
    Redis {
        /// The URL without its password.
        url: String,
        /// What the client library said.
        reason: String,
    },
    /// The serving threads could not start.
    #[error("cannot start the threads that serve requests")]
    Threads(#[source] std::io::Error),
}

/// Runs the gateway until SIGINT or SIGTERM, then drains the usage queue and stops the
/// model server. With a model (`up`, or `serve --model`), sets it up and runs it first.
pub async fn run(config: GatewayConfig, launch: Launch) -> Result<(), ServeError> {
    let store = super::open_store(&config).await?;
    let first_run = store.list_keys().await?.is_empty();
    let admin_key = ensure_admin_key(store.as_ref(), std::env::var(ADMIN_KEY_ENV).ok()).await?;

    // Bind first: a taken port is reported before minutes of model set-up.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(ServeError::LocalAddress)?;

    // The gateway answers while the models that start with it load: the console works,
    // and model calls get 503 saying the model is loading until it is ready.
    let models = Registry::new(config.clone(), Progress::AlsoOnTerminal);
    models.restore(store.clone()).await?;
    let user_key = if launch == Launch::Up && first_run {
        UserKey::Create
    } else {
        UserKey::None
    };
    let result = serve(
        &config,
        user_key,
        admin_key,
        store.clone(),
        listener,
        local,
        models.clone(),
    )
    .await;
    models.stop_all().await;
    store.close().await;
    result
}

/// Whether to create a user key for calling the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserKey {
    /// The first `llmgate up`: create one named `default` and show it once.
    Create,
    /// Keys are the operator's business.
    None,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &GatewayConfig,
    user_key: UserKey,
    admin_key: Option<Secret>,
    store: Arc<dyn Storage>,
    listener: tokio::net::TcpListener,
    local: std::net::SocketAddr,
    models: Arc<Registry>,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::default());
    let gauges = models.clone();
    metrics.set_model_gauges(Arc::new(move || gauges.gauges()));
    models.set_events(metrics.clone());
    let options = RecorderOptions {
        counter: Some(models.clone()),
        observer: Some(metrics.clone()),
        queue_max: usize::try_from(config.usage_queue_max).unwrap_or(usize::MAX),
        data_dir: Some(config.data_dir.clone()),
    };
    let (recorder, writer) = UsageRecorder::start_with(store.clone(), options);
    let keys = KeyCache::with_ttl(
        store.clone(),
        Duration::from_millis(config.key_cache_ttl_ms),
    );
    let mut state = AppState::new(keys, store.clone(), recorder, metrics, models.clone())?;
    state.metrics_public = config.metrics_public;
    state.limiter = limiter(config, store.clone())?;
    let router = app(state, config.max_body_bytes as usize);

    let user_key = match user_key {
        UserKey::Create => {
            let secret = Secret::generate();
            let record = KeyRecord::new("default", Role::User, &secret);
            store.insert_key(&record, &secret.hash()).await?;
            Some(secret)
        }
        UserKey::None => None,
    };
    let shutdown = shutdown_signal();
    let names = models.names();
    print_welcome(local, admin_key.as_ref(), user_key.as_ref(), names.first());
    let upstream = match (&config.upstream, names.len()) {
        (Some(upstream), 1) => format!("upstream {upstream}"),
        (_, 0) => "no model yet: add one with POST /admin/models".to_owned(),
        _ => format!("models: {}", names.join(", ")),
    };
    println!("llmgate listening on http://{local} ({upstream})");
    tracing::info!(%local, "listening");
    models.start();

    crate::http::raise_open_files_limit();
    let limits = crate::http::ConnectionLimits::from_config(config);
    tracing::info!(
        max_connections = limits.max_connections,
        "connection limits"
    );
    crate::http::serve_on_loops(listener, router, serving_threads(config), limits, shutdown)
        .await
        .map_err(ServeError::Threads)?;
    tracing::info!("shutting down: writing queued usage");
    writer.shutdown().await;
    Ok(())
}

/// The limiter the config asks for: counters in Redis shared by the replicas when
/// `redis_url` is set (connecting in the background: an unreachable Redis never stops
/// the gateway), else in this process.
fn limiter(config: &GatewayConfig, store: Arc<dyn Storage>) -> Result<Limiter, ServeError> {
    let defaults = config.key_defaults.clone();
    let usage: Arc<dyn UsageStore> = store;
    let limiter = match &config.redis_url {
        Some(url) => {
            let shown = without_password(url);
            let limiter =
                Limiter::shared(url, defaults, usage, config.replicas).map_err(|err| {
                    ServeError::Redis {
                        url: shown.clone(),
                        reason: err.to_string(),
                    }
                })?;
            tracing::info!(redis = %shown, replicas = config.replicas, "key limits counted in Redis, shared by the replicas");
            limiter
        }
        None => Limiter::local(defaults, usage),
    };
    Ok(limiter.with_token_estimate(config.estimated_completion_tokens))
}

/// `url` with its password (and user name) replaced by `***`, for the log. A password
/// may sit in the user info (`redis://:pw@host`, the password itself holding `/` or
/// `@`) or in the query (`redis+unix:///sock?pass=pw`): everything before the last `@`
/// and everything from `?` or `#` on is hidden.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".to_owned();
    };
    let (rest, hidden_query) = match rest.find(['?', '#']) {
        Some(at) => (&rest[..at], true),
        None => (rest, false),
    };
    let mut shown = match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => format!("{scheme}://{rest}"),
    };
    if hidden_query {
        shown.push_str("?***");
    }
    shown
}

/// How many threads serve requests: `workers`, else Tokio's `TOKIO_WORKER_THREADS`,
/// else one per core.
fn serving_threads(config: &GatewayConfig) -> usize {
    config
        .workers
        .map(|n| n as usize)
        .or_else(|| std::env::var("TOKIO_WORKER_THREADS").ok()?.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn print_welcome(
    local: std::net::SocketAddr,
    admin: Option<&Secret>,
    user: Option<&Secret>,
    model: Option<&String>,
) {
    let host = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        local.ip().to_string()
    };
    let base = format!("http://{host}:{}", local.port());
    if let Some(admin) = admin {
        println!(
            "\nCreated the first admin key. It is shown only this once; keep it safe:\n\n    {}\n\n\
             Create a key for each user with:\n    curl -X POST {base}/admin/keys -H 'Authorization: Bearer <admin key>' -d '{{\"name\":\"alice\"}}'\n\
             or: llmgate keys create alice\n",
            admin.expose(),
        );
    }
    if let Some(user) = user {
        println!(
            "A user key named 'default' for calling the model (shown only this once):\n\n    {}\n",
            user.expose()
        );
    }
    if let Some(model) = model {
        let key = user.map_or("<key>", |k| k.expose());
        println!(
            "Call it like OpenAI:\n    curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n         -H 'content-type: application/json' -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\
             or from Python:\n    from openai import OpenAI\n    client = OpenAI(base_url=\"{base}/v1\", api_key=\"{key}\")\n"
        );
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed now, not when the future
/// is first polled: a signal sent right after "listening" is printed must not find the
/// default action (exit at once, nothing drained) still in place.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .expect("SIGINT handler installs");
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// On first start there is no admin key: take the operator's (`LLMGATE_ADMIN_KEY`) or
/// create one; a created key is returned, to be shown once.
pub async fn ensure_admin_key(
    store: &dyn KeyStore,
    from_env: Option<String>,
) -> Result<Option<Secret>, ServeError> {
    let keys = store.list_keys().await?;
    if let Some(raw) = from_env {
        let secret = Secret::new(raw.trim());
        if !secret.is_well_formed() {
            return Err(ServeError::MalformedAdminKey);
        }
        match store.key_by_hash(&secret.hash()).await? {
            Some(key) if key.revoked_at.is_some() => return Err(ServeError::RevokedAdminKey),
            Some(key) if key.role != Role::Admin => {
                return Err(ServeError::NotAnAdminKey {
                    role: key.role.as_str(),
                });
            }
            Some(_) => {}
            None => {
                let name = free_name(&keys, "admin");
                store
                    .insert_key(&KeyRecord::new(name, Role::Admin, &secret), &secret.hash())
                    .await?;
                tracing::info!("admin key from {ADMIN_KEY_ENV} stored");
            }
        }
        return Ok(None);
    }
    if keys
        .iter()
        .any(|k| k.role == Role::Admin && k.revoked_at.is_none())
    {
        return Ok(None);
    }
    let secret = Secret::generate();
    let record = KeyRecord::new(free_name(&keys, "admin"), Role::Admin, &secret);
    store.insert_key(&record, &secret.hash()).await?;
    Ok(Some(secret))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_password_never_reaches_the_log() {
        assert_eq!(
            without_password("redis://:hunter2@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(
            without_password("rediss://user:pw@cache/"),
            "rediss://***@cache/"
        );
        assert_eq!(
            without_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(without_password("hunter2"), "(not a URL)");
        // The same secret elsewhere in the URL: a password holding `/` or `@`, or given
        // in the query.
        for (url, shown) in [
            ("redis://:hun/ter2@cache:6379/0", "redis://***@cache:6379/0"),
            ("redis://:hun@ter2@cache/", "redis://***@cache/"),
            (
                "redis+unix:///run/redis.sock?pass=hunter2",
                "redis+unix:///run/redis.sock?***",
            ),
            ("redis://cache/0?password=hunter2#x", "redis://cache/0?***"),
        ] {
            assert_eq!(without_password(url), shown);
            assert!(!without_password(url).contains("hunter2"));
        }
    }
}
