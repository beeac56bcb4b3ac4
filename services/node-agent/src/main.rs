//! The `node-agent` binary: flags and environment, logging, GPUs, signals, then [`node_agent::run`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bus::{Bus, BusConfig, Publisher, PublisherConfig};
use clap::{Parser, ValueEnum};
use events::{Nanoton, WorkerId};
use node_agent::{AgentConfig, ExecConfig, ExecExecutor, Executor, GpuSource, SimulatedExecutor};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExecutorKind {
    /// Run the command given with --exec (or after `--`), the task's input on stdin.
    Exec,
    /// Load tests only: echo the input after --simulated-task-ms.
    Simulated,
}

/// Runs on a GPU worker: registers it, heartbeats its GPU telemetry, runs the tasks allocated to it.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about)]
struct Args {
    /// NATS URL; also read from NATS_URL. [default: nats://127.0.0.1:4222]
    #[arg(long, env = "COCOON_NATS_URL")]
    nats_url: Option<String>,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    /// This worker's id (ASCII letters, digits, '-', '_'; at most 64 bytes).
    #[arg(long, env = "COCOON_WORKER_ID")]
    worker_id: String,
    #[arg(long, default_value = "local")]
    region: String,
    /// Price in nanoton per GPU-second.
    #[arg(long, default_value_t = 0)]
    price: u64,
    /// TON address payouts go to.
    #[arg(long, default_value = "")]
    payout_address: String,
    /// Tasks run at once, at most.
    #[arg(long, default_value_t = 1)]
    max_concurrent: u32,
    /// A model this worker serves (repeat for several); none: any model.
    #[arg(long = "model-tag")]
    model_tags: Vec<String>,
    /// The worker's public key, 64 hex digits; default: derived per run.
    #[arg(long, env = "COCOON_WORKER_PUBLIC_KEY")]
    public_key: Option<String>,
    #[arg(long, default_value_t = 2000)]
    heartbeat_interval_ms: u64,
    /// How long running tasks may finish after SIGTERM/Ctrl-C before they are killed and failed.
    #[arg(long, default_value_t = 30_000)]
    drain_timeout_ms: u64,
    /// Run N simulated GPUs instead of reading NVML (load tests); they are labelled as simulated everywhere.
    #[arg(long, value_name = "N")]
    simulate_gpus: Option<u32>,
    #[arg(long, value_enum, default_value = "exec")]
    executor: ExecutorKind,
    /// The command to run per task, with its arguments: `--exec sh -c 'tr a-z A-Z'` (takes every value after
    /// it, so put it last), or after `--`.
    #[arg(long = "exec", value_name = "PROGRAM [ARGS]", num_args = 1.., allow_hyphen_values = true)]
    exec: Vec<String>,
    /// Duration of a simulated task.
    #[arg(long, default_value_t = 0)]
    simulated_task_ms: u64,
    /// Stdout captured per task, at most; the rest is discarded and the result marked truncated. Above the
    /// default, an output that does not compress may not fit in a result frame: the attempt then fails.
    #[arg(long, default_value_t = node_agent::exec::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: usize,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465); off by default.
    #[arg(long, env = "COCOON_AGENT_METRICS")]
    metrics_addr: Option<String>,
    /// Development: submit this TDX quote file instead of asking configfs-tsm (it does not bind this
    /// worker's key, so a real attestor rejects it for the binding).
    #[arg(long, value_name = "PATH")]
    quote_file: Option<std::path::PathBuf>,
    /// Seconds between attestations (each verdict must be renewed before it expires).
    #[arg(long, default_value_t = 1_200)]
    reattest_interval_s: u64,
    /// The command to run per task (same as --exec).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_hex_key(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "--public-key must be 64 hex digits (32 bytes)"
    );
    (0..32)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(Into::into))
        .collect()
}

fn executor(args: &Args) -> anyhow::Result<Arc<dyn Executor>> {
    match args.executor {
        ExecutorKind::Simulated => {
            anyhow::ensure!(
                args.exec.is_empty() && args.command.is_empty(),
                "--executor simulated runs no command; drop --exec"
            );
            tracing::warn!(
                "SIMULATED executor: tasks run nothing and echo their input (load tests only)"
            );
            Ok(Arc::new(SimulatedExecutor::new(Duration::from_millis(
                args.simulated_task_ms,
            ))))
        }
        ExecutorKind::Exec => {
            let command = match (args.exec.is_empty(), args.command.is_empty()) {
                (false, true) => &args.exec,
                (true, false) => &args.command,
                (true, true) => anyhow::bail!(
                    "the exec executor needs a command: --exec PROGRAM [ARGS...] or `-- PROGRAM [ARGS...]` \
                     (or --executor simulated for load tests)"
                ),
                (false, false) => {
                    anyhow::bail!("give the command once: --exec or after `--`, not both")
                }
            };
            let mut config = ExecConfig::new(&command[0], &command[1..]);
            config.max_output_bytes = args.max_output_bytes;
            Ok(Arc::new(ExecExecutor::new(config)))
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bus::logging::init();
    let worker_id = WorkerId::new(args.worker_id.clone()).context("--worker-id")?;
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| std::env::var("NATS_URL").ok())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    if let Some(addr) = &args.metrics_addr {
        let addr: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| anyhow::anyhow!("--metrics-addr {addr:?}: {e}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    }
    let executor = executor(&args)?;
    let gpus = match args.simulate_gpus {
        Some(n) => {
            anyhow::ensure!(n > 0, "--simulate-gpus needs at least 1");
            tracing::warn!(
                gpus = n,
                "SIMULATED GPUs: telemetry is synthetic (load tests only)"
            );
            GpuSource::simulated(&worker_id, n)
        }
        None => GpuSource::nvml().await?,
    };

    let mut config = AgentConfig::new(worker_id.clone());
    config.region = args.region.clone();
    config.price_per_gpu_second = Nanoton(args.price);
    config.payout_address = args.payout_address.clone();
    config.max_concurrent_tasks = args.max_concurrent;
    config.model_tags = args.model_tags.clone();
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms.max(1));
    config.drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    if let Some(key) = &args.public_key {
        config.public_key = parse_hex_key(key)?;
    }
    config.reattest_interval = Duration::from_secs(args.reattest_interval_s.max(1));
    config.attestation = match &args.quote_file {
        Some(path) => {
            tracing::warn!(path = %path.display(), "attesting with a quote FILE (development only)");
            Some(node_agent::attest::QuoteSource::File(path.clone()))
        }
        None => node_agent::attest::QuoteSource::detect(),
    };

    let bus = Bus::connect(
        &BusConfig::new(&nats_url, format!("node-agent-{worker_id}")).with_credentials(
            bus::Credentials::load_optional(args.nats_credentials.as_deref())?,
        ),
    )
    .await
    .context("is the stack running? start it with `cocoon dev up`")?;
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default())?;

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("stopping: draining (a second signal exits at once)");
        signal.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = terminate.recv() => {},
        }
        std::process::exit(130);
    });

    let report = node_agent::run(
        config,
        bus.clone(),
        publisher.clone(),
        gpus,
        executor,
        shutdown,
    )
    .await?;
    publisher.flush().await?;
    tracing::info!(?report, "stopped");
    bus.client.drain().await.ok();
    Ok(())
}
