//! `system`: the whole-system load test. A scenario file (`load-tests/scenarios/*.toml`) drives a producer and a
//! SIMULATED fleet of thousands of workers through the full lifecycle, settlement included, against the
//! services running as separate processes:
//!
//! - nats-server (started for the run, `tests::NatsServer`), Postgres (a fresh database on the dev stack,
//!   `tests::TestDb`), the local TON chain (`infra/ton-local` under Node, `tests::TonLocal`);
//! - `projector`, `allocator` (production policy: attested workers only) and `settler` (paying on the local
//!   chain), the release binaries next to this one;
//! - in this process: the producer (`client::Producer`, the seeded task stream at the scenario's rate), the
//!   simulated fleet (`load_tests::fleet`: registrations, heartbeats, allocations, TaskStarted/TaskCompleted/
//!   TaskResult), a follower of PAYMENTS (accruals, confirmed settlements), and a sampler.
//!
//! Every second it records tasks submitted/allocated/completed/accrued/paid, latency percentiles, what the read
//! model has projected, and the resident memory and CPU time of every process. After the load it waits until
//! every task is completed, projected and paid (or the drain times out), checks that each was completed,
//! accrued and paid exactly once (in the driver's view, in the read model and on chain), and writes
//! `load-tests/reports/<scenario>-<date>/report.md` with SVG plots and `samples.csv`.
//!
//! ```sh
//! cargo build --release -p projector -p allocator -p settler
//! cargo run --release -p load-tests --bin system -- --scenario load-tests/scenarios/smoke.toml
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bus::{Bus, Follower, Publisher, PublisherConfig, provision_streams};
use clap::Parser;
use client::{PaymentsQuery, Producer, ProducerConfig, ReadModel, TaskRequest, TaskRequirements};
use events::{
    CodecConfig, Event, Nanoton, ProducerId, SettlementId, Stream, TaskId, Timestamp, WorkerId,
};
use load_tests::fleet::{self, Clock, FleetReport, Sample};
use load_tests::machine::{self, Memory};
use load_tests::scenario::{PlannedTask, Scenario};
use load_tests::stats::{self, Flatness, LatencyKind, Percentiles, Step, Tracker};
use load_tests::svg::{LineChart, Series};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    about = "The whole-system load test: a scenario through every service, with a report and plots"
)]
struct Args {
    /// The scenario file.
    #[arg(long)]
    scenario: PathBuf,
    /// Override the scenario's rate (tasks/s); the report directory's name says so.
    #[arg(long)]
    rate: Option<u32>,
    /// Override the scenario's duration (seconds of load).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Override the number of simulated workers.
    #[arg(long)]
    workers: Option<u32>,
    /// Override how long the drain may take (seconds).
    #[arg(long)]
    drain_timeout_s: Option<u64>,
    /// Where report directories go.
    #[arg(long, default_value = "load-tests/reports")]
    reports: PathBuf,
    /// Where the service logs go (ignored by git).
    #[arg(long, default_value = "load-tests/out")]
    logs: PathBuf,
    /// Where the projector, allocator and settler binaries are; default: next to this one.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Log filter of the services (RUST_LOG); per-task info logs would cost CPU that the pool does not.
    #[arg(long, default_value = "warn")]
    service_log: String,
    /// Before starting, wait at most this long for a quiet machine (other processes using less than
    /// `--quiet-cores` over 5 s): builds of other users would take the cores the run measures.
    #[arg(long, default_value_t = 900)]
    max_wait_s: u64,
    #[arg(long, default_value_t = 0.2)]
    quiet_cores: f64,
}

/// The services the test starts as processes, in the order they stop.
const SERVICES: [&str; 3] = ["projector", "allocator", "settler"];
/// Settings the services read from the environment, which a service under test must not inherit.
const INHERITED_SETTINGS: [&str; 8] = [
    "COCOON_NATS_CREDENTIALS",
    "COCOON_PROJECTOR_INSTANCE",
    "COCOON_PROJECTOR_INSTANCES",
    "COCOON_PROJECTOR_METRICS",
    "COCOON_ALLOW_UNATTESTED",
    "COCOON_TONCENTER_API_KEY",
    "NATS_URL",
    "COCOON_DATABASE_URL",
];
/// How many tasks may be submitted and not yet acknowledged before the producer waits.
const MAX_UNACKED_SUBMISSIONS: usize = 100_000;
/// How long a stopped service may take.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long the services may take to be ready (the projector has registered every worker).
const READY_DEADLINE: Duration = Duration::from_secs(180);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // On SIGINT or SIGTERM the run is dropped, which stops the servers and services it started, and says so: a
    // run that vanished without a word would look like a crash.
    runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            () = bus::stop_requested() => {
                bail!("stopped by a signal (SIGINT or SIGTERM) at {}", machine::date_utc())
            }
        }
    })
}

/// A service process.
struct Service {
    name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Service {
    async fn spawn(
        bin_dir: &Path,
        name: &'static str,
        args: &[String],
        env: &[(&str, String)],
        logs: &Path,
    ) -> anyhow::Result<Service> {
        let log = logs.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let path = bin_dir.join(name);
        let mut command = Command::new(&path);
        // Only what the command line says: no credentials, instances or ports from this shell's environment.
        for var in INHERITED_SETTINGS {
            command.env_remove(var);
        }
        let child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        println!("  started {name:<10} pid {pid:<8} log {}", log.display());
        Ok(Service {
            name,
            child,
            pid,
            log,
        })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                tests::services::tail(&self.log, 20)
            )),
            _ => None,
        }
    }

    /// SIGINT (the services' clean stop), then SIGKILL after [`STOP_GRACE`].
    async fn stop(mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("{} had exited ({status})", self.name);
        }
        // kill(1): the workspace forbids unsafe code, so no libc.
        let _ = Command::new("kill")
            .args(["-INT", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => format!("{} stopped ({status})", self.name),
            _ => {
                let _ = self.child.kill().await;
                format!(
                    "{} killed: not stopped {} s after SIGINT",
                    self.name,
                    STOP_GRACE.as_secs()
                )
            }
        }
    }
}

/// Processes whose memory and CPU are sampled.
#[derive(Debug, Clone)]
enum Watched {
    Pid(u32),
    /// The Postgres backends serving this run's database (found each second).
    PostgresBackends,
}

/// One second of resources and read-model progress.
#[derive(Debug, Clone)]
struct ResourceRow {
    /// Seconds since the start of the load.
    t: f64,
    memory: Vec<Option<Memory>>,
    /// CPU seconds used in the interval before this row, per process.
    cpu: Vec<f64>,
    /// Busy CPU seconds of the whole machine in the interval.
    machine_busy: f64,
    projected_completed: i64,
    projected_accrued: i64,
}

/// Waits until the machine has used less than `cores` over 5 s, or `max` has passed; returns how long it waited
/// and whether it found the machine quiet.
async fn wait_for_quiet(cores: f64, max: Duration) -> (Duration, bool) {
    let started = Instant::now();
    let window = Duration::from_secs(5);
    loop {
        let Some(before) = machine::system_busy_seconds() else {
            return (started.elapsed(), false);
        };
        tokio::time::sleep(window).await;
        let Some(after) = machine::system_busy_seconds() else {
            return (started.elapsed(), false);
        };
        let busy = (after - before) / window.as_secs_f64();
        if busy < cores {
            return (started.elapsed(), true);
        }
        if started.elapsed() >= max {
            println!(
                "  the machine is still busy ({busy:.2} cores) after {} s: running anyway",
                max.as_secs()
            );
            return (started.elapsed(), false);
        }
        if started.elapsed() < window * 2 {
            println!(
                "  the machine is busy ({busy:.2} cores used by other processes): waiting for a quiet moment"
            );
        }
    }
}

/// Samples every second until `stop`.
async fn sample_resources(
    watched: Vec<(String, Watched)>,
    pg: tokio_postgres::Client,
    clock: Clock,
    stop: CancellationToken,
) -> Vec<ResourceRow> {
    let mut rows = Vec::new();
    let mut last_cpu: Vec<HashMap<u32, f64>> = vec![HashMap::new(); watched.len()];
    let mut first = true;
    let mut last_busy = machine::system_busy_seconds().unwrap_or(0.0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return rows,
            _ = tick.tick() => {}
        }
        let backends: Vec<u32> = match pg
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
                &[],
            )
            .await
        {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        let counts = pg
            .query_one(
                "SELECT coalesce((SELECT count FROM task_status_totals WHERE status = 'completed'), 0), \
                 (SELECT count(*) FROM payment_accruals)",
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((-1, -1));
        let t = clock.now() as f64 / 1e6;
        let mut memory = Vec::with_capacity(watched.len());
        let mut cpu = Vec::with_capacity(watched.len());
        for (i, (_, w)) in watched.iter().enumerate() {
            let pids: Vec<u32> = match w {
                Watched::Pid(pid) => vec![*pid],
                Watched::PostgresBackends => backends.clone(),
            };
            let mut sum: Option<Memory> = None;
            let mut used = 0.0;
            let mut seen = HashMap::new();
            for pid in pids {
                if let Some(m) = machine::memory(pid) {
                    sum = Some(sum.unwrap_or_default() + m);
                }
                if let Some(c) = machine::cpu_seconds(&format!("/proc/{pid}/stat")) {
                    // A process first seen after the first sample started during the load: all of its CPU counts.
                    let before =
                        last_cpu[i]
                            .get(&pid)
                            .copied()
                            .unwrap_or(if first { c } else { 0.0 });
                    used += (c - before).max(0.0);
                    seen.insert(pid, c);
                }
            }
            last_cpu[i] = seen;
            memory.push(sum);
            cpu.push(used);
        }
        let busy = machine::system_busy_seconds().unwrap_or(last_busy);
        rows.push(ResourceRow {
            t,
            memory,
            cpu,
            machine_busy: (busy - last_busy).max(0.0),
            projected_completed: counts.0,
            projected_accrued: counts.1,
        });
        last_busy = busy;
        first = false;
    }
}

/// What the PAYMENTS follower saw.
#[derive(Debug, Clone, Default)]
struct PaymentsSeen {
    accruals: u64,
    prepared: u64,
    confirmed: u64,
    expired: u64,
    failed: u64,
    payouts_paid: u64,
    failed_transfers: u64,
    nanoton_paid: u128,
    most_tasks_in_one: usize,
    most_payouts_in_one: usize,
    undecodable: u64,
}

/// Follows PAYMENTS from the start: each PaymentAccrued is an `Accrued` step; each confirmed settlement makes
/// the tasks of its sent transfers `Paid`.
async fn follow_payments(
    bus: Bus,
    clock: Clock,
    samples: mpsc::UnboundedSender<Sample>,
    stop: CancellationToken,
) -> anyhow::Result<PaymentsSeen> {
    let mut follower = Follower::open(&bus.jetstream, Stream::Payments, vec![], 1).await?;
    let codec = CodecConfig::default();
    let mut open: HashMap<SettlementId, Vec<(WorkerId, Nanoton, Vec<TaskId>)>> = HashMap::new();
    let mut seen = PaymentsSeen::default();
    loop {
        let frame = tokio::select! {
            () = stop.cancelled() => return Ok(seen),
            f = follower.next() => f,
        };
        let Some(frame) = frame else {
            return Ok(seen);
        };
        let records = match frame
            .map_err(anyhow::Error::from)
            .and_then(|f| Ok(f.decode(&codec)?))
        {
            Ok(records) => records,
            Err(e) => {
                seen.undecodable += 1;
                tracing::warn!(error = %e, "payments: frame skipped");
                continue;
            }
        };
        let now = clock.now();
        for record in records {
            match record.event {
                Event::PaymentAccrued(a) => {
                    seen.accruals += 1;
                    let _ = samples.send((a.task_id, Step::Accrued, now));
                }
                Event::SettlementPrepared(p) => {
                    seen.prepared += 1;
                    seen.most_payouts_in_one = seen.most_payouts_in_one.max(p.payouts.len());
                    seen.most_tasks_in_one = seen
                        .most_tasks_in_one
                        .max(p.payouts.iter().map(|x| x.task_ids.len()).sum());
                    open.insert(
                        p.settlement_id,
                        p.payouts
                            .into_iter()
                            .map(|x| (x.worker_id, x.amount, x.task_ids))
                            .collect(),
                    );
                }
                Event::SettlementConfirmed(c) => {
                    seen.confirmed += 1;
                    seen.failed_transfers += c.failed_transfers.len() as u64;
                    for (worker, amount, tasks) in open.remove(&c.settlement_id).unwrap_or_default()
                    {
                        if c.failed_transfers.iter().any(|f| f.worker_id == worker) {
                            continue;
                        }
                        seen.payouts_paid += 1;
                        seen.nanoton_paid += u128::from(amount.0);
                        for task in tasks {
                            let _ = samples.send((task, Step::Paid, now));
                        }
                    }
                }
                Event::SettlementExpired(e) => {
                    seen.expired += 1;
                    open.remove(&e.settlement_id);
                }
                Event::SettlementFailed(f) => {
                    seen.failed += 1;
                    open.remove(&f.settlement_id);
                }
                _ => {}
            }
        }
    }
}

/// Folds every sample into the tracker.
async fn collect(mut samples: mpsc::UnboundedReceiver<Sample>, tracker: Arc<Mutex<Tracker>>) {
    let mut buffer = Vec::with_capacity(4096);
    while samples.recv_many(&mut buffer, 4096).await > 0 {
        let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        for (task, step, at) in buffer.drain(..) {
            t.record(task, step, at);
        }
    }
}

fn request(task: &PlannedTask) -> TaskRequest {
    let mut r = TaskRequest::new(
        format!("load-{}", task.client),
        Nanoton(task.max_price_per_gpu_second),
    );
    r.priority = task.priority;
    r.timeout_ms = task.timeout_ms;
    r.requirements = TaskRequirements {
        gpu_count: task.gpus,
        gpu_memory_mib: task.gpu_memory_mib,
        model_tag: task.model_tag.clone(),
    };
    r.input = task.input.clone();
    r
}

/// What the producer did.
#[derive(Debug, Clone, Default)]
struct Produced {
    offered: u64,
    failed: u64,
    first_error: Option<String>,
    /// Seconds the producer ended behind its schedule by, at most.
    max_lag_s: f64,
}

/// Submits the scenario's task stream at its rate (open loop, in 10 ms slices), each slice pipelined on its own
/// task, so a slow acknowledgement does not slow the offered rate until [`MAX_UNACKED_SUBMISSIONS`] are
/// outstanding.
async fn produce(
    scenario: Scenario,
    producer: Producer,
    clock: Clock,
    samples: mpsc::UnboundedSender<Sample>,
) -> Produced {
    let total = scenario.total_tasks();
    let mut stream = scenario.tasks();
    let unacked = Arc::new(Semaphore::new(MAX_UNACKED_SUBMISSIONS));
    let failures = Arc::new(Mutex::new((0u64, None::<String>)));
    let mut slices = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut offered = 0u64;
    let mut max_lag_s = 0f64;
    let start = Instant::now();
    while offered < total {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = scenario.due(elapsed).max(offered);
        let n = (due - offered) as usize;
        if n == 0 {
            continue;
        }
        let Ok(permits) = unacked.clone().acquire_many_owned(n as u32).await else {
            break;
        };
        let behind = elapsed - start.elapsed().as_secs_f64();
        max_lag_s = max_lag_s.max(-behind);
        let batch: Vec<TaskRequest> = stream.by_ref().take(n).map(|t| request(&t)).collect();
        offered += n as u64;
        let (producer, samples, failures) = (producer.clone(), samples.clone(), failures.clone());
        slices.spawn(async move {
            let sent = clock.now();
            for outcome in producer.submit_many(batch.iter()).await {
                match outcome {
                    Ok(s) => {
                        let _ = samples.send((s.task_id, Step::Submitted { sent }, clock.now()));
                    }
                    Err(e) => {
                        let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                        f.0 += 1;
                        f.1.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            drop(permits);
        });
        while slices.try_join_next().is_some() {}
    }
    while slices.join_next().await.is_some() {}
    let (failed, first_error) = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Produced {
        offered,
        failed,
        first_error,
        max_lag_s,
    }
}

/// `command --version`'s first line, or "unknown".
fn version_of(program: &Path, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn git_revision() -> String {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{head} + uncommitted changes")
    } else {
        head
    }
}

/// What the read model and the chain say at the end.
#[derive(Debug, Clone, Default)]
struct FinalChecks {
    tasks_by_status: Vec<(String, i64)>,
    tasks_rows: i64,
    accrual_rows: i64,
    accrual_tasks: i64,
    paid_task_rows: i64,
    paid_tasks: i64,
    accrued: Nanoton,
    paid: Nanoton,
    pending: Nanoton,
    parked: Nanoton,
    in_flight: Nanoton,
    settlements: Vec<(String, u64)>,
    /// Sum of the payout addresses' balances on the local chain, and how many were read.
    on_chain: Option<(u128, usize)>,
    wallet_spent: Option<u128>,
}

async fn read_model_checks(
    pg: &tokio_postgres::Client,
    model: &ReadModel,
) -> anyhow::Result<FinalChecks> {
    let mut f = FinalChecks::default();
    for row in pg
        .query(
            "SELECT status, count FROM task_status_totals WHERE count <> 0 ORDER BY status",
            &[],
        )
        .await?
    {
        f.tasks_by_status.push((row.get(0), row.get(1)));
    }
    f.tasks_rows = pg
        .query_one("SELECT count(*) FROM tasks", &[])
        .await?
        .get(0);
    let row = pg
        .query_one(
            "SELECT count(*), count(DISTINCT task_id) FROM payment_accruals",
            &[],
        )
        .await?;
    (f.accrual_rows, f.accrual_tasks) = (row.get(0), row.get(1));
    let row = pg
        .query_one(
            "SELECT count(*), count(DISTINCT st.task_id) FROM settlement_tasks st \
             JOIN settlement_payouts p ON p.settlement_id = st.settlement_id AND p.worker_id = st.worker_id \
             WHERE p.status = 'paid'",
            &[],
        )
        .await?;
    (f.paid_task_rows, f.paid_tasks) = (row.get(0), row.get(1));
    let status = model
        .payments(&PaymentsQuery {
            worker: None,
            recent: 0,
        })
        .await?;
    let s = status.totals.sums;
    (f.accrued, f.paid, f.pending, f.parked, f.in_flight) =
        (s.accrued, s.paid, s.pending, s.parked, s.in_flight);
    f.settlements = status
        .totals
        .settlements
        .iter()
        .map(|(st, n)| (st.to_string(), *n))
        .collect();
    Ok(f)
}

/// An account's balance on the local chain, asked up to five times (the Node server resets a connection now and
/// then when it is busy); `None` when it never answered.
async fn chain_balance(chain: &settler::Toncenter, address: &str) -> Option<u64> {
    let mut backoff = Duration::from_millis(100);
    for _ in 0..5 {
        match chain.balance(address).await {
            Ok(b) => return Some(b),
            Err(e) => {
                tracing::warn!(%address, error = %e, "balance not read; asking again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    None
}

/// Whether everything submitted is completed, paid and projected.
async fn drained(
    tracker: &Arc<Mutex<Tracker>>,
    submitted_ok: u64,
    pg: &tokio_postgres::Client,
) -> anyhow::Result<(bool, String)> {
    let (s, c, p) = tracker.lock().unwrap_or_else(|p| p.into_inner()).progress();
    let row = pg
        .query_one(
            "SELECT coalesce((SELECT count FROM task_status_totals WHERE status = 'completed'), 0), \
             (SELECT count(*) FROM payment_accruals), \
             (SELECT count(DISTINCT st.task_id) FROM settlement_tasks st JOIN settlements x \
              ON x.settlement_id = st.settlement_id WHERE x.status = 'confirmed')",
            &[],
        )
        .await?;
    let (projected, accrued, settled): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let n = submitted_ok as i64;
    let done = s == submitted_ok
        && c >= submitted_ok
        && p >= submitted_ok
        && projected >= n
        && accrued >= n
        && settled >= n;
    Ok((
        done,
        format!(
            "acked {s}/{submitted_ok}, completed {c}, paid {p}; read model: completed {projected}, accrued \
             {accrued}, in confirmed settlements {settled}"
        ),
    ))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut scenario = Scenario::load(&args.scenario)?;
    let mut suffix = String::new();
    if let Some(rate) = args.rate {
        scenario.rate = rate;
        let _ = write!(suffix, "-r{rate}");
    }
    if let Some(d) = args.duration_s {
        scenario.duration_s = d;
        scenario.ramp_s = scenario.ramp_s.min(d);
        let _ = write!(suffix, "-d{d}");
    }
    if let Some(w) = args.workers {
        scenario.workers.count = w;
        let _ = write!(suffix, "-w{w}");
    }
    if let Some(d) = args.drain_timeout_s {
        scenario.drain_timeout_s = d;
    }
    scenario.validate()?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this executable has no directory")?
            .to_path_buf(),
    };
    let missing: Vec<String> = SERVICES
        .iter()
        .map(|s| bin_dir.join(s))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing {}: build them with `cargo build --release -p projector -p allocator -p settler`",
            missing.join(", ")
        );
    }
    let date = machine::date_utc();
    let stamp = date.replace([':', '-'], "");
    let run_name = format!("{}{suffix}-{stamp}", scenario.name);
    let report_dir = args.reports.join(&run_name);
    let logs = args.logs.join(format!("system-{run_name}"));
    std::fs::create_dir_all(&report_dir)?;
    std::fs::create_dir_all(&logs)?;
    let machine_line = machine::description();
    println!(
        "system load test: scenario {} ({} simulated workers, {} tasks/s for {} s, ramp {} s, seed {}); {date}\n  {machine_line}",
        scenario.name,
        scenario.workers.count,
        scenario.rate,
        scenario.duration_s,
        scenario.ramp_s,
        scenario.seed
    );

    let (waited, quiet) =
        wait_for_quiet(args.quiet_cores, Duration::from_secs(args.max_wait_s)).await;
    let quiet_line = format!(
        "waited {:.0} s for a quiet machine ({}); other processes' CPU during the run is in the CPU plot",
        waited.as_secs_f64(),
        if quiet {
            "found"
        } else {
            "not found: ran anyway"
        }
    );

    // The servers.
    let nats = tests::NatsServer::start().await;
    let nats_pid = machine::find_server_pid(nats.port()).context("nats-server's pid")?;
    let bus = Bus::from_client(nats.client().await, Duration::from_secs(10));
    provision_streams(&bus.jetstream, 1).await?;
    let db = tests::TestDb::create().await;
    {
        let mut c = db.client().await;
        schemas::migrate(&mut c).await?;
    }
    let pool_key = {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(uuid::Uuid::now_v7().as_bytes());
        h.update(uuid::Uuid::now_v7().as_bytes());
        let seed: [u8; 32] = h.finalize().into();
        seed.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let public_key = settler::PoolKey::parse(&pool_key)?.public_key();
    let wallet_balance = scenario.settler.wallet_ton.saturating_mul(Nanoton::PER_TON);
    let ton = tests::TonLocal::start(&public_key, wallet_balance).await;
    let ton_pid = machine::children_with(std::process::id(), "server.mjs")
        .first()
        .copied()
        .context("the local TON server's pid")?;
    println!(
        "  nats-server pid {nats_pid} ({}), Postgres database {}, ton-local pid {ton_pid} ({})",
        nats.url(),
        db.name(),
        ton.url()
    );

    // The services.
    let env = vec![
        ("RUST_LOG", args.service_log.clone()),
        ("NO_COLOR", "1".to_owned()),
        ("COCOON_SETTLER_KEY", pool_key.clone()),
    ];
    let k = &scenario;
    let mut services = vec![
        Service::spawn(
            &bin_dir,
            "projector",
            &[
                "--nats-url".into(),
                nats.url(),
                "--database-url".into(),
                db.url().to_owned(),
                "--metrics-addr".into(),
                String::new(),
                "--workers".into(),
                k.projector.workers.to_string(),
            ],
            &env[..2],
            &logs,
        )
        .await?,
        Service::spawn(
            &bin_dir,
            "allocator",
            &[
                "--nats-url".into(),
                nats.url(),
                "--instance".into(),
                "allocator-load".into(),
                "--heartbeat-timeout-ms".into(),
                k.allocator.heartbeat_timeout_ms.to_string(),
                "--finished-retention-s".into(),
                k.allocator.finished_retention_s.to_string(),
            ],
            &env[..2],
            &logs,
        )
        .await?,
        Service::spawn(
            &bin_dir,
            "settler",
            &[
                "--nats-url".into(),
                nats.url(),
                "--toncenter-url".into(),
                ton.url().to_owned(),
                "--instance".into(),
                "settler-load".into(),
                "--max-age-s".into(),
                k.settler.max_age_s.to_string(),
                "--min-payout-nanoton".into(),
                k.settler.min_payout_nanoton.to_string(),
                "--resend-interval-ms".into(),
                k.settler.resend_interval_ms.to_string(),
                "--check-interval-ms".into(),
                k.settler.check_interval_ms.to_string(),
                "--accrual-window-s".into(),
                k.settler.accrual_window_s.to_string(),
            ],
            &env,
            &logs,
        )
        .await?,
    ];

    // The fleet registers; the stand-in verdicts admit it under the production policy.
    let plans = scenario.fleet();
    let fleet_publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default())?;
    let registered_at = Instant::now();
    fleet::register(
        &fleet_publisher,
        &plans,
        Timestamp::now().saturating_add(Duration::from_secs(86_400)),
    )
    .await?;
    println!(
        "  registered {} simulated workers ({} simulated GPUs) with stand-in attestations in {:.1} s",
        plans.len(),
        plans.iter().map(|p| u64::from(p.gpus)).sum::<u64>(),
        registered_at.elapsed().as_secs_f64()
    );
    let pg = db.client().await;
    let model = ReadModel::from_client(db.client().await);
    let ready = Instant::now();
    loop {
        for s in &mut services {
            if let Some(e) = s.exited() {
                bail!("{e}");
            }
        }
        let active: i64 = pg
            .query_one("SELECT active_workers FROM dashboard_stats", &[])
            .await?
            .get(0);
        let lease = match bus.jetstream.get_key_value(allocator::lease::BUCKET).await {
            Ok(kv) => kv
                .get(allocator::lease::LEASE_KEY)
                .await
                .ok()
                .flatten()
                .is_some(),
            Err(_) => false,
        };
        if active >= i64::from(scenario.workers.count) && lease {
            break;
        }
        if ready.elapsed() > READY_DEADLINE {
            bail!(
                "not ready after {} s: the read model shows {active} of {} workers, allocator lease {}",
                READY_DEADLINE.as_secs(),
                scenario.workers.count,
                if lease { "held" } else { "not held" }
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "  ready in {:.1} s: the projector shows every worker, the allocator holds its lease",
        ready.elapsed().as_secs_f64()
    );

    // The load.
    let clock = Clock::start();
    let stop_fleet = CancellationToken::new();
    let stop_watch = CancellationToken::new();
    let (samples_tx, samples_rx) = mpsc::unbounded_channel::<Sample>();
    let tracker = Arc::new(Mutex::new(Tracker::new()));
    let collector = tokio::spawn(collect(samples_rx, tracker.clone()));
    let watched: Vec<(String, Watched)> = vec![
        ("projector".into(), Watched::Pid(services[0].pid)),
        ("allocator".into(), Watched::Pid(services[1].pid)),
        ("settler".into(), Watched::Pid(services[2].pid)),
        ("nats-server".into(), Watched::Pid(nats_pid)),
        ("postgres".into(), Watched::PostgresBackends),
        ("ton-local".into(), Watched::Pid(ton_pid)),
        ("driver".into(), Watched::Pid(std::process::id())),
    ];
    let sampler = tokio::spawn(sample_resources(
        watched.clone(),
        db.client().await,
        clock,
        stop_watch.clone(),
    ));
    let payments = tokio::spawn(follow_payments(
        bus.clone(),
        clock,
        samples_tx.clone(),
        stop_watch.clone(),
    ));
    let fleet_task = {
        let (bus, publisher, plans, tx, stop) = (
            bus.clone(),
            fleet_publisher.clone(),
            plans.clone(),
            samples_tx.clone(),
            stop_fleet.clone(),
        );
        let interval = Duration::from_millis(scenario.workers.heartbeat_interval_ms);
        tokio::spawn(
            async move { fleet::run(bus, publisher, &plans, interval, clock, tx, stop).await },
        )
    };
    let producer = Producer::from_bus(
        &bus,
        ProducerConfig {
            producer: ProducerId::new("load-producer")?,
            publisher: PublisherConfig::default(),
        },
    )?;
    println!(
        "load: {} tasks at {} tasks/s (ramp {} s) for {} s …",
        scenario.total_tasks(),
        scenario.rate,
        scenario.ramp_s,
        scenario.duration_s
    );
    let mut production = tokio::spawn(produce(
        scenario.clone(),
        producer,
        clock,
        samples_tx.clone(),
    ));
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    let produced = loop {
        tokio::select! {
            p = &mut production => break p?,
            _ = progress.tick() => {
                let (s, c, p) = tracker.lock().unwrap_or_else(|p| p.into_inner()).progress();
                println!("  {:>5.0} s  submitted {s:>8}  completed {c:>8}  paid {p:>8}", clock.now() as f64 / 1e6);
                for svc in &mut services {
                    if let Some(e) = svc.exited() {
                        bail!("{e}");
                    }
                }
            }
        }
    };
    let load_end = clock.now() as f64 / 1e6;
    let submitted_ok = produced.offered - produced.failed;
    println!(
        "  load done at {load_end:.1} s: {} offered, {} failed submissions; draining (at most {} s) …",
        produced.offered, produced.failed, scenario.drain_timeout_s
    );

    // The drain: every task completed, projected and paid.
    let drain_deadline = Instant::now() + Duration::from_secs(scenario.drain_timeout_s);
    let mut last_print = Instant::now();
    let drained_ok = loop {
        let (done, line) = drained(&tracker, submitted_ok, &pg).await?;
        if done {
            break true;
        }
        if Instant::now() >= drain_deadline {
            println!("  drain timed out: {line}");
            break false;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            println!("  {:>5.0} s  {line}", clock.now() as f64 / 1e6);
            last_print = Instant::now();
        }
        for svc in &mut services {
            if let Some(e) = svc.exited() {
                bail!("{e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drain_end = clock.now() as f64 / 1e6;
    println!(
        "  drained: {} at {drain_end:.1} s",
        if drained_ok { "yes" } else { "NO" }
    );

    // Stop the fleet and the watchers; read the final state; stop the services. From here on a failure is
    // written into the report rather than ending the run without one.
    let mut problems: Vec<String> = Vec::new();
    stop_fleet.cancel();
    let fleet_report = match fleet_task.await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            problems.push(format!("the simulated fleet failed: {e}"));
            FleetReport::default()
        }
        Err(e) => {
            problems.push(format!("the simulated fleet's task failed: {e}"));
            FleetReport::default()
        }
    };
    if let Err(e) = fleet_publisher.flush().await {
        problems.push(format!("the fleet's last events: {e}"));
    }
    stop_watch.cancel();
    let rows = sampler.await.unwrap_or_else(|e| {
        problems.push(format!("the sampler failed: {e}"));
        Vec::new()
    });
    let payments_seen = match payments.await {
        Ok(Ok(seen)) => seen,
        Ok(Err(e)) => {
            problems.push(format!("following PAYMENTS failed: {e}"));
            PaymentsSeen::default()
        }
        Err(e) => {
            problems.push(format!("following PAYMENTS failed: {e}"));
            PaymentsSeen::default()
        }
    };
    drop(samples_tx);
    if let Err(e) = collector.await {
        problems.push(format!("the collector failed: {e}"));
    }
    let mut checks = match read_model_checks(&pg, &model).await {
        Ok(checks) => checks,
        Err(e) => {
            problems.push(format!("reading the read model failed: {e:#}"));
            FinalChecks::default()
        }
    };
    println!(
        "  reading {} balances on the local chain …",
        plans.len() + 1
    );
    let chain = settler::Toncenter::new(
        ton.url(),
        None,
        httpc::HttpClient::new(&httpc::ClientConfig::new(), false)?,
    );
    match chain_balance(&chain, ton.wallet()).await {
        Some(left) => {
            checks.wallet_spent = Some(u128::from(wallet_balance.saturating_sub(left)));
        }
        None => problems.push("the pool wallet's balance could not be read".to_owned()),
    }
    let mut on_chain = 0u128;
    let mut unreadable = 0usize;
    for plan in &plans {
        match chain_balance(&chain, &fleet::payout_address(&plan.id)).await {
            Some(b) => on_chain += u128::from(b),
            None => unreadable += 1,
        }
    }
    if unreadable > 0 {
        problems.push(format!(
            "{unreadable} payout balances could not be read from the local chain"
        ));
    } else {
        checks.on_chain = Some((on_chain, plans.len()));
    }
    let mut stopped = Vec::new();
    for s in services {
        stopped.push(s.stop().await);
    }
    println!("  {}", stopped.join("; "));
    let tracker = Arc::try_unwrap(tracker)
        .map_err(|_| anyhow::anyhow!("the tracker is still shared"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());

    let versions = Versions {
        nats: version_of(&tests::nats_server_binary(), "--version"),
        postgres: pg
            .query_one("SHOW server_version", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "unknown".into()),
        node: version_of(Path::new("node"), "--version"),
        git: git_revision(),
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = Report {
        scenario: &scenario,
        scenario_path: &args.scenario,
        overrides: &suffix,
        date: &date,
        machine: &machine_line,
        command: &command,
        versions: &versions,
        load_end,
        drain_end,
        drained: drained_ok,
        produced: &produced,
        fleet: &fleet_report,
        payments: &payments_seen,
        checks: &checks,
        tracker: &tracker,
        rows: &rows,
        watched: &watched.iter().map(|w| w.0.clone()).collect::<Vec<_>>(),
        wallet_balance,
        quiet: &quiet_line,
        service_log: &args.service_log,
        problems: &problems,
    };
    let (summary, outcome) = report.write(&report_dir)?;
    std::fs::copy(&args.scenario, report_dir.join("scenario.toml"))?;
    println!(
        "\n{summary}\nreport: {}",
        report_dir.join("report.md").display()
    );
    // The clients go before the database, which is dropped WITH (FORCE).
    drop(pg);
    drop(model);
    drop(ton);
    drop(db);
    drop(nats);
    match outcome {
        Outcome::Exact => Ok(()),
        Outcome::Unfinished => {
            bail!("not every task was paid before the drain ended; see the report")
        }
        Outcome::Wrong => bail!("the run lost or duplicated work; see the report"),
    }
}

/// How the work of a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every task completed, accrued and paid exactly once.
    Exact,
    /// Nothing done twice and nothing lost, but not everything paid when the drain ended.
    Unfinished,
    /// Lost or duplicated work.
    Wrong,
}

struct Versions {
    nats: String,
    postgres: String,
    node: String,
    git: String,
}

struct Report<'a> {
    scenario: &'a Scenario,
    scenario_path: &'a Path,
    overrides: &'a str,
    date: &'a str,
    machine: &'a str,
    command: &'a str,
    versions: &'a Versions,
    load_end: f64,
    drain_end: f64,
    drained: bool,
    produced: &'a Produced,
    fleet: &'a FleetReport,
    payments: &'a PaymentsSeen,
    checks: &'a FinalChecks,
    tracker: &'a Tracker,
    rows: &'a [ResourceRow],
    watched: &'a [String],
    wallet_balance: u64,
    quiet: &'a str,
    service_log: &'a str,
    /// What went wrong while finishing the run (each makes the outcome wrong).
    problems: &'a [String],
}

/// One process's memory over the run, and whether it stayed flat over the load.
struct MemorySeries {
    name: String,
    flat: Option<Flatness>,
    points: Vec<(f64, f64)>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// The trailing moving average of `points` over `window` points.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

fn fmt_latency(p: Option<Percentiles>, unit_s: bool) -> String {
    match p {
        None => "| — | — | — | — | 0 |".to_owned(),
        Some(p) if unit_s => format!(
            "| {:.2} s | {:.2} s | {:.2} s | {:.2} s | {} |",
            p.p50 / 1e3,
            p.p95 / 1e3,
            p.p99 / 1e3,
            p.max / 1e3,
            p.count
        ),
        Some(p) => format!(
            "| {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            p.p50, p.p95, p.p99, p.max, p.count
        ),
    }
}

impl Report<'_> {
    /// Writes report.md, the SVGs and samples.csv; returns the verdict lines, and how the work ended.
    fn write(&self, dir: &Path) -> anyhow::Result<(String, Outcome)> {
        let s = self.scenario;
        let buckets = &self.tracker.buckets;
        let seconds = buckets.len().max(self.rows.len());
        let load_end_s = self.load_end.floor() as usize;
        let rate = f64::from(s.rate);
        let longest_task_s = s
            .tasks
            .iter()
            .map(|t| t.duration_ms[1])
            .max()
            .unwrap_or(0)
            .div_ceil(1000) as usize;
        // Steady: after the ramp and the longest task, to the end of the load.
        let steady_from = (s.ramp_s as usize + longest_task_s + 2).min(load_end_s);
        let steady = steady_from..load_end_s.max(steady_from);
        let series = |f: &dyn Fn(&stats::Bucket) -> u64| -> Vec<(f64, f64)> {
            (0..seconds)
                .map(|i| (i as f64, buckets.get(i).map_or(0.0, |b| f(b) as f64)))
                .collect()
        };
        let submitted = series(&|b| b.submitted);
        let allocated = series(&|b| b.allocated);
        let completed = series(&|b| b.completed);
        let paid = series(&|b| b.paid);
        let steady_mean =
            |pts: &[(f64, f64)]| mean(steady.clone().filter_map(|i| pts.get(i).map(|p| p.1)));
        let (m_sub, m_alloc, m_done, m_paid) = (
            steady_mean(&submitted),
            steady_mean(&allocated),
            steady_mean(&completed),
            steady_mean(&paid),
        );
        // Backlogs: in flight (submitted, not completed) and unpaid (completed, not paid), per second.
        let mut cum = (0.0, 0.0, 0.0);
        let mut in_flight = Vec::with_capacity(seconds);
        let mut unpaid = Vec::with_capacity(seconds);
        for i in 0..seconds {
            cum.0 += submitted[i].1;
            cum.1 += completed[i].1;
            cum.2 += paid[i].1;
            in_flight.push((i as f64, cum.0 - cum.1));
            unpaid.push((i as f64, cum.1 - cum.2));
        }
        let second_half = (load_end_s / 2)..load_end_s;
        let in_window = |pts: &[(f64, f64)], r: std::ops::Range<usize>| -> Vec<(f64, f64)> {
            pts.iter()
                .copied()
                .filter(|p| r.contains(&(p.0 as usize)))
                .collect()
        };
        let in_flight_slope = stats::slope(&in_window(&in_flight, steady.clone()));
        let unpaid_slope = stats::slope(&in_window(&unpaid, second_half.clone()));
        let paid_second_half = mean(second_half.clone().filter_map(|i| paid.get(i).map(|p| p.1)));
        // Sustained: the offered rate submitted, completions keeping up (the in-flight backlog grows by less
        // than 1% of the rate per second), and payments keeping up over the second half (paid at 95% of the rate
        // or more, the unpaid backlog growing by less than 5% of it: payments come in steps, one settlement at a
        // time).
        let lifecycle_ok =
            m_sub >= 0.98 * rate && m_done >= 0.98 * rate && in_flight_slope < 0.01 * rate;
        let paid_ok = paid_second_half >= 0.95 * rate && unpaid_slope < 0.05 * rate;
        let sustained = lifecycle_ok && paid_ok;

        let totals = self.tracker.totals();
        let c = self.checks;
        let n = totals.submitted as i64;
        let completed_rm = c
            .tasks_by_status
            .iter()
            .find(|(st, _)| st == "completed")
            .map_or(0, |x| x.1);
        let read_model_ok = completed_rm == n
            && c.tasks_rows == n
            && c.tasks_by_status.iter().all(|(st, _)| st == "completed")
            && c.accrual_rows == n
            && c.accrual_tasks == n
            && c.paid_task_rows == n
            && c.paid_tasks == n
            && c.pending.0 == 0
            && c.in_flight.0 == 0
            && c.parked.0 == 0
            && c.paid == c.accrued;
        let chain_ok = c.on_chain.is_some_and(|(sum, _)| {
            // A fresh account pays a storage fee on later transfers in, so it may hold a little less.
            sum <= u128::from(c.paid.0)
                && u128::from(c.paid.0) - sum <= u128::from(c.paid.0) / 100 + 1_000_000
        });
        let exact = totals.is_exact()
            && self.drained
            && read_model_ok
            && chain_ok
            && self.problems.is_empty();

        // Memory over the load.
        let names = self.watched;
        let mem_points = |i: usize, anon: bool| -> Vec<(f64, f64)> {
            self.rows
                .iter()
                .filter_map(|r| {
                    r.memory[i].map(|m| (r.t, mib(if anon { m.anon_kib } else { m.rss_kib })))
                })
                .collect()
        };
        // Postgres backends share the buffer cache, which each backend's VmRSS counts as it touches it: their
        // private memory (RssAnon) is what would show a leak.
        let is_pg = |name: &str| name == "postgres";
        let retention = s
            .allocator
            .finished_retention_s
            .max(s.settler.accrual_window_s) as f64;
        let judged_from = stats::warm_up(self.load_end, retention);
        let flat: Vec<MemorySeries> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let points = mem_points(i, is_pg(name));
                MemorySeries {
                    name: name.clone(),
                    flat: stats::flatness(&points, judged_from, self.load_end),
                    points,
                }
            })
            .collect();
        let services_flat = flat
            .iter()
            .filter(|m| SERVICES.contains(&m.name.as_str()))
            .all(|m| m.flat.is_some_and(|f| f.flat));

        // Plots.
        let end_marker = (self.load_end, "load ends".to_owned());
        let mut projected = Vec::new();
        let mut last_projected = None;
        for r in self.rows {
            if r.projected_completed >= 0 {
                if let Some((_, last)) = last_projected {
                    projected.push((r.t, (r.projected_completed - last) as f64));
                }
                last_projected = Some((r.t, r.projected_completed));
            }
        }
        let offered: Vec<(f64, f64)> = (0..seconds)
            .map(|i| {
                let t = i as f64;
                (t, (s.due(t + 1.0) - s.due(t)) as f64)
            })
            .collect();
        let throughput = LineChart::new("Throughput", "seconds since the load started", "tasks/s")
            .series(Series::new("offered", offered).dashed())
            .series(Series::new("submitted", submitted.clone()))
            .series(Series::new("allocated", allocated.clone()))
            .series(Series::new("completed", completed.clone()))
            .series(Series::new("projected (completed)", projected))
            .series(Series::new("accrued (settler)", series(&|b| b.accrued)))
            .series(Series::new(
                "paid (10 s average)",
                moving_average(&paid, 10),
            ))
            .marker(end_marker.0, end_marker.1.clone());
        std::fs::write(dir.join("throughput.svg"), throughput.render())?;
        let pct = |kind: LatencyKind, q: fn(&Percentiles) -> f64, scale: f64| -> Vec<(f64, f64)> {
            (0..seconds)
                .map(|i| {
                    let v = self
                        .tracker
                        .latency_over(i, i + 1, kind)
                        .map_or(f64::NAN, |p| q(&p) / scale);
                    (i as f64, v)
                })
                .collect()
        };
        let latency = LineChart::new(
            "Latency: submit → allocated (received by the worker), and what the pool adds to completion",
            "seconds since the load started",
            "ms",
        )
        .series(Series::new("allocated p50", pct(LatencyKind::Allocated, |p| p.p50, 1.0)))
        .series(Series::new("allocated p95", pct(LatencyKind::Allocated, |p| p.p95, 1.0)))
        .series(Series::new("allocated p99", pct(LatencyKind::Allocated, |p| p.p99, 1.0)))
        .series(Series::new("completed − run p50", pct(LatencyKind::Overhead, |p| p.p50, 1.0)).dashed())
        .series(Series::new("completed − run p99", pct(LatencyKind::Overhead, |p| p.p99, 1.0)).dashed())
        .marker(end_marker.0, end_marker.1.clone());
        std::fs::write(dir.join("latency.svg"), latency.render())?;
        let latency_s = LineChart::new(
            "Latency: submit → completed and submit → paid (confirmed on chain)",
            "seconds since the load started",
            "s",
        )
        .series(Series::new(
            "completed p50",
            pct(LatencyKind::Completed, |p| p.p50, 1e3),
        ))
        .series(Series::new(
            "completed p99",
            pct(LatencyKind::Completed, |p| p.p99, 1e3),
        ))
        .series(Series::new(
            "paid p50",
            pct(LatencyKind::Paid, |p| p.p50, 1e3),
        ))
        .series(Series::new(
            "paid p99",
            pct(LatencyKind::Paid, |p| p.p99, 1e3),
        ))
        .marker(end_marker.0, end_marker.1.clone());
        std::fs::write(dir.join("latency_lifecycle.svg"), latency_s.render())?;
        // Two charts: the services are a few MiB each and would be flattened by the servers' hundreds.
        for (file, title, services) in [
            (
                "memory_services.svg",
                "Resident memory of the services (VmRSS)",
                true,
            ),
            (
                "memory_servers.svg",
                "Resident memory of the servers and the driver (VmRSS; Postgres: RssAnon of this run's backends)",
                false,
            ),
        ] {
            let mut chart = LineChart::new(title, "seconds since the load started", "MiB")
                .marker(judged_from, "warm-up ends")
                .marker(end_marker.0, end_marker.1.clone());
            for m in &flat {
                if SERVICES.contains(&m.name.as_str()) == services {
                    chart = chart.series(Series::new(m.name.clone(), m.points.clone()));
                }
            }
            std::fs::write(dir.join(file), chart.render())?;
        }
        let mut cpu = LineChart::new(
            "CPU (5 s average)",
            "seconds since the load started",
            "cores",
        )
        .marker(end_marker.0, end_marker.1.clone());
        for (i, name) in names.iter().enumerate() {
            let pts: Vec<(f64, f64)> = self.rows.iter().map(|r| (r.t, r.cpu[i])).collect();
            cpu = cpu.series(Series::new(name.clone(), moving_average(&pts, 5)));
        }
        let others: Vec<(f64, f64)> = self
            .rows
            .iter()
            .map(|r| (r.t, (r.machine_busy - r.cpu.iter().sum::<f64>()).max(0.0)))
            .collect();
        cpu = cpu.series(Series::new("other processes", moving_average(&others, 5)).dashed());
        std::fs::write(dir.join("cpu.svg"), cpu.render())?;
        let projector_lag: Vec<(f64, f64)> = {
            let mut done = 0.0;
            let mut by_second = Vec::new();
            for (i, p) in completed.iter().enumerate() {
                done += p.1;
                by_second.push((i, done));
            }
            self.rows
                .iter()
                .filter(|r| r.projected_completed >= 0)
                .map(|r| {
                    let i = (r.t.floor() as usize).min(by_second.len().saturating_sub(1));
                    let done = by_second.get(i).map_or(0.0, |x| x.1);
                    (r.t, (done - r.projected_completed as f64).max(0.0))
                })
                .collect()
        };
        let backlog = LineChart::new("Backlogs", "seconds since the load started", "tasks")
            .series(Series::new(
                "in flight (submitted, not completed)",
                in_flight.clone(),
            ))
            .series(Series::new("unpaid (completed, not paid)", unpaid.clone()))
            .series(Series::new("not yet projected (completed)", projector_lag))
            .marker(end_marker.0, end_marker.1.clone());
        std::fs::write(dir.join("backlog.svg"), backlog.render())?;

        // samples.csv
        let mut csv = String::from(
            "second,submitted,allocated,started,completed,accrued,paid,alloc_p50_ms,alloc_p95_ms,alloc_p99_ms,overhead_p50_ms,overhead_p99_ms,completed_p50_ms,completed_p99_ms,paid_p50_ms,paid_p99_ms",
        );
        for n in names {
            let _ = write!(csv, ",{n}_rss_mib,{n}_anon_mib,{n}_cpu_cores");
        }
        csv.push_str(",machine_busy_cores,projected_completed,projected_accrued\n");
        for i in 0..seconds {
            let b = buckets.get(i).cloned().unwrap_or_default();
            let p = |kind| self.tracker.latency_over(i, i + 1, kind);
            let f = |x: Option<Percentiles>, q: fn(&Percentiles) -> f64| {
                x.map_or(String::new(), |p| format!("{:.2}", q(&p)))
            };
            let _ = write!(
                csv,
                "{i},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                b.submitted,
                b.allocated,
                b.started,
                b.completed,
                b.accrued,
                b.paid,
                f(p(LatencyKind::Allocated), |p| p.p50),
                f(p(LatencyKind::Allocated), |p| p.p95),
                f(p(LatencyKind::Allocated), |p| p.p99),
                f(p(LatencyKind::Overhead), |p| p.p50),
                f(p(LatencyKind::Overhead), |p| p.p99),
                f(p(LatencyKind::Completed), |p| p.p50),
                f(p(LatencyKind::Completed), |p| p.p99),
                f(p(LatencyKind::Paid), |p| p.p50),
                f(p(LatencyKind::Paid), |p| p.p99),
            );
            let row = self.rows.iter().find(|r| r.t.floor() as usize == i);
            for j in 0..names.len() {
                match row {
                    Some(r) => {
                        let m = r.memory[j].unwrap_or_default();
                        let _ = write!(
                            csv,
                            ",{:.1},{:.1},{:.3}",
                            mib(m.rss_kib),
                            mib(m.anon_kib),
                            r.cpu[j]
                        );
                    }
                    None => csv.push_str(",,,"),
                }
            }
            match row {
                Some(r) => {
                    let _ = writeln!(
                        csv,
                        ",{:.3},{},{}",
                        r.machine_busy, r.projected_completed, r.projected_accrued
                    );
                }
                None => csv.push_str(",,,\n"),
            }
        }
        std::fs::write(dir.join("samples.csv"), csv)?;

        // report.md
        let mut md = String::new();
        let mut verdict = String::new();
        let _ = writeln!(
            verdict,
            "- rate: **{}** {} tasks/s offered{}; over the steady window (s {}–{}): submitted {:.0}/s, allocated {:.0}/s, completed {:.0}/s; paid {:.0}/s over the second half (s {}–{}); in-flight backlog {:+.1} tasks/s, unpaid backlog {:+.1} tasks/s",
            if sustained {
                "sustained"
            } else {
                "NOT sustained"
            },
            s.rate,
            if self.overrides.is_empty() {
                String::new()
            } else {
                format!(" (overridden: {})", self.overrides)
            },
            steady.start,
            steady.end,
            m_sub,
            m_alloc,
            m_done,
            paid_second_half,
            second_half.start,
            second_half.end,
            in_flight_slope,
            unpaid_slope
        );
        if !sustained {
            let _ = writeln!(
                verdict,
                "- highest rate reached: {:.0} tasks/s submitted and {:.0} completed (steady window), {:.0} paid (second half)",
                m_sub, m_done, paid_second_half
            );
        }
        // Nothing done twice anywhere, and what was paid agrees everywhere: then a run whose drain ran out of
        // time is unfinished, not wrong.
        let nothing_twice = totals.completed_twice == 0
            && totals.accrued_twice == 0
            && totals.paid_twice == 0
            && totals.unknown == 0
            && c.accrual_rows == c.accrual_tasks
            && c.paid_task_rows == c.paid_tasks;
        let unfinished = !self.drained
            && self.problems.is_empty()
            && nothing_twice
            && totals.not_completed == 0
            && c.paid_tasks == totals.paid as i64
            && c.paid.0 > 0
            && chain_ok;
        let work = if exact {
            "nothing lost or duplicated: every task completed, accrued and paid exactly once"
                .to_owned()
        } else if unfinished {
            format!(
                "NOT ALL PAID when the drain ended ({:.0} s after the load): {} completed tasks not yet accrued, {} \
                 accrued and not yet paid (the settler was still working through them); none completed, accrued \
                 or paid twice, and what was paid agrees with the read model and the chain",
                self.drain_end - self.load_end,
                totals.submitted - totals.accrued,
                totals.accrued.saturating_sub(totals.paid),
            )
        } else {
            "LOST OR DUPLICATED WORK (see the totals)".to_owned()
        };
        let _ = writeln!(
            verdict,
            "- work: {work}: {} submitted, {} completed, {} accrued, {} paid (driver); read model {}; chain {}",
            totals.submitted,
            totals.completed,
            totals.accrued,
            totals.paid,
            if read_model_ok {
                "agrees"
            } else if unfinished {
                "agrees on what is paid"
            } else {
                "DISAGREES"
            },
            if chain_ok { "agrees" } else { "DISAGREES" },
        );
        for p in self.problems {
            let _ = writeln!(verdict, "- PROBLEM: {p}");
        }
        let mem_line: Vec<String> = flat
            .iter()
            .map(
                |MemorySeries {
                     name: n, flat: f, ..
                 }| match f {
                    Some(f) => format!(
                        "{n} {} ({:+.2} MiB/min, p95/p5 {:.2})",
                        if f.flat { "flat" } else { "GROWS" },
                        f.slope_mib_per_min,
                        f.ratio()
                    ),
                    None => format!("{n} not measured"),
                },
            )
            .collect();
        let _ = writeln!(
            verdict,
            "- memory: services {}: {}",
            if services_flat {
                "flat"
            } else {
                "NOT all flat"
            },
            mem_line.join("; ")
        );

        let _ = writeln!(
            md,
            "# Whole-system load test: `{}`{}\n",
            s.name,
            if self.overrides.is_empty() {
                String::new()
            } else {
                format!(" (overridden: `{}`)", self.overrides)
            }
        );
        let _ = writeln!(md, "{}\n", s.description.trim());
        let _ = writeln!(
            md,
            "## Verdict\n\n{verdict}\nA rate counts as sustained when, over the steady window (after the ramp and the longest task, to the end of the load), tasks are submitted and completed at 98% of it or more and the in-flight backlog grows by less than 1% of it per second; and over the second half of the load tasks are paid at 95% of it or more, the unpaid backlog growing by less than 5% of it per second (payments come in steps, one settlement at a time).\n"
        );
        let _ = writeln!(
            md,
            "## Run\n\n- command: `{}`\n- date (UTC): {}\n- machine: {}\n- code: {}\n- servers: {} (JetStream, file storage, 1 replica, loopback, started for the run); Postgres {} (a fresh database on the dev stack, migrated); local TON chain `infra/ton-local` on Node {} (the real TVM under @ton/sandbox, wallet v5r1 funded with {} TON)\n- scenario file: `{}` (copied here as `scenario.toml`), seed {}\n- phases: load 0–{:.1} s, drain (until every task is completed, projected and paid) to {:.1} s{}\n- before the run: {}\n",
            self.command,
            self.date,
            self.machine,
            self.versions.git,
            self.versions.nats,
            self.versions.postgres,
            self.versions.node,
            self.wallet_balance / Nanoton::PER_TON,
            self.scenario_path.display(),
            s.seed,
            self.load_end,
            self.drain_end,
            if self.drained { "" } else { " (**timed out**)" },
            self.quiet
        );
        let gpus: u64 = s.fleet().iter().map(|p| u64::from(p.gpus)).sum();
        let _ = writeln!(
            md,
            "## What ran\n\n| part | how |\n| --- | --- |\n| projector | process (`target/release/projector --workers {}`), every projection |\n| allocator | process, production policy (attested workers only), heartbeat timeout {} ms, finished tasks remembered for {} s of log time |\n| settler | process, paying on the local chain: batches close at {} s or 255 transfers, every amount paid (min {} nanoton), checked on chain every {} ms, paid task ids remembered for an accrual window of {} s |\n| nats-server, Postgres, ton-local | processes (see above) |\n| producer | in the driver: `client::Producer`, the seeded task stream at the offered rate, {} client ids |\n| workers | **SIMULATED** in the driver (`load_tests::fleet`): {} workers, {} simulated GPUs, heartbeats every {} ms |\n| attestor | not run: stand-in verdicts (`events::sample::stand_in_attestation`) admit the simulated workers, which have no TDX quote |\n| API | not run: producers publish through the client library |\n\nThe simulated fleet speaks the node agent's protocol on the real bus with the agent's own ledger (epoch fencing, de-duplication) and simulated GPUs: it registers (WorkerRegistered v2 with a TON payout address), heartbeats with GPU telemetry, takes each allocation addressed to one of its workers, runs at most `max_concurrent` attempts per worker for the duration written in the task's input, and publishes TaskStarted, TaskResult (on `results.<client>`) and TaskCompleted, each caused by its allocation, on its worker's own subjects. It differs from {} real agents in one way that matters for the measurement: one durable consumer reads all of ALLOCATIONS and hands each allocation to its worker, instead of one consumer per worker on `allocations.<worker>` ({} pull consumers polling the server would measure the polling, and the driver's two cores could not run {} agents beside the services). Services log at `{}`.\n",
            s.projector.workers,
            s.allocator.heartbeat_timeout_ms,
            s.allocator.finished_retention_s,
            s.settler.max_age_s,
            s.settler.min_payout_nanoton,
            s.settler.check_interval_ms,
            s.settler.accrual_window_s,
            s.clients,
            s.workers.count,
            gpus,
            s.workers.heartbeat_interval_ms,
            s.workers.count,
            s.workers.count,
            s.workers.count,
            self.service_log
        );
        let _ = writeln!(
            md,
            "Task mix (offered {} tasks/s after a {} s ramp, {} s in all, {} tasks):\n\n| class | weight | priority | GPUs | GPU memory | run time | max price |\n| --- | ---: | --- | ---: | ---: | --- | ---: |",
            s.rate,
            s.ramp_s,
            s.duration_s,
            s.total_tasks()
        );
        for t in &s.tasks {
            let _ = writeln!(
                md,
                "| {}{} | {} | {}–{} | {} | {} MiB | {}–{} ms | {} nanoton/GPU-s |",
                t.name,
                t.model_tag
                    .as_ref()
                    .map_or(String::new(), |m| format!(" (model {m})")),
                t.weight,
                t.priority[0],
                t.priority[1],
                t.gpus,
                t.gpu_memory_mib,
                t.duration_ms[0],
                t.duration_ms[1],
                t.max_price_per_gpu_second
            );
        }
        let _ = writeln!(
            md,
            "\nWorker kinds: {}; prices {}–{} nanoton per GPU-second.\n",
            s.workers
                .mix
                .iter()
                .map(|k| format!(
                    "{} GPU(s) × weight {}{}",
                    k.gpus,
                    k.weight,
                    k.max_concurrent
                        .map_or(String::new(), |m| format!(" (max {m} at once)"))
                ))
                .collect::<Vec<_>>()
                .join(", "),
            s.workers.price_per_gpu_second[0],
            s.workers.price_per_gpu_second[1]
        );

        let _ = writeln!(
            md,
            "## Throughput\n\n![throughput](throughput.svg)\n\n![backlogs](backlog.svg)\n"
        );
        let _ = writeln!(
            md,
            "Per second over the steady window (s {}–{}, after the ramp and the longest task): submitted {:.0}, allocated {:.0}, completed {:.0}, paid {:.0} (paid moves in steps, one confirmed settlement at a time: {:.0}/s over the second half). The producer ended at most {:.2} s behind its schedule; {} submissions failed{}.\n",
            steady.start,
            steady.end,
            m_sub,
            m_alloc,
            m_done,
            m_paid,
            paid_second_half,
            self.produced.max_lag_s,
            self.produced.failed,
            self.produced
                .first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        let _ = writeln!(
            md,
            "## Latency\n\n![latency](latency.svg)\n\n![lifecycle latency](latency_lifecycle.svg)\n"
        );
        let _ = writeln!(
            md,
            "Over the steady window (from before the producer's publish; allocated = received by the simulated worker; completion overhead = submit → TaskCompleted stored, less the attempt's own run time):\n\n| from submission to | p50 | p95 | p99 | max | tasks |\n| --- | ---: | ---: | ---: | ---: | ---: |"
        );
        let window = |kind| self.tracker.latency_over(steady.start, steady.end, kind);
        let _ = writeln!(
            md,
            "| allocated {}",
            fmt_latency(window(LatencyKind::Allocated), false)
        );
        let _ = writeln!(
            md,
            "| completed, less the run time {}",
            fmt_latency(window(LatencyKind::Overhead), false)
        );
        let _ = writeln!(
            md,
            "| completed {}",
            fmt_latency(window(LatencyKind::Completed), true)
        );
        let _ = writeln!(
            md,
            "| paid (settlement confirmed on chain) {}",
            fmt_latency(
                self.tracker.latency_over(0, seconds, LatencyKind::Paid),
                true
            )
        );
        let _ = writeln!(
            md,
            "\n(The paid row covers every task of the run: payment follows in batches, so a window cuts it arbitrarily.)\n"
        );

        let _ = writeln!(
            md,
            "## Memory\n\n![memory of the services](memory_services.svg)\n\n![memory of the servers](memory_servers.svg)\n\nMemory is judged after a warm-up of {:.0} s: the longest-lived bounded state of this run (the allocator's finished tasks, {} s; the settler's accrual window, {} s) fills for as long as it keeps its entries, up to 1.5 times that for state kept in generations; the warm-up is 1.5 times the longer of the two, at least 20% and at most half of the load. Flat means: from there to the end of the load, the least-squares growth is below {:.0}% of the mean (or {:.0} MiB), and the band holding 90% of the samples (5th to 95th percentile) is at most {:.2} as p95/p5 (or {:.0} MiB wide); a single second's spike (a transient batch buffer) shows as the maximum, outside the band. Postgres is the private memory (RssAnon) of the backends serving this run's database: their VmRSS also counts the shared buffers each has touched, which is cache, not growth.\n\n| process | MiB at {:.0} s (warm-up's end) | at the load's end | p5 – p95 after warm-up | p95/p5 | max | slope after warm-up | growth after warm-up | flat |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            judged_from,
            s.allocator.finished_retention_s,
            s.settler.accrual_window_s,
            stats::FLAT_GROWTH_SHARE * 100.0,
            stats::FLAT_GROWTH_MIB,
            stats::FLAT_RATIO,
            stats::FLAT_SPREAD_MIB,
            judged_from
        );
        for MemorySeries {
            name,
            flat: f,
            points: pts,
        } in &flat
        {
            let at = |t: f64| {
                pts.iter()
                    .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
                    .map_or(f64::NAN, |p| p.1)
            };
            match f {
                Some(f) => {
                    let _ = writeln!(
                        md,
                        "| {name}{} | {:.1} | {:.1} | {:.1} – {:.1} | {:.3} | {:.1} | {:+.2} MiB/min | {:+.1} MiB | {} |",
                        if SERVICES.contains(&name.as_str()) {
                            ""
                        } else {
                            " (not a service)"
                        },
                        at(f.from_s),
                        at(self.load_end),
                        f.p5_mib,
                        f.p95_mib,
                        f.ratio(),
                        f.max_mib,
                        f.slope_mib_per_min,
                        f.growth_mib,
                        if f.flat { "yes" } else { "**no**" }
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {name} | — | — | — | — | — | — | — | not enough samples |"
                    );
                }
            }
        }
        let _ = writeln!(md, "\n![cpu](cpu.svg)\n");
        let cpu_means: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "{n} {:.2}",
                    mean(
                        self.rows
                            .iter()
                            .filter(|r| r.t <= self.load_end)
                            .map(|r| r.cpu[i])
                    )
                )
            })
            .collect();
        let busy = mean(
            self.rows
                .iter()
                .filter(|r| r.t <= self.load_end)
                .map(|r| r.machine_busy),
        );
        let other = mean(
            self.rows
                .iter()
                .filter(|r| r.t <= self.load_end)
                .map(|r| (r.machine_busy - r.cpu.iter().sum::<f64>()).max(0.0)),
        );
        let _ = writeln!(
            md,
            "Mean CPU over the load, in cores: {}; the whole machine {busy:.2} of {} (other processes, e.g. builds by other users of the machine: {other:.2}).\n",
            cpu_means.join(", "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );

        let _ = writeln!(
            md,
            "## Nothing lost\n\n| | driver's view |\n| --- | ---: |\n| submitted (acknowledged) | {} |\n| allocated (tasks / allocations) | {} / {} |\n| completed | {} |\n| accrued (PaymentAccrued) | {} |\n| paid (in a confirmed settlement, transfer sent) | {} |\n| never completed / never accrued / completed, never paid | {} / {} / {} |\n| completed twice / accrued twice / paid twice | {} / {} / {} |\n| steps of tasks not submitted by this run | {} |\n",
            totals.submitted,
            totals.allocated,
            totals.allocations,
            totals.completed,
            totals.accrued,
            totals.paid,
            totals.not_completed,
            totals.not_accrued,
            totals.not_paid,
            totals.completed_twice,
            totals.accrued_twice,
            totals.paid_twice,
            totals.unknown
        );
        let _ = writeln!(
            md,
            "Read model (after the drain): tasks by status {}; {} task rows; payment_accruals {} rows for {} tasks; tasks in paid payouts of settlements {} rows for {} tasks; accrued {}, paid {}, pending {}, parked {}, in flight {}; settlements {}.\n",
            c.tasks_by_status
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            c.tasks_rows,
            c.accrual_rows,
            c.accrual_tasks,
            c.paid_task_rows,
            c.paid_tasks,
            c.accrued,
            c.paid,
            c.pending,
            c.parked,
            c.in_flight,
            c.settlements
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some((sum, count)) = c.on_chain {
            let _ = writeln!(
                md,
                "On chain: the {count} payout addresses hold {} in all (the read model says {} was paid; a fresh account is charged a little storage fee on each later transfer in); the pool wallet spent {} (payouts plus fees: {} in fees over {} paid transfers).\n",
                Nanoton(u64::try_from(sum).unwrap_or(u64::MAX)),
                c.paid,
                Nanoton(u64::try_from(c.wallet_spent.unwrap_or(0)).unwrap_or(u64::MAX)),
                Nanoton(
                    u64::try_from(
                        c.wallet_spent
                            .unwrap_or(0)
                            .saturating_sub(u128::from(c.paid.0))
                    )
                    .unwrap_or(u64::MAX)
                ),
                self.payments.payouts_paid
            );
        }
        let p = self.payments;
        let _ = writeln!(
            md,
            "Settlements seen on PAYMENTS: {} prepared, {} confirmed, {} expired, {} failed; {} transfers sent, {} failed; at most {} transfers and {} tasks in one settlement.\n",
            p.prepared,
            p.confirmed,
            p.expired,
            p.failed,
            p.payouts_paid,
            p.failed_transfers,
            p.most_payouts_in_one,
            p.most_tasks_in_one
        );
        let f = self.fleet;
        let _ = writeln!(
            md,
            "Simulated fleet: {} heartbeats, {} allocations received, {} attempts started, {} completed, {} revoked, {} stale, {} duplicate, {} for unknown workers, {} undecodable frames, {} task events not stored, at most {} attempts waiting on one worker.\n",
            f.heartbeats,
            f.allocations,
            f.started,
            f.completed,
            f.revoked,
            f.stale,
            f.duplicate,
            f.foreign,
            f.undecodable,
            f.lost_events,
            f.max_waiting
        );
        let _ = writeln!(
            md,
            "## Files\n\n`samples.csv` holds every second: the counts, the latency percentiles, and each process's memory and CPU. The services' logs stay in `load-tests/out/` (not committed)."
        );
        std::fs::write(dir.join("report.md"), md)?;
        let outcome = if exact {
            Outcome::Exact
        } else if unfinished {
            Outcome::Unfinished
        } else {
            Outcome::Wrong
        };
        Ok((verdict, outcome))
    }
}
