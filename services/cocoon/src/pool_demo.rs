//! `dev pool`: the pool's main job, end to end, on the running stack.
//!
//! Starts the services as child processes from the directory of this executable (`projector`, `allocator
//! --allow-unattested`, and node agents on the NVIDIA GPUs or on simulated GPUs), waits for the workers to
//! appear in the read model, submits a sample workload through `client::Producer`, prints each result as it is
//! stored on `results.<client>` and each task's steps as the read model shows them, then the tasks and workers
//! tables, and stops the services: node agents first (SIGTERM: they drain), then the allocator and the
//! projector (SIGINT, their clean stop), each killed if it has not exited within 10 s.
//!
//! The children run in their own process group, so a Ctrl-C reaches only `cocoon`, which stops them in that
//! order. Their output goes to `.cocoon/logs/<name>.log` (under `COCOON_HOME` when set).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use client::{
    Producer, ProducerConfig, ReadModel, ResultItem, ResultStream, ResultsError, StartAt,
    TaskRequest, TaskRequirements, TaskStatus, TaskView, WorkerStatus, WorkerView,
};
use events::payload::Blob;
use events::{ClientId, Nanoton, ProducerId, TaskId, Timestamp};
use tokio::process::{Child, Command};

use crate::Shutdown;
use crate::cli::{Connection, PoolArgs};

/// The client the sample workload is submitted as; its results arrive on `results.pool-demo`.
pub const CLIENT_ID: &str = "pool-demo";
/// The model tag one worker serves and one task asks for.
pub const MODEL_TAG: &str = "llama-3-8b";
/// The most the sample tasks pay per GPU-second (the workers ask 0.001 and 0.0015 TON).
pub const MAX_PRICE: Nanoton = Nanoton(2_000_000);
/// What a worker runs per task: the input upper-cased, and the GPUs the allocation gave it. The second of sleep
/// lets the tasks be seen running and queueing.
pub const TASK_SCRIPT: &str = r#"input=$(cat); sleep 1; printf "%s on GPU(s) %s" "$(printf %s "$input" | tr a-z A-Z)" "$CUDA_VISIBLE_DEVICES""#;
/// How long the allocator lets a task that fits no worker wait before rejecting it.
const REJECT_AFTER_MS: u64 = 2_000;
/// How long a stopped service may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the workers may take to appear in the read model.
const WORKERS_DEADLINE: Duration = Duration::from_secs(30);
/// How often the read model is polled.
const POLL: Duration = Duration::from_millis(250);

/// Which GPUs the node agents use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuChoice {
    /// The machine's NVIDIA GPUs, through NVML.
    Nvidia,
    /// `--simulate-gpus`: synthetic GPUs, labelled as simulated everywhere.
    Simulated,
}

/// NVIDIA GPUs are used when `nvidia-smi -L` lists one or `/dev/nvidia0` exists, unless simulated GPUs are asked
/// for.
pub fn choose_gpus(
    force_simulated: bool,
    nvidia_smi_lists_gpus: bool,
    dev_nvidia0: bool,
) -> GpuChoice {
    if !force_simulated && (nvidia_smi_lists_gpus || dev_nvidia0) {
        GpuChoice::Nvidia
    } else {
        GpuChoice::Simulated
    }
}

/// Whether `nvidia-smi -L` lists a GPU, and whether `/dev/nvidia0` exists.
fn probe_nvidia() -> (bool, bool) {
    let smi = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"));
    (smi, Path::new("/dev/nvidia0").exists())
}

/// One node agent to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlan {
    pub worker_id: &'static str,
    /// Nanoton per GPU-second.
    pub price: u64,
    pub model_tags: Vec<&'static str>,
    /// `Some(n)`: n simulated GPUs; `None`: the real ones.
    pub simulate_gpus: Option<u32>,
    pub max_concurrent: u32,
}

/// One agent on the real GPUs, or two agents with 2 simulated GPUs each (different prices; one serves
/// [`MODEL_TAG`]).
pub fn agent_plans(choice: GpuChoice) -> Vec<AgentPlan> {
    match choice {
        GpuChoice::Nvidia => vec![AgentPlan {
            worker_id: "pool-demo-gpu",
            price: 1_000_000,
            model_tags: vec![MODEL_TAG],
            simulate_gpus: None,
            max_concurrent: 2,
        }],
        GpuChoice::Simulated => vec![
            AgentPlan {
                worker_id: "pool-demo-sim-a",
                price: 1_000_000,
                model_tags: vec![MODEL_TAG],
                simulate_gpus: Some(2),
                max_concurrent: 2,
            },
            AgentPlan {
                worker_id: "pool-demo-sim-b",
                price: 1_500_000,
                model_tags: Vec::new(),
                simulate_gpus: Some(2),
                max_concurrent: 2,
            },
        ],
    }
}

impl AgentPlan {
    /// The node agent's command line (the connection comes through the environment).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--worker-id",
            self.worker_id,
            "--price",
            &self.price.to_string(),
            "--max-concurrent",
            &self.max_concurrent.to_string(),
            "--heartbeat-interval-ms",
            "1000",
            "--drain-timeout-ms",
            "8000",
            "--payout-address",
            &crate::pool_ton::payout_address(self.worker_id),
        ]
        .map(str::to_owned)
        .into();
        for tag in &self.model_tags {
            args.extend(["--model-tag".to_owned(), (*tag).to_owned()]);
        }
        if let Some(n) = self.simulate_gpus {
            args.extend(["--simulate-gpus".to_owned(), n.to_string()]);
        }
        // --exec takes every value after it, so it goes last.
        args.extend(["--executor", "exec", "--exec", "sh", "-c", TASK_SCRIPT].map(str::to_owned));
        args
    }
}

/// How a sample task should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Completed,
    /// No worker can ever fit it: the allocator rejects it.
    Rejected,
}

/// A task of the sample workload.
#[derive(Debug, Clone)]
pub struct SampleTask {
    pub label: String,
    pub request: TaskRequest,
    pub expect: Expect,
}

/// Eight tasks of mixed priorities for `client`: one on [`MODEL_TAG`], one needing two GPUs (as many as a
/// worker has, when that is fewer), and one needing more GPUs than any worker has (at least 16), which the
/// allocator rejects. `gpus_per_worker` is the most GPUs one of the demo's workers has.
pub fn sample_workload(client: &str, gpus_per_worker: u16) -> Vec<SampleTask> {
    let multi = gpus_per_worker.clamp(1, 2);
    let unfit = gpus_per_worker.saturating_add(1).max(16);
    let task = |label: String, priority: u8, gpus: u16, tag: Option<&str>, input: &str| {
        let mut request = TaskRequest::new(client, MAX_PRICE);
        request.priority = priority;
        request.timeout_ms = 60_000;
        request.requirements = TaskRequirements {
            gpu_count: gpus,
            model_tag: tag.map(str::to_owned),
            ..TaskRequirements::default()
        };
        request.input = input.as_bytes().to_vec();
        SampleTask {
            label,
            request,
            expect: Expect::Completed,
        }
    };
    let mut tasks = vec![
        task("priority 5".into(), 5, 1, None, "hello from the pool"),
        task("priority 9".into(), 9, 1, None, "summarise the log"),
        task(
            format!("model {MODEL_TAG}"),
            6,
            1,
            Some(MODEL_TAG),
            "what is a tdx quote?",
        ),
        task(
            format!("{multi} GPUs"),
            7,
            multi,
            None,
            "shard me across gpus",
        ),
        task("priority 1".into(), 1, 1, None, "background batch"),
        task("priority 10".into(), 10, 1, None, "urgent: page on-call"),
        task("priority 3".into(), 3, 1, None, "translate: bonjour"),
        task(
            format!("{unfit} GPUs (fits no worker)"),
            5,
            unfit,
            None,
            "too big for this pool",
        ),
    ];
    if let Some(last) = tasks.last_mut() {
        last.expect = Expect::Rejected;
    }
    tasks
}

/// Where the services' logs go: `$COCOON_HOME/logs`, or `.cocoon/logs` at the repository root.
fn logs_dir() -> anyhow::Result<PathBuf> {
    let state = match std::env::var_os("COCOON_HOME") {
        Some(home) => PathBuf::from(home),
        None => {
            let root = crate::dev::stack_script()
                .ok()
                .and_then(|s| s.parent()?.parent().map(Path::to_path_buf))
                .map_or_else(std::env::current_dir, Ok)?;
            root.join(".cocoon")
        }
    };
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    Ok(logs)
}

/// A path relative to the current directory when it lies under it, for printing.
fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    let rel = cwd
        .as_deref()
        .and_then(|c| path.strip_prefix(c).ok())
        .unwrap_or(path);
    rel.display().to_string()
}

/// A running service.
struct Service {
    name: String,
    child: Child,
    log: PathBuf,
    /// What `kill` sends to stop it cleanly: TERM for node agents, INT for the others (their Ctrl-C).
    stop_signal: &'static str,
    is_agent: bool,
}

/// The services `dev pool` started.
struct Services {
    bin_dir: PathBuf,
    logs: PathBuf,
    env: Vec<(&'static str, String)>,
    running: Vec<Service>,
}

/// A service that stopped on its own.
struct Exited {
    name: String,
    status: ExitStatus,
    log: PathBuf,
}

impl Services {
    fn new(conn: &Connection) -> anyhow::Result<Services> {
        let exe = std::env::current_exe().context("cannot tell where this executable is")?;
        let bin_dir = exe
            .parent()
            .context("this executable has no directory")?
            .to_path_buf();
        let missing: Vec<String> = ["projector", "allocator", "node-agent", "settler"]
            .into_iter()
            .map(|b| bin_dir.join(b))
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing {}: build them next to cocoon with `cargo build -p cocoon -p projector -p allocator -p node-agent -p settler`",
                missing.join(", ")
            );
        }
        Ok(Services {
            bin_dir,
            logs: logs_dir()?,
            // The connection goes through the environment, which every service reads and `ps` does not show.
            env: vec![
                ("COCOON_NATS_URL", conn.nats_url.clone()),
                ("NATS_URL", conn.nats_url.clone()),
                ("COCOON_DATABASE_URL", conn.database_url.clone()),
                ("NO_COLOR", "1".to_owned()),
            ],
            running: Vec::new(),
        })
    }

    fn spawn(
        &mut self,
        name: &str,
        program: &str,
        args: &[String],
        stop_signal: &'static str,
    ) -> anyhow::Result<()> {
        self.spawn_with_env(name, program, args, stop_signal, &[])
    }

    /// Like `spawn`, with variables for this one service only (a key).
    fn spawn_with_env(
        &mut self,
        name: &str,
        program: &str,
        args: &[String],
        stop_signal: &'static str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let path = self.bin_dir.join(program);
        let child = Command::new(&path)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        self.adopt(name, child, log, stop_signal);
        if let Some(s) = self.running.last_mut() {
            s.is_agent = program == "node-agent";
        }
        Ok(())
    }

    /// Takes over a child started elsewhere, to stop it with the others.
    fn adopt(&mut self, name: &str, child: Child, log: PathBuf, stop_signal: &'static str) {
        println!(
            "  started {name:<16} pid {:<8} log {}",
            child.id().unwrap_or(0),
            shown(&log)
        );
        self.running.push(Service {
            name: name.to_owned(),
            child,
            log,
            stop_signal,
            is_agent: false,
        });
    }

    /// The first service that has exited, taken out of the running set.
    fn exited(&mut self) -> Option<Exited> {
        let i = self
            .running
            .iter_mut()
            .position(|s| matches!(s.child.try_wait(), Ok(Some(_)) | Err(_)))?;
        let mut s = self.running.remove(i);
        let status = s
            .child
            .try_wait()
            .ok()
            .flatten()
            .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(1 << 8));
        Some(Exited {
            name: s.name,
            status,
            log: s.log,
        })
    }

    /// Stops everything: the node agents first (they drain and deregister), then, once the read model shows
    /// them gone (at most a few seconds), the allocator and the projector. After a Ctrl-C all are signalled at
    /// once, so that a second Ctrl-C, which ends `cocoon` at once, leaves none of them running.
    async fn stop(&mut self, model: Option<&ReadModel>, interrupted: bool) {
        if self.running.is_empty() {
            return;
        }
        if interrupted {
            println!("\nstopping the services:");
            let all = std::mem::take(&mut self.running);
            for line in futures_util::future::join_all(all.into_iter().map(stop_one)).await {
                println!("  {line}");
            }
            return;
        }
        println!("\nstopping the services (node agents drain first):");
        let (agents, others): (Vec<Service>, Vec<Service>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.is_agent);
        let names: Vec<String> = agents.iter().map(|s| s.name.clone()).collect();
        let lines = futures_util::future::join_all(agents.into_iter().map(stop_one)).await;
        for line in lines {
            println!("  {line}");
        }
        if let Some(model) = model {
            wait_until_gone(model, &names).await;
        }
        for service in others.into_iter().rev() {
            println!("  {}", stop_one(service).await);
        }
    }
}

/// Signals one service and waits for it; kills it after [`STOP_GRACE`].
async fn stop_one(mut s: Service) -> String {
    let started = Instant::now();
    if let Ok(Some(status)) = s.child.try_wait() {
        return format!("{} had already exited ({status})", s.name);
    }
    if let Some(pid) = s.child.id() {
        // The shell's own `kill`: the workspace has no unsafe code for libc, and minimal images lack procps.
        let _ = Command::new("sh")
            .args(["-c", r#"kill -s "$0" "$1""#, s.stop_signal])
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .await;
    }
    match tokio::time::timeout(STOP_GRACE, s.child.wait()).await {
        Ok(Ok(status)) => format!(
            "stopped {:<16} (SIG{}, {status}) in {:.1}s",
            s.name,
            s.stop_signal,
            started.elapsed().as_secs_f64()
        ),
        _ => {
            let _ = s.child.kill().await;
            format!(
                "killed  {:<16} it had not stopped {} s after SIG{}",
                s.name,
                STOP_GRACE.as_secs(),
                s.stop_signal
            )
        }
    }
}

/// Waits (a few seconds at most) until the projector has written that the stopped agents are no longer active.
async fn wait_until_gone(model: &ReadModel, names: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match model.workers().await {
            Ok(ws) => {
                if !ws.iter().any(|w| {
                    names.iter().any(|n| n == w.worker_id.as_str())
                        && w.status == WorkerStatus::Active
                }) {
                    return;
                }
            }
            Err(_) => return,
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last lines of a log, indented, for when a service stopped on its own.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    | {l}\n"))
        .collect()
}

fn exited_error(e: &Exited) -> anyhow::Error {
    anyhow::anyhow!(
        "{} stopped on its own ({}); the end of {}:\n{}",
        e.name,
        e.status,
        shown(&e.log),
        log_tail(&e.log, 15)
    )
}

/// Seconds since `t0`, from a read-model timestamp.
fn since(t0: Timestamp, t: Timestamp) -> f64 {
    (t.as_micros() - t0.as_micros()).max(0) as f64 / 1e6
}

/// A submitted sample task and what has been printed of it.
struct Tracked {
    n: usize,
    sample: SampleTask,
    task_id: TaskId,
    /// Steps already printed, per attempt.
    printed: HashSet<(u32, &'static str)>,
    view: Option<TaskView>,
    result: bool,
}

impl Tracked {
    fn name(&self) -> String {
        format!("#{} {:<26}", self.n, self.sample.label)
    }

    fn is_final(&self) -> bool {
        self.view.as_ref().is_some_and(TaskView::is_final)
    }

    fn done(&self) -> bool {
        self.is_final()
            && (self.result
                || self
                    .view
                    .as_ref()
                    .is_some_and(|v| v.status != TaskStatus::Completed))
    }
}

/// The steps of `view` not printed yet, as (seconds since `t0`, line), using the read model's own timestamps so
/// that steps between two polls are shown with their times.
fn new_steps(t: &mut Tracked, view: &TaskView, t0: Timestamp) -> Vec<(f64, String)> {
    let mut out = Vec::new();
    let a = view.attempt;
    let worker = view
        .worker_id
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let now = since(t0, Timestamp::now());
    let name = t.name();
    let mut step = |t: &mut Tracked, key: &'static str, at: f64, text: String| {
        if t.printed.insert((a, key)) {
            out.push((at, format!("{name} {text}")));
        }
    };
    if let Some(at) = view.allocated_at
        && view.worker_id.is_some()
    {
        step(
            t,
            "allocated",
            since(t0, at),
            format!("allocated  to {worker}, attempt {a}"),
        );
    }
    if let Some(at) = view.started_at {
        step(
            t,
            "running",
            since(t0, at),
            format!("running    on {worker}"),
        );
    }
    let at = view.finished_at.map_or(now, |f| since(t0, f));
    match view.status {
        TaskStatus::Completed => {
            let usage = view.gpu_millis.map_or_else(String::new, |g| {
                format!(", {}.{:03} GPU-seconds", g.0 / 1000, g.0 % 1000)
            });
            step(t, "completed", at, format!("completed  on {worker}{usage}"));
        }
        TaskStatus::Submitted | TaskStatus::Allocated | TaskStatus::Running => {}
        other => {
            let reason = view
                .failure_reason
                .as_ref()
                .map_or_else(String::new, Clone::clone);
            step(
                t,
                other.as_str(),
                at,
                format!("{:<10} {reason}", other.as_str()),
            );
        }
    }
    out
}

/// `"…"` of a result's output, when it is text.
fn output_text(item: &ResultItem) -> String {
    match &item.result.output {
        Blob::Inline(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("<{} bytes of binary output>", bytes.len()),
        },
        Blob::Reference { uri, .. } => format!("<output at {uri}>"),
    }
}

/// Runs the pool with a sample workload, then stops it.
pub async fn run(
    conn: &Connection,
    args: &PoolArgs,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    let bus = crate::connect(conn).await?;
    let model = crate::tasks::read_model(conn).await?;
    let mut services = Services::new(conn)?;
    let outcome = drive(conn, args, &shutdown, &bus, &model, &mut services).await;
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
    }
    services.stop(Some(&model), shutdown.is_triggered()).await;
    let code = outcome.unwrap_or(ExitCode::FAILURE);
    if code == ExitCode::SUCCESS {
        println!(
            "\ndone. The logs stay in {}; `cocoon tasks list --client {CLIENT_ID}` and `cocoon workers list` read the pool again.",
            shown(&services.logs)
        );
    }
    Ok(code)
}

async fn drive(
    conn: &Connection,
    args: &PoolArgs,
    shutdown: &Shutdown,
    bus: &bus::Bus,
    model: &ReadModel,
    services: &mut Services,
) -> anyhow::Result<ExitCode> {
    let t0 = Timestamp::now();
    let Some((plans, workers, chain)) = start(conn, args, shutdown, model, services, t0).await?
    else {
        return Ok(interrupted());
    };
    let (mut results, mut tracked) = submit(bus, &workers).await?;
    match follow(
        args,
        shutdown,
        model,
        services,
        &mut results,
        &mut tracked,
        t0,
    )
    .await?
    {
        Followed::Done => {
            let code = report(bus, model, &plans, &tracked).await?;
            let ids: Vec<&str> = plans.iter().map(|p| p.worker_id).collect();
            let paid = crate::pool_ton::settle_and_report(model, &chain, &ids).await?;
            Ok(if paid { code } else { ExitCode::FAILURE })
        }
        Followed::Interrupted => Ok(interrupted()),
        Followed::TimedOut => Ok(ExitCode::FAILURE),
    }
}

/// Chooses the GPUs, starts the services and waits for the workers; `None` when interrupted.
async fn start(
    conn: &Connection,
    args: &PoolArgs,
    shutdown: &Shutdown,
    model: &ReadModel,
    services: &mut Services,
    t0: Timestamp,
) -> anyhow::Result<Option<(Vec<AgentPlan>, Vec<WorkerView>, crate::pool_ton::Chain)>> {
    let (smi, dev) = if args.simulate {
        (false, false)
    } else {
        probe_nvidia()
    };
    let choice = choose_gpus(args.simulate, smi, dev);
    match choice {
        GpuChoice::Nvidia => {
            println!("NVIDIA GPU found: the node agent runs tasks on the real GPU(s)")
        }
        GpuChoice::Simulated if args.simulate => println!("--simulate: running SIMULATED GPUs"),
        GpuChoice::Simulated => println!("no NVIDIA GPU found: running SIMULATED GPUs"),
    }
    println!(
        "!! pool policy: the allocator admits UNATTESTED workers (--allow-unattested): DEVELOPMENT ONLY: these workers are not TDX guests"
    );
    println!(
        "starting the services from {} (NATS {}, Postgres {}):",
        shown(&services.bin_dir),
        conn.nats_url,
        crate::dev::redact(&conn.database_url)
    );
    services.spawn(
        "projector",
        "projector",
        &["--metrics-addr".into(), String::new()],
        "INT",
    )?;
    let reject_after = REJECT_AFTER_MS.to_string();
    services.spawn(
        "allocator",
        "allocator",
        &[
            "--allow-unattested".into(),
            "--reject-after-ms".into(),
            reject_after,
        ],
        "INT",
    )?;
    let key = crate::pool_ton::dev_pool_key();
    let ton = crate::pool_ton::start(&services.logs, &key).await?;
    let chain = crate::pool_ton::Chain {
        url: ton.url.clone(),
        wallet: ton.wallet.clone(),
    };
    services.adopt("ton-local", ton.child, ton.log, "INT");
    println!(
        "  local TON chain (the real TVM, @ton/sandbox) at {}: pool wallet {} with {}",
        chain.url,
        chain.wallet,
        Nanoton(crate::pool_ton::WALLET_BALANCE)
    );
    services.spawn_with_env(
        "settler",
        "settler",
        &crate::pool_ton::settler_args(&chain.url),
        "INT",
        &[("COCOON_SETTLER_KEY", key.as_str())],
    )?;
    let mut plans = agent_plans(choice);
    for plan in &plans {
        services.spawn(plan.worker_id, "node-agent", &plan.args(), "TERM")?;
    }

    println!("waiting for the workers to register and the projector to show them …");
    let workers = loop {
        match wait_for_workers(model, &plans, t0, shutdown, services).await? {
            Waited::Ready(workers) => break workers,
            Waited::Interrupted => return Ok(None),
            Waited::Exited(e)
                if choice == GpuChoice::Nvidia && plans[0].simulate_gpus.is_none() =>
            {
                println!(
                    "the node agent could not use the NVIDIA GPU ({}); the end of {}:\n{}falling back to SIMULATED GPUs",
                    e.status,
                    shown(&e.log),
                    log_tail(&e.log, 5)
                );
                plans = agent_plans(GpuChoice::Simulated);
                for plan in &plans {
                    services.spawn(plan.worker_id, "node-agent", &plan.args(), "TERM")?;
                }
            }
            Waited::Exited(e) => return Err(exited_error(&e)),
        }
    };
    for w in &workers {
        println!(
            "  worker {:<16} {}  {} nanoton/GPU-s, up to {} tasks at once{}",
            w.worker_id.as_str(),
            crate::workers::gpus(w),
            w.price_per_gpu_second.0,
            w.max_concurrent,
            plans
                .iter()
                .find(|p| p.worker_id == w.worker_id.as_str())
                .filter(|p| !p.model_tags.is_empty())
                .map_or_else(String::new, |p| format!(
                    ", serves {}",
                    p.model_tags.join(", ")
                ))
        );
    }

    Ok(Some((plans, workers, chain)))
}

/// Opens the result stream, then submits the sample workload sized to `workers`.
async fn submit(
    bus: &bus::Bus,
    workers: &[WorkerView],
) -> anyhow::Result<(ResultStream, Vec<Tracked>)> {
    let gpus_per_worker = workers.iter().map(|w| w.gpus.len()).max().unwrap_or(1);
    let workload = sample_workload(
        CLIENT_ID,
        u16::try_from(gpus_per_worker).unwrap_or(u16::MAX),
    );
    let client_id = ClientId::new(CLIENT_ID)?;
    let results = ResultStream::open(&bus.jetstream, &client_id, StartAt::New).await?;
    let producer = Producer::from_bus(
        bus,
        ProducerConfig {
            producer: ProducerId::new("cocoon-pool-demo")?,
            ..ProducerConfig::default()
        },
    )?;
    println!(
        "\nsubmitting {} tasks as client {CLIENT_ID} (results on results.{CLIENT_ID}):",
        workload.len()
    );
    let submitted = producer
        .submit_many(workload.iter().map(|t| &t.request))
        .await;
    let mut tracked = Vec::new();
    for (i, (sample, outcome)) in workload.into_iter().zip(submitted).enumerate() {
        let s = outcome.with_context(|| format!("submitting task #{}", i + 1))?;
        let r = &sample.request;
        println!(
            "  #{} {:<26} {}  priority {:>2}, {} GPU(s), input {:?}",
            i + 1,
            sample.label,
            s.task_id,
            r.priority,
            r.requirements.gpu_count,
            String::from_utf8_lossy(&r.input)
        );
        tracked.push(Tracked {
            n: i + 1,
            sample,
            task_id: s.task_id,
            printed: HashSet::new(),
            view: None,
            result: false,
        });
    }
    Ok((results, tracked))
}

/// How following the workload ended.
enum Followed {
    Done,
    Interrupted,
    TimedOut,
}

/// Prints each result as it is stored and each task's steps as the read model shows them, until every task is
/// final with its result delivered, or the deadline, or an interruption.
async fn follow(
    args: &PoolArgs,
    shutdown: &Shutdown,
    model: &ReadModel,
    services: &mut Services,
    results: &mut ResultStream,
    tracked: &mut [Tracked],
    t0: Timestamp,
) -> anyhow::Result<Followed> {
    let index: HashMap<TaskId, usize> = tracked
        .iter()
        .enumerate()
        .map(|(i, t)| (t.task_id, i))
        .collect();

    println!(
        "\nprogress (seconds since start; the allocator rejects a task no worker fits after {} s):",
        REJECT_AFTER_MS / 1000
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Lines wait for the next poll and are printed in time order: results stamped when the log stored them,
    // steps with the read model's timestamps.
    let mut pending: Vec<(f64, String)> = Vec::new();
    let flush = |pending: &mut Vec<(f64, String)>| {
        pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, line) in pending.drain(..) {
            println!("  {at:>6.2}s  {line}");
        }
    };
    while !tracked.iter().all(Tracked::done) {
        tokio::select! {
            item = results.next() => match item {
                Some(Ok(item)) => {
                    if let Some(&i) = index.get(&item.result.task_id) {
                        let t = &mut tracked[i];
                        t.result = true;
                        pending.push((
                            since(t0, item.stored_at),
                            format!(
                                "{} result     attempt {} from {}: {}",
                                t.name(),
                                item.result.attempt,
                                item.result.worker_id,
                                output_text(&item)
                            ),
                        ));
                    }
                }
                Some(Err(ResultsError::Consume(reason))) => bail!("reading results.{CLIENT_ID}: {reason}"),
                Some(Err(e)) => println!("  result stream: {e}"),
                None => bail!("the results stream ended"),
            },
            _ = tick.tick() => {
                if let Some(e) = services.exited() {
                    return Err(exited_error(&e));
                }
                for t in tracked.iter_mut().filter(|t| !t.is_final()) {
                    match model.task(t.task_id).await {
                        Ok(Some(view)) => {
                            pending.extend(new_steps(t, &view, t0));
                            t.view = Some(view);
                        }
                        Ok(None) => {}
                        Err(e) => eprintln!("warning: reading the read model: {e}"),
                    }
                }
                flush(&mut pending);
            },
            () = shutdown.wait() => return Ok(Followed::Interrupted),
            () = tokio::time::sleep_until(deadline) => {
                println!("\ntimed out after {} s; not finished:", args.timeout_secs);
                for t in tracked.iter().filter(|t| !t.done()) {
                    let status = t.view.as_ref().map_or("not projected", |v| v.status.as_str());
                    let missing = if t.is_final() { " (its result was not delivered)" } else { "" };
                    println!("  {} {}  {status}{missing}", t.name(), t.task_id);
                }
                println!("the services' logs are in {}", shown(&services.logs));
                return Ok(Followed::TimedOut);
            }
        }
    }

    flush(&mut pending);
    Ok(Followed::Done)
}

/// The tasks and workers tables, and whether every task ended as expected.
async fn report(
    bus: &bus::Bus,
    model: &ReadModel,
    plans: &[AgentPlan],
    tracked: &[Tracked],
) -> anyhow::Result<ExitCode> {
    // The tables, as `cocoon tasks list` and `cocoon workers list` print them, once the workers' heartbeats show
    // them idle (a few seconds at most).
    let idle_by = Instant::now() + Duration::from_secs(3);
    while Instant::now() < idle_by {
        let workers = model.workers().await?;
        if !workers.iter().any(|w| {
            plans.iter().any(|p| p.worker_id == w.worker_id.as_str()) && w.running_tasks > 0
        }) {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "\ntasks (read model):")?;
    let mut views = Vec::new();
    for t in tracked {
        if let Some(v) = model.task(t.task_id).await? {
            views.push(v);
        }
    }
    crate::tasks::write_table(&mut out, &views)?;
    writeln!(out, "\nworkers (read model):")?;
    let policy = crate::workers::read_pool_policy(&bus.jetstream)
        .await
        .unwrap_or_else(|e| {
            eprintln!("warning: cannot read the pool policy: {e}");
            None
        });
    let ours: Vec<WorkerView> = model
        .workers()
        .await?
        .into_iter()
        .filter(|w| plans.iter().any(|p| p.worker_id == w.worker_id.as_str()))
        .collect();
    crate::workers::write_listing(&mut out, policy.as_ref(), &ours, Timestamp::now())?;

    let unexpected: Vec<String> = tracked
        .iter()
        .filter_map(|t| {
            let status = t.view.as_ref()?.status;
            let ok = match t.sample.expect {
                Expect::Completed => status == TaskStatus::Completed,
                Expect::Rejected => status == TaskStatus::Rejected,
            };
            (!ok).then(|| {
                format!(
                    "{} ended {status}, expected {:?}",
                    t.name().trim_end(),
                    t.sample.expect
                )
            })
        })
        .collect();
    let count = |s: TaskStatus| {
        tracked
            .iter()
            .filter(|t| t.view.as_ref().is_some_and(|v| v.status == s))
            .count()
    };
    writeln!(
        out,
        "\n{} tasks: {} completed with their results delivered, {} rejected (fits no worker){}",
        tracked.len(),
        count(TaskStatus::Completed),
        count(TaskStatus::Rejected),
        if unexpected.is_empty() {
            ", as expected"
        } else {
            ""
        }
    )?;
    for line in &unexpected {
        writeln!(out, "  unexpected: {line}")?;
    }
    out.flush()?;
    Ok(if unexpected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn interrupted() -> ExitCode {
    println!("\ninterrupted");
    ExitCode::from(130)
}

enum Waited {
    Ready(Vec<WorkerView>),
    Exited(Exited),
    Interrupted,
}

/// Waits until every planned worker is active in the read model with a registration or heartbeat from this
/// run, or a service stops, or the deadline passes (an error).
async fn wait_for_workers(
    model: &ReadModel,
    plans: &[AgentPlan],
    t0: Timestamp,
    shutdown: &Shutdown,
    services: &mut Services,
) -> anyhow::Result<Waited> {
    let deadline = Instant::now() + WORKERS_DEADLINE;
    loop {
        if shutdown.is_triggered() {
            return Ok(Waited::Interrupted);
        }
        if let Some(e) = services.exited() {
            return Ok(Waited::Exited(e));
        }
        let workers = model.workers().await?;
        let ready: Vec<WorkerView> = plans
            .iter()
            .filter_map(|p| {
                workers.iter().find(|w| {
                    w.worker_id.as_str() == p.worker_id
                        && w.status == WorkerStatus::Active
                        && !w.gpus.is_empty()
                        && (w.registered_at >= t0 || w.last_heartbeat_at.is_some_and(|h| h >= t0))
                })
            })
            .cloned()
            .collect();
        if ready.len() == plans.len() {
            return Ok(Waited::Ready(ready));
        }
        if Instant::now() >= deadline {
            bail!(
                "the workers did not appear in the read model within {} s; see the logs in {}",
                WORKERS_DEADLINE.as_secs(),
                shown(&services.logs)
            );
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.wait() => return Ok(Waited::Interrupted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_gpus_are_used_when_seen_unless_simulation_is_asked_for() {
        assert_eq!(choose_gpus(false, true, false), GpuChoice::Nvidia);
        assert_eq!(choose_gpus(false, false, true), GpuChoice::Nvidia);
        assert_eq!(choose_gpus(false, true, true), GpuChoice::Nvidia);
        assert_eq!(choose_gpus(false, false, false), GpuChoice::Simulated);
        assert_eq!(choose_gpus(true, true, true), GpuChoice::Simulated);
    }

    #[test]
    fn agents_simulate_gpus_only_without_nvidia_and_run_a_real_command() {
        let sim = agent_plans(GpuChoice::Simulated);
        assert_eq!(sim.len(), 2);
        for plan in &sim {
            let args = plan.args();
            let at = args.iter().position(|a| a == "--simulate-gpus").unwrap();
            assert_eq!(args[at + 1], "2");
            // --exec takes the rest of the line: it must come last, with the whole command.
            let exec = args.iter().position(|a| a == "--exec").unwrap();
            assert_eq!(&args[exec + 1..], ["sh", "-c", TASK_SCRIPT]);
            assert_eq!(args[exec - 1], "exec");
            events::WorkerId::new(plan.worker_id).unwrap();
        }
        assert!(sim.iter().any(|p| p.model_tags == [MODEL_TAG]));
        let real = agent_plans(GpuChoice::Nvidia);
        assert_eq!(real.len(), 1);
        assert!(!real[0].args().iter().any(|a| a == "--simulate-gpus"));
    }

    #[test]
    fn the_sample_workload_is_valid_and_mixed() {
        for gpus_per_worker in [1, 2, 8, 16] {
            let tasks = sample_workload(CLIENT_ID, gpus_per_worker);
            assert_eq!(tasks.len(), 8);
            for t in &tasks {
                t.request
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", t.label));
                assert!(
                    t.request.max_price_per_gpu_second >= Nanoton(1_500_000),
                    "{}",
                    t.label
                );
            }
            let priorities: HashSet<u8> = tasks.iter().map(|t| t.request.priority).collect();
            assert!(priorities.len() >= 6, "{priorities:?}");
            assert!(
                tasks
                    .iter()
                    .any(|t| t.request.requirements.model_tag.as_deref() == Some(MODEL_TAG))
            );
            let rejected: Vec<&SampleTask> = tasks
                .iter()
                .filter(|t| t.expect == Expect::Rejected)
                .collect();
            assert_eq!(rejected.len(), 1);
            // More GPUs than any worker has: the allocator can only reject it.
            assert!(rejected[0].request.requirements.gpu_count > gpus_per_worker);
            assert!(rejected[0].request.requirements.gpu_count >= 16);
            // Everything else fits a worker.
            for t in tasks.iter().filter(|t| t.expect == Expect::Completed) {
                assert!(
                    t.request.requirements.gpu_count <= gpus_per_worker.max(1),
                    "{}",
                    t.label
                );
            }
        }
        let two = sample_workload(CLIENT_ID, 2);
        assert!(
            two.iter()
                .any(|t| t.request.requirements.gpu_count == 2 && t.expect == Expect::Completed)
        );
    }

    #[test]
    fn the_task_script_upper_cases_its_input_and_names_the_gpus() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", TASK_SCRIPT])
            .env("CUDA_VISIBLE_DEVICES", "0,1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"hello pool")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "HELLO POOL on GPU(s) 0,1"
        );
    }
}
