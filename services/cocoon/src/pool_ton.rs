//! `dev pool`'s payments: the local TON server (the real TVM under @ton/sandbox, `infra/ton-local`) with a
//! wallet v5r1 for a pool key made for this run, the settler paying the workers there, and the report of what
//! each worker earned, was paid, and holds on chain.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use client::{PaymentsQuery, ReadModel, WorkerPayments};
use events::Nanoton;
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonlib_core::TonAddress;

/// The pool wallet's balance on the local chain at start.
pub const WALLET_BALANCE: u64 = 100 * Nanoton::PER_TON;
/// How long the local TON server may take to start.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the workers' earnings may take to be paid once the workload is done.
const PAID_DEADLINE: Duration = Duration::from_secs(60);

/// The running local TON server.
#[derive(Debug)]
pub struct LocalTon {
    pub child: Child,
    pub url: String,
    pub wallet: String,
    pub log: PathBuf,
}

/// Where the local chain answers, once its process is handed to the services to stop.
#[derive(Debug, Clone)]
pub struct Chain {
    pub url: String,
    pub wallet: String,
}

/// A demo worker's payout address: derived from its id, so it is the same every run (a fresh account on the
/// local chain, which receives non-bounceable transfers).
pub fn payout_address(worker_id: &str) -> String {
    let hash: [u8; 32] = sha2::Sha256::digest(format!("cocoon dev payout {worker_id}")).into();
    TonAddress::new(0, hash.into()).to_base64_url()
}

/// A pool key for this run (development only): 64 hex characters, an Ed25519 seed hashed from two UUIDv7s
/// (148 random bits).
pub fn dev_pool_key() -> String {
    let mut hasher = sha2::Sha256::new();
    hasher.update(uuid::Uuid::now_v7().as_bytes());
    hasher.update(uuid::Uuid::now_v7().as_bytes());
    let seed: [u8; 32] = hasher.finalize().into();
    seed.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts `infra/ton-local/server.mjs` with a wallet for `key` (the pool key's text), funded with
/// [`WALLET_BALANCE`], and waits for its ready line.
pub async fn start(logs: &Path, key: &str) -> anyhow::Result<LocalTon> {
    let infra = crate::dev::stack_script()?
        .parent()
        .context("infra/stack.sh has no directory")?
        .to_path_buf();
    let dir = infra.join("ton-local");
    if !dir.join("node_modules").is_dir() {
        bail!(
            "the local TON server's packages are not installed: run `make ton-local-deps` (npm ci --prefix {})",
            dir.display()
        );
    }
    let public_key = settler::PoolKey::parse(key)?.public_key();
    let public_hex: String = public_key.iter().map(|b| format!("{b:02x}")).collect();
    let log = logs.join("ton-local.log");
    let err = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new("node")
        .arg(dir.join("server.mjs"))
        .args(["--public-key", &public_hex, "--port", "0"])
        .args(["--balance", &WALLET_BALANCE.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start node (Node.js 20 or later is needed for the local TON server)")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(READY_DEADLINE, lines.next_line())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the local TON server did not start within {} s; see {}",
                READY_DEADLINE.as_secs(),
                log.display()
            )
        })?
        .context("reading the local TON server's ready line")?
        .with_context(|| format!("the local TON server exited; see {}", log.display()))?;
    let ready: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("the local TON server said {line:?}"))?;
    let field = |k: &str| {
        ready[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the ready line has no {k}: {line}"))
    };
    Ok(LocalTon {
        url: field("url")?,
        wallet: field("wallet")?,
        child,
        log,
    })
}

/// The settler's command line for the local chain: short batches, every amount paid.
pub fn settler_args(url: &str) -> Vec<String> {
    [
        "--toncenter-url",
        url,
        "--max-age-s",
        "2",
        "--min-payout-nanoton",
        "1",
        "--resend-interval-ms",
        "1000",
    ]
    .map(str::to_owned)
    .into()
}

/// Waits until everything `workers` earned is paid (nothing pending or in flight), printing progress; then
/// prints what each earned, was paid and holds on chain. Returns whether all was paid in time.
pub async fn settle_and_report(
    model: &ReadModel,
    ton: &Chain,
    workers: &[&str],
) -> anyhow::Result<bool> {
    println!(
        "\npayments: the settler batches what each worker earned and pays it on the local TON chain …"
    );
    let deadline = tokio::time::Instant::now() + PAID_DEADLINE;
    let mut last = String::new();
    let rows = loop {
        let status = model
            .payments(&PaymentsQuery {
                worker: None,
                recent: 5,
            })
            .await?;
        let ours: Vec<WorkerPayments> = status
            .workers
            .into_iter()
            .filter(|w| workers.contains(&w.worker_id.as_str()))
            .collect();
        let owed = |w: &WorkerPayments| w.sums.pending.0 + w.sums.in_flight.0;
        let line = format!(
            "  accrued {}, paid {}, in flight {}, pending {}",
            sum(&ours, |w| w.sums.accrued.0),
            sum(&ours, |w| w.sums.paid.0),
            sum(&ours, |w| w.sums.in_flight.0),
            sum(&ours, |w| w.sums.pending.0),
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        let accrued_any = ours.iter().any(|w| w.sums.accruals > 0);
        if accrued_any && ours.iter().all(|w| owed(w) == 0) {
            break ours;
        }
        if tokio::time::Instant::now() >= deadline {
            println!(
                "  not all paid within {} s; `cocoon payments status` shows where it stands",
                PAID_DEADLINE.as_secs()
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let http = httpc::HttpClient::new(&httpc::ClientConfig::new(), false)?;
    let chain = settler::Toncenter::new(&ton.url, None, http);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{:<18} {:>20} {:>20} {:>20}  payout address",
        "worker", "earned", "paid", "on chain"
    )?;
    for w in &rows {
        let address = payout_address(w.worker_id.as_str());
        let on_chain = chain.balance(&address).await.map(Nanoton).ok();
        writeln!(
            out,
            "{:<18} {:>20} {:>20} {:>20}  {address}",
            w.worker_id.as_str(),
            w.sums.accrued.to_string(),
            w.sums.paid.to_string(),
            on_chain.map_or_else(|| "?".to_owned(), |b| b.to_string()),
        )?;
    }
    writeln!(
        out,
        "(earned and paid count every run on this stack; the local chain starts empty each run, so \"on chain\" is this run's payouts, less the storage fee TON charges an account on each later transfer in)"
    )?;
    let wallet = chain.balance(&ton.wallet).await.map(Nanoton).ok();
    writeln!(
        out,
        "pool wallet {} holds {} (started with {}; the difference is the payouts and their fees)",
        ton.wallet,
        wallet.map_or_else(|| "?".to_owned(), |b| b.to_string()),
        Nanoton(WALLET_BALANCE)
    )?;
    Ok(true)
}

fn sum(rows: &[WorkerPayments], f: impl Fn(&WorkerPayments) -> u64) -> Nanoton {
    Nanoton(rows.iter().map(f).sum())
}
