//! The settler end to end: a real nats-server, the real TVM (the local TON server over @ton/sandbox, with a
//! wallet v5r1 for the pool's key), and for the read model a real Postgres with the projector.
//!
//! Completions are published by the test, standing in for node agents; everything after them (accruals,
//! batching, signing, sending, confirming on chain) is the settler's. "Killed" settlers stop at an
//! injected fault point and are dropped, like a process killed there: everything they knew is in the log
//! and on chain, which is what a restart reads.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::allocations::{ScoreBreakdown, TaskAllocated};
use events::payments::{SettlementConfirmed, SettlementPrepared};
use events::tasks::{TaskCancelled, TaskCompleted, TaskFailed, Usage};
use events::workers::{GpuInfo, WorkerRegistered};
use events::{
    ClientId, Event, EventRecord, GpuMillis, Nanoton, ProducerId, Stream, TaskId, WorkerId,
};
use settler::ledger::BatchPolicy;
use settler::{FaultPoint, PoolKey, PoolWallet, RunReport, SettlerConfig, SettlerError, Toncenter};
use tests::ton_local::TonLocal;
use tests::{NatsServer, TestDb};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonlib_core::TonAddress;

const TON: u64 = 1_000_000_000;
const DEADLINE: Duration = Duration::from_secs(60);

struct Env {
    server: NatsServer,
    bus: Bus,
    publisher: Publisher,
    ton: TonLocal,
    key: PoolKey,
    /// The key's seed in hex, as the binary reads it.
    seed_hex: String,
    /// What each worker earned (by the test's own arithmetic) and where it is paid.
    earned: BTreeMap<WorkerId, u64>,
    addresses: HashMap<WorkerId, String>,
}

struct Running {
    stop: CancellationToken,
    handle: JoinHandle<Result<RunReport, SettlerError>>,
}

impl Running {
    async fn stop(self) -> RunReport {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

fn fresh_address() -> String {
    let mut hash = [0u8; 32];
    hash[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    hash[16..].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    hash[31] ^= 0x5a;
    TonAddress::new(0, hash.into()).to_base64_url()
}

fn test_config() -> SettlerConfig {
    SettlerConfig {
        instance: "settler-test".into(),
        policy: BatchPolicy {
            max_age: Duration::from_millis(500),
            min_payout: Nanoton(1),
            failed_retry_after: Duration::from_millis(500),
            ..BatchPolicy::default()
        },
        message_ttl: Duration::from_secs(30),
        resend_interval: Duration::from_millis(500),
        expiry_grace: Duration::from_millis(500),
        tick: Duration::from_millis(50),
        check_interval: Duration::from_millis(100),
        ..SettlerConfig::default()
    }
}

impl Env {
    async fn start(wallet_balance: u64) -> Env {
        Self::start_with(wallet_balance, false).await
    }

    async fn start_with(wallet_balance: u64, undeployed: bool) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let server = NatsServer::start().await;
        let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
        provision_streams(&bus.jetstream, 1).await.unwrap();
        let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
        seed[16..].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
        let key = PoolKey::from_seed(&seed);
        let seed_hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let ton = if undeployed {
            TonLocal::start_undeployed(&key.public_key(), wallet_balance).await
        } else {
            TonLocal::start(&key.public_key(), wallet_balance).await
        };
        let wallet = PoolWallet::new(&key).unwrap();
        assert!(
            settler::wallet::same_account(&wallet.address(), ton.wallet()),
            "tonlib-core's v5r1 address {} differs from @ton/ton's {}",
            wallet.address(),
            ton.wallet()
        );
        Env {
            server,
            bus,
            publisher,
            ton,
            key,
            seed_hex,
            earned: BTreeMap::new(),
            addresses: HashMap::new(),
        }
    }

    fn toncenter(&self) -> Toncenter {
        let http = httpc::HttpClient::new(&httpc::ClientConfig::new(), false).unwrap();
        Toncenter::new(self.ton.url(), None, http)
    }

    fn spawn(&self, config: SettlerConfig) -> Running {
        let stop = CancellationToken::new();
        let (bus, ton, wallet, s) = (
            self.bus.clone(),
            self.toncenter(),
            PoolWallet::new(&self.key).unwrap(),
            stop.clone(),
        );
        let handle = tokio::spawn(async move { settler::run(bus, ton, wallet, config, s).await });
        Running { stop, handle }
    }

    /// Runs the settler with every message it sends lost on the way (the chain drops external messages until
    /// told otherwise), until it has sent its first settlement; returns it running, and that settlement.
    async fn spawn_with_sends_lost(&self, config: SettlerConfig) -> (Running, SettlementPrepared) {
        self.ton.set_drop_externals(true).await;
        let running = self.spawn(config);
        eventually("the settlement is sent", || async {
            self.payments()
                .await
                .iter()
                .any(|e| matches!(e, Event::SettlementSubmitted(_)))
        })
        .await;
        let first = prepared(&self.payments().await)[0].clone();
        (running, first)
    }

    /// Runs the `settler` binary until it exits (with `fault`, it stops there like a killed process) or, without,
    /// until every worker is paid on chain and the log confirms it; then kills it.
    async fn run_binary(&self, fault: Option<&str>) -> std::process::ExitStatus {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_settler"));
        command
            .args(["--nats-url", &self.server.url()])
            .args(["--toncenter-url", self.ton.url()])
            .args(["--max-age-s", "0", "--min-payout-nanoton", "1"])
            .args(["--resend-interval-ms", "500", "--instance", "settler-bin"])
            .env("COCOON_SETTLER_KEY", &self.seed_hex)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        if let Some(fault) = fault {
            command.args(["--fault", fault]);
        }
        let mut child = command.spawn().expect("the settler binary starts");
        if fault.is_some() {
            return tokio::time::timeout(DEADLINE, child.wait())
                .await
                .expect("the settler stopped at its fault point")
                .unwrap();
        }
        self.wait_all_paid().await;
        let earned: u64 = self.earned.values().sum();
        eventually("the log confirms every payout", || async {
            confirmed_payouts(&self.payments().await)
                .values()
                .sum::<u64>()
                == earned
        })
        .await;
        child.kill().await.unwrap();
        child.wait().await.unwrap()
    }

    async fn publish(&self, event: impl Into<Event>) {
        let record = EventRecord::new(ProducerId::new("test").unwrap(), event);
        let _receipt = self.publisher.publish(&record).await.unwrap();
        self.publisher.flush().await.unwrap();
    }

    /// Registers a worker at `price` nanoton per GPU-second, paid to a fresh address (or `address`).
    async fn register(&mut self, name: &str, price: u64, address: Option<&str>) -> WorkerId {
        let worker = WorkerId::new(name).unwrap();
        let address = address.map(str::to_owned).unwrap_or_else(fresh_address);
        self.publish(WorkerRegistered {
            worker_id: worker.clone(),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: format!("GPU-{name}"),
                name: "simulated".into(),
                memory_total_mib: 80_000,
                simulated: true,
            }],
            price_per_gpu_second: Nanoton(price),
            payout_address: address.clone(),
            region: "test".into(),
            max_concurrent_tasks: 4,
            public_key: vec![1; 32],
            agent_version: "test".into(),
            model_tags: vec![],
        })
        .await;
        self.addresses.insert(worker.clone(), address);
        self.earned.entry(worker.clone()).or_insert(0);
        worker
    }

    /// Publishes a completion of a new task and books what it earns.
    /// A task allocated to `worker` (whose registered price is `price`, the task's ceiling too) and completed.
    async fn complete(&mut self, worker: &WorkerId, price: u64, gpu_millis: u64) -> TaskId {
        let task = TaskId::new();
        self.publish(allocation(task, worker, 1, price)).await;
        self.publish(completion(task, worker, 1, gpu_millis)).await;
        *self.earned.get_mut(worker).unwrap() += gpu_millis * price / 1000;
        task
    }

    async fn payments(&self) -> Vec<Event> {
        bus::read_events(&self.bus.jetstream, Stream::Payments, Vec::new())
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.event)
            .collect()
    }

    async fn balance_of(&self, worker: &WorkerId) -> u64 {
        self.ton.balance(&self.addresses[worker]).await
    }

    /// What a worker's address received from the pool wallet, summed over its transactions on chain, and
    /// the fees its own account paid (storage, charged by TON on every incoming transaction after the first).
    async fn received_by(&self, worker: &WorkerId) -> (u64, u64) {
        let (_, raw) = self
            .ton
            .request(
                &format!(
                    "/api/v2/getTransactions?address={}&limit=100",
                    self.addresses[worker]
                ),
                None,
            )
            .await;
        let items = raw["result"].as_array().cloned().unwrap_or_default();
        let amount =
            |v: &serde_json::Value| v.as_str().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let mut received = 0;
        let mut fees = 0;
        for item in &items {
            let source = item["in_msg"]["source"].as_str().unwrap_or_default();
            if settler::wallet::same_account(source, self.ton.wallet()) {
                received += amount(&item["in_msg"]["value"]);
            }
            fees += amount(&item["fee"]);
        }
        (received, fees)
    }

    /// Waits until every worker has received on chain what it earned, and the log confirms it (the chain
    /// executes a message before the settler has seen and recorded it).
    async fn wait_all_paid(&self) {
        eventually("every worker received what it earned", || async {
            for (worker, earned) in &self.earned {
                let (received, _) = self.received_by(worker).await;
                if received != *earned {
                    tracing::debug!(%worker, received, earned, "not paid yet");
                    return false;
                }
            }
            true
        })
        .await;
        let earned: u64 = self.earned.values().sum();
        eventually("the log confirms every payout", || async {
            confirmed_payouts(&self.payments().await)
                .values()
                .sum::<u64>()
                == earned
        })
        .await;
    }

    /// Each worker received exactly what it earned (not more: nobody paid twice), its balance is that less
    /// its own account's storage fees, and each task accrued once.
    async fn assert_books_balance(&self) {
        for (worker, earned) in &self.earned {
            let (received, fees) = self.received_by(worker).await;
            assert_eq!(received, *earned, "what {worker} received");
            assert_eq!(
                self.balance_of(worker).await,
                received - fees,
                "{worker}'s balance rose by what it received, less its storage fees"
            );
        }
        let payments = self.payments().await;
        let mut accruals: HashMap<TaskId, usize> = HashMap::new();
        let mut accrued = 0u64;
        for e in &payments {
            if let Event::PaymentAccrued(a) = e {
                *accruals.entry(a.task_id).or_default() += 1;
                accrued += a.amount.0;
            }
        }
        assert!(
            accruals.values().all(|n| *n == 1),
            "a task accrued twice: {accruals:?}"
        );
        let earned: u64 = self.earned.values().sum();
        assert_eq!(accrued, earned, "total accrued = total earned");
        let paid: u64 = confirmed_payouts(&payments).values().sum();
        assert_eq!(paid, earned, "total paid = total earned");
    }
}

/// The allocator's placement of the task's `attempt` on `worker`, for a task whose price ceiling is
/// `max_price` nanoton per GPU-second.
fn allocation(task: TaskId, worker: &WorkerId, attempt: u32, max_price: u64) -> TaskAllocated {
    let mut spec = events::sample::task_spec(0);
    spec.max_price_per_gpu_second = Nanoton(max_price);
    TaskAllocated {
        task_id: task,
        client_id: ClientId::new("client-1").unwrap(),
        worker_id: worker.clone(),
        attempt,
        allocator_epoch: 1,
        gpu_indices: vec![0],
        score: ScoreBreakdown {
            total: 1.0,
            load: 0.2,
            memory: 0.2,
            history: 0.2,
            latency: 0.2,
            affinity: 0.2,
        },
        spec,
    }
}

fn completion(task: TaskId, worker: &WorkerId, attempt: u32, gpu_millis: u64) -> TaskCompleted {
    TaskCompleted {
        task_id: task,
        worker_id: worker.clone(),
        attempt,
        usage: Usage {
            gpu_millis: GpuMillis(gpu_millis),
            peak_gpu_memory_mib: None,
            wall_ms: gpu_millis,
        },
    }
}

/// What confirmed settlements paid each worker (failed transfers excluded).
fn confirmed_payouts(payments: &[Event]) -> HashMap<WorkerId, u64> {
    let prepared: HashMap<_, _> = payments
        .iter()
        .filter_map(|e| match e {
            Event::SettlementPrepared(p) => Some((p.settlement_id, p)),
            _ => None,
        })
        .collect();
    let mut paid: HashMap<WorkerId, u64> = HashMap::new();
    for e in payments {
        if let Event::SettlementConfirmed(c) = e {
            for payout in &prepared[&c.settlement_id].payouts {
                if !c
                    .failed_transfers
                    .iter()
                    .any(|f| f.worker_id == payout.worker_id)
                {
                    *paid.entry(payout.worker_id.clone()).or_default() += payout.amount.0;
                }
            }
        }
    }
    paid
}

fn prepared(payments: &[Event]) -> Vec<&SettlementPrepared> {
    payments
        .iter()
        .filter_map(|e| match e {
            Event::SettlementPrepared(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn confirmations(payments: &[Event]) -> Vec<&SettlementConfirmed> {
    payments
        .iter()
        .filter_map(|e| match e {
            Event::SettlementConfirmed(c) => Some(c),
            _ => None,
        })
        .collect()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_paid_exactly_what_they_earned_and_duplicates_accrue_once() {
    let mut env = Env::start(100 * TON).await;
    let db = TestDb::create().await;
    let stop_projector = CancellationToken::new();
    let mut projection = projector::ProjectorConfig::new(env.server.url(), db.url());
    projection.fetch_wait = Duration::from_millis(100);
    let s = stop_projector.clone();
    let projector = tokio::spawn(async move { projector::run(projection, s, false).await });

    let a = env.register("worker-a", 1_000_000, None).await;
    let b = env.register("worker-b", 2_500_000, None).await;
    let c = env.register("worker-c", 333, None).await;
    env.complete(&a, 1_000_000, 1_500).await;
    env.complete(&a, 1_000_000, 2_000).await;
    let twice = env.complete(&b, 2_500_000, 4_321).await;
    // The same completion published again, and a late completion of another attempt of that task.
    env.publish(completion(twice, &b, 1, 4_321)).await;
    env.publish(completion(twice, &b, 2, 9_999)).await;
    env.complete(&c, 333, 7).await;

    let running = env.spawn(test_config());
    env.wait_all_paid().await;
    let report = running.stop().await;
    assert_eq!(report.accruals, 4, "{report:?}");
    env.assert_books_balance().await;
    assert_eq!(
        env.earned[&c], 2,
        "333 × 7 ms = 2.331 rounds down to 2 nanoton"
    );

    // The read model shows the same: everything paid, nothing pending.
    let pg = db.client().await;
    eventually("the read model shows every worker paid", || async {
        let rows = pg
            .query(
                "SELECT worker_id, paid_nanoton::bigint, pending_nanoton::bigint, in_flight_nanoton::bigint
                 FROM worker_payments",
                &[],
            )
            .await;
        // The projector may still be migrating a fresh database on a busy machine: not there yet.
        let Ok(rows) = rows else { return false };
        rows.len() == 3
            && rows.iter().all(|r| {
                let worker = WorkerId::new(r.get::<_, String>(0)).unwrap();
                r.get::<_, i64>(1) as u64 == env.earned[&worker]
                    && r.get::<_, i64>(2) == 0
                    && r.get::<_, i64>(3) == 0
            })
    })
    .await;
    stop_projector.cancel();
    projector.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_255_payouts_executes_in_one_transaction() {
    let mut env = Env::start(1_000 * TON).await;
    let mut workers = Vec::new();
    for i in 0..255 {
        workers.push(env.register(&format!("w{i:03}"), 1_000_000, None).await);
    }
    for (i, w) in workers.iter().enumerate() {
        env.complete(w, 1_000_000, 1_000 + i as u64).await;
    }
    let mut config = test_config();
    // Only a full batch closes it: the age limit is far away.
    config.policy.max_age = Duration::from_secs(3_600);
    let running = env.spawn(config);
    env.wait_all_paid().await;
    running.stop().await;
    let payments = env.payments().await;
    let confirmed = confirmations(&payments);
    assert_eq!(confirmed.len(), 1, "one settlement");
    assert!(confirmed[0].failed_transfers.is_empty());
    let prepared: Vec<_> = prepared(&payments);
    assert_eq!(prepared.len(), 1);
    assert_eq!(prepared[0].payouts.len(), 255);
    // On chain: one wallet transaction with 255 outgoing transfers.
    let txs = env
        .toncenter()
        .transactions(env.ton.wallet(), 5, None)
        .await
        .unwrap();
    let tx = txs
        .iter()
        .find(|t| t.hash_hex() == confirmed[0].tx_hash)
        .expect("the confirmed transaction is the wallet's");
    assert_eq!(tx.out_msgs.len(), 255);
    env.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_killed_at_each_step_never_pays_twice_nor_loses_an_accrual() {
    let mut env = Env::start(100 * TON).await;
    let workers = [
        env.register("k1", 1_000_000, None).await,
        env.register("k2", 2_000_000, None).await,
    ];
    for (round, fault) in [
        FaultPoint::AfterPrepared,
        FaultPoint::AfterSend,
        FaultPoint::BeforeConfirmed,
    ]
    .into_iter()
    .enumerate()
    {
        for (i, w) in workers.iter().enumerate() {
            let price = 1_000_000 * (i as u64 + 1);
            env.complete(w, price, 1_000 + 10 * round as u64).await;
        }
        let mut config = test_config();
        config.fault = Some(fault);
        let killed = env.spawn(config);
        match killed.handle.await.unwrap() {
            Err(SettlerError::Fault(point)) => assert_eq!(point, fault),
            other => panic!("expected to stop at {fault:?}, got {other:?}"),
        }
        // Restarted: it resumes the recorded settlement.
        let running = env.spawn(test_config());
        env.wait_all_paid().await;
        running.stop().await;
        env.assert_books_balance().await;
        let payments = env.payments().await;
        assert_eq!(
            confirmations(&payments).len(),
            round + 1,
            "one settlement per round, each confirmed once (after {fault:?})"
        );
    }
    // One more restart finds nothing left to do and pays nothing more.
    let running = env.spawn(test_config());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let report = running.stop().await;
    assert_eq!(report.settlements_prepared, 0, "{report:?}");
    env.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_goes_into_a_new_batch_and_is_paid_once() {
    let mut env = Env::start(100 * TON).await;
    let w = env.register("e1", 1_000_000, None).await;
    let task = env.complete(&w, 1_000_000, 3_000).await;
    // The network loses every message for now.
    env.ton.set_drop_externals(true).await;
    let mut config = test_config();
    config.message_ttl = Duration::from_secs(2);
    let running = env.spawn(config);
    eventually("the settlement expired", || async {
        env.payments()
            .await
            .iter()
            .any(|e| matches!(e, Event::SettlementExpired(_)))
    })
    .await;
    env.ton.set_drop_externals(false).await;
    env.wait_all_paid().await;
    running.stop().await;
    let payments = env.payments().await;
    let prepared: Vec<_> = prepared(&payments);
    assert!(prepared.len() >= 2, "rebuilt after expiring");
    let expired = prepared[0];
    let paid_by = prepared.last().unwrap();
    assert_eq!(expired.payouts[0].task_ids, vec![task]);
    assert_eq!(paid_by.payouts[0].task_ids, vec![task]);
    assert_eq!(
        expired.wallet_seqno, paid_by.wallet_seqno,
        "the expired message never used its seqno"
    );
    assert!(
        payments
            .iter()
            .any(|e| matches!(e, Event::SettlementSubmitted(s) if s.settlement_id == expired.settlement_id && s.send_attempt >= 2)),
        "the message was resent while it could still be accepted"
    );
    assert_eq!(confirmations(&payments).len(), 1);
    env.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_the_wallet_cannot_cover_stay_unpaid_and_are_reported() {
    let mut env = Env::start(100 * TON).await;
    let db = TestDb::create().await;
    let stop_projector = CancellationToken::new();
    let mut projection = projector::ProjectorConfig::new(env.server.url(), db.url());
    projection.fetch_wait = Duration::from_millis(100);
    let s = stop_projector.clone();
    let projector = tokio::spawn(async move { projector::run(projection, s, false).await });

    let workers = [
        env.register("p1", TON, None).await,
        env.register("p2", TON, None).await,
        env.register("p3", TON, None).await,
    ];
    for w in &workers {
        env.complete(w, TON, 2_000).await; // 2 TON each
    }
    // Enough for one transfer and the fees, not for three.
    env.ton.set_balance(env.ton.wallet(), 3 * TON).await;
    let mut config = test_config();
    config.policy.failed_retry_after = Duration::from_secs(3_600);
    let running = env.spawn(config);
    eventually("a settlement confirmed", || async {
        !confirmations(&env.payments().await).is_empty()
    })
    .await;
    let payments = env.payments().await;
    let confirmed = confirmations(&payments)[0].clone();
    assert_eq!(confirmed.failed_transfers.len(), 2, "{confirmed:?}");
    for f in &confirmed.failed_transfers {
        assert_eq!(
            env.balance_of(&f.worker_id).await,
            0,
            "{} was not paid",
            f.worker_id
        );
        assert!(f.reason.contains("no transfer"), "{}", f.reason);
    }
    let paid: Vec<_> = workers
        .iter()
        .filter(|w| {
            !confirmed
                .failed_transfers
                .iter()
                .any(|f| &f.worker_id == *w)
        })
        .collect();
    assert_eq!(paid.len(), 1);
    assert_eq!(env.balance_of(paid[0]).await, 2 * TON);
    // The read model reports them as failed and still owed.
    let pg = db.client().await;
    eventually("the read model reports the failed transfers", || async {
        let row = pg
            .query_one(
                "SELECT coalesce(sum(failed_transfers), 0)::bigint, coalesce(sum(pending_nanoton), 0)::bigint,
                        coalesce(sum(paid_nanoton), 0)::bigint
                 FROM worker_payments",
                &[],
            )
            .await;
        // The projector may still be migrating a fresh database on a busy machine: not there yet.
        let Ok(row) = row else { return false };
        row.get::<_, i64>(0) == 2
            && row.get::<_, i64>(1) == 4 * TON as i64
            && row.get::<_, i64>(2) == 2 * TON as i64
    })
    .await;
    running.stop().await;

    // Topped up, a settler retrying them pays each exactly once.
    env.ton.fund(env.ton.wallet(), 10 * TON).await;
    let running = env.spawn(test_config());
    env.wait_all_paid().await;
    running.stop().await;
    env.assert_books_balance().await;
    stop_projector.cancel();
    projector.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_payout_address_is_parked_without_blocking_the_batch() {
    let mut env = Env::start(100 * TON).await;
    let good = env.register("good", 1_000_000, None).await;
    let bad = env
        .register("bad", 1_000_000, Some("EQ-not-a-real-address"))
        .await;
    env.complete(&good, 1_000_000, 5_000).await;
    let parked_task = env.complete(&bad, 1_000_000, 4_000).await;
    let owed_to_bad = env.earned.remove(&bad).unwrap();
    let running = env.spawn(test_config());
    env.wait_all_paid().await;
    eventually("the bad address is parked", || async {
        env.payments().await.iter().any(|e| {
            matches!(e, Event::PayoutParked(p) if p.worker_id == bad && p.task_ids == vec![parked_task])
        })
    })
    .await;
    // The worker registers a payable address: what was parked is paid.
    env.earned.insert(bad.clone(), owed_to_bad);
    env.register("bad", 1_000_000, None).await;
    env.wait_all_paid().await;
    running.stop().await;
    env.assert_books_balance().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settler_process_stopped_at_each_step_and_restarted_pays_once() {
    let mut env = Env::start(100 * TON).await;
    let workers = [
        env.register("b1", 1_000_000, None).await,
        env.register("b2", 3_000_000, None).await,
    ];
    for (round, fault) in ["after-prepared", "after-send", "before-confirmed"]
        .into_iter()
        .enumerate()
    {
        for (i, w) in workers.iter().enumerate() {
            let price = if i == 0 { 1_000_000 } else { 3_000_000 };
            env.complete(w, price, 2_000 + round as u64).await;
        }
        let status = env.run_binary(Some(fault)).await;
        assert!(!status.success(), "the process ended at {fault}: {status}");
        // A fresh process takes over from the log and the chain.
        env.run_binary(None).await;
        env.assert_books_balance().await;
        assert_eq!(confirmations(&env.payments().await).len(), round + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_seqno_another_message_used_is_rebuilt_and_paid_once() {
    let mut env = Env::start(100 * TON).await;
    let w = env.register("u1", 1_000_000, None).await;
    let task = env.complete(&w, 1_000_000, 4_000).await;
    // The settler's first send is lost, and it does not resend for a long while.
    let mut config = test_config();
    config.resend_interval = Duration::from_secs(600);
    let (running, first) = env.spawn_with_sends_lost(config).await;
    // Someone else with the pool's key spends that seqno on another message.
    env.ton.set_drop_externals(false).await;
    let other = fresh_address();
    let valid_until = (events::Timestamp::now().as_millis() / 1000 + 60) as u32;
    let signed = PoolWallet::new(&env.key)
        .unwrap()
        .sign_transfers(first.wallet_seqno, valid_until, &[(&other, 1_000)], false)
        .unwrap();
    assert!(matches!(
        env.toncenter().send_boc(&signed.boc).await.unwrap(),
        settler::toncenter::SendOutcome::Accepted { .. }
    ));
    env.wait_all_paid().await;
    running.stop().await;
    let payments = env.payments().await;
    assert!(
        payments.iter().any(
            |e| matches!(e, Event::SettlementExpired(x) if x.settlement_id == first.settlement_id)
        ),
        "the settlement whose seqno was used expired"
    );
    let paid_by = *prepared(&payments).last().unwrap();
    assert_eq!(paid_by.payouts[0].task_ids, vec![task]);
    assert_eq!(paid_by.wallet_seqno, first.wallet_seqno + 1);
    env.assert_books_balance().await;
}

/// Whoever relays an external message may lay it out anew (here: the body moved into a reference), which
/// changes its hash but executes the very same signed transfers. The settler recognises its message by the
/// signed body: the settlement is confirmed, never expired and paid a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_relayed_in_another_layout_is_recognised_and_paid_once() {
    use tonlib_core::tlb_types::block::message::Message;
    use tonlib_core::tlb_types::primitives::either::EitherRefLayout;
    use tonlib_core::tlb_types::tlb::TLB;

    let mut env = Env::start(100 * TON).await;
    let w = env.register("r1", 1_000_000, None).await;
    let task = env.complete(&w, 1_000_000, 4_000).await;
    // The settler's own sends are lost, and it does not resend for a long while.
    let mut config = test_config();
    config.resend_interval = Duration::from_secs(600);
    let (running, first) = env.spawn_with_sends_lost(config).await;
    // A relay hands the chain the same signed body in another layout.
    let mut relaid = Message::from_boc(&first.signed_message).unwrap();
    relaid.body.layout = match relaid.body.layout {
        EitherRefLayout::ToCell => EitherRefLayout::ToRef,
        _ => EitherRefLayout::ToCell,
    };
    let relaid_boc = relaid.to_boc(true).unwrap();
    let relaid_hash: [u8; 32] = relaid.cell_hash().unwrap().into();
    let relaid_hash = settler::wallet::hex(&relaid_hash);
    assert_ne!(
        relaid_hash, first.message_hash,
        "the relayed message has another hash"
    );
    env.ton.set_drop_externals(false).await;
    assert!(matches!(
        env.toncenter().send_boc(&relaid_boc).await.unwrap(),
        settler::toncenter::SendOutcome::Accepted { .. }
    ));
    eventually("the settlement is confirmed", || async {
        !confirmations(&env.payments().await).is_empty()
    })
    .await;
    env.wait_all_paid().await;
    running.stop().await;
    let payments = env.payments().await;
    assert!(
        !payments
            .iter()
            .any(|e| matches!(e, Event::SettlementExpired(_))),
        "nothing expired: {payments:?}"
    );
    assert_eq!(prepared(&payments).len(), 1, "one batch, paid once");
    assert_eq!(
        confirmations(&payments)[0].settlement_id,
        first.settlement_id
    );
    assert_eq!(first.payouts[0].task_ids, vec![task]);
    assert_eq!(env.received_by(&w).await.0, env.earned[&w], "paid once");
    env.assert_books_balance().await;
}

/// A pool wallet that is funded but not deployed: the first settlement (seqno 0) deploys it. Its first
/// sends are lost; the settler resends it like any other until it executes, deploying the wallet and paying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settlement_that_deploys_the_wallet_is_resent_until_it_executes() {
    let mut env = Env::start_with(100 * TON, true).await;
    let address = PoolWallet::new(&env.key).unwrap().address();
    assert_eq!(
        env.toncenter().account(&address).await.unwrap().state,
        "uninitialized"
    );
    let w = env.register("d1", 1_000_000, None).await;
    env.complete(&w, 1_000_000, 3_000).await;
    env.ton.set_drop_externals(true).await;
    let running = env.spawn(test_config());
    eventually("the deploying settlement is sent twice", || async {
        env.payments()
            .await
            .iter()
            .any(|e| matches!(e, Event::SettlementSubmitted(s) if s.send_attempt >= 2))
    })
    .await;
    env.ton.set_drop_externals(false).await;
    env.wait_all_paid().await;
    running.stop().await;
    let payments = env.payments().await;
    let batches = prepared(&payments);
    assert_eq!(batches.len(), 1, "one batch, never rebuilt");
    assert_eq!(batches[0].wallet_seqno, 0);
    assert_eq!(confirmations(&payments).len(), 1);
    assert_eq!(
        env.toncenter().account(&address).await.unwrap().state,
        "active"
    );
    env.assert_books_balance().await;
}

/// Incoming transfers (anyone can send them, many and cheap) land on the wallet after a settlement's message
/// executed and before the settler looks: they do not count against the search limit, so the message is
/// still found and the settlement confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_transfers_do_not_push_an_executed_message_out_of_the_search() {
    let mut env = Env::start(100 * TON).await;
    let w = env.register("s1", 1_000_000, None).await;
    env.complete(&w, 1_000_000, 2_000).await;
    let (running, first) = env.spawn_with_sends_lost(test_config()).await;
    running.stop().await;
    // While no settler runs, the message executes, then twelve transfers come in.
    env.ton.set_drop_externals(false).await;
    assert!(matches!(
        env.toncenter()
            .send_boc(&first.signed_message)
            .await
            .unwrap(),
        settler::toncenter::SendOutcome::Accepted { .. }
    ));
    let wallet = env.ton.wallet().to_owned();
    for _ in 0..12 {
        env.ton.fund(&wallet, TON).await;
    }
    let mut config = test_config();
    config.search_limit = 4;
    let running = env.spawn(config);
    eventually("the settlement is confirmed", || async {
        !confirmations(&env.payments().await).is_empty()
    })
    .await;
    running.stop().await;
    let payments = env.payments().await;
    assert_eq!(
        confirmations(&payments)[0].settlement_id,
        first.settlement_id
    );
    assert!(
        !payments
            .iter()
            .any(|e| matches!(e, Event::SettlementExpired(_)))
    );
    env.assert_books_balance().await;
}

/// Anyone with a worker's credentials can publish a completion naming any task: only an attempt allocated to
/// the reporting worker accrues, at the worker's price but never above the task's ceiling; another worker's
/// failure of an earlier attempt does not take that allocation away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allocated_attempts_accrue_and_never_above_the_tasks_price_ceiling() {
    let mut env = Env::start(100 * TON).await;
    let honest = env.register("honest", 1_000_000, None).await;
    let greedy = env.register("greedy", 5_000_000, None).await;
    // A worker whose registration comes only later: its completion waits for it, and a cancellation of the
    // task read meanwhile does not take away the allocation it was already matched with.
    let late = WorkerId::new("late").unwrap();
    let waits = TaskId::new();
    env.publish(allocation(waits, &late, 1, 1_000_000)).await;
    env.publish(completion(waits, &late, 1, 700)).await;
    env.publish(TaskCancelled {
        task_id: waits,
        reason: "the client gave up".into(),
    })
    .await;
    // A task never allocated to anyone, and one allocated to the honest worker, both "completed" by greedy.
    let invented = TaskId::new();
    env.publish(completion(invented, &greedy, 1, 9_000)).await;
    let someone_elses = TaskId::new();
    env.publish(allocation(someone_elses, &honest, 1, 1_000_000))
        .await;
    env.publish(completion(someone_elses, &greedy, 1, 9_000))
        .await;
    // Greedy's own task, whose ceiling is below its price: paid at the ceiling.
    let own = TaskId::new();
    env.publish(allocation(own, &greedy, 1, 2_000_000)).await;
    env.publish(completion(own, &greedy, 1, 3_000)).await;
    *env.earned.get_mut(&greedy).unwrap() += 3_000 * 2_000_000 / 1_000;
    // A task taken back from the honest worker (attempt 1) and given to greedy (attempt 2); the honest
    // worker's late failure of attempt 1 does not take greedy's allocation away.
    let moved = TaskId::new();
    env.publish(allocation(moved, &honest, 1, 1_000_000)).await;
    env.publish(allocation(moved, &greedy, 2, 1_000_000)).await;
    env.publish(TaskFailed {
        task_id: moved,
        worker_id: Some(honest.clone()),
        attempt: 1,
        reason: "lost its GPU".into(),
        retryable: false,
    })
    .await;
    env.publish(completion(moved, &greedy, 2, 1_000)).await;
    *env.earned.get_mut(&greedy).unwrap() += 1_000 * 1_000_000 / 1_000;
    // Attempt 1 placed on the honest worker at epoch 2, and a fenced-out allocator's placement of the same
    // attempt on greedy (epoch 1) landing late: the newer epoch's placement holds.
    let doubled = TaskId::new();
    let mut newer = allocation(doubled, &honest, 1, 1_000_000);
    newer.allocator_epoch = 2;
    env.publish(newer).await;
    env.publish(allocation(doubled, &greedy, 1, 1_000_000))
        .await;
    env.publish(completion(doubled, &honest, 1, 500)).await;
    *env.earned.get_mut(&honest).unwrap() += 500 * 1_000_000 / 1_000;
    let running = env.spawn(test_config());
    // The honest worker completes its task: it accrues, once.
    env.publish(completion(someone_elses, &honest, 1, 2_000))
        .await;
    *env.earned.get_mut(&honest).unwrap() += 2_000 * 1_000_000 / 1_000;
    env.wait_all_paid().await;
    // Now the late worker registers: its waiting completion accrues and is paid.
    assert_eq!(env.register("late", 1_000_000, None).await, late);
    *env.earned.get_mut(&late).unwrap() += 700 * 1_000_000 / 1_000;
    env.wait_all_paid().await;
    let report = running.stop().await;
    assert_eq!(report.accruals, 5, "{report:?}");
    assert_eq!(report.refused_completions, 2, "{report:?}");
    let accrued: BTreeMap<TaskId, (WorkerId, u64, u64)> = env
        .payments()
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::PaymentAccrued(a) => Some((
                a.task_id,
                (a.worker_id, a.price_per_gpu_second.0, a.amount.0),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(accrued.len(), 5, "{accrued:?}");
    assert!(!accrued.contains_key(&invented));
    assert_eq!(accrued[&own], (greedy.clone(), 2_000_000, 6_000_000));
    assert_eq!(
        accrued[&someone_elses],
        (honest.clone(), 1_000_000, 2_000_000)
    );
    assert_eq!(accrued[&moved], (greedy.clone(), 1_000_000, 1_000_000));
    assert_eq!(accrued[&doubled], (honest.clone(), 1_000_000, 500_000));
    assert_eq!(accrued[&waits], (late.clone(), 1_000_000, 700_000));
    env.assert_books_balance().await;
}

/// A v7 task id minted `ago` before now.
fn task_minted_ago(ago: Duration) -> TaskId {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let millis = (now - ago).as_millis();
    let fresh = uuid::Uuid::now_v7().as_u128();
    TaskId::from_u128(millis << 80 | (fresh & ((1 << 80) - 1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_tasks_are_forgotten_after_the_accrual_window_and_never_accrue_again() {
    let mut env = Env::start(100 * TON).await;
    let a = env.register("worker-a", 1_000_000, None).await;
    let mut config = test_config();
    config.accrual_window = Duration::from_secs(10);
    // A task submitted 8 s ago completes now: inside the window, it accrues and is paid.
    let old = task_minted_ago(Duration::from_secs(8));
    let leaves_window_at = tokio::time::Instant::now() + Duration::from_secs(3);
    env.publish(allocation(old, &a, 1, 1_000_000)).await;
    env.publish(completion(old, &a, 1, 1_500)).await;
    *env.earned.get_mut(&a).unwrap() += 1_500_000;
    let fresh = env.complete(&a, 1_000_000, 2_000).await;
    let running = env.spawn(config.clone());
    env.wait_all_paid().await;

    // Once log time has passed the window, the paid task's id is forgotten: its duplicate completion is refused
    // (not paid again), and so is a completion of a task submitted an hour ago; a fresh task is paid.
    tokio::time::sleep_until(leaves_window_at).await;
    env.publish(completion(old, &a, 2, 9_999)).await;
    let hour_old = task_minted_ago(Duration::from_secs(3_600));
    env.publish(completion(hour_old, &a, 1, 4_000)).await;
    env.complete(&a, 1_000_000, 3_000).await;
    env.wait_all_paid().await;
    let report = running.stop().await;
    assert_eq!(report.accruals, 3, "{report:?}");
    assert_eq!(report.refused_completions, 2, "{report:?}");
    env.assert_books_balance().await;

    // A restart reads TASKS from the start again: the old completions are refused, the fresh task is still
    // remembered as paid, and only a new completion accrues.
    let running = env.spawn(config);
    env.publish(completion(fresh, &a, 1, 2_000)).await;
    env.complete(&a, 1_000_000, 500).await;
    env.wait_all_paid().await;
    let report = running.stop().await;
    assert_eq!(report.accruals, 1, "{report:?}");
    assert_eq!(
        report.refused_completions, 3,
        "the old task's two completions and the hour-old task: {report:?}"
    );
    env.assert_books_balance().await;
}
