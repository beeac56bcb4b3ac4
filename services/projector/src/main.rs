//! The `projector` binary: configuration from flags and environment, logging, signals, then [`projector::run`].

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Builds the Postgres read models from the event log.
#[derive(Debug, Parser)]
#[command(name = "projector", version, about)]
struct Args {
    #[arg(long, env = "COCOON_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[arg(
        long,
        env = "COCOON_DATABASE_URL",
        default_value = "postgres://cocoon@127.0.0.1:55432/cocoon",
        hide_env_values = true
    )]
    database_url: String,
    /// Partition workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Projections to run (tasks, workers, payments); default all.
    #[arg(long = "projection")]
    projections: Vec<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464); off when empty.
    #[arg(
        long,
        env = "COCOON_PROJECTOR_METRICS",
        default_value = "127.0.0.1:9464"
    )]
    metrics_addr: String,
    /// Stop once every stream is drained (catch-up mode), instead of following the log.
    #[arg(long)]
    until_idle: bool,
    /// Seconds to finish in-flight batches after a stop signal.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if !args.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = args
            .metrics_addr
            .parse()
            .map_err(|e| anyhow::anyhow!("--metrics-addr {:?}: {e}", args.metrics_addr))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    }
    let mut config = projector::ProjectorConfig::new(args.nats_url, args.database_url);
    config.workers = args.workers;
    if !args.projections.is_empty() {
        config.projections = args
            .projections
            .iter()
            .map(|p| {
                projector::Projection::parse(p).ok_or_else(|| {
                    anyhow::anyhow!("unknown projection {p:?}; use tasks, workers or payments")
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let grace = Duration::from_secs(args.grace_seconds);
    tokio::spawn(async move {
        bus::stop_requested().await;
        tracing::info!("stopping: finishing in-flight batches");
        signal.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            () = tokio::time::sleep(grace) => {},
        }
        std::process::exit(130);
    });
    projector::run(config, shutdown, args.until_idle).await
}
