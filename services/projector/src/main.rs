//! The `projector` binary: configuration from flags and environment, logging, signals, then [`projector::run`].

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Builds the Postgres read models from the event log.
///
/// Several processes can share the work: run each with the same --instances N and --projection list and its
/// own --instance 0..N-1; instance I projects partition p of every keyed stream when p mod N == I, and the
/// whole streams (allocations, results) are spread among the instances. A stopped instance's partitions wait
/// at their checkpoints until it is back.
#[derive(Debug, Parser)]
#[command(name = "projector", version, about, long_about)]
struct Args {
    #[arg(long, env = "COCOON_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    #[arg(
        long,
        env = "COCOON_DATABASE_URL",
        default_value = "postgres://cocoon@127.0.0.1:55432/cocoon",
        hide_env_values = true
    )]
    database_url: String,
    /// Partition workers (concurrent consumers) in this process.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// This process's number among --instances, from 0.
    #[arg(long, env = "COCOON_PROJECTOR_INSTANCE", default_value_t = 0)]
    instance: usize,
    /// Projector processes sharing the partitions.
    #[arg(long, env = "COCOON_PROJECTOR_INSTANCES", default_value_t = 1)]
    instances: usize,
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
    /// Milliseconds a batch that has frames but is not full waits for more: fewer, larger transactions
    /// while events keep coming, at up to this much more projection latency; 0 takes what is there.
    #[arg(long, default_value_t = 10)]
    gather_ms: u64,
    /// Where a worker's partitions are picked out of a shared stream: `client` (its consumer reads the stream
    /// whole and skips other workers' frames, cheaper for nats-server while catching up) or `server` (its
    /// consumer is filtered by partition subjects, one delivery per frame).
    #[arg(
        long,
        env = "COCOON_PROJECTOR_PARTITION_FILTER",
        default_value = "client"
    )]
    partition_filter: projector::PartitionFilter,
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
    // Checked before anything starts, so a wrong number stops the process at once.
    let instance = projector::Instance::new(args.instance, args.instances).map_err(|e| {
        anyhow::anyhow!(
            "--instance {} --instances {}: {e}",
            args.instance,
            args.instances
        )
    })?;
    bus::logging::init();
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
    config.nats_credentials = bus::Credentials::load_optional(args.nats_credentials.as_deref())?;
    config.workers = args.workers;
    config.gather = Duration::from_millis(args.gather_ms);
    config.partition_filter = args.partition_filter;
    config.instance = instance;
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
