//! `node-agent`: runs on each GPU worker; registers it, reports its GPUs, and executes what it is allocated.
//!
//! - consumes: `allocations.<worker>` on ALLOCATIONS (TaskAllocated, AllocationRevoked), through the durable
//!   pull consumer `agent-<worker>`;
//! - produces: AttestationSubmitted on ATTESTATIONS (on start and every `reattest_interval`, when it has a
//!   quote source: configfs-tsm on a TDX guest, or a quote file for development; see [`attest`]);
//!   WorkerRegistered, WorkerHeartbeat (every `heartbeat_interval`), WorkerDraining and
//!   WorkerDeregistered on WORKERS; TaskStarted, TaskCompleted and TaskFailed on TASKS; TaskResult on
//!   `results.<client>`; every task event is caused by its allocation (same correlation id);
//! - owns: nothing durable; which attempts it has seen lives in memory ([`ledger`]) for one run;
//! - guarantees: allocations from an allocator epoch older than the newest seen are ignored; an attempt runs
//!   at most once per agent run; at most `max_concurrent_tasks` attempts run at once (the others wait in
//!   arrival order, none is dropped); a revoked attempt is killed and reports nothing more; on shutdown it
//!   drains (finishes what runs, up to `drain_timeout`, then kills it and fails it as retryable) and waits
//!   until its task events and its deregistration are stored before returning. A frame of allocations is acked once each of its allocations is recorded
//!   and queued; an agent that dies with queued work stops heartbeating, and the allocator requeues it.
//!
//! Many agents can run in one process (load tests): each call of [`run`] is one worker, and they can share one
//! [`bus::Publisher`], so their heartbeats travel in shared frames.

pub mod attest;
pub mod exec;
pub mod gpu;
pub mod ledger;
pub mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{Bus, ConsumeError, ConsumerSpec, FrameConsumer, PublishError, Publisher, Receipt};
use events::allocations::{AllocationRevoked, TaskAllocated};
use events::payload::Blob;
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskFailed, TaskStarted, Usage};
use events::workers::{WorkerDeregistered, WorkerDraining, WorkerHeartbeat, WorkerRegistered};
use events::{
    Envelope, Event, EventRecord, GpuMillis, Nanoton, ProducerId, Stream, Subject, WorkerId,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use exec::{
    ExecConfig, ExecExecutor, ExecOutcome, Executor, Job, SimulatedExecutor, TaskFailure,
};
pub use gpu::{GpuError, GpuSource};
use ledger::{Admission, AttemptKey, Ledger, Revocation};

/// Why an attempt still running (or queued) at the end of the drain failed.
pub const DRAINED_REASON: &str = "worker drained before the task finished";

/// One agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub worker_id: WorkerId,
    pub region: String,
    pub price_per_gpu_second: Nanoton,
    /// TON address payouts go to.
    pub payout_address: String,
    pub max_concurrent_tasks: u32,
    /// Models this worker serves; empty: any.
    pub model_tags: Vec<String>,
    /// The key attestation quotes bind; 32 bytes.
    pub public_key: Vec<u8>,
    pub agent_version: String,
    pub heartbeat_interval: Duration,
    /// How long in-flight attempts may run on after shutdown is asked for.
    pub drain_timeout: Duration,
    /// Allocation frames fetched at most per batch.
    pub fetch_batch: usize,
    /// How long a fetch waits for the first frame (also how soon the loop notices shutdown at the latest).
    pub fetch_wait: Duration,
    /// How often a running attempt's GPU memory is sampled (real GPUs only).
    pub memory_sample_interval: Duration,
    /// Where TDX quotes come from; `None`: the worker submits none and stays unattested.
    pub attestation: Option<attest::QuoteSource>,
    /// How often the worker attests again (before its verdict expires).
    pub reattest_interval: Duration,
    /// How soon the worker attests again after a failed round or a rejection.
    pub reattest_retry: Duration,
    /// How often the registration is published again (well inside the WORKERS stream's 7-day retention).
    pub reregister_interval: Duration,
}

impl AgentConfig {
    /// Defaults: region `local`, price 0, max 1 concurrent task, heartbeats every 2 s, 30 s drain, and a public
    /// key derived from the worker id, the time and the process (an operator passes a real one).
    pub fn new(worker_id: WorkerId) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut key = Sha256::new();
        key.update(worker_id.as_str().as_bytes());
        key.update(nanos.to_le_bytes());
        key.update(std::process::id().to_le_bytes());
        Self {
            worker_id,
            region: "local".into(),
            price_per_gpu_second: Nanoton::ZERO,
            payout_address: String::new(),
            max_concurrent_tasks: 1,
            model_tags: Vec::new(),
            public_key: key.finalize().to_vec(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            heartbeat_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            fetch_batch: 64,
            fetch_wait: Duration::from_millis(500),
            memory_sample_interval: Duration::from_millis(500),
            attestation: None,
            reattest_interval: Duration::from_secs(20 * 60),
            reattest_retry: Duration::from_secs(30),
            reregister_interval: Duration::from_secs(3_600),
        }
    }

    /// The durable consumer of this worker's allocations.
    pub fn durable(&self) -> String {
        format!("agent-{}", self.worker_id)
    }
}

/// What one agent run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    pub heartbeats: u64,
    /// Attestations submitted.
    pub attestations: u64,
    pub tasks_started: u64,
    pub tasks_completed: u64,
    /// Failed attempts, the drained ones included.
    pub tasks_failed: u64,
    /// Attempts failed because the drain ran out of time, or queued when it began.
    pub tasks_drained: u64,
    pub tasks_revoked: u64,
    pub allocations_stale: u64,
    pub allocations_duplicate: u64,
}

/// Why an agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The allocation stream is missing or its consumer cannot be made.
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Runs one agent until `cancel`, then drains; see the crate documentation.
pub async fn run(
    config: AgentConfig,
    bus: Bus,
    publisher: Publisher,
    gpus: GpuSource,
    executor: Arc<dyn Executor>,
    cancel: CancellationToken,
) -> Result<AgentReport, AgentError> {
    if config.max_concurrent_tasks == 0 {
        return Err(AgentError::Config(
            "max_concurrent_tasks must be at least 1".into(),
        ));
    }
    let producer = ProducerId::new(config.worker_id.as_str())
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let worker = config.worker_id.clone();
    let inventory = gpus.inventory().await?;
    // Bind first: a missing ALLOCATIONS stream fails before the worker announces itself.
    let spec = ConsumerSpec::new(Stream::Allocations, config.durable())
        .filter_subjects([Subject::allocations(&worker).to_string()]);
    let mut consumer = FrameConsumer::bind(&bus.jetstream, &spec).await?;

    tracing::info!(
        worker = %worker,
        gpus = inventory.len(),
        simulated_gpus = gpus.is_simulated(),
        executor = executor.kind(),
        max_concurrent = config.max_concurrent_tasks,
        "registering{}",
        if gpus.is_simulated() { " (SIMULATED GPUs)" } else { "" }
    );
    let registered = WorkerRegistered {
        worker_id: worker.clone(),
        gpus: inventory,
        price_per_gpu_second: config.price_per_gpu_second,
        payout_address: config.payout_address.clone(),
        region: config.region.clone(),
        max_concurrent_tasks: config.max_concurrent_tasks,
        public_key: config.public_key.clone(),
        agent_version: config.agent_version.clone(),
        model_tags: config.model_tags.clone(),
    };
    // Awaited: a missing WORKERS stream is a clear error now rather than silent heartbeats later.
    publisher
        .publish(&EventRecord::new(producer.clone(), registered.clone()))
        .await?
        .await?;

    let agent = Arc::new(Agent {
        config,
        producer,
        publisher,
        gpus,
        executor,
        state: Mutex::new(State::default()),
        hard_stop: CancellationToken::new(),
    });
    let stop_heartbeats = CancellationToken::new();
    // Re-registration stops before WorkerDraining is published, so it can never undo the drain.
    let stop_reregistering = CancellationToken::new();
    let heartbeats = tokio::spawn(heartbeat_loop(
        agent.clone(),
        bus.client.clone(),
        Reregistration {
            event: registered,
            every: agent.config.reregister_interval,
            stop: stop_reregistering.clone(),
        },
        stop_heartbeats.clone(),
    ));
    let drain = CancellationToken::new();
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let dispatcher = tokio::spawn(dispatch(agent.clone(), queue_rx, drain.clone()));
    let attestation = match agent.config.attestation.clone() {
        Some(source) => tokio::spawn(
            attest::Attester {
                source,
                worker: worker.clone(),
                public_key: agent.config.public_key.clone(),
                producer: agent.producer.clone(),
                publisher: agent.publisher.clone(),
                interval: agent.config.reattest_interval,
                retry: agent.config.reattest_retry,
                jetstream: Some(bus.jetstream.clone()),
            }
            .run(stop_heartbeats.clone()),
        ),
        None => {
            tracing::warn!(
                worker = %worker,
                "no TDX quote source (not a TDX guest, no --quote-file): submitting no attestation; this \
                 worker stays unattested and gets no tasks unless the pool admits unattested workers \
                 (development only)"
            );
            tokio::spawn(async { 0 })
        }
    };
    // If this future is dropped mid-run (its caller gone, as when the process dies), the heartbeats stop
    // and the running attempts are dropped with their processes: a dead agent must look dead.
    let _abort_on_drop = AbortOnDrop(vec![
        heartbeats.abort_handle(),
        dispatcher.abort_handle(),
        attestation.abort_handle(),
    ]);

    let fatal = consume(&agent, &bus, &spec, &mut consumer, &queue_tx, &cancel).await;

    let reason = match &fatal {
        None => "shutdown requested".to_owned(),
        Some(e) => format!("cannot read allocations: {e}"),
    };
    tracing::info!(worker = %worker, %reason, "draining");
    stop_reregistering.cancel();
    let draining = agent
        .publisher
        .publish(&EventRecord::new(
            agent.producer.clone(),
            WorkerDraining {
                worker_id: worker.clone(),
                reason,
            },
        ))
        .await;
    drop(queue_tx);
    drain.cancel();
    if let Err(e) = dispatcher.await {
        tracing::error!(worker = %worker, error = %e, "task dispatcher failed");
    }
    stop_heartbeats.cancel();
    let heartbeat_count = heartbeats.await.unwrap_or_default();
    let attestations = attestation.await.unwrap_or_default();
    let deregistered = agent
        .publisher
        .publish(&EventRecord::new(
            agent.producer.clone(),
            WorkerDeregistered {
                worker_id: worker.clone(),
                reason: "drained".into(),
            },
        ))
        .await;
    // This agent's own last events are awaited rather than the publisher flushed: the publisher may be shared
    // with agents that keep publishing, and a flush waits until all of them are quiet. Task events were
    // awaited by their attempts; heartbeats are superseded by the next one anyway.
    for receipt in [draining, deregistered] {
        receipt?.await?;
    }
    let mut report = agent.lock().report.clone();
    report.heartbeats = heartbeat_count;
    report.attestations = attestations;
    tracing::info!(worker = %worker, ?report, "deregistered");
    match fatal {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// Aborts tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

/// One agent's shared state.
struct Agent {
    config: AgentConfig,
    producer: ProducerId,
    publisher: Publisher,
    gpus: GpuSource,
    executor: Arc<dyn Executor>,
    state: Mutex<State>,
    /// Cancelled when the drain ran out of time: every running attempt is killed.
    hard_stop: CancellationToken,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    /// Kill switches of queued and running attempts.
    kills: HashMap<AttemptKey, CancellationToken>,
    /// Running attempts and their GPUs, for heartbeats.
    running: HashMap<AttemptKey, Vec<u32>>,
    report: AgentReport,
}

/// An admitted allocation waiting for a slot.
struct Queued {
    cause: Envelope,
    allocation: TaskAllocated,
    kill: CancellationToken,
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an event to the publisher; the receipt is returned to be awaited (or dropped: failures still
    /// surface at the final flush).
    async fn publish(&self, record: EventRecord) -> Option<Receipt> {
        match self.publisher.publish(&record).await {
            Ok(receipt) => Some(receipt),
            Err(e) => {
                tracing::error!(event_id = %record.envelope.event_id, kind = record.event.kind(), error = %e, "cannot publish");
                None
            }
        }
    }

    fn caused_by(&self, cause: &Envelope, event: impl Into<Event>) -> EventRecord {
        EventRecord::caused_by(cause, self.producer.clone(), event)
    }

    /// Forgets an attempt's kill switch and marks it done; says whether it had been revoked.
    fn finish(&self, key: AttemptKey) -> bool {
        let mut state = self.lock();
        let revoked = state.ledger.is_revoked(&key);
        state.ledger.finish(key);
        state.kills.remove(&key);
        if revoked {
            state.report.tasks_revoked += 1;
            ::metrics::counter!(metrics::TASKS_REVOKED).increment(1);
        }
        revoked
    }

    fn task_failed(&self, allocation: &TaskAllocated, failure: &TaskFailure) -> TaskFailed {
        TaskFailed {
            task_id: allocation.task_id,
            worker_id: Some(self.config.worker_id.clone()),
            attempt: allocation.attempt,
            reason: failure.reason.clone(),
            retryable: failure.retryable,
        }
    }

    fn count_failure(&self, failure: &TaskFailure, drained: bool) {
        let mut state = self.lock();
        state.report.tasks_failed += 1;
        if drained {
            state.report.tasks_drained += 1;
        }
        let retryable = if failure.retryable { "true" } else { "false" };
        ::metrics::counter!(metrics::TASKS_FAILED, "retryable" => retryable).increment(1);
    }

    /// Fails an attempt that never started because the agent is draining.
    async fn fail_drained(&self, queued: Queued) {
        let key = (queued.allocation.task_id, queued.allocation.attempt);
        if self.finish(key) {
            return;
        }
        let failure = TaskFailure::retryable(DRAINED_REASON);
        self.count_failure(&failure, true);
        let failed = self.task_failed(&queued.allocation, &failure);
        drop(self.publish(self.caused_by(&queued.cause, failed)).await);
    }
}

/// Fetches allocation frames until `cancel`; returns the error that stopped it early, if any.
async fn consume(
    agent: &Agent,
    bus: &Bus,
    spec: &ConsumerSpec,
    consumer: &mut FrameConsumer,
    queue: &mpsc::UnboundedSender<Queued>,
    cancel: &CancellationToken,
) -> Option<ConsumeError> {
    let codec = agent.publisher.config().codec;
    let mut backoff = Duration::from_millis(100);
    loop {
        let fetched = tokio::select! {
            biased;
            () = cancel.cancelled() => return None,
            fetched = consumer.fetch(agent.config.fetch_batch, agent.config.fetch_wait) => fetched,
        };
        let batch = match fetched {
            Ok(batch) => {
                backoff = Duration::from_millis(100);
                batch
            }
            Err(e @ ConsumeError::NoStream { .. }) => return Some(e),
            Err(e) => {
                tracing::warn!(worker = %agent.config.worker_id, error = %e, "fetching allocations failed; starting again after the last acked frame");
                // Frames of the failed fetch may be lost on the way while the server counts them delivered;
                // the next batch's ack would cover them. Deliver again after what was acked: the ledger
                // recognises allocations seen before.
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    rewound = consumer.rewind_to_ack_floor_retrying(&bus.jetstream, spec, &mut backoff) => {
                        if let Err(e) = rewound {
                            return Some(e);
                        }
                    }
                }
                continue;
            }
        };
        for frame in &batch.frames {
            match frame.decode(&codec) {
                Ok(records) => {
                    for record in records {
                        handle(agent, record, queue);
                    }
                }
                // Nothing else could make sense of it either; the projector dead-letters it.
                Err(e) => tracing::warn!(
                    worker = %agent.config.worker_id,
                    stream = Stream::Allocations.name(),
                    seq = frame.stream_sequence,
                    error = %e,
                    "skipping an allocation frame that does not decode"
                ),
            }
        }
        // Every allocation of the batch is now queued or refused: ack it.
        if let Err(e) = batch.ack().await {
            // The frames come again after the ack wait; the ledger recognises them as duplicates.
            tracing::warn!(worker = %agent.config.worker_id, error = %e, "ack of allocations failed");
        }
    }
}

/// Applies one allocation event: admit and queue, revoke, or ignore.
fn handle(agent: &Agent, record: EventRecord, queue: &mpsc::UnboundedSender<Queued>) {
    let worker = &agent.config.worker_id;
    match record.event {
        Event::TaskAllocated(allocation) => {
            if &allocation.worker_id != worker {
                tracing::warn!(%worker, other = %allocation.worker_id,
                    event_id = %record.envelope.event_id, "allocation for another worker on our subject");
                return;
            }
            let key = (allocation.task_id, allocation.attempt);
            let mut state = agent.lock();
            match state.ledger.admit(key, allocation.allocator_epoch) {
                Admission::Accept => {
                    let kill = agent.hard_stop.child_token();
                    state.kills.insert(key, kill.clone());
                    drop(state);
                    tracing::debug!(%worker, task = %allocation.task_id, attempt = allocation.attempt,
                        event_id = %record.envelope.event_id, correlation_id = %record.envelope.correlation_id, "allocation queued");
                    let queued = Queued {
                        cause: record.envelope,
                        allocation,
                        kill,
                    };
                    if let Err(mpsc::error::SendError(queued)) = queue.send(queued) {
                        // The dispatcher only stops after the consumer; keep the attempt from lingering anyway.
                        agent.finish((queued.allocation.task_id, queued.allocation.attempt));
                    }
                }
                Admission::Stale { epoch, highest } => {
                    state.report.allocations_stale += 1;
                    ::metrics::counter!(metrics::ALLOCATIONS_IGNORED, "why" => "stale_epoch")
                        .increment(1);
                    tracing::info!(%worker, task = %allocation.task_id, epoch, highest,
                        event_id = %record.envelope.event_id, "ignoring an allocation from an older allocator epoch");
                }
                Admission::Duplicate => {
                    state.report.allocations_duplicate += 1;
                    ::metrics::counter!(metrics::ALLOCATIONS_IGNORED, "why" => "duplicate")
                        .increment(1);
                    tracing::debug!(%worker, task = %allocation.task_id, attempt = allocation.attempt,
                        event_id = %record.envelope.event_id, "duplicate allocation");
                }
            }
        }
        Event::AllocationRevoked(AllocationRevoked {
            task_id,
            attempt,
            allocator_epoch,
            reason,
            ..
        }) => {
            let key = (task_id, attempt);
            let mut state = agent.lock();
            match state.ledger.revoke(key, allocator_epoch) {
                Revocation::Stop => {
                    tracing::info!(%worker, task = %task_id, attempt, %reason,
                        event_id = %record.envelope.event_id, correlation_id = %record.envelope.correlation_id, "allocation revoked; stopping the attempt");
                    if let Some(kill) = state.kills.get(&key) {
                        kill.cancel();
                    }
                }
                Revocation::Stale { epoch, highest } => {
                    tracing::info!(%worker, task = %task_id, epoch, highest,
                        event_id = %record.envelope.event_id, "ignoring a revocation from an older allocator epoch");
                }
                Revocation::NotActive => {
                    tracing::debug!(%worker, task = %task_id, attempt,
                        event_id = %record.envelope.event_id, "revocation of an attempt not running here");
                }
            }
        }
        other => {
            tracing::warn!(%worker, kind = other.kind(), event_id = %record.envelope.event_id, "unexpected event on the allocation subject")
        }
    }
}

/// Starts queued attempts in arrival order as slots free up; on drain, fails what has not started, waits for
/// what runs up to the drain timeout, then kills the rest. Returns when every attempt has ended.
async fn dispatch(
    agent: Arc<Agent>,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    drain: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(agent.config.max_concurrent_tasks as usize));
    let mut running = JoinSet::new();
    loop {
        let queued = tokio::select! {
            biased;
            () = drain.cancelled() => break,
            queued = queue.recv() => queued,
        };
        let Some(queued) = queued else { break };
        let permit = tokio::select! {
            biased;
            // Revoked while waiting: it never starts.
            () = queued.kill.cancelled() => {
                agent.finish((queued.allocation.task_id, queued.allocation.attempt));
                continue;
            }
            () = drain.cancelled() => {
                agent.fail_drained(queued).await;
                break;
            }
            permit = slots.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        running.spawn(run_attempt(agent.clone(), queued, permit));
        // Reap finished attempts so the set does not grow with the agent's history.
        while running.try_join_next().is_some() {}
    }
    queue.close();
    while let Ok(queued) = queue.try_recv() {
        agent.fail_drained(queued).await;
    }
    let all_done = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(agent.config.drain_timeout, all_done)
        .await
        .is_err()
    {
        tracing::warn!(
            worker = %agent.config.worker_id,
            running = running.len(),
            "drain timeout reached; killing the attempts still running"
        );
        agent.hard_stop.cancel();
        while running.join_next().await.is_some() {}
    }
}

/// Runs one attempt in its slot and reports how it ended.
async fn run_attempt(agent: Arc<Agent>, queued: Queued, permit: tokio::sync::OwnedSemaphorePermit) {
    let Queued {
        cause,
        allocation,
        kill,
    } = queued;
    let key = (allocation.task_id, allocation.attempt);
    let worker = &agent.config.worker_id;
    if kill.is_cancelled() {
        // Revoked between getting its slot and starting: it never starts, and reports nothing.
        agent.finish(key);
        return;
    }
    {
        let mut state = agent.lock();
        state.running.insert(key, allocation.gpu_indices.clone());
        state.report.tasks_started += 1;
    }
    ::metrics::counter!(metrics::TASKS_STARTED).increment(1);
    ::metrics::gauge!(metrics::TASKS_RUNNING).increment(1.0);
    tracing::info!(%worker, task = %allocation.task_id, attempt = allocation.attempt, gpus = ?allocation.gpu_indices, executor = agent.executor.kind(),
        event_id = %cause.event_id, correlation_id = %cause.correlation_id, "task started");
    let started = TaskStarted {
        task_id: allocation.task_id,
        worker_id: worker.clone(),
        attempt: allocation.attempt,
        gpu_indices: allocation.gpu_indices.clone(),
    };
    let mut receipts = Vec::with_capacity(3);
    let started = agent.caused_by(&cause, started);
    receipts.push((started.clone(), agent.publish(started).await));

    let (pid_tx, pid_rx) = oneshot::channel();
    let job = Job {
        task_id: allocation.task_id,
        attempt: allocation.attempt,
        gpu_indices: &allocation.gpu_indices,
        input: &allocation.spec.input,
        // A zero timeout means none (the allocator enforces the task's deadline in any case).
        timeout: (allocation.spec.timeout_ms > 0)
            .then(|| Duration::from_millis(allocation.spec.timeout_ms)),
        kill,
        started: (!agent.gpus.is_simulated()).then_some(pid_tx),
    };
    let clock = Instant::now();
    let mut peak = None;
    let outcome = tokio::select! {
        biased;
        outcome = agent.executor.execute(job) => outcome,
        () = sample_peak_memory(&agent, &allocation.gpu_indices, pid_rx, &mut peak) => unreachable!("sampling never ends"),
    };
    let wall_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    agent.lock().running.remove(&key);
    ::metrics::gauge!(metrics::TASKS_RUNNING).decrement(1.0);
    let revoked = agent.finish(key);
    if revoked {
        tracing::info!(%worker, task = %allocation.task_id, attempt = allocation.attempt,
            event_id = %cause.event_id, correlation_id = %cause.correlation_id, "revoked attempt stopped; reporting nothing");
    } else {
        match outcome {
            ExecOutcome::Succeeded { output, truncated } => {
                let gpu_count = allocation.gpu_indices.len() as u64;
                let usage = Usage {
                    gpu_millis: GpuMillis(wall_ms.saturating_mul(gpu_count)),
                    peak_gpu_memory_mib: peak,
                    wall_ms,
                };
                tracing::info!(%worker, task = %allocation.task_id, attempt = allocation.attempt, wall_ms, output_bytes = output.len(), truncated,
                    event_id = %cause.event_id, correlation_id = %cause.correlation_id, "task completed");
                let result = TaskResult {
                    task_id: allocation.task_id,
                    client_id: allocation.client_id.clone(),
                    worker_id: worker.clone(),
                    attempt: allocation.attempt,
                    checksum: checksum(&output),
                    output: Blob::Inline(output),
                    truncated,
                };
                let completed = TaskCompleted {
                    task_id: allocation.task_id,
                    worker_id: worker.clone(),
                    attempt: allocation.attempt,
                    usage,
                };
                // The result is stored before the completion is published: a reader that sees the completion
                // finds the output, and a result that cannot be stored (an output that does not fit in a frame
                // once encoded) fails the attempt instead of completing it without one.
                let result = agent.caused_by(&cause, result);
                let first = agent.publisher.publish(&result).await;
                match store_outcome(&agent, &allocation, &result, first).await {
                    Ok(()) => {
                        let completed = agent.caused_by(&cause, completed);
                        receipts.push((completed.clone(), agent.publish(completed).await));
                        agent.lock().report.tasks_completed += 1;
                        ::metrics::counter!(metrics::TASKS_COMPLETED).increment(1);
                    }
                    Err(e) => {
                        let reason = format!("the task's result could not be stored: {e}");
                        // Another run would make the same output; a store that kept failing may not.
                        let failure = if e.is_permanent() {
                            TaskFailure::permanent(reason)
                        } else {
                            TaskFailure::retryable(reason)
                        };
                        tracing::warn!(%worker, task = %allocation.task_id, attempt = allocation.attempt, reason = %failure.reason,
                            event_id = %cause.event_id, correlation_id = %cause.correlation_id, "task ran, but its result is not stored; reporting it failed");
                        agent.count_failure(&failure, false);
                        let failed =
                            agent.caused_by(&cause, agent.task_failed(&allocation, &failure));
                        receipts.push((failed.clone(), agent.publish(failed).await));
                    }
                }
            }
            ExecOutcome::Failed(failure) => {
                tracing::info!(%worker, task = %allocation.task_id, attempt = allocation.attempt, reason = %failure.reason, retryable = failure.retryable,
                    event_id = %cause.event_id, correlation_id = %cause.correlation_id, "task failed");
                agent.count_failure(&failure, false);
                let failed = agent.caused_by(&cause, agent.task_failed(&allocation, &failure));
                receipts.push((failed.clone(), agent.publish(failed).await));
            }
            ExecOutcome::Killed => {
                // Not revoked, so the drain ran out of time.
                let failure = TaskFailure::retryable(DRAINED_REASON);
                tracing::warn!(%worker, task = %allocation.task_id, attempt = allocation.attempt,
                    event_id = %cause.event_id, correlation_id = %cause.correlation_id, "task killed by the drain timeout");
                agent.count_failure(&failure, true);
                let failed = agent.caused_by(&cause, agent.task_failed(&allocation, &failure));
                receipts.push((failed.clone(), agent.publish(failed).await));
            }
        }
    }
    // The slot frees before the acks come back: the events are in the publisher, and its flush (at the
    // latest on shutdown) reports any that failed.
    drop(permit);
    for (record, receipt) in receipts {
        let first = receipt.ok_or(PublishError::Closed);
        if let Err(e) = store_outcome(&agent, &allocation, &record, first).await {
            tracing::error!(%worker, task = %allocation.task_id, kind = record.event.kind(),
                event_id = %record.envelope.event_id, error = %e, "task event not stored; giving up");
        }
    }
}

/// Waits until `record`, published once (`first`), is stored. An outcome that is not stored would leave the
/// task to its timeout and a second run: a failure is published again (same event, same id; readers apply
/// it once) a few times, unless it is permanent (the event cannot be encoded, or does not fit in a frame).
async fn store_outcome(
    agent: &Agent,
    allocation: &TaskAllocated,
    record: &EventRecord,
    first: Result<Receipt, PublishError>,
) -> Result<(), PublishError> {
    let mut stored = match first {
        Ok(receipt) => receipt.await.map(|_| ()),
        Err(e) => Err(e),
    };
    let mut backoff = Duration::from_millis(500);
    for _ in 0..OUTCOME_RETRIES {
        let Err(e) = &stored else { break };
        if e.is_permanent() {
            break;
        }
        tracing::warn!(worker = %agent.config.worker_id, task = %allocation.task_id, kind = record.event.kind(),
            event_id = %record.envelope.event_id, error = %e, "task event not stored; publishing it again");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
        stored = match agent.publisher.publish(record).await {
            Ok(receipt) => receipt.await.map(|_| ()),
            Err(e) => Err(e),
        };
    }
    stored
}

/// Publishing an attempt's outcome is tried this many more times (0.5 s, 1 s, 2 s, 4 s apart).
const OUTCOME_RETRIES: usize = 4;

/// Samples the GPU memory of the attempt's process tree until dropped, keeping the highest value in `peak`.
/// Never returns. Simulated GPUs send no pid, so `peak` stays `None`.
async fn sample_peak_memory(
    agent: &Agent,
    gpu_indices: &[u32],
    pid: oneshot::Receiver<u32>,
    peak: &mut Option<u64>,
) {
    if let Ok(pid) = pid.await {
        loop {
            if let Some(mib) = agent.gpus.process_memory_mib(gpu_indices, pid).await {
                *peak = Some(peak.map_or(mib, |p: u64| p.max(mib)));
            }
            tokio::time::sleep(agent.config.memory_sample_interval).await;
        }
    }
    std::future::pending().await
}

/// Sends a heartbeat every interval until `stop`; returns how many it sent.
/// The registration, published again every `every`: WORKERS keeps events for a limited time (7 days), and
/// an allocator or attestor that starts later must still find this worker's registration in the log.
struct Reregistration {
    event: WorkerRegistered,
    every: Duration,
    stop: CancellationToken,
}

async fn heartbeat_loop(
    agent: Arc<Agent>,
    client: async_nats::Client,
    reregistration: Reregistration,
    stop: CancellationToken,
) -> u64 {
    let mut registered_at = Instant::now();
    let worker = agent.config.worker_id.clone();
    let mut interval = tokio::time::interval(agent.config.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return sequence,
            _ = interval.tick() => {}
        }
        sequence += 1;
        if registered_at.elapsed() >= reregistration.every && !reregistration.stop.is_cancelled() {
            registered_at = Instant::now();
            let record = EventRecord::new(agent.producer.clone(), reregistration.event.clone());
            drop(agent.publish(record).await);
        }
        let latency_us = round_trip(&client).await;
        let (running_tasks, load) = {
            let state = agent.lock();
            let mut tasks: Vec<_> = state.running.keys().map(|(task, _)| *task).collect();
            tasks.sort();
            tasks.dedup();
            (
                tasks,
                ledger::gpu_load(state.running.values().map(Vec::as_slice)),
            )
        };
        let gpus = match agent.gpus.telemetry(&load, sequence).await {
            Ok(gpus) => gpus,
            Err(e) => {
                // Liveness matters more than telemetry: the heartbeat still goes, without GPU readings.
                tracing::warn!(%worker, error = %e, "cannot read GPU telemetry");
                Vec::new()
            }
        };
        let heartbeat = WorkerHeartbeat {
            worker_id: worker.clone(),
            sequence,
            gpus,
            running_tasks,
            latency_us,
        };
        drop(
            agent
                .publish(EventRecord::new(agent.producer.clone(), heartbeat))
                .await,
        );
        ::metrics::counter!(metrics::HEARTBEATS).increment(1);
    }
}

/// One round trip to the NATS server: a request to a fresh inbox nobody listens on, which the server answers
/// at once with "no responders". `None` when the server did not answer like that in time.
pub async fn round_trip(client: &async_nats::Client) -> Option<u32> {
    let clock = Instant::now();
    let answered = match tokio::time::timeout(
        Duration::from_secs(2),
        client.request(client.new_inbox(), bytes::Bytes::new()),
    )
    .await
    {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
        Err(_) => false,
    };
    answered.then(|| u32::try_from(clock.elapsed().as_micros()).unwrap_or(u32::MAX))
}

/// `sha256:<hex>` of `bytes`.
pub fn checksum(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_prefixed_hex_sha256() {
        assert_eq!(
            checksum(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_durable_is_named_after_the_worker() {
        let c = AgentConfig::new(WorkerId::new("w1").unwrap());
        assert_eq!(c.durable(), "agent-w1");
        assert_eq!(c.public_key.len(), 32);
    }
}
