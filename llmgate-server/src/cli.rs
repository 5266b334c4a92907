//! Command-line arguments (clap only; no logic).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// llmgate: share an OpenAI-compatible model server safely, with per-user API keys and
/// exact per-key usage.
#[derive(Debug, Parser)]
#[command(name = "llmgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Directory for the database and other state [default: ./llmgate-data]
    #[arg(long, global = true, env = "LLMGATE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with settings; flags and LLMGATE_* variables override it
    #[arg(long, global = true, env = "LLMGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in front of an OpenAI-compatible upstream
    Serve(ServeArgs),
    /// Create, list and revoke API keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show usage per key
    Usage {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// Options of `llmgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Base URL of the OpenAI-compatible upstream, e.g. http://127.0.0.1:8000
    #[arg(long, env = "LLMGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,

    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "LLMGATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Key the gateway sends to the upstream (for a hosted API)
    #[arg(
        long,
        env = "LLMGATE_UPSTREAM_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub upstream_key: Option<String>,

    /// Seconds to wait for the upstream's response headers [default: 600]
    #[arg(long, env = "LLMGATE_UPSTREAM_TIMEOUT_SECS", value_name = "SECS")]
    pub upstream_timeout_secs: Option<u64>,

    /// Largest request body accepted, in bytes [default: 16777216]
    #[arg(long, env = "LLMGATE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,

    /// How long key lookups are cached, in milliseconds [default: 500]
    #[arg(long, env = "LLMGATE_KEY_CACHE_TTL_MS", value_name = "MS")]
    pub key_cache_ttl_ms: Option<u64>,
}

/// `llmgate keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once)
    Create {
        /// Who or what the key is for (unique among active keys)
        name: String,
        /// Make it an admin key (manages keys, reads everyone's usage)
        #[arg(long)]
        admin: bool,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List keys
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name; a running gateway refuses it within a second
    Revoke {
        /// The key's id (key_…) or its name
        #[arg(value_name = "ID|NAME")]
        key: String,
    },
}
