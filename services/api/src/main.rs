//! The `api` binary: parses flags, sets up logging and signals, and serves [`api::serve`] until Ctrl-C or
//! SIGTERM (a second signal exits at once).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The HTTP API of the Cocoon GPU pool (see services/api/CONTRACT.md).
#[derive(Debug, Parser)]
#[command(name = "api", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "COCOON_API_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// NATS server URL (comma-separated for a cluster).
    #[arg(long, env = "NATS_URL", default_value = api::DEFAULT_NATS_URL)]
    nats_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    /// Postgres URL of the read models.
    #[arg(long, env = "COCOON_DATABASE_URL", default_value = api::DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// Postgres connections at most.
    #[arg(long, default_value_t = 16)]
    pg_pool_size: usize,
    /// Serve a list answer again from memory for this long per URL (milliseconds; 0 turns it off). Reads with a
    /// consistency token always go to the database.
    #[arg(long, default_value_t = 500)]
    hot_ttl_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bus::logging::init();
    let args = Args::parse();
    let mut config = api::ApiConfig::new(args.nats_url, args.database_url);
    config.listen = args.listen;
    config.nats_credentials = bus::Credentials::load_optional(args.nats_credentials.as_deref())?;
    config.pg_pool_size = args.pg_pool_size;
    config.hot_ttl = std::time::Duration::from_millis(args.hot_ttl_ms);
    tracing::info!(?config, "starting");
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        bus::stop_requested().await;
        tracing::info!("stopping; a second signal exits at once");
        on_signal.cancel();
        bus::stop_requested().await;
        std::process::exit(130);
    });
    api::serve(config, listener, cancel).await
}
