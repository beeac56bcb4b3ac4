//! The `settler` binary: pays workers in TON for their completed tasks.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use events::money::Nanoton;
use settler::{BatchPolicy, FaultPoint, PoolKey, PoolWallet, SettlerConfig, Toncenter};
use tokio_util::sync::CancellationToken;

/// Accrues each completed task (GPU-seconds × the worker's price), batches what each worker is owed into
/// one wallet v5r1 message of up to 255 transfers, records it, sends it through a toncenter-compatible API,
/// and confirms it on chain; never paying any worker twice.
#[derive(Debug, Parser)]
#[command(name = "settler", version)]
struct Args {
    /// NATS URL (comma-separated for a cluster).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    /// The toncenter v2 API root, e.g. https://toncenter.com/api/v2 (or the local TON server's URL).
    #[arg(long, env = "COCOON_TONCENTER_URL")]
    toncenter_url: String,
    /// The toncenter API key (sent as X-API-Key; never logged).
    #[arg(
        long = "toncenter-api-key",
        env = "COCOON_TONCENTER_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// A file holding the pool wallet's key: 64 hex characters (an Ed25519 seed) or a 24-word mnemonic.
    #[arg(long, conflicts_with = "key_env")]
    key_file: Option<PathBuf>,
    /// The environment variable holding the pool wallet's key, when no file is given.
    #[arg(long, default_value = "COCOON_SETTLER_KEY")]
    key_env: String,
    /// Extra CA certificates (PEM) to trust for the API.
    #[arg(long)]
    api_ca: Option<PathBuf>,
    /// This instance's name: the producer of its events.
    #[arg(long, env = "SETTLER_INSTANCE", default_value = "settler-1")]
    instance: String,
    /// Close a batch at this many transfers (at most 255).
    #[arg(long, default_value_t = 255)]
    max_payouts: usize,
    /// Close a batch once its oldest accrual is this many seconds old.
    #[arg(long, default_value_t = 30)]
    max_age_s: u64,
    /// Close a batch once its total reaches this many nanoton.
    #[arg(long, default_value_t = 1_000_000_000_000)]
    max_total_nanoton: u64,
    /// A worker owed less than this (nanoton) is carried over to a later batch.
    #[arg(long, default_value_t = 10_000_000)]
    min_payout_nanoton: u64,
    /// A worker whose transfer did not go out is retried after this many seconds.
    #[arg(long, default_value_t = 300)]
    failed_retry_s: u64,
    /// A message is valid for this many seconds after it is built.
    #[arg(long, default_value_t = 60)]
    message_ttl_s: u64,
    /// Resend an unconfirmed, still acceptable message this often (milliseconds).
    #[arg(long, default_value_t = 5_000)]
    resend_interval_ms: u64,
    /// Check an open settlement on chain this often (milliseconds; each check is a few API calls).
    #[arg(long, default_value_t = 1_000)]
    check_interval_ms: u64,
    /// A task may accrue for this many seconds after its submission (a week by default); paid task ids older
    /// than this are forgotten, so the settler's memory is bounded by the tasks completed in this span.
    #[arg(long, default_value_t = 604_800)]
    accrual_window_s: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9104).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// TESTING ONLY: exit at this step as if killed (after-prepared, after-send, before-confirmed).
    #[arg(long, hide = true, value_parser = parse_fault)]
    fault: Option<FaultPoint>,
}

fn parse_fault(s: &str) -> Result<FaultPoint, String> {
    FaultPoint::parse(s)
        .ok_or_else(|| format!("{s:?}: expected after-prepared, after-send or before-confirmed"))
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
    let key = match &args.key_file {
        Some(path) => PoolKey::from_file(path)?,
        None => PoolKey::from_env(&args.key_env)?,
    };
    let wallet = PoolWallet::new(&key)?;
    let mut http = httpc::ClientConfig::new();
    http.extra_ca = args.api_ca.clone();
    let http = httpc::HttpClient::new(&http, args.toncenter_url.starts_with("https://"))?;
    let ton = Toncenter::new(&args.toncenter_url, args.api_key.clone(), http);
    let config = SettlerConfig {
        instance: args.instance.clone(),
        policy: BatchPolicy {
            max_payouts: args.max_payouts,
            max_age: Duration::from_secs(args.max_age_s),
            max_total: Nanoton(args.max_total_nanoton),
            min_payout: Nanoton(args.min_payout_nanoton),
            failed_retry_after: Duration::from_secs(args.failed_retry_s),
            ..BatchPolicy::default()
        },
        message_ttl: Duration::from_secs(args.message_ttl_s),
        resend_interval: Duration::from_millis(args.resend_interval_ms),
        check_interval: Duration::from_millis(args.check_interval_ms),
        accrual_window: Duration::from_secs(args.accrual_window_s),
        fault: args.fault,
        ..SettlerConfig::default()
    };
    config.policy.validate()?;
    tracing::info!(wallet = %wallet.address(), api = %ton.base_url(), "settler starting");
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
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    let report = settler::run(bus, ton, wallet, config, cancel).await?;
    tracing::info!(?report, "settler stopped");
    Ok(())
}
