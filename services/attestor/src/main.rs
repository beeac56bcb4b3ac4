//! The `attestor` binary: verifies workers' TDX quotes and publishes the verdicts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use attestor::{AttestorConfig, CollateralSource, PccsClient, PccsConfig, Policy, Verifier};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Verifies each AttestationSubmitted (a TDX quote binding the worker's key) with dcap-qvl against the
/// policy and the collateral, and publishes AttestationVerified or AttestationRejected.
#[derive(Debug, Parser)]
#[command(name = "attestor", version)]
struct Args {
    #[arg(long, env = "COCOON_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, written by `cocoon auth init`); without it the
    /// connection is unauthenticated (a development server without users).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS")]
    nats_credentials: Option<std::path::PathBuf>,
    /// Policy file (JSON): allowed MRTD and RTMR values, accepted TCB statuses, maximum validity.
    #[arg(long, env = "COCOON_ATTESTATION_POLICY")]
    policy: PathBuf,
    /// Collateral: a JSON file, or a directory of them (one per FMSPC), as Intel's PCS/PCCS serves it.
    #[arg(long, env = "COCOON_COLLATERAL", conflicts_with = "pccs_url")]
    collateral: Option<PathBuf>,
    /// A PCCS (or Intel PCS) base URL, http:// or https://, to fetch each platform's collateral from when a
    /// quote first needs it (and again when it expires or is a day old), e.g. https://pccs.internal:8081.
    #[arg(long, env = "COCOON_PCCS_URL")]
    pccs_url: Option<String>,
    /// Extra CA certificates (PEM) to trust for an https PCCS, e.g. its self-signed certificate.
    #[arg(long, value_name = "PEM", requires = "pccs_url")]
    pccs_ca: Option<PathBuf>,
    /// Verify at this time (RFC 3339) instead of now: tests, and re-checking old quotes.
    #[arg(long)]
    verify_at: Option<String>,
    /// Verifications at once, at most [default: the number of CPUs].
    #[arg(long)]
    concurrency: Option<usize>,
    #[arg(long, default_value_t = 10_000)]
    cache_capacity: usize,
    /// How long a verified verdict stays cached (never past its valid-until).
    #[arg(long, default_value_t = 3_600)]
    cache_ttl_s: u64,
    /// A submission whose nonce is older than this is refused (replay protection).
    #[arg(long, default_value_t = 600)]
    max_nonce_age_s: u64,
    /// DEVELOPMENT ONLY: accept quotes carrying exactly this report data (128 hex digits) without the key
    /// binding, e.g. Intel's sample quotes. Repeatable. Logged at start.
    #[arg(long = "dev-accept-report-data", value_name = "HEX")]
    dev_accept_report_data: Vec<String>,
    #[arg(long, env = "COCOON_ATTESTOR_INSTANCE", default_value = "attestor-1")]
    instance: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9466).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn report_data(hex: &str) -> anyhow::Result<[u8; 64]> {
    anyhow::ensure!(
        hex.len() == 128 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "--dev-accept-report-data needs 128 hex digits (64 bytes), got {:?}",
        hex
    );
    let mut out = [0u8; 64];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
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
    let policy =
        Policy::load(&args.policy).with_context(|| format!("policy {}", args.policy.display()))?;
    let source = match (&args.collateral, &args.pccs_url) {
        (Some(path), None) => CollateralSource::Files(path.clone()),
        (None, Some(url)) => CollateralSource::Url(url.clone()),
        _ => anyhow::bail!("give the collateral: --collateral FILE|DIR (or --pccs-url URL)"),
    };
    let pccs = match &args.pccs_url {
        Some(url) => {
            let mut pccs = PccsConfig::new(url.clone());
            pccs.extra_ca = args.pccs_ca.clone();
            let client = PccsClient::new(&pccs).context("--pccs-url")?;
            tracing::info!(
                pccs = client.base_url(),
                "collateral is fetched from the PCCS as quotes need it"
            );
            Some(client)
        }
        None => None,
    };
    let verifier =
        Arc::new(Verifier::from_source(policy, &source).context("loading the collateral")?);
    let mut config = AttestorConfig {
        pccs,
        instance: args.instance.clone(),
        cache_capacity: args.cache_capacity,
        cache_ttl_verified: Duration::from_secs(args.cache_ttl_s),
        max_nonce_age: Duration::from_secs(args.max_nonce_age_s),
        ..AttestorConfig::default()
    };
    if let Some(n) = args.concurrency {
        config.concurrency = n.max(1);
    }
    if let Some(at) = &args.verify_at {
        let parsed =
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("--verify-at {at:?} is not RFC 3339"))?;
        config.verify_at = Some(SystemTime::from(parsed));
        tracing::warn!(at, "verifying at an injected time, not now");
    }
    for hex in &args.dev_accept_report_data {
        config.dev_accept_report_data.push(report_data(hex)?);
    }
    if !config.dev_accept_report_data.is_empty() {
        tracing::warn!(
            count = config.dev_accept_report_data.len(),
            "DEVELOPMENT: quotes with these report data are accepted without the key binding"
        );
    }
    let bus = bus::Bus::connect(
        &bus::BusConfig::new(&args.nats_url, &args.instance).with_credentials(
            bus::Credentials::load_optional(args.nats_credentials.as_deref())?,
        ),
    )
    .await
    .context("is the stack running? start it with `cocoon dev up`")?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        bus::stop_requested().await;
        tracing::info!("stopping: finishing the batch in flight");
        on_signal.cancel();
    });
    let report = attestor::run(bus, verifier, config, cancel).await?;
    tracing::info!(?report, "attestor stopped");
    Ok(())
}
