//! The `allocator` binary: one instance of the allocator; run several for a hot standby.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Places tasks on the best attested GPU worker. Run two or more: one is active (by a NATS KV lease), the
/// others stand by and take over within seconds.
#[derive(Debug, Parser)]
#[command(name = "allocator", version)]
struct Args {
    /// NATS URL (comma-separated for a cluster).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    /// This instance's name: the lease holder and the producer of its events.
    #[arg(long, env = "ALLOCATOR_INSTANCE", default_value = "allocator-1")]
    instance: String,
    /// A worker silent this long is lost and its tasks are requeued.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Attempts a task gets before it expires.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// DEVELOPMENT ONLY: place tasks on workers without a valid attestation. Shown wherever workers are listed.
    #[arg(long, env = "COCOON_ALLOW_UNATTESTED")]
    allow_unattested: bool,
    /// A waiting task counts one priority band higher per this many milliseconds.
    #[arg(long, default_value_t = 5_000)]
    aging_interval_ms: u64,
    /// A task that no registered worker could ever fit is rejected after waiting this long.
    #[arg(long, default_value_t = 10_000)]
    reject_after_ms: u64,
    /// How long (of log time) a finished task is at least remembered, so that a late or repeated event about it
    /// changes nothing; it is forgotten by one and a half times this, which keeps memory bounded. Keep it well
    /// past the streams' 2-minute duplicate window.
    #[arg(long, default_value_t = 600)]
    finished_retention_s: u64,
    /// Lease time to live; a standby takes over at most about this long after the active one dies.
    #[arg(long, default_value_t = 3_000)]
    lease_ttl_ms: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9102).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bus::logging::init();
    let args = Args::parse();
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .context("starting the metrics listener")?;
    }
    let config = allocator::AllocatorConfig {
        pool: allocator::PoolConfig {
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            max_attempts: args.max_attempts.max(1),
            allow_unattested: args.allow_unattested,
            aging_interval: Duration::from_millis(args.aging_interval_ms),
            reject_after: Duration::from_millis(args.reject_after_ms),
            finished_retention: Duration::from_secs(args.finished_retention_s),
            ..Default::default()
        },
        instance: args.instance.clone(),
        lease_ttl: Duration::from_millis(args.lease_ttl_ms),
        ..Default::default()
    };
    if args.allow_unattested {
        tracing::warn!("pool policy: UNATTESTED workers are admitted (development only)");
    }
    let bus = bus::Bus::connect(
        &bus::BusConfig::new(&args.nats_url, &args.instance).with_credentials(
            bus::Credentials::load_optional(args.nats_credentials.as_deref())?,
        ),
    )
    .await?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        bus::stop_requested().await;
        tracing::info!("shutting down: giving the lease up");
        on_signal.cancel();
    });
    let report = allocator::run(bus, config, cancel).await?;
    tracing::info!(?report, "allocator stopped");
    Ok(())
}
