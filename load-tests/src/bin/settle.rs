//! Settlement benchmark.
//!
//! - **Fee per payout on the TVM**: the settler's own wallet v5r1 message (tonlib-core, signed with the pool
//!   key) carrying 1, 50 and 255 transfers to fresh addresses, executed by the local TON server over
//!   @ton/sandbox. The cost of a batch is what the pool wallet lost beyond the amounts sent (gas, action and
//!   forwarding fees, storage), divided by its transfers. Goal: at 255 at least 60% below the cost at 1.
//! - **Prepared and signed per second**: the settler's batching (`Ledger::plan`) over workers owed money,
//!   signing the 255-transfer message, and encoding the SettlementPrepared frame, in one thread.
//!
//! Needs node and `npm ci --prefix infra/ton-local` (`make ton-local-deps`).

use std::time::{Duration, Instant};

use clap::Parser;
use events::ids::{SettlementId, TaskId, WorkerId};
use events::money::{GpuMillis, Nanoton};
use events::payments::{PaymentAccrued, SettlementConfirmed, SettlementPrepared};
use events::{CodecConfig, Event, EventRecord, ProducerId, Timestamp};
use settler::ledger::{BatchPolicy, Ledger, Payee};
use settler::toncenter::SendOutcome;
use settler::{PoolKey, PoolWallet, Toncenter};
use tests::ton_local::TonLocal;
use tonlib_core::TonAddress;

#[derive(Debug, Parser)]
#[command(
    about = "Fee per payout on the TVM for batches of 1, 50 and 255, and payouts prepared and signed per second"
)]
struct Args {
    /// Batches executed per size.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Each transfer's amount, nanoton.
    #[arg(long, default_value_t = 10_000_000)]
    amount: u64,
    /// Batches of 255 prepared and signed in the throughput run.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const TON: u64 = 1_000_000_000;

fn address(n: u64, salt: u8) -> String {
    let mut hash = [salt; 32];
    hash[..8].copy_from_slice(&n.to_be_bytes());
    TonAddress::new(0, hash.into()).to_base64_url()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "settle: fee per payout on the TVM ({} batches per size, {} nanoton per transfer), then {} batches of 255 \
         prepared and signed × {} runs; {}",
        args.repeats,
        args.amount,
        args.batches,
        args.runs,
        load_tests::machine::date_utc()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(fees(&args))?;
    for run in 1..=args.runs {
        let rate = prepare_and_sign(args.batches)?;
        println!(
            "run {run}/{}: {rate:.0} payouts prepared and signed per second ({:.1} ms per batch of 255)",
            args.runs,
            255_000.0 / rate
        );
    }
    Ok(())
}

async fn fees(args: &Args) -> anyhow::Result<()> {
    let key = PoolKey::from_seed(&[7; 32]);
    let wallet = PoolWallet::new(&key)?;
    let local = TonLocal::start(&key.public_key(), 10_000 * TON).await;
    let http = httpc::HttpClient::new(&httpc::ClientConfig::new(), false)?;
    let ton = Toncenter::new(local.url(), None, http);
    let mut next_recipient = 0u64;
    let mut per_size = Vec::new();
    for size in [1usize, 50, 255] {
        let mut costs = Vec::new();
        for _ in 0..args.repeats {
            let recipients: Vec<String> = (0..size)
                .map(|_| {
                    next_recipient += 1;
                    address(next_recipient, 0x42)
                })
                .collect();
            let transfers: Vec<(&str, u64)> = recipients
                .iter()
                .map(|r| (r.as_str(), args.amount))
                .collect();
            let seqno = ton
                .seqno(&wallet.address())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the pool wallet is not active"))?;
            let before = ton.balance(&wallet.address()).await?;
            let valid_until = (Timestamp::now().as_millis() / 1000 + 60) as u32;
            let signed = wallet.sign_transfers(seqno, valid_until, &transfers, false)?;
            match ton.send_boc(&signed.boc).await? {
                SendOutcome::Accepted { .. } => {}
                SendOutcome::Refused { reason } => anyhow::bail!("refused: {reason}"),
            }
            let after = ton.balance(&wallet.address()).await?;
            for r in &recipients {
                anyhow::ensure!(
                    ton.balance(r).await? == args.amount,
                    "{r} did not receive its transfer"
                );
            }
            let sent = args.amount * size as u64;
            let cost = before - after - sent;
            costs.push(cost as f64 / size as f64);
        }
        costs.sort_by(f64::total_cmp);
        let median = costs[costs.len() / 2];
        println!(
            "fee per payout, batch of {size:>3}: {:.7} TON (median of {}; min {:.7}, max {:.7})",
            median / TON as f64,
            costs.len(),
            costs[0] / TON as f64,
            costs[costs.len() - 1] / TON as f64
        );
        per_size.push((size, median));
    }
    let at_1 = per_size[0].1;
    let at_255 = per_size[2].1;
    let lower = 1.0 - at_255 / at_1;
    println!(
        "fee per payout at 255 is {:.0}% lower than at 1 (goal: at least 60%): {}",
        lower * 100.0,
        if lower >= 0.6 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Batches of 255 from workers each owed one accrual: plan, sign, encode the Prepared frame; then the batch
/// is confirmed in the ledger so the next plan takes the next 255 workers.
fn prepare_and_sign(batches: usize) -> anyhow::Result<f64> {
    let key = PoolKey::from_seed(&[9; 32]);
    let wallet = PoolWallet::new(&key)?;
    let producer = ProducerId::new("bench")?;
    let mut ledger = Ledger::new();
    let workers = batches * 255;
    let start_at = Timestamp::now();
    for i in 0..workers {
        let worker = WorkerId::new(format!("w{i}"))?;
        ledger.register(
            worker.clone(),
            Payee {
                payout_address: address(i as u64, 0x17),
                price_per_gpu_second: Nanoton(1_000_000),
            },
        );
        ledger.apply(
            &Event::PaymentAccrued(PaymentAccrued {
                task_id: TaskId::new(),
                worker_id: worker,
                attempt: 1,
                gpu_millis: GpuMillis(1_000),
                price_per_gpu_second: Nanoton(1_000_000),
                amount: Nanoton(1_000_000 + i as u64),
            }),
            start_at,
        );
    }
    let policy = BatchPolicy {
        max_age: Duration::ZERO,
        min_payout: Nanoton(1),
        ..BatchPolicy::default()
    };
    let now = Timestamp(start_at.0 + 1);
    let started = Instant::now();
    let mut payouts = 0usize;
    let (mut planning, mut signing) = (Duration::ZERO, Duration::ZERO);
    for seqno in 0..batches as u32 {
        let t = Instant::now();
        let batch = ledger
            .plan(now, &policy)
            .batch
            .ok_or_else(|| anyhow::anyhow!("no batch planned"))?;
        planning += t.elapsed();
        let t = Instant::now();
        let transfers: Vec<(&str, u64)> = batch
            .payouts
            .iter()
            .map(|p| (p.destination.as_str(), p.amount.0))
            .collect();
        let signed = wallet.sign_transfers(seqno, u32::MAX, &transfers, false)?;
        payouts += transfers.len();
        drop(transfers);
        let message_hash = signed.hash_hex();
        let prepared = SettlementPrepared {
            settlement_id: SettlementId::new(),
            wallet_seqno: seqno,
            valid_until: Timestamp(i64::MAX),
            payouts: batch.payouts,
            signed_message: signed.boc,
            message_hash,
        };
        let id = prepared.settlement_id;
        let record = EventRecord::new(producer.clone(), prepared);
        let frame = events::encode_frame(CodecConfig::default(), std::slice::from_ref(&record))?;
        std::hint::black_box(&frame);
        signing += t.elapsed();
        ledger.apply(&record.event, now);
        ledger.apply(
            &Event::SettlementConfirmed(SettlementConfirmed {
                settlement_id: id,
                tx_hash: String::new(),
                logical_time: 0,
                failed_transfers: vec![],
            }),
            now,
        );
    }
    anyhow::ensure!(payouts == workers, "{payouts} of {workers} paid");
    let rate = payouts as f64 / started.elapsed().as_secs_f64();
    println!(
        "  per batch: planning {:.1} ms (over {workers} owed workers, fewer each batch), signing and encoding {:.1} ms",
        planning.as_secs_f64() * 1000.0 / batches as f64,
        signing.as_secs_f64() * 1000.0 / batches as f64
    );
    Ok(rate)
}
