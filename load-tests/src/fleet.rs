//! A SIMULATED fleet of workers for the whole-system load test: thousands of workers in one task of the
//! driver, speaking the node agent's protocol on the real bus.
//!
//! What each simulated worker does is what `node_agent::run` does, through the same events and the agent's
//! own pieces (`node_agent::ledger` for epoch fencing and de-duplication, `GpuSource::simulated` for the
//! inventory and telemetry): it registers (`WorkerRegistered` v2 with simulated GPUs, price and a payout
//! address), heartbeats every `heartbeat_interval` (spread evenly over the interval across the fleet), takes
//! the allocations addressed to it, runs at most `max_concurrent` attempts (the rest wait in arrival order),
//! publishes `TaskStarted`, and after the task's simulated duration its `TaskResult` on
//! `results.<client>` and `TaskCompleted` (GPU-seconds = wall time × GPUs), each caused by its allocation;
//! a revoked attempt reports nothing more.
//!
//! Where it differs from 10,000 real agents, and why:
//! - one durable consumer (`fleet-sim`) reads the whole ALLOCATIONS stream and hands each allocation to its
//!   worker, instead of one durable consumer per worker on `allocations.<worker>`: 10,000 pull consumers
//!   each polling the server would measure the polling, not the pool;
//! - one publisher carries every worker's events (each event still goes on its worker's own subject, so
//!   frames are per worker as with real agents);
//! - the bus round trip reported in heartbeats is measured once a second for the fleet, not per heartbeat;
//! - attestation verdicts are the stand-in (`events::sample::stand_in_attestation`): there is no TDX quote
//!   to verify for simulated workers, and the allocator runs its production policy (attested workers only).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus::{Bus, ConsumerSpec, FrameConsumer, PublishError, Publisher, Receipt};
use events::allocations::{AllocationRevoked, TaskAllocated};
use events::payload::Blob;
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskStarted, Usage};
use events::workers::{WorkerHeartbeat, WorkerRegistered};
use events::{
    Envelope, Event, EventRecord, GpuMillis, Nanoton, ProducerId, Stream, TaskId, Timestamp,
    WorkerId,
};
use node_agent::GpuSource;
use node_agent::ledger::{Admission, AttemptKey, Ledger, Revocation};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::scenario::{WorkerPlan, simulated_duration_ms};
use crate::stats::{Micros, Step};

/// The durable consumer the fleet reads ALLOCATIONS with.
pub const DURABLE: &str = "fleet-sim";
/// Allocation frames fetched at most per batch.
const FETCH_BATCH: usize = 512;
/// How long a fetch waits for the first frame.
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// The loop wakes at least this often (to notice heartbeats and completions that came due).
const MAX_SLEEP: Duration = Duration::from_millis(20);
/// A task event that was not stored is published again this many times (as the node agent does).
const OUTCOME_RETRIES: usize = 4;

/// Microseconds since the start of the load, for every step the driver records.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Micros {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn at(&self, instant: Instant) -> Micros {
        u64::try_from(instant.saturating_duration_since(self.0).as_micros()).unwrap_or(u64::MAX)
    }
}

/// A step of a task seen by the fleet, with when.
pub type Sample = (TaskId, Step, Micros);

/// Why the fleet stopped.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("worker id {0:?}: {1}")]
    Id(String, String),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// What the fleet did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetReport {
    pub heartbeats: u64,
    pub allocations: u64,
    pub started: u64,
    pub completed: u64,
    pub revoked: u64,
    pub stale: u64,
    pub duplicate: u64,
    /// Allocations for a worker that is not in the fleet.
    pub foreign: u64,
    /// Frames of ALLOCATIONS that did not decode.
    pub undecodable: u64,
    /// Task events that were not stored after every retry.
    pub lost_events: u64,
    /// Most attempts waiting for a slot on one worker at once.
    pub max_waiting: usize,
}

/// One simulated worker.
struct SimWorker {
    id: WorkerId,
    producer: ProducerId,
    gpus: GpuSource,
    max_concurrent: usize,
    ledger: Ledger,
    running: HashMap<AttemptKey, Running>,
    waiting: VecDeque<(Envelope, TaskAllocated)>,
    heartbeat_sequence: u64,
}

struct Running {
    cause: Envelope,
    allocation: TaskAllocated,
    started: Instant,
}

/// The registration of a planned worker, with a payout address derived from its id.
pub fn registration(plan: &WorkerPlan) -> Result<WorkerRegistered, FleetError> {
    let worker = WorkerId::new(plan.id.as_str())
        .map_err(|e| FleetError::Id(plan.id.clone(), e.to_string()))?;
    Ok(WorkerRegistered {
        worker_id: worker.clone(),
        gpus: simulated_inventory(&worker, plan.gpus),
        price_per_gpu_second: Nanoton(plan.price_per_gpu_second),
        payout_address: payout_address(&plan.id),
        region: "sim".into(),
        max_concurrent_tasks: plan.max_concurrent,
        public_key: key_of(&plan.id).to_vec(),
        agent_version: format!("fleet-sim/{}", env!("CARGO_PKG_VERSION")),
        model_tags: plan.model_tags.clone(),
    })
}

fn simulated_inventory(worker: &WorkerId, count: u32) -> Vec<events::workers::GpuInfo> {
    // The agent's own simulated inventory; `inventory()` is async only for NVML's sake.
    futures_util::FutureExt::now_or_never(GpuSource::simulated(worker, count).inventory())
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// A worker's TON payout address: a fresh account derived from its id (non-bounceable transfers reach it).
pub fn payout_address(worker: &str) -> String {
    tonlib_core::TonAddress::new(0, key_of(&format!("payout {worker}")).into()).to_base64_url()
}

/// 32 bytes derived from `text` (a stand-in public key, an address hash).
fn key_of(text: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(format!("cocoon load-test {text}")).into()
}

/// Registers every worker of the fleet and publishes the stand-in attestation verdicts (valid until
/// `attested_until`), then waits until all of it is stored.
pub async fn register(
    publisher: &Publisher,
    plans: &[WorkerPlan],
    attested_until: Timestamp,
) -> Result<(), FleetError> {
    let mut receipts = Vec::with_capacity(plans.len() * 3);
    for plan in plans {
        let registered = registration(plan)?;
        let producer = ProducerId::new(plan.id.as_str())
            .map_err(|e| FleetError::Id(plan.id.clone(), e.to_string()))?;
        receipts.push(
            publisher
                .publish(&EventRecord::new(producer, registered.clone()))
                .await?,
        );
        for record in events::sample::stand_in_attestation(&registered.worker_id, attested_until) {
            receipts.push(publisher.publish(&record).await?);
        }
    }
    for receipt in receipts {
        receipt.await?;
    }
    Ok(())
}

/// Runs the fleet until `stop`: consumes allocations, runs attempts, heartbeats. Every step it sees goes to
/// `samples` with its time on `clock`.
pub async fn run(
    bus: Bus,
    publisher: Publisher,
    plans: &[WorkerPlan],
    heartbeat_interval: Duration,
    clock: Clock,
    samples: mpsc::UnboundedSender<Sample>,
    stop: CancellationToken,
) -> Result<FleetReport, FleetError> {
    let mut workers = Vec::with_capacity(plans.len());
    let mut index = HashMap::with_capacity(plans.len());
    for plan in plans {
        let id = WorkerId::new(plan.id.as_str())
            .map_err(|e| FleetError::Id(plan.id.clone(), e.to_string()))?;
        let producer = ProducerId::new(plan.id.as_str())
            .map_err(|e| FleetError::Id(plan.id.clone(), e.to_string()))?;
        index.insert(id.clone(), workers.len());
        workers.push(SimWorker {
            gpus: GpuSource::simulated(&id, plan.gpus),
            id,
            producer,
            max_concurrent: plan.max_concurrent.max(1) as usize,
            ledger: Ledger::default(),
            running: HashMap::new(),
            waiting: VecDeque::new(),
            heartbeat_sequence: 0,
        });
    }
    let consumer = FrameConsumer::bind(
        &bus.jetstream,
        &ConsumerSpec::new(Stream::Allocations, DURABLE),
    )
    .await?;

    let latency = Arc::new(AtomicU32::new(0));
    let undecodable = Arc::new(AtomicU64::new(0));
    let (frames_tx, frames_rx) = mpsc::channel::<Vec<EventRecord>>(64);
    let (acks_tx, acks_rx) = mpsc::unbounded_channel::<Pending>();
    let lost = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(read_allocations(
        consumer,
        publisher.config().codec,
        frames_tx,
        undecodable.clone(),
        stop.clone(),
    ));
    let pinger = tokio::spawn(measure_round_trip(
        bus.client.clone(),
        latency.clone(),
        stop.clone(),
    ));
    let acker = tokio::spawn(await_receipts(
        publisher.clone(),
        acks_rx,
        clock,
        samples.clone(),
        lost.clone(),
    ));
    let mut core = Core {
        workers,
        index,
        due: BinaryHeap::new(),
        publisher,
        acks: acks_tx,
        samples,
        clock,
        latency,
        report: FleetReport::default(),
    };
    let result = core
        .drive(frames_rx, heartbeat_interval, stop.clone())
        .await;
    stop.cancel();
    let _ = reader.await;
    let _ = pinger.await;
    let mut report = core.report.clone();
    drop(core);
    let _ = acker.await;
    report.undecodable = undecodable.load(Ordering::Relaxed);
    report.lost_events = lost.load(Ordering::Relaxed);
    result.map(|()| report)
}

/// A published event whose receipt the acker awaits, and the step to record once it is stored.
struct Pending {
    record: Option<EventRecord>,
    receipt: Receipt,
    step: Option<(TaskId, Step)>,
}

/// The fleet's state, owned by one loop.
struct Core {
    workers: Vec<SimWorker>,
    index: HashMap<WorkerId, usize>,
    /// Running attempts by when they finish.
    due: BinaryHeap<Reverse<(Instant, usize, TaskId, u32)>>,
    publisher: Publisher,
    acks: mpsc::UnboundedSender<Pending>,
    samples: mpsc::UnboundedSender<Sample>,
    clock: Clock,
    latency: Arc<AtomicU32>,
    report: FleetReport,
}

impl Core {
    async fn drive(
        &mut self,
        mut frames: mpsc::Receiver<Vec<EventRecord>>,
        heartbeat_interval: Duration,
        stop: CancellationToken,
    ) -> Result<(), FleetError> {
        let n = self.workers.len().max(1) as u32;
        let spacing = heartbeat_interval / n;
        // Worker i heartbeats at start + i × spacing + k × interval: evenly spread, as independent agents are.
        let start = Instant::now();
        let mut next_heartbeat = 0usize;
        let mut round = 0u32;
        let heartbeat_due =
            |i: usize, round: u32| start + heartbeat_interval * round + spacing * i as u32;
        loop {
            let now = Instant::now();
            let mut wake = now + MAX_SLEEP;
            if let Some(Reverse((at, ..))) = self.due.peek() {
                wake = wake.min(*at);
            }
            wake = wake.min(heartbeat_due(next_heartbeat, round));
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                frame = frames.recv() => match frame {
                    Some(records) => {
                        for record in records {
                            self.on_allocation_event(record).await?;
                        }
                    }
                    None => return Ok(()),
                },
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            while let Some(Reverse((at, ..))) = self.due.peek() {
                if *at > now {
                    break;
                }
                let Some(Reverse((_, w, task, attempt))) = self.due.pop() else {
                    break;
                };
                self.finish(w, (task, attempt)).await?;
            }
            while heartbeat_due(next_heartbeat, round) <= now {
                self.heartbeat(next_heartbeat).await?;
                next_heartbeat += 1;
                if next_heartbeat == self.workers.len() {
                    next_heartbeat = 0;
                    round += 1;
                }
            }
        }
    }

    async fn publish(
        &mut self,
        record: EventRecord,
        step: Option<(TaskId, Step)>,
    ) -> Result<(), FleetError> {
        let receipt = self.publisher.publish(&record).await?;
        // Heartbeats are superseded by the next one: only task events are published again on failure.
        let record = step.is_some().then_some(record);
        let _ = self.acks.send(Pending {
            record,
            receipt,
            step,
        });
        Ok(())
    }

    async fn on_allocation_event(&mut self, record: EventRecord) -> Result<(), FleetError> {
        match record.event {
            Event::TaskAllocated(allocation) => {
                self.report.allocations += 1;
                let _ = self
                    .samples
                    .send((allocation.task_id, Step::Allocated, self.clock.now()));
                let Some(&w) = self.index.get(&allocation.worker_id) else {
                    self.report.foreign += 1;
                    return Ok(());
                };
                let key = (allocation.task_id, allocation.attempt);
                let worker = &mut self.workers[w];
                match worker.ledger.admit(key, allocation.allocator_epoch) {
                    Admission::Accept => {
                        worker.waiting.push_back((record.envelope, allocation));
                        self.report.max_waiting = self.report.max_waiting.max(worker.waiting.len());
                        self.start_waiting(w).await?;
                    }
                    Admission::Stale { .. } => self.report.stale += 1,
                    Admission::Duplicate => self.report.duplicate += 1,
                }
            }
            Event::AllocationRevoked(AllocationRevoked {
                task_id,
                worker_id,
                attempt,
                allocator_epoch,
                ..
            }) => {
                let Some(&w) = self.index.get(&worker_id) else {
                    self.report.foreign += 1;
                    return Ok(());
                };
                let key = (task_id, attempt);
                let worker = &mut self.workers[w];
                if let Revocation::Stop = worker.ledger.revoke(key, allocator_epoch) {
                    // Killed where it stands: it reports nothing more (its entry in `due` finds nothing).
                    worker.running.remove(&key);
                    worker
                        .waiting
                        .retain(|(_, a)| (a.task_id, a.attempt) != key);
                    worker.ledger.finish(key);
                    self.report.revoked += 1;
                    self.start_waiting(w).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Starts waiting attempts of worker `w` while it has free slots.
    async fn start_waiting(&mut self, w: usize) -> Result<(), FleetError> {
        loop {
            let worker = &mut self.workers[w];
            if worker.running.len() >= worker.max_concurrent {
                return Ok(());
            }
            let Some((cause, allocation)) = worker.waiting.pop_front() else {
                return Ok(());
            };
            let key = (allocation.task_id, allocation.attempt);
            let duration = match &allocation.spec.input {
                Blob::Inline(bytes) => simulated_duration_ms(bytes).unwrap_or(0),
                Blob::Reference { .. } => 0,
            };
            let now = Instant::now();
            let started = EventRecord::caused_by(
                &cause,
                worker.producer.clone(),
                TaskStarted {
                    task_id: allocation.task_id,
                    worker_id: worker.id.clone(),
                    attempt: allocation.attempt,
                    gpu_indices: allocation.gpu_indices.clone(),
                },
            );
            worker.running.insert(
                key,
                Running {
                    cause,
                    allocation,
                    started: now,
                },
            );
            self.due.push(Reverse((
                now + Duration::from_millis(duration),
                w,
                key.0,
                key.1,
            )));
            self.report.started += 1;
            self.publish(started, Some((key.0, Step::Started))).await?;
        }
    }

    /// An attempt's time is up: its result and completion, then the next waiting attempt.
    async fn finish(&mut self, w: usize, key: AttemptKey) -> Result<(), FleetError> {
        let worker = &mut self.workers[w];
        let Some(run) = worker.running.remove(&key) else {
            return Ok(());
        };
        worker.ledger.finish(key);
        let ran = run.started.elapsed();
        let wall_ms = u64::try_from(ran.as_millis()).unwrap_or(u64::MAX);
        let ran = u64::try_from(ran.as_micros()).unwrap_or(u64::MAX);
        let gpus = run.allocation.gpu_indices.len() as u64;
        let output = match &run.allocation.spec.input {
            Blob::Inline(bytes) => bytes.clone(),
            Blob::Reference { .. } => Vec::new(),
        };
        let result = TaskResult {
            task_id: key.0,
            client_id: run.allocation.client_id.clone(),
            worker_id: worker.id.clone(),
            attempt: key.1,
            checksum: node_agent::checksum(&output),
            output: Blob::Inline(output),
            truncated: false,
        };
        let completed = TaskCompleted {
            task_id: key.0,
            worker_id: worker.id.clone(),
            attempt: key.1,
            usage: Usage {
                gpu_millis: GpuMillis(wall_ms.saturating_mul(gpus.max(1))),
                peak_gpu_memory_mib: None,
                wall_ms,
            },
        };
        let producer = worker.producer.clone();
        // The result goes first, so a reader that sees the completion finds the output stored.
        self.publish(
            EventRecord::caused_by(&run.cause, producer.clone(), result),
            None,
        )
        .await?;
        self.publish(
            EventRecord::caused_by(&run.cause, producer, completed),
            Some((key.0, Step::Completed { ran })),
        )
        .await?;
        self.report.completed += 1;
        self.start_waiting(w).await
    }

    async fn heartbeat(&mut self, w: usize) -> Result<(), FleetError> {
        let worker = &mut self.workers[w];
        worker.heartbeat_sequence += 1;
        let load = node_agent::ledger::gpu_load(
            worker
                .running
                .values()
                .map(|r| r.allocation.gpu_indices.as_slice()),
        );
        let gpus = futures_util::FutureExt::now_or_never(
            worker.gpus.telemetry(&load, worker.heartbeat_sequence),
        )
        .and_then(Result::ok)
        .unwrap_or_default();
        let mut running_tasks: Vec<TaskId> = worker.running.keys().map(|k| k.0).collect();
        running_tasks.sort();
        running_tasks.dedup();
        let latency = self.latency.load(Ordering::Relaxed);
        let heartbeat = WorkerHeartbeat {
            worker_id: worker.id.clone(),
            sequence: worker.heartbeat_sequence,
            gpus,
            running_tasks,
            latency_us: (latency > 0).then_some(latency),
        };
        let record = EventRecord::new(worker.producer.clone(), heartbeat);
        self.report.heartbeats += 1;
        self.publish(record, None).await
    }
}

/// Fetches allocation frames and hands their events to the fleet's loop, acking each batch once handed over
/// (as an agent acks once its allocations are queued).
async fn read_allocations(
    consumer: FrameConsumer,
    codec: events::CodecConfig,
    frames: mpsc::Sender<Vec<EventRecord>>,
    undecodable: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let fetched = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            fetched = consumer.fetch(FETCH_BATCH, FETCH_WAIT) => fetched,
        };
        let batch = match fetched {
            Ok(batch) => {
                backoff = Duration::from_millis(100);
                batch
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet: fetching allocations failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for frame in &batch.frames {
            match frame.decode(&codec) {
                Ok(records) => {
                    if frames.send(records).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sequence = frame.stream_sequence, error = %e, "fleet: undecodable allocation frame");
                }
            }
        }
        if !batch.is_empty()
            && let Err(e) = batch.ack().await
        {
            // Redelivered after the ack wait; the ledgers recognise the duplicates.
            tracing::warn!(error = %e, "fleet: ack of allocations failed");
        }
    }
}

/// Awaits receipts in publish order and records each stored task step; publishes a task event again when
/// its frame failed (same event id, so readers apply it once).
async fn await_receipts(
    publisher: Publisher,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    clock: Clock,
    samples: mpsc::UnboundedSender<Sample>,
    lost: Arc<AtomicU64>,
) {
    while let Some(p) = pending.recv().await {
        let mut stored = p.receipt.await.map(|_| ());
        if let Some(record) = &p.record {
            let mut backoff = Duration::from_millis(500);
            for _ in 0..OUTCOME_RETRIES {
                let Err(e) = &stored else { break };
                tracing::warn!(kind = record.event.kind(), error = %e, "fleet: task event not stored; publishing it again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                stored = match publisher.publish(record).await {
                    Ok(receipt) => receipt.await.map(|_| ()),
                    Err(e) => Err(e),
                };
            }
            if stored.is_err() {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Ok(()), Some((task, step))) = (stored, p.step) {
            let _ = samples.send((task, step, clock.now()));
        }
    }
}

/// Measures one bus round trip a second (a request nobody answers; the server says "no responders").
async fn measure_round_trip(
    client: async_nats::Client,
    latency: Arc<AtomicU32>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(us) = node_agent::round_trip(&client).await {
            latency.store(us.max(1), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(id: &str) -> WorkerPlan {
        WorkerPlan {
            id: id.into(),
            gpus: 4,
            max_concurrent: 2,
            price_per_gpu_second: 1_500,
            model_tags: vec!["m".into()],
        }
    }

    #[test]
    fn a_registration_is_labelled_simulated_and_payable() {
        let r = registration(&plan("sim-00001")).unwrap();
        assert_eq!(r.gpus.len(), 4);
        assert!(r.gpus.iter().all(|g| g.simulated));
        assert_eq!(r.max_concurrent_tasks, 2);
        assert_eq!(r.price_per_gpu_second, Nanoton(1_500));
        // The settler pays only addresses that parse.
        assert!(tonlib_core::TonAddress::from_base64_url(&r.payout_address).is_ok());
        assert_ne!(r.payout_address, payout_address("sim-00002"));
        assert!(registration(&plan("bad id with spaces")).is_err());
    }

    #[test]
    fn the_clock_counts_from_its_start() {
        let clock = Clock::start();
        let a = clock.now();
        let b = clock.at(Instant::now());
        assert!(b >= a);
        assert_eq!(clock.at(clock.0), 0);
    }
}
