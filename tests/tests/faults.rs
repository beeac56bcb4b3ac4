//! Fault injection under steady load: the whole pool as separate processes (projector, allocator, three node
//! agents, settler) on a real nats-server, a private Postgres and the local TON chain, while a producer
//! submits tasks at a steady rate. In turn it kills each service with SIGKILL and starts it again, restarts
//! nats-server, and crashes Postgres and starts it again, each time waiting (deadline polls) until tasks
//! complete and a settlement confirms again. Then it stops the load, lets everything drain, and checks that
//! nothing was lost or duplicated:
//!
//! - every submitted task reached exactly one terminal state in TASKS, and the read model agrees;
//! - every read model equals a clean rebuild (the whole log projected into a fresh database);
//! - every completed task accrued exactly once, in exactly one confirmed settlement, and each worker
//!   received on chain exactly what it earned, in as many transfers as settlements paid it.
//!
//! The figures go to stdout and `target/faults/summary.md`; the services' logs to `target/faults/logs-<pid>/`
//! (kept when the test fails).
//! The binaries come from the target directory: `cargo build -p projector -p allocator -p node-agent -p
//! settler` (CI's `cargo nextest run --workspace` builds them first).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bus::Bus;
use client::{Producer, ProducerConfig, SubmitError, Submitted, TaskRequest};
use events::payments::{PaymentAccrued, SettlementConfirmed, SettlementPrepared};
use events::tasks::RequeueReason;
use events::{Event, GpuMillis, Nanoton, ProducerId, SettlementId, Stream, TaskId, Timestamp};
use projector::Projection;
use serde_json::{Value, json};
use settler::{PoolKey, PoolWallet};
use tests::NatsServer;
use tests::TonLocal;
use tests::postgres::PrivatePostgres;
use tests::services::{ServiceSpec, Services};
use tokio::task::JoinSet;
use tokio::time::Instant;

const BUILD: &str = "cargo build -p projector -p allocator -p node-agent -p settler";

/// Tasks submitted per second, for the whole run.
const RATE_PER_SECOND: u64 = 20;
/// How long a simulated task runs.
const TASK_MS: u64 = 200;
/// The attempt timeout each task asks for: an attempt whose allocation never reached its worker is taken
/// back after it (and counted in the summary as "timed out").
const TASK_TIMEOUT_MS: u64 = 20_000;
/// The agents: id and price (nanoton per GPU-second). Each has 2 simulated GPUs and runs 4 tasks at once:
/// 12 slots for 20 tasks/s of 0.2 s, so a backlog left by a fault drains in seconds.
const AGENTS: [(&str, u64); 3] = [
    ("fault-a", 1_000_000),
    ("fault-b", 1_500_000),
    ("fault-c", 2_000_000),
];
/// The agent that is killed.
const KILLED_AGENT: &str = "fault-b";
/// Tasks submitted while a killed process or crashed server is down, before it is started again.
const DOWN_FOR_SUBMISSIONS: u64 = 20;
/// Completions after a fault (by their completion time, as the read model shows them) that count as
/// recovered: more than the 12 slots, so new allocations must have been made and run.
const RECOVERED_COMPLETIONS: i64 = 40;
/// The pool wallet's balance on the local chain.
const WALLET_BALANCE: u64 = 1_000 * Nanoton::PER_TON;
/// The most a task pays per GPU-second: above every agent's price.
const MAX_PRICE: Nanoton = Nanoton(5_000_000);
const CLIENT: &str = "faults";

const START_LIMIT: Duration = Duration::from_secs(60);
const RECOVERY_LIMIT: Duration = Duration::from_secs(45);
const DRAIN_LIMIT: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(200);

/// Terminal task states, as the read model spells them.
const TERMINAL: [&str; 5] = ["completed", "failed", "cancelled", "expired", "rejected"];

/// The pool under test and the servers it runs on.
struct Pool {
    nats: NatsServer,
    pg: PrivatePostgres,
    ton: TonLocal,
    services: Services,
    bus: Bus,
    live_url: String,
    /// While a server the services depend on is being restarted (named here), a service that exits is
    /// started again, as a supervisor (systemd, Kubernetes) would, and recorded; at any other time an exit
    /// fails the test.
    supervising: Option<String>,
    restarted_by_supervisor: Vec<SupervisedExit>,
}

/// A service that exited on its own while a server was restarted, and was started again.
#[derive(Debug)]
struct SupervisedExit {
    service: String,
    during: String,
    status: String,
    /// Its last words: the `Error:` line of its log, or the last line.
    reason: String,
}

impl Pool {
    /// The end of every log, for failure messages.
    fn diagnostics(&self) -> String {
        // NatsServer keeps its log next to the store directory.
        let nats_log = self
            .nats
            .store_dir()
            .parent()
            .map(|d| d.join("nats-server.log"))
            .unwrap_or_default();
        let ton = self.ton.logs();
        let ton_tail: Vec<&str> = ton.lines().collect();
        format!(
            "\n{}--- nats-server ---\n{}--- postgres ---\n{}--- ton-local ---\n{}\n(full logs in {})",
            self.services.tails(25),
            tests::services::tail(&nats_log, 15),
            self.pg.log_tail(15),
            ton_tail[ton_tail.len().saturating_sub(10)..].join("\n"),
            self.services.logs_dir().display()
        )
    }

    /// Polls `probe` every 200 ms until it returns `Ok`, and returns its value and how long that took.
    /// `Err` carries what was seen, for the message if `limit` passes.
    ///
    /// # Panics
    ///
    /// When `limit` passes or a service exits on its own; with the logs' tails.
    async fn wait<T, F, Fut>(&mut self, what: &str, limit: Duration, probe: F) -> (T, Duration)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        match self.try_wait(what, limit, probe).await {
            Ok(done) => done,
            Err(timed_out) => panic!("{timed_out}{}", self.diagnostics()),
        }
    }

    /// [`Pool::wait`], answering the time-out (with the last state seen, without the logs) instead of
    /// panicking, so that the caller can add what it knows.
    async fn try_wait<T, F, Fut>(
        &mut self,
        what: &str,
        limit: Duration,
        mut probe: F,
    ) -> Result<(T, Duration), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let started = Instant::now();
        loop {
            let exited = self.services.exited();
            match &self.supervising {
                Some(during) => {
                    for e in exited {
                        let reason = e
                            .tail
                            .lines()
                            .find(|l| l.contains("Error:"))
                            .or_else(|| e.tail.lines().last())
                            .unwrap_or("")
                            .trim_start_matches("    | ")
                            .to_string();
                        println!(
                            "  {} exited on its own ({}) during `{during}`; started again: {reason}",
                            e.name, e.status
                        );
                        self.services.restart(&e.name);
                        self.restarted_by_supervisor.push(SupervisedExit {
                            service: e.name,
                            during: during.clone(),
                            status: e.status.to_string(),
                            reason,
                        });
                    }
                }
                None => assert!(
                    exited.is_empty(),
                    "while waiting until {what}:\n{}{}",
                    exited
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.diagnostics()
                ),
            }
            let seen = match probe().await {
                Ok(value) => return Ok((value, started.elapsed())),
                Err(state) => state,
            };
            if started.elapsed() >= limit {
                return Err(format!(
                    "timed out after {limit:?} waiting until {what}; last seen: {seen}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One query on a fresh connection (the database may have just crashed), as text for a wait's message.
async fn query(
    url: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        tokio::spawn(connection);
        client
            .query(sql, params)
            .await
            .map_err(|e| format!("query failed: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "the query timed out".to_string())?
}

/// Completed tasks and confirmed settlements in the read model whose completion (settlement preparation)
/// happened after `since`.
async fn progress_since(url: &str, since: Timestamp) -> Result<(i64, i64), String> {
    let secs = since.as_micros() as f64 / 1e6;
    let rows = query(
        url,
        "SELECT (SELECT count(*) FROM tasks WHERE status = 'completed' AND finished_at > to_timestamp($1)),
                (SELECT count(*) FROM settlements WHERE status = 'confirmed' AND prepared_at > to_timestamp($1))",
        &[&secs],
    )
    .await?;
    Ok((rows[0].get(0), rows[0].get(1)))
}

/// For each task the read model does not show terminal: its events in TASKS and ALLOCATIONS, and the lines
/// of the services' logs that name it.
async fn stuck_tasks_story(pool: &Pool, url: &str) -> String {
    let stuck: Vec<uuid::Uuid> = query(
        url,
        "SELECT task_id FROM tasks WHERE NOT (status = ANY($1) AND NOT (status = 'failed' AND retryable))
         ORDER BY submitted_at LIMIT 5",
        &[&TERMINAL.to_vec()],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_default();
    let mut out = String::new();
    let mut events = Vec::new();
    for stream in [Stream::Tasks, Stream::Allocations] {
        if let Ok(read) = bus::read_events(&pool.bus.jetstream, stream, Vec::new()).await {
            events.extend(read.into_iter().map(|(seq, r)| (stream, seq, r)));
        }
    }
    for id in stuck {
        let _ = writeln!(out, "task {id}, in the log:");
        for (stream, seq, r) in &events {
            let json = serde_json::to_string(&r.event).unwrap_or_default();
            if json.contains(&id.to_string()) {
                let _ = writeln!(
                    out,
                    "  {} #{seq} at {} by {}: {json}",
                    stream.name(),
                    r.envelope.occurred_at.as_micros(),
                    r.envelope.producer.as_str()
                );
            }
        }
        let _ = writeln!(out, "  in the logs:");
        if let Ok(dir) = std::fs::read_dir(pool.services.logs_dir()) {
            for entry in dir.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in text.lines().filter(|l| l.contains(&id.to_string())) {
                    let _ = writeln!(out, "  {}: {line}", entry.file_name().to_string_lossy());
                }
            }
        }
    }
    out
}

/// The steady load: one submission every 1/RATE s, each awaited on its own task so that a stalled ack
/// (nats-server restarting) does not slow the rate.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<LoadReport>,
    started: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct LoadReport {
    /// Submissions begun.
    started: u64,
    /// Task ids the log acknowledged.
    acked: Vec<TaskId>,
    /// Submissions that returned an error (the task may still be stored).
    errors: Vec<String>,
    /// Submissions still unanswered at the end.
    unanswered: usize,
}

impl LoadReport {
    fn record(&mut self, outcome: Result<Result<Submitted, SubmitError>, tokio::task::JoinError>) {
        match outcome {
            Ok(Ok(submitted)) => self.acked.push(submitted.task_id),
            Ok(Err(e)) => self.errors.push(e.to_string()),
            Err(e) => self.errors.push(format!("the submission task failed: {e}")),
        }
    }
}

fn start_load(bus: &Bus) -> Load {
    let producer = Producer::from_bus(
        bus,
        ProducerConfig {
            producer: ProducerId::new("faults-load").expect("a valid id"),
            ..ProducerConfig::default()
        },
    )
    .expect("a producer");
    let started = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&started);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(async move {
        let mut report = LoadReport::default();
        let mut inflight = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SECOND));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tick.tick() => {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let mut request = TaskRequest::new(CLIENT, MAX_PRICE);
                    request.priority = u8::try_from(n % 10).unwrap_or(0) + 1;
                    request.timeout_ms = TASK_TIMEOUT_MS;
                    request.input = format!("fault load #{n}").into_bytes();
                    let producer = producer.clone();
                    inflight.spawn(async move { producer.submit(&request).await });
                }
            }
            while let Some(done) = inflight.try_join_next() {
                report.record(done);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, inflight.join_next()).await {
            report.record(done);
        }
        report.unanswered = inflight.len();
        report.started = counter.load(Ordering::Relaxed);
        report
    });
    Load {
        stop,
        handle,
        started,
    }
}

/// A fault and how the pool recovered from it.
#[derive(Debug)]
struct FaultRecord {
    name: String,
    /// Seconds since the load started.
    at_s: f64,
    /// From the fault until the process or server was started again.
    down: Duration,
    /// From the fault until tasks completed and a settlement confirmed again.
    recovered: Duration,
    /// Completions (read model) between the fault and recovery.
    completed_meanwhile: i64,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(&'static str),
    RestartNats,
    CrashPostgres,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::Kill(service) => format!("kill -9 {service}"),
            Fault::RestartNats => "restart nats-server".to_string(),
            Fault::CrashPostgres => "crash Postgres (immediate stop)".to_string(),
        }
    }
}

/// Waits until the producer has begun `n` more submissions: how long a fault keeps a part down.
async fn submissions_pass(pool: &mut Pool, load: &Load, n: u64) {
    let target = load.started.load(Ordering::Relaxed) + n;
    let started = Arc::clone(&load.started);
    pool.wait(
        &format!("the producer has begun {n} more submissions"),
        Duration::from_secs(30),
        || {
            let now = started.load(Ordering::Relaxed);
            async move {
                if now >= target {
                    Ok(())
                } else {
                    Err(format!("{now} of {target}"))
                }
            }
        },
    )
    .await;
}

async fn inject(pool: &mut Pool, load: &Load, fault: Fault, load_started: Instant) -> FaultRecord {
    let at = Instant::now();
    let since = Timestamp::now();
    println!(
        "[{:>6.1}s] fault: {}",
        load_started.elapsed().as_secs_f64(),
        fault.name()
    );
    match fault {
        Fault::Kill(service) => {
            pool.services.kill9(service).await;
            submissions_pass(pool, load, DOWN_FOR_SUBMISSIONS).await;
            pool.services.restart(service);
        }
        Fault::RestartNats => {
            pool.supervising = Some(fault.name());
            pool.nats.restart().await;
        }
        Fault::CrashPostgres => {
            pool.supervising = Some(fault.name());
            pool.pg.crash().await;
            submissions_pass(pool, load, DOWN_FOR_SUBMISSIONS).await;
            pool.pg.start_again().await;
        }
    }
    let down = at.elapsed();
    let url = pool.live_url.clone();
    let ((completed, _), _) = pool
        .wait(
            &format!(
                "after `{}`, {RECOVERED_COMPLETIONS} tasks complete and a settlement prepared after it confirms",
                fault.name()
            ),
            RECOVERY_LIMIT,
            || {
                let url = url.clone();
                async move {
                    let (completed, confirmed) = progress_since(&url, since).await?;
                    if completed >= RECOVERED_COMPLETIONS && confirmed >= 1 {
                        Ok((completed, confirmed))
                    } else {
                        Err(format!(
                            "{completed} completed and {confirmed} settlements confirmed since the fault"
                        ))
                    }
                }
            },
        )
        .await;
    pool.supervising = None;
    let record = FaultRecord {
        name: fault.name(),
        at_s: (at - load_started).as_secs_f64(),
        down,
        recovered: at.elapsed(),
        completed_meanwhile: completed,
    };
    println!(
        "[{:>6.1}s]   down {:.1}s, recovered in {:.1}s",
        load_started.elapsed().as_secs_f64(),
        record.down.as_secs_f64(),
        record.recovered.as_secs_f64()
    );
    record
}

/// A terminal event of a task in TASKS.
#[derive(Debug, Clone)]
struct Terminal {
    kind: &'static str,
    attempt: Option<u32>,
    sequence: u64,
}

#[derive(Debug, Default)]
struct TaskFacts {
    submitted: usize,
    /// Terminal events that count: of an attempt not requeued before them in TASKS.
    terminals: Vec<Terminal>,
    /// Attempts the allocator requeued (so a completion of theirs stored after the requeue does not count).
    requeued: HashSet<u32>,
    /// Terminal events of attempts already requeued: late reports of superseded attempts.
    late: Vec<Terminal>,
    /// Completions: attempt, worker, usage.
    completions: Vec<(u32, String, GpuMillis)>,
}

/// What the log says about the tasks, and what is wrong with it.
#[derive(Debug, Default)]
struct TaskAudit {
    tasks: BTreeMap<TaskId, TaskFacts>,
    /// Outcome per task with exactly one terminal event.
    outcome: HashMap<TaskId, Terminal>,
    by_outcome: BTreeMap<&'static str, usize>,
    requeued: BTreeMap<String, usize>,
    retryable_failures: usize,
    lost: Vec<TaskId>,
    duplicated: Vec<String>,
    problems: Vec<String>,
}

fn audit_tasks(tasks_log: &[(u64, events::EventRecord)], acked: &[TaskId]) -> TaskAudit {
    let mut audit = TaskAudit::default();
    for (sequence, record) in tasks_log {
        let sequence = *sequence;
        // TASKS orders a task's events (one stream, so one sequence for all its subjects): an attempt's end
        // stored after the allocator requeued that attempt is a late report, not the task's outcome.
        let terminal = |audit: &mut TaskAudit, id: TaskId, kind, attempt: Option<u32>| {
            let facts = audit.tasks.entry(id).or_default();
            let t = Terminal {
                kind,
                attempt,
                sequence,
            };
            if attempt.is_some_and(|a| facts.requeued.contains(&a)) {
                facts.late.push(t);
            } else {
                facts.terminals.push(t);
            }
        };
        match &record.event {
            Event::TaskSubmitted(e) => audit.tasks.entry(e.task_id).or_default().submitted += 1,
            Event::TaskCompleted(e) => {
                terminal(&mut audit, e.task_id, "completed", Some(e.attempt));
                audit.tasks.entry(e.task_id).or_default().completions.push((
                    e.attempt,
                    e.worker_id.as_str().to_string(),
                    e.usage.gpu_millis,
                ));
            }
            Event::TaskFailed(e) if !e.retryable => {
                terminal(&mut audit, e.task_id, "failed", Some(e.attempt));
            }
            Event::TaskFailed(_) => audit.retryable_failures += 1,
            Event::TaskCancelled(e) => terminal(&mut audit, e.task_id, "cancelled", None),
            Event::TaskExpired(e) => terminal(&mut audit, e.task_id, "expired", None),
            Event::TaskRejected(e) => terminal(&mut audit, e.task_id, "rejected", None),
            Event::TaskRequeued(e) => {
                audit
                    .tasks
                    .entry(e.task_id)
                    .or_default()
                    .requeued
                    .insert(e.attempt);
                let reason = match e.reason {
                    RequeueReason::WorkerLost => "worker lost",
                    RequeueReason::TimedOut => "timed out",
                    RequeueReason::Revoked => "revoked",
                    RequeueReason::RetryableFailure => "retryable failure",
                };
                *audit.requeued.entry(reason.to_string()).or_default() += 1;
            }
            _ => {}
        }
    }
    let stored: HashSet<TaskId> = audit
        .tasks
        .iter()
        .filter(|(_, f)| f.submitted > 0)
        .map(|(id, _)| *id)
        .collect();
    for id in acked {
        if !stored.contains(id) {
            audit.lost.push(*id);
            audit.problems.push(format!(
                "task {} was acknowledged to the producer but its TaskSubmitted is not in TASKS",
                id.as_uuid()
            ));
        }
    }
    for (id, facts) in &audit.tasks {
        if facts.submitted == 0 {
            audit.problems.push(format!(
                "task {} has events in TASKS but no TaskSubmitted",
                id.as_uuid()
            ));
            continue;
        }
        if facts.submitted > 1 {
            audit.duplicated.push(format!(
                "task {}: TaskSubmitted stored {} times",
                id.as_uuid(),
                facts.submitted
            ));
        }
        match facts.terminals.as_slice() {
            [] => audit.lost.push(*id),
            [one] => {
                audit.outcome.insert(*id, one.clone());
                *audit.by_outcome.entry(one.kind).or_default() += 1;
            }
            many => audit.duplicated.push(format!(
                "task {} reached {} terminal states: {}",
                id.as_uuid(),
                many.len(),
                many.iter()
                    .map(|t| format!("{} (attempt {:?}, seq {})", t.kind, t.attempt, t.sequence))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    for id in audit.lost.iter().filter(|id| stored.contains(id)) {
        audit.problems.push(format!(
            "task {} never reached a terminal state in TASKS",
            id.as_uuid()
        ));
    }
    audit.problems.extend(audit.duplicated.iter().cloned());
    audit
}

/// The read model's tasks table agrees with the log's outcomes.
async fn audit_read_model_tasks(url: &str, audit: &TaskAudit) -> Vec<String> {
    let mut problems = Vec::new();
    let rows = match query(url, "SELECT task_id, status, attempt FROM tasks", &[]).await {
        Ok(rows) => rows,
        Err(e) => return vec![format!("reading the tasks table: {e}")],
    };
    let mut seen = HashSet::new();
    for row in &rows {
        let id = TaskId(row.get::<_, uuid::Uuid>(0));
        let status: String = row.get(1);
        let attempt: i32 = row.get(2);
        seen.insert(id);
        match audit.outcome.get(&id) {
            None if audit.tasks.get(&id).is_some_and(|f| f.submitted > 0) => {}
            None => problems.push(format!(
                "the read model has task {} that TASKS never submitted",
                id.as_uuid()
            )),
            Some(t) => {
                let attempt_differs = t
                    .attempt
                    .is_some_and(|a| i64::from(a) != i64::from(attempt));
                if status != t.kind || attempt_differs {
                    problems.push(format!(
                        "task {}: the read model says {status} (attempt {attempt}), TASKS says {} (attempt {:?})",
                        id.as_uuid(),
                        t.kind,
                        t.attempt
                    ));
                }
            }
        }
    }
    for (id, facts) in &audit.tasks {
        if facts.submitted > 0 && !seen.contains(id) {
            problems.push(format!(
                "task {} is in TASKS but not in the read model",
                id.as_uuid()
            ));
        }
    }
    problems
}

/// What PAYMENTS and the chain say, and what is wrong with them.
#[derive(Debug, Default)]
struct PaymentAudit {
    accruals: usize,
    accrued: BTreeMap<String, u64>,
    /// Paid by confirmed settlements (failed transfers excluded), per worker: amount and transfers.
    paid: BTreeMap<String, (u64, usize)>,
    /// Received on chain from the pool wallet, per worker: amount and transfers.
    received: BTreeMap<String, (u64, usize)>,
    prepared: usize,
    confirmed: usize,
    duplicate_confirmations: usize,
    expired: usize,
    failed_settlements: usize,
    failed_transfers: usize,
    parked: usize,
    wallet_transactions: usize,
    problems: Vec<String>,
}

fn audit_payments(
    payments_log: &[(u64, events::EventRecord)],
    tasks: &TaskAudit,
    prices: &HashMap<String, u64>,
) -> PaymentAudit {
    let mut audit = PaymentAudit::default();
    let mut accruals: HashMap<TaskId, Vec<&PaymentAccrued>> = HashMap::new();
    let mut prepared: HashMap<SettlementId, &SettlementPrepared> = HashMap::new();
    let mut confirmed: BTreeMap<SettlementId, Vec<&SettlementConfirmed>> = BTreeMap::new();
    let mut expired: HashSet<SettlementId> = HashSet::new();
    for (_, record) in payments_log {
        match &record.event {
            Event::PaymentAccrued(a) => accruals.entry(a.task_id).or_default().push(a),
            Event::SettlementPrepared(p) => {
                prepared.insert(p.settlement_id, p);
            }
            Event::SettlementConfirmed(c) => confirmed.entry(c.settlement_id).or_default().push(c),
            Event::SettlementExpired(e) => {
                expired.insert(e.settlement_id);
            }
            Event::SettlementFailed(_) => audit.failed_settlements += 1,
            Event::PayoutParked(_) => audit.parked += 1,
            _ => {}
        }
    }
    audit.prepared = prepared.len();
    audit.confirmed = confirmed.len();
    audit.expired = expired.len();
    audit.duplicate_confirmations = confirmed.values().map(|c| c.len() - 1).sum();

    // Each task with a completion accrued once, for one of its completions, at its worker's price.
    for (id, facts) in &tasks.tasks {
        // The settler pays a task's first completion (a late one of a requeued attempt too: its work was
        // done), once.
        let completed = !facts.completions.is_empty();
        let found = accruals.get(id).map_or(&[][..], Vec::as_slice);
        match (completed, found) {
            (true, [a]) => {
                let worker = a.worker_id.as_str();
                let matches = facts.completions.iter().any(|(attempt, w, usage)| {
                    *attempt == a.attempt && w == worker && *usage == a.gpu_millis
                });
                let price = prices.get(worker).copied();
                let cost = a.gpu_millis.cost(a.price_per_gpu_second);
                if !matches || price != Some(a.price_per_gpu_second.0) || cost != Some(a.amount) {
                    audit.problems.push(format!(
                        "task {}: accrual {a:?} does not match its completion {:?} at price {price:?}",
                        id.as_uuid(),
                        facts.completions
                    ));
                }
            }
            (true, []) => audit.problems.push(format!(
                "task {} completed ({:?}, TASKS #{}) but never accrued (payment lost)",
                id.as_uuid(),
                facts.completions,
                tasks.outcome.get(id).map_or(0, |t| t.sequence)
            )),
            (true, many) => audit.problems.push(format!(
                "task {} accrued {} times (payment duplicated)",
                id.as_uuid(),
                many.len()
            )),
            (false, []) => {}
            (false, some) => audit.problems.push(format!(
                "task {} did not complete but accrued {} times",
                id.as_uuid(),
                some.len()
            )),
        }
    }
    for (id, list) in &accruals {
        audit.accruals += 1;
        if !tasks.tasks.contains_key(id) {
            audit
                .problems
                .push(format!("an accrual for unknown task {}", id.as_uuid()));
        }
        if let Some(a) = list.first() {
            *audit
                .accrued
                .entry(a.worker_id.as_str().to_string())
                .or_default() += a.amount.0;
        }
    }

    // Each accrual is in exactly one confirmed settlement that paid its worker's transfer.
    let mut paid_tasks: HashMap<TaskId, usize> = HashMap::new();
    let mut tx_hashes: HashSet<&str> = HashSet::new();
    for (sid, confirmations) in &confirmed {
        let Some(p) = prepared.get(sid) else {
            audit
                .problems
                .push(format!("settlement {sid:?} confirmed but never prepared"));
            continue;
        };
        if expired.contains(sid) {
            audit
                .problems
                .push(format!("settlement {sid:?} both expired and confirmed"));
        }
        let c = confirmations[0];
        if !tx_hashes.insert(c.tx_hash.as_str()) {
            audit.problems.push(format!(
                "transaction {} confirms two settlements",
                c.tx_hash
            ));
        }
        audit.failed_transfers += c.failed_transfers.len();
        for payout in &p.payouts {
            if c.failed_transfers
                .iter()
                .any(|f| f.worker_id == payout.worker_id)
            {
                continue;
            }
            let entry = audit
                .paid
                .entry(payout.worker_id.as_str().to_string())
                .or_default();
            entry.0 += payout.amount.0;
            entry.1 += 1;
            let mut sum = 0u64;
            for task in &payout.task_ids {
                *paid_tasks.entry(*task).or_default() += 1;
                sum += accruals
                    .get(task)
                    .and_then(|a| a.first())
                    .map_or(0, |a| a.amount.0);
            }
            if sum != payout.amount.0 {
                audit.problems.push(format!(
                    "settlement {sid:?} pays {} {} for accruals summing to {sum}",
                    payout.worker_id, payout.amount.0
                ));
            }
        }
    }
    for id in accruals.keys() {
        match paid_tasks.get(id).copied().unwrap_or(0) {
            1 => {}
            0 => audit.problems.push(format!(
                "the accrual of task {} is in no confirmed settlement (unpaid)",
                id.as_uuid()
            )),
            n => audit.problems.push(format!(
                "the accrual of task {} is in {n} confirmed settlements (paid {n} times)",
                id.as_uuid()
            )),
        }
    }
    for id in paid_tasks.keys() {
        if !accruals.contains_key(id) {
            audit.problems.push(format!(
                "a settlement paid task {} which never accrued",
                id.as_uuid()
            ));
        }
    }
    for (worker, accrued) in &audit.accrued {
        let paid = audit.paid.get(worker).map_or(0, |p| p.0);
        if paid != *accrued {
            audit.problems.push(format!(
                "{worker} accrued {accrued} nanoton and confirmed settlements paid it {paid}"
            ));
        }
    }
    audit
}

/// Every transaction of `address` on the local chain, newest first (pages of 100).
async fn all_transactions(ton: &TonLocal, address: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut from: Option<(String, String)> = None;
    loop {
        let mut body = json!({ "address": address, "limit": 100 });
        if let Some((lt, hash)) = &from {
            body["lt"] = json!(lt);
            body["hash"] = json!(hash);
        }
        let (status, answer) = ton.request("/api/v2/getTransactions", Some(&body)).await;
        assert_eq!(status, 200, "getTransactions of {address}: {answer}");
        let page = answer["result"].as_array().cloned().unwrap_or_default();
        // A page after the first starts with the transaction it was asked from.
        let fresh: Vec<Value> = if from.is_some() {
            page.into_iter().skip(1).collect()
        } else {
            page
        };
        let Some(last) = fresh.last() else {
            return out;
        };
        from = Some((
            last["transaction_id"]["lt"]
                .as_str()
                .unwrap_or("0")
                .to_string(),
            last["transaction_id"]["hash"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ));
        out.extend(fresh);
    }
}

fn nanoton(value: &Value) -> u64 {
    value.as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// What each worker's address received from the pool wallet, and the wallet's transactions that sent
/// transfers; each worker received what confirmed settlements paid it, in as many transfers.
async fn audit_chain(
    ton: &TonLocal,
    addresses: &BTreeMap<String, String>,
    audit: &mut PaymentAudit,
) {
    for (worker, address) in addresses {
        let mut amount = 0;
        let mut transfers = 0;
        for tx in all_transactions(ton, address).await {
            let source = tx["in_msg"]["source"].as_str().unwrap_or_default();
            if settler::wallet::same_account(source, ton.wallet()) {
                amount += nanoton(&tx["in_msg"]["value"]);
                transfers += 1;
            }
        }
        audit.received.insert(worker.clone(), (amount, transfers));
        let paid = audit.paid.get(worker).copied().unwrap_or((0, 0));
        if (amount, transfers) != paid {
            audit.problems.push(format!(
                "{worker} received {amount} nanoton in {transfers} transfers on chain; confirmed settlements \
                 paid it {} in {}",
                paid.0, paid.1
            ));
        }
    }
    audit.wallet_transactions = all_transactions(ton, ton.wallet())
        .await
        .iter()
        .filter(|tx| {
            tx["in_msg"]["source"].as_str() == Some("")
                && tx["out_msgs"].as_array().is_some_and(|m| !m.is_empty())
        })
        .count();
    if audit.wallet_transactions != audit.confirmed {
        audit.problems.push(format!(
            "the pool wallet sent transfers in {} transactions, and {} settlements confirmed",
            audit.wallet_transactions, audit.confirmed
        ));
    }
}

/// The tables and views compared between the live read models and the rebuild.
fn compared_relations() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Projection::ALL
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    out.extend([
        "projection_checkpoints",
        "task_status_totals",
        "dashboard_stats",
        "worker_payments",
    ]);
    out
}

async fn fingerprints(url: &str) -> BTreeMap<String, projector::verify::TableSum> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    projector::verify::fingerprint(&client, "public", &compared_relations())
        .await
        .unwrap_or_else(|e| panic!("fingerprinting {url}: {e}"))
}

async fn dead_letters(url: &str) -> i64 {
    query(url, "SELECT count(*) FROM dead_letters", &[])
        .await
        .map_or(-1, |rows| rows[0].get(0))
}

/// A payout address nobody else uses: a fresh wallet's (an uninitialised account, which keeps the
/// non-bounceable transfers it is sent).
fn fresh_address() -> String {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    PoolWallet::new(&PoolKey::from_seed(&seed))
        .expect("a wallet")
        .address()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The target directory (the parent of the profile directory holding the binaries).
fn target_dir(bin: &Path) -> PathBuf {
    bin.parent()
        .map_or_else(|| bin.to_path_buf(), Path::to_path_buf)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores ({model})")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_duplicated_when_each_part_of_the_pool_fails_under_load() {
    let run_started = Instant::now();
    let bin = tests::services::bin_dir(&["projector", "allocator", "node-agent", "settler"], BUILD);
    let out_dir = target_dir(&bin).join("faults");
    // One directory per run (test process): two runs at once (CI shards, developers) must not share logs.
    // Kept when the test fails, removed when it passes.
    let logs = out_dir.join(format!("logs-{}", std::process::id()));

    // The servers.
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    let public_key = PoolKey::from_seed(&seed).public_key();
    let (nats, pg, ton) = tokio::join!(
        NatsServer::start(),
        PrivatePostgres::start(),
        TonLocal::start(&public_key, WALLET_BALANCE)
    );
    let bus = Bus::from_client(nats.client().await, Duration::from_secs(5));
    bus::provision_streams(&bus.jetstream, 1)
        .await
        .expect("streams provisioned");
    let live_url = pg.create_database("readmodel").await;
    let rebuild_url = pg.create_database("rebuild").await;

    // The services.
    let env = vec![
        ("COCOON_NATS_URL".to_string(), nats.url()),
        ("NATS_URL".to_string(), nats.url()),
        ("COCOON_DATABASE_URL".to_string(), live_url.clone()),
        ("NO_COLOR".to_string(), "1".to_string()),
        ("RUST_LOG".to_string(), "info".to_string()),
        // An error ends a service with its message alone, which the summary quotes.
        ("RUST_BACKTRACE".to_string(), "0".to_string()),
    ];
    let mut services = Services::new(bin, &logs, env);
    services.start(ServiceSpec::new(
        "projector",
        "projector",
        ["--metrics-addr", ""],
    ));
    services.start(ServiceSpec::new(
        "allocator",
        "allocator",
        ["--allow-unattested", "--instance", "faults-allocator"],
    ));
    services.start(
        ServiceSpec::new(
            "settler",
            "settler",
            [
                "--toncenter-url",
                ton.url(),
                "--instance",
                "faults-settler",
                "--max-age-s",
                "1",
                "--min-payout-nanoton",
                "1",
                "--resend-interval-ms",
                "1000",
                "--check-interval-ms",
                "500",
            ],
        )
        .env("COCOON_SETTLER_KEY", hex(&seed)),
    );
    let mut addresses = BTreeMap::new();
    let mut prices = HashMap::new();
    for (worker, price) in AGENTS {
        let address = fresh_address();
        addresses.insert(worker.to_string(), address.clone());
        prices.insert(worker.to_string(), price);
        services.start(
            ServiceSpec::new(
                worker,
                "node-agent",
                [
                    "--worker-id",
                    worker,
                    "--price",
                    &price.to_string(),
                    "--payout-address",
                    &address,
                    "--max-concurrent",
                    "4",
                    "--simulate-gpus",
                    "2",
                    "--heartbeat-interval-ms",
                    "500",
                    "--drain-timeout-ms",
                    "5000",
                    "--executor",
                    "simulated",
                    "--simulated-task-ms",
                    &TASK_MS.to_string(),
                ],
            )
            .stop_with_term(),
        );
    }
    let mut pool = Pool {
        nats,
        pg,
        ton,
        services,
        bus,
        live_url: live_url.clone(),
        supervising: None,
        restarted_by_supervisor: Vec::new(),
    };
    let url = live_url.clone();
    let ids: Vec<String> = AGENTS.iter().map(|(w, _)| w.to_string()).collect();
    let (_, workers_up) = pool
        .wait(
            "the three workers are active in the read model",
            START_LIMIT,
            || {
                let (url, ids) = (url.clone(), ids.clone());
                async move {
                    let rows = query(
                        &url,
                        "SELECT count(*) FROM workers WHERE status = 'active' AND worker_id = ANY($1)",
                        &[&ids],
                    )
                    .await?;
                    let n: i64 = rows[0].get(0);
                    if n == 3 { Ok(()) } else { Err(format!("{n} active")) }
                }
            },
        )
        .await;
    let setup = run_started.elapsed();
    println!(
        "pool up in {:.1}s (workers active {:.1}s after the services started); logs in {}",
        setup.as_secs_f64(),
        workers_up.as_secs_f64(),
        logs.display()
    );

    // The load, a warm-up, then the faults in turn.
    let load_started = Instant::now();
    let load = start_load(&pool.bus);
    let since = Timestamp::now();
    let url = live_url.clone();
    let (_, warm_up) = pool
        .wait(
            "the first tasks complete and the first settlement confirms",
            START_LIMIT,
            || {
                let url = url.clone();
                async move {
                    let (completed, confirmed) = progress_since(&url, since).await?;
                    if completed >= RECOVERED_COMPLETIONS && confirmed >= 1 {
                        Ok(())
                    } else {
                        Err(format!(
                            "{completed} completed, {confirmed} settlements confirmed"
                        ))
                    }
                }
            },
        )
        .await;
    println!("warm-up: {:.1}s", warm_up.as_secs_f64());
    let mut faults = Vec::new();
    for fault in [
        Fault::Kill("projector"),
        Fault::Kill("allocator"),
        Fault::Kill(KILLED_AGENT),
        Fault::Kill("settler"),
        Fault::RestartNats,
        Fault::CrashPostgres,
    ] {
        faults.push(inject(&mut pool, &load, fault, load_started).await);
    }

    // Stop the load and let everything drain.
    let _ = load.stop.send(true);
    let report = load.handle.await.expect("the load task");
    let load_secs = load_started.elapsed().as_secs_f64();
    println!(
        "[{load_secs:>6.1}s] load stopped: {} submissions, {} acknowledged, {} errors, {} unanswered",
        report.started,
        report.acked.len(),
        report.errors.len(),
        report.unanswered
    );
    let drain_started = Instant::now();
    let submitted_log = bus::read_events(&pool.bus.jetstream, Stream::Tasks, Vec::new())
        .await
        .expect("TASKS read");
    let stored: i64 = submitted_log
        .iter()
        .filter(|(_, r)| matches!(r.event, Event::TaskSubmitted(_)))
        .map(|(_, r)| match &r.event {
            Event::TaskSubmitted(e) => e.task_id,
            _ => unreachable!(),
        })
        .collect::<HashSet<_>>()
        .len() as i64;
    let url = live_url.clone();
    let terminal = pool.try_wait(
        &format!("all {stored} stored tasks are terminal in the read model"),
        DRAIN_LIMIT,
        || {
            let url = url.clone();
            async move {
                let rows = query(
                    &url,
                    "SELECT count(*), count(*) FILTER (WHERE status = ANY($1) AND NOT (status = 'failed' AND retryable))
                     FROM tasks",
                    &[&TERMINAL.to_vec()],
                )
                .await?;
                let (all, terminal): (i64, i64) = (rows[0].get(0), rows[0].get(1));
                if all == stored && terminal == stored {
                    return Ok(());
                }
                // What the others are doing, for the message if this never ends.
                let waiting = query(
                    &url,
                    "SELECT task_id::text || ' ' || status || ' attempt ' || attempt || ' on ' ||
                            coalesce(worker_id, '-') || ' since ' || coalesce(allocated_at, submitted_at)::text
                     FROM tasks WHERE NOT (status = ANY($1) AND NOT (status = 'failed' AND retryable))
                     ORDER BY submitted_at LIMIT 5",
                    &[&TERMINAL.to_vec()],
                )
                .await?;
                let waiting: Vec<String> = waiting.iter().map(|r| r.get(0)).collect();
                Err(format!(
                    "{all} tasks in the read model, {terminal} terminal; not terminal: {}",
                    waiting.join("; ")
                ))
            }
        },
    )
    .await;
    // A drain that does not finish is a problem to report with the audits below, which say what is missing.
    let mut drain_problems = Vec::new();
    if let Err(timed_out) = terminal {
        let story = stuck_tasks_story(&pool, &live_url).await;
        println!("{timed_out}\n{story}");
        drain_problems.push(timed_out);
    }
    let (url, js) = (live_url.clone(), pool.bus.jetstream.clone());
    let paid = pool.try_wait(
        "every task with a completion in TASKS has accrued, and every accrual is paid",
        DRAIN_LIMIT,
        || {
            let (url, js) = (url.clone(), js.clone());
            async move {
                let completed: HashSet<TaskId> = bus::read_events(&js, Stream::Tasks, Vec::new())
                    .await
                    .map_err(|e| format!("reading TASKS: {e}"))?
                    .iter()
                    .filter_map(|(_, r)| match &r.event {
                        Event::TaskCompleted(e) => Some(e.task_id),
                        _ => None,
                    })
                    .collect();
                let rows = query(
                    &url,
                    "SELECT coalesce(sum(accruals), 0)::bigint,
                            coalesce(sum(pending_nanoton + parked_nanoton + in_flight_nanoton), 0)::bigint
                     FROM worker_payments",
                    &[],
                )
                .await?;
                let (accruals, owed): (i64, i64) = (rows[0].get(0), rows[0].get(1));
                if accruals == completed.len() as i64 && owed == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{} tasks with a completion, {accruals} accrued, {owed} nanoton still owed",
                        completed.len()
                    ))
                }
            }
        },
    )
    .await;
    if let Err(timed_out) = paid {
        println!("{timed_out}");
        drain_problems.push(timed_out);
    }
    let drained = drain_started.elapsed();
    println!("drained in {:.1}s", drained.as_secs_f64());

    // Stop whatever publishes, then let the projector reach the head of every stream, and stop it.
    for name in ["settler", "allocator"]
        .into_iter()
        .chain(AGENTS.iter().map(|(w, _)| *w))
    {
        let status = pool.services.stop(name).await;
        println!("stopped {name}: {status:?}");
    }
    let js = pool.bus.jetstream.clone();
    let url = live_url.clone();
    let caught_up = pool
        .try_wait(
            "the live projector has applied every stream to its head",
            DRAIN_LIMIT,
            || {
                let (js, url) = (js.clone(), url.clone());
                async move {
                    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(connection);
                    let (partitions, _) = projector::ops::status(
                        &js,
                        &client,
                        &Projection::ALL,
                        events::Partitions::DEFAULT,
                    )
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                    let lagging: Vec<String> = partitions
                        .iter()
                        .filter(|p| p.lag_frames > 0)
                        .map(|p| {
                            format!(
                                "{}/{}/{}: {} frames behind",
                                p.projection,
                                p.stream.name(),
                                p.partition,
                                p.lag_frames
                            )
                        })
                        .collect();
                    if lagging.is_empty() {
                        Ok(())
                    } else {
                        Err(lagging.join(", "))
                    }
                }
            },
        )
        .await;
    if let Err(timed_out) = caught_up {
        println!("{timed_out}");
        drain_problems.push(timed_out);
    }
    let projector_status = pool.services.stop("projector").await;
    println!("stopped projector: {projector_status:?}");

    // A clean rebuild: the whole log projected into a fresh database.
    let rebuild_started = Instant::now();
    let mut config = projector::ProjectorConfig::new(pool.nats.url(), rebuild_url.clone());
    config.durable_prefix = "faults-rebuild".into();
    config.fetch_wait = Duration::from_millis(100);
    let rebuilt = tokio::time::timeout(
        Duration::from_secs(120),
        projector::run(config, tokio_util::sync::CancellationToken::new(), true),
    )
    .await;
    assert!(
        matches!(rebuilt, Ok(Ok(()))),
        "the rebuild projector failed: {rebuilt:?}"
    );
    let rebuild_time = rebuild_started.elapsed();
    let live = fingerprints(&live_url).await;
    let clean = fingerprints(&rebuild_url).await;
    let differences = projector::verify::differences(&live, &clean);
    let (live_dead, clean_dead) = (
        dead_letters(&live_url).await,
        dead_letters(&rebuild_url).await,
    );

    // The log, the read model and the chain.
    let payments_log = bus::read_events(&pool.bus.jetstream, Stream::Payments, Vec::new())
        .await
        .expect("PAYMENTS read");
    let tasks_log = bus::read_events(&pool.bus.jetstream, Stream::Tasks, Vec::new())
        .await
        .expect("TASKS read");
    let tasks = audit_tasks(&tasks_log, &report.acked);
    let read_model = audit_read_model_tasks(&live_url, &tasks).await;
    let mut payments = audit_payments(&payments_log, &tasks, &prices);
    audit_chain(&pool.ton, &addresses, &mut payments).await;
    let wallet_left = pool.ton.balance(pool.ton.wallet()).await;

    let mut problems: Vec<String> = drain_problems;
    problems.extend(tasks.problems.iter().cloned());
    problems.extend(read_model);
    problems.extend(payments.problems.iter().cloned());
    for (table, live, clean) in &differences {
        problems.push(format!(
            "read model {table} differs from a clean rebuild: live {live:?}, rebuild {clean:?}"
        ));
    }
    if live_dead != 0 || clean_dead != 0 {
        problems.push(format!(
            "dead letters: {live_dead} live, {clean_dead} in the rebuild"
        ));
    }

    // The summary.
    let total = run_started.elapsed();
    let submitted = tasks.tasks.values().filter(|f| f.submitted > 0).count();
    let acked: HashSet<TaskId> = report.acked.iter().copied().collect();
    let stored_unacked = tasks
        .tasks
        .iter()
        .filter(|(id, f)| f.submitted > 0 && !acked.contains(id))
        .count();
    let paid_total: u64 = payments.paid.values().map(|p| p.0).sum();
    let received_total: u64 = payments.received.values().map(|p| p.0).sum();
    let mut s = String::new();
    let _ = writeln!(s, "# Fault injection (tests/tests/faults.rs)\n");
    let _ = writeln!(
        s,
        "Run on {} at unix time {}; `cargo nextest run -p tests --test faults`; {:.1}s in all (setup {:.1}s, \
         load {load_secs:.1}s, drain {:.1}s, rebuild {:.1}s).\n",
        machine(),
        Timestamp::now().as_millis() / 1000,
        total.as_secs_f64(),
        setup.as_secs_f64(),
        drained.as_secs_f64(),
        rebuild_time.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "Load: {RATE_PER_SECOND} tasks/s through `client::Producer` for {load_secs:.0}s; 3 node agents \
         (2 simulated GPUs, 4 tasks at once, simulated tasks of {TASK_MS} ms), projector, allocator \
         (--allow-unattested), settler paying on the local TON chain (@ton/sandbox), real nats-server 2.15 and a \
         private Postgres.\n"
    );
    let _ = writeln!(
        s,
        "| fault | at (s since load start) | down (s) | recovered in (s) | completed meanwhile |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
    for f in &faults {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.1} | {} |",
            f.name,
            f.at_s,
            f.down.as_secs_f64(),
            f.recovered.as_secs_f64(),
            f.completed_meanwhile
        );
    }
    if pool.restarted_by_supervisor.is_empty() {
        let _ = writeln!(s, "\nNo service exited on its own.");
    } else {
        let _ = writeln!(
            s,
            "\nServices that exited on their own while a server restarted, and were started again by the test \
             as a supervisor would:\n"
        );
        for e in &pool.restarted_by_supervisor {
            let _ = writeln!(
                s,
                "- {} during `{}` ({}): {}",
                e.service, e.during, e.status, e.reason
            );
        }
    }
    let _ = writeln!(
        s,
        "\n\"Recovered\": {RECOVERED_COMPLETIONS} tasks completed after the fault and a settlement prepared \
         after it confirmed on chain, as the read model shows them. \"Down\": until the process or server was \
         started again ({DOWN_FOR_SUBMISSIONS} submissions later; nats-server: a stop and a start).\n"
    );
    let _ = writeln!(s, "| tasks | count |");
    let _ = writeln!(s, "| --- | ---: |");
    let _ = writeln!(s, "| submissions begun | {} |", report.started);
    let _ = writeln!(
        s,
        "| acknowledged to the producer | {} |",
        report.acked.len()
    );
    let _ = writeln!(
        s,
        "| submit errors (of which stored anyway) | {} ({stored_unacked}) |",
        report.errors.len()
    );
    let _ = writeln!(s, "| stored in TASKS (submitted) | {submitted} |");
    for (kind, n) in &tasks.by_outcome {
        let _ = writeln!(s, "| {kind} | {n} |");
    }
    for (reason, n) in &tasks.requeued {
        let _ = writeln!(s, "| attempts requeued: {reason} | {n} |");
    }
    let _ = writeln!(s, "| retryable failures | {} |", tasks.retryable_failures);
    let _ = writeln!(
        s,
        "| late ends of attempts already requeued (not counted) | {} |",
        tasks.tasks.values().map(|f| f.late.len()).sum::<usize>()
    );
    let _ = writeln!(
        s,
        "| **lost** (acknowledged or stored, never terminal) | **{}** |",
        tasks.lost.len()
    );
    let _ = writeln!(
        s,
        "| **duplicated** (more than one terminal state) | **{}** |",
        tasks.duplicated.len()
    );
    let _ = writeln!(s, "\n| payments | value |");
    let _ = writeln!(s, "| --- | ---: |");
    let _ = writeln!(
        s,
        "| accruals (one per completed task) | {} |",
        payments.accruals
    );
    let _ = writeln!(
        s,
        "| settlements prepared / confirmed / expired | {} / {} / {} |",
        payments.prepared, payments.confirmed, payments.expired
    );
    let _ = writeln!(
        s,
        "| duplicate confirmation events | {} |",
        payments.duplicate_confirmations
    );
    let _ = writeln!(
        s,
        "| failed transfers / failed settlements / parked payouts | {} / {} / {} |",
        payments.failed_transfers, payments.failed_settlements, payments.parked
    );
    let _ = writeln!(
        s,
        "| paid by confirmed settlements | {} |",
        Nanoton(paid_total)
    );
    let _ = writeln!(
        s,
        "| received on chain by the workers | {} |",
        Nanoton(received_total)
    );
    let _ = writeln!(
        s,
        "| pool wallet transactions that sent transfers | {} |",
        payments.wallet_transactions
    );
    let _ = writeln!(
        s,
        "| pool wallet left | {} of {} |",
        Nanoton(wallet_left),
        Nanoton(WALLET_BALANCE)
    );
    let _ = writeln!(
        s,
        "\n| worker | earned (accrued) | paid (transfers) | received on chain (transfers) |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
    for (worker, accrued) in &payments.accrued {
        let paid = payments.paid.get(worker).copied().unwrap_or((0, 0));
        let received = payments.received.get(worker).copied().unwrap_or((0, 0));
        let _ = writeln!(
            s,
            "| {worker} | {accrued} | {} ({}) | {} ({}) |",
            paid.0, paid.1, received.0, received.1
        );
    }
    let _ = writeln!(
        s,
        "\nRead models: {} tables and views compared with a clean rebuild (row counts and checksums): {} differ; \
         dead letters {live_dead} live, {clean_dead} rebuilt.",
        compared_relations().len(),
        differences.len()
    );
    let rows: Vec<String> = live
        .iter()
        .map(|(t, sum)| format!("{t} {}", sum.rows))
        .collect();
    let _ = writeln!(s, "Rows: {}.", rows.join(", "));
    let _ = writeln!(
        s,
        "\nProblems: {}",
        if problems.is_empty() {
            "none (lost = 0, duplicated = 0, paid exactly once).".to_string()
        } else {
            format!(
                "{}\n- {}",
                problems.len(),
                problems
                    .iter()
                    .take(50)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n- ")
            )
        }
    );
    println!("\n{s}");
    let _ = std::fs::create_dir_all(&out_dir);
    let summary_path = out_dir.join("summary.md");
    if let Err(e) = std::fs::write(&summary_path, &s) {
        println!("cannot write {}: {e}", summary_path.display());
    }
    if !report.errors.is_empty() {
        println!(
            "first submit errors: {:?}",
            &report.errors[..report.errors.len().min(5)]
        );
    }
    assert!(
        problems.is_empty(),
        "{} problems (see the summary above and {}):\n- {}{}",
        problems.len(),
        summary_path.display(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n- "),
        pool.diagnostics()
    );
    drop(pool);
    let _ = std::fs::remove_dir_all(&logs);
}
