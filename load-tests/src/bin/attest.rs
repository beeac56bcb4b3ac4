//! Attestation benchmark: verifications per second of Intel's sample TDX quote (dcap-qvl, the policy, the
//! binding), cold and cached.
//!
//! - `cold, 1 thread`: `Verifier::verify` in a loop: the full chain of trust every time.
//! - `cold, N permits`: `attestor::verify_blocking` with N concurrent verifications on the blocking pool, as
//!   the service runs them.
//! - `cached`: what a repeated quote costs the service: the cache key (SHA-256 of the quote) and a lookup.
//!
//! The quote is the sample in `services/attestor/tests/fixtures`, verified at 2025-07-01T00:00:00Z (inside
//! its collateral's window) with its own report data as the binding.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use attestor::{
    Binding, CacheKey, CollateralSource, Policy, VerdictCache, Verifier, verify_blocking,
};
use clap::Parser;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "TDX quote verifications per second, cold and cached")]
struct Args {
    /// Cold verifications per run.
    #[arg(long, default_value_t = 300)]
    verifications: usize,
    /// Cached lookups per run.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
    /// Concurrent verifications on the blocking pool (default: the number of CPUs).
    #[arg(long)]
    permits: Option<usize>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const GOOD_TIME: u64 = 1_751_328_000;
const REPORT_DATA_OFFSET: usize = 48 + 584 - 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fixtures = tests::workspace_root().join("services/attestor/tests/fixtures");
    let quote = std::fs::read(fixtures.join("tdx_quote"))?;
    let report_data: [u8; 64] = quote[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64].try_into()?;
    let binding = Binding::Exact(report_data);
    let policy = Policy::load(&fixtures.join("policy.json"))?;
    let verifier = Arc::new(Verifier::from_source(
        policy,
        &CollateralSource::Files(fixtures.join("collateral")),
    )?);
    let at = UNIX_EPOCH + Duration::from_secs(GOOD_TIME);
    anyhow::ensure!(
        verifier.verify(&quote, &binding, at).is_verified(),
        "the sample quote does not verify"
    );
    let permits = args
        .permits
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "attest: sample TDX quote ({} bytes), {} cold verifications, {} cached lookups, {permits} permits, {} runs; {}",
        quote.len(),
        args.verifications,
        args.lookups,
        args.runs,
        load_tests::machine::date_utc()
    );
    for run in 1..=args.runs {
        let start = Instant::now();
        for _ in 0..args.verifications {
            assert!(verifier.verify(&quote, &binding, at).is_verified());
        }
        let single = args.verifications as f64 / start.elapsed().as_secs_f64();

        let pooled = runtime.block_on(async {
            let semaphore = Arc::new(Semaphore::new(permits));
            let start = Instant::now();
            let mut handles = Vec::with_capacity(args.verifications);
            for _ in 0..args.verifications {
                let (v, s, q, b) = (
                    verifier.clone(),
                    semaphore.clone(),
                    quote.clone(),
                    binding.clone(),
                );
                handles.push(tokio::spawn(async move {
                    verify_blocking(v, &s, q, b, at).await
                }));
            }
            for h in handles {
                assert!(h.await.expect("joined").expect("verified").is_verified());
            }
            args.verifications as f64 / start.elapsed().as_secs_f64()
        });

        let mut cache =
            VerdictCache::new(10_000, Duration::from_secs(3_600), Duration::from_secs(300));
        cache.insert(
            CacheKey::new(&quote, &binding),
            verifier.verify(&quote, &binding, at),
            at,
        );
        let start = Instant::now();
        for _ in 0..args.lookups {
            let key = CacheKey::new(&quote, &binding);
            assert!(cache.get(&key, at).is_some());
        }
        let cached = args.lookups as f64 / start.elapsed().as_secs_f64();
        println!(
            "run {run}/{}: cold 1 thread {single:.0} verifications/s ({:.2} ms each); cold {permits} permits \
             {pooled:.0}/s; cached {cached:.0}/s ({:.1} µs each, {:.0}× cold)",
            args.runs,
            1000.0 / single,
            1e6 / cached,
            cached / single
        );
    }
    Ok(())
}
