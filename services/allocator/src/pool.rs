//! The allocator's in-memory pool: workers with capacity, telemetry and verdicts, waiting tasks, and the
//! allocations it holds reservations for. Pure: no IO, time comes in as an argument, so every rule here is
//! unit-tested and the same code rebuilds the state from the log on a standby.
//!
//! - [`Pool::apply`] folds an event from any stream into the state. Events of different streams may arrive in
//!   any interleaving (a standby reads ALLOCATIONS and TASKS concurrently), so a task only moves forward by
//!   (attempt, phase), and a reservation is taken and released at most once per attempt.
//! - [`Pool::allocate`] places waiting tasks in queue order (batch allocation) and returns the decisions; the
//!   caller publishes them. [`Pool::tick`] returns what time decided: lost workers, requeues, expiries. Both
//!   apply their own events to the state before returning them, and applying them again from the log is a
//!   no-op.
//!
//! Finding the best worker without scoring them all: every score component but affinity depends on the worker
//! alone, so eligible workers are kept ordered by that base score (`index`), and, per model tag, the workers
//! that recently ran the tag (`by_tag`). The best fit is the better of the first fitting worker in `index`
//! (whose affinity may be 0 or 1) and the first fitting worker in `by_tag[tag]` (affinity 1): no other worker
//! can score higher.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use events::allocations::{AllocationRevoked, ScoreBreakdown, TaskAllocated};
use events::payload::{Requirements, TaskSpec};
use events::tasks::{RequeueReason, TaskExpired, TaskRejected, TaskRequeued};
use events::workers::WorkerLost;
use events::{
    ClientId, Envelope, Event, EventRecord, Nanoton, ProducerId, TaskId, Timestamp, WorkerId,
};

use crate::queue::TaskQueue;
use crate::recent::RecentSet;
use crate::scoring::{self, GpuSlot, Misfit, Offer, WorkerLoad};

/// Pool rules.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// A worker not heard from for this long is lost, and its tasks are requeued.
    pub heartbeat_timeout: Duration,
    /// Attempts a task gets before it expires.
    pub max_attempts: u32,
    /// Development only: admit workers without a valid attestation.
    pub allow_unattested: bool,
    /// A waiting task counts one band higher per interval waited.
    pub aging_interval: Duration,
    /// Added to a task's own timeout before the allocator takes the attempt back.
    pub timeout_grace: Duration,
    /// A task no registered worker could ever fit is rejected once it has waited this long (workers may
    /// still be registering when a task arrives).
    pub reject_after: Duration,
    /// Tasks looked at per allocation round.
    pub batch_size: usize,
    /// Completed tasks remembered per worker for affinity.
    pub affinity_memory: usize,
    /// A finished task is remembered (so that a late or repeated event about it changes nothing) for this
    /// long of log time, then forgotten: the allocator's memory stays bounded however long it runs. Well
    /// past the streams' 2-minute duplicate window and a lease's lifetime, the spans within which such an
    /// event can arrive.
    pub finished_retention: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(10),
            max_attempts: 3,
            allow_unattested: false,
            aging_interval: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(5),
            reject_after: Duration::from_secs(10),
            batch_size: 1024,
            affinity_memory: 4,
            finished_retention: Duration::from_secs(600),
        }
    }
}

type Slot = u32;
/// Index key: base score (non-negative f64 bits order like the values), best first.
type Key = (Reverse<u64>, Slot);

#[derive(Debug, Clone)]
struct Worker {
    id: WorkerId,
    registered: bool,
    gpus: Vec<GpuSlot>,
    price: Nanoton,
    max_concurrent: u32,
    model_tags: Vec<String>,
    draining: bool,
    deregistered: bool,
    /// Set by WorkerLost: the heartbeat time it was declared lost at; a newer heartbeat revives it.
    lost_at_heartbeat: Option<Timestamp>,
    last_seen: Timestamp,
    latency_us: Option<u32>,
    attested_until: Option<Timestamp>,
    /// Attempts holding a reservation here.
    tasks: HashSet<TaskId>,
    mean_task_ms: Option<f64>,
    recent_tags: VecDeque<String>,
    key: Option<Key>,
    /// The tags `key` is filed under in `by_tag` (what `recent_tags` was when it was filed).
    indexed_tags: Vec<String>,
    /// Sequence of the newest heartbeat: it counts up within one agent run, so a lower one means the agent
    /// restarted.
    heartbeat_sequence: u64,
    /// When a restart was seen: attempts it held from before then died with the old run.
    restarted_at: Option<Timestamp>,
}

impl Worker {
    fn new(id: WorkerId, seen: Timestamp) -> Self {
        Self {
            id,
            registered: false,
            gpus: Vec::new(),
            price: Nanoton(0),
            max_concurrent: 0,
            model_tags: Vec::new(),
            draining: false,
            deregistered: false,
            lost_at_heartbeat: None,
            last_seen: seen,
            latency_us: None,
            attested_until: None,
            tasks: HashSet::new(),
            mean_task_ms: None,
            recent_tags: VecDeque::new(),
            key: None,
            indexed_tags: Vec::new(),
            heartbeat_sequence: 0,
            restarted_at: None,
        }
    }

    fn running(&self) -> u32 {
        u32::try_from(self.tasks.len()).unwrap_or(u32::MAX)
    }

    fn load(&self) -> WorkerLoad<'_> {
        WorkerLoad {
            gpus: &self.gpus,
            running: self.running(),
            max_concurrent: self.max_concurrent,
            mean_task_ms: self.mean_task_ms,
            latency_us: self.latency_us,
        }
    }

    fn offer(&self) -> Offer<'_> {
        Offer {
            gpus: &self.gpus,
            price_per_gpu_second: self.price,
            model_tags: &self.model_tags,
        }
    }

    fn present(&self) -> bool {
        self.registered && !self.gone()
    }

    /// Lost or deregistered: what it holds must be taken back. (A worker whose registration is not in the
    /// log, e.g. older than the WORKERS retention, is not gone while it heartbeats; it gets no new work.)
    fn gone(&self) -> bool {
        self.deregistered || self.lost_at_heartbeat.is_some()
    }

    fn attested(&self, now: Timestamp) -> bool {
        self.attested_until.is_some_and(|until| until > now)
    }
}

/// Where a task is in its life, ordered: a task only moves to a greater (attempt, phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Waiting in the queue for attempt `attempt`.
    Waiting = 0,
    Allocated = 1,
    Started = 2,
    /// The attempt ended; `retry` says whether the allocator still has to requeue it.
    Ended = 3,
}

#[derive(Debug, Clone)]
struct Reservation {
    slot: Slot,
    attempt: u32,
    gpus: Vec<u32>,
    memory_mib: u64,
}

#[derive(Debug, Clone)]
struct Task {
    client: ClientId,
    spec: TaskSpec,
    attempt: u32,
    phase: Phase,
    /// When the current phase began: queued, allocated or started.
    since: Timestamp,
    worker: Option<WorkerId>,
    reservation: Option<Reservation>,
    /// Set when an attempt ended with a retryable failure: the reason the allocator will requeue with.
    retry: Option<RequeueReason>,
    /// The event that created the task, for causation of what the allocator emits about it.
    cause: Envelope,
    unfit_checked_at: Option<Timestamp>,
}

/// Counts for status output and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub workers_known: usize,
    pub workers_eligible: usize,
    pub tasks_waiting: usize,
    pub tasks_in_flight: usize,
    pub waiting_by_band: [usize; 3],
    /// Finished tasks remembered (for `finished_retention`).
    pub finished_remembered: usize,
}

/// The allocator's state.
#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    producer: ProducerId,
    workers: Vec<Worker>,
    slots: HashMap<WorkerId, Slot>,
    index: BTreeSet<Key>,
    by_tag: HashMap<String, BTreeSet<Key>>,
    tasks: HashMap<TaskId, Task>,
    queue: TaskQueue<TaskId>,
    /// Tasks in a final state, for `finished_retention`: later events about them change nothing.
    finished: RecentSet<TaskId>,
    /// Highest allocator epoch seen in the log.
    epoch_seen: u64,
    /// Workers' reports about an attempt not known to be placed yet (its allocation not read: the streams are
    /// read side by side), applied when it is; at most [`MAX_PARKED_PER_TASK`] per task, dropped when the
    /// task finishes.
    parked: HashMap<TaskId, Vec<(EventRecord, Timestamp)>>,
}

/// Reports kept per task while their attempt's allocation is not read; more are dropped (and counted).
const MAX_PARKED_PER_TASK: usize = 8;

impl Pool {
    pub fn new(config: PoolConfig, producer: ProducerId) -> Self {
        let queue = TaskQueue::new(config.aging_interval);
        let finished = RecentSet::new(config.finished_retention);
        Self {
            config,
            producer,
            workers: Vec::new(),
            slots: HashMap::new(),
            index: BTreeSet::new(),
            by_tag: HashMap::new(),
            tasks: HashMap::new(),
            queue,
            finished,
            epoch_seen: 0,
            parked: HashMap::new(),
        }
    }

    /// The highest allocator epoch found on an allocation in the log.
    pub fn epoch_seen(&self) -> u64 {
        self.epoch_seen
    }

    pub fn stats(&self) -> PoolStats {
        let waiting_by_band = [
            self.queue.len_of(crate::queue::Band::High),
            self.queue.len_of(crate::queue::Band::Medium),
            self.queue.len_of(crate::queue::Band::Low),
        ];
        PoolStats {
            workers_known: self.workers.iter().filter(|w| w.present()).count(),
            workers_eligible: self.index.len(),
            tasks_waiting: self.queue.len(),
            tasks_in_flight: self.tasks.len() - self.queue.len(),
            waiting_by_band,
            finished_remembered: self.finished.len(),
        }
    }

    /// Whether `task` is waiting in the queue.
    pub fn is_waiting(&self, task: &TaskId) -> bool {
        self.queue.contains(task)
    }

    /// Whether a worker's report about `attempt` of `task` must not be applied now (anyone with a worker's
    /// credentials can name any task and attempt):
    /// - an attempt known to be placed on another worker: ignored;
    /// - an attempt not known to be placed (a later one, or the current one while the task waits): kept until
    ///   that allocation is read (the streams are read side by side), then applied, or never; at most
    ///   [`MAX_PARKED_PER_TASK`] per task.
    ///
    /// A report about an earlier attempt, or about a task not known, is left to `advance`.
    fn withheld(
        &mut self,
        record: &EventRecord,
        stored_at: Timestamp,
        task: &TaskId,
        attempt: u32,
        worker: &WorkerId,
    ) -> bool {
        let Some(t) = self.tasks.get(task) else {
            return false;
        };
        if attempt < t.attempt {
            return false;
        }
        if attempt == t.attempt && t.phase != Phase::Waiting {
            let foreign = t.worker.as_ref().is_some_and(|w| w != worker);
            if foreign {
                tracing::warn!(%task, attempt, %worker, "a report about an attempt another worker holds; ignored");
                metrics::counter!("allocator_foreign_reports_total").increment(1);
            }
            return foreign;
        }
        let parked = self.parked.entry(*task).or_default();
        if parked.len() < MAX_PARKED_PER_TASK {
            parked.push((record.clone(), stored_at));
        } else {
            tracing::warn!(%task, attempt, "too many reports about attempts not placed; dropped");
            metrics::counter!("allocator_unplaced_reports_dropped_total").increment(1);
        }
        true
    }

    /// The worker currently holding `task`'s attempt, if any.
    pub fn holder(&self, task: &TaskId) -> Option<&WorkerId> {
        let slot = self.tasks.get(task)?.reservation.as_ref()?.slot;
        Some(&self.workers[slot as usize].id)
    }

    /// Folds one event into the state. Events the allocator does not use are ignored. Times are the events'
    /// own (the allocator's decisions, applied as it makes them, and tests); see [`Pool::apply_stored`] for
    /// events read from the log.
    pub fn apply(&mut self, record: &EventRecord) {
        self.apply_stored(record, record.envelope.occurred_at);
    }

    /// [`Pool::apply`], with `stored_at` (when the server stored the frame) as the event's time: when a task
    /// queued (its aging), when an attempt started (its timeout, a worker's restart), when a worker was last
    /// heard from. A sender's clock that drifts (a client's far ahead, a worker's behind) must not starve
    /// the queue, revoke attempts at once or keep a dead worker alive.
    pub fn apply_stored(&mut self, record: &EventRecord, stored_at: Timestamp) {
        let at = stored_at;
        match &record.event {
            Event::TaskSubmitted(e) => {
                if self.finished.contains(&e.task_id) || self.tasks.contains_key(&e.task_id) {
                    return;
                }
                let task = Task {
                    client: e.client_id.clone(),
                    spec: e.spec.clone(),
                    attempt: 1,
                    phase: Phase::Waiting,
                    since: at,
                    worker: None,
                    reservation: None,
                    retry: None,
                    cause: record.envelope.clone(),
                    unfit_checked_at: None,
                };
                self.queue.push(e.task_id, e.spec.priority, at);
                self.tasks.insert(e.task_id, task);
            }
            Event::TaskAllocated(e) => {
                self.epoch_seen = self.epoch_seen.max(e.allocator_epoch);
                if self.finished.contains(&e.task_id) {
                    return;
                }
                // The allocation carries the spec: it can stand in for a submission not read yet.
                self.tasks.entry(e.task_id).or_insert_with(|| Task {
                    client: e.client_id.clone(),
                    spec: e.spec.clone(),
                    attempt: e.attempt,
                    phase: Phase::Waiting,
                    since: at,
                    worker: None,
                    reservation: None,
                    retry: None,
                    cause: record.envelope.clone(),
                    unfit_checked_at: None,
                });
                self.advance(
                    e.task_id,
                    e.attempt,
                    Phase::Allocated,
                    at,
                    Some((&e.worker_id, &e.gpu_indices)),
                );
                // Reports read before this allocation are judged now.
                if let Some(reports) = self.parked.remove(&e.task_id) {
                    for (report, stored_at) in reports {
                        self.apply_stored(&report, stored_at);
                    }
                }
            }
            Event::TaskStarted(e) => {
                if self.withheld(record, stored_at, &e.task_id, e.attempt, &e.worker_id) {
                    return;
                }
                self.advance(
                    e.task_id,
                    e.attempt,
                    Phase::Started,
                    at,
                    Some((&e.worker_id, &e.gpu_indices)),
                );
            }
            Event::TaskCompleted(e) => {
                if self.withheld(record, stored_at, &e.task_id, e.attempt, &e.worker_id) {
                    return;
                }
                let tag = self
                    .tasks
                    .get(&e.task_id)
                    .and_then(|t| t.spec.requirements.model_tag.clone());
                if self.advance(e.task_id, e.attempt, Phase::Ended, at, None) {
                    self.learn(&e.worker_id, e.usage.wall_ms, tag);
                    self.finish(e.task_id, stored_at);
                }
            }
            Event::TaskFailed(e) => {
                if let Some(worker) = &e.worker_id
                    && self.withheld(record, stored_at, &e.task_id, e.attempt, worker)
                {
                    return;
                }
                if !self.advance(e.task_id, e.attempt, Phase::Ended, at, None) {
                    return;
                }
                if !e.retryable {
                    self.finish(e.task_id, stored_at);
                } else if let Some(t) = self.tasks.get_mut(&e.task_id) {
                    t.retry = Some(RequeueReason::RetryableFailure);
                }
            }
            Event::TaskRequeued(e) => {
                let next = e.attempt.saturating_add(1);
                self.advance(e.task_id, next, Phase::Waiting, at, None);
            }
            Event::TaskCancelled(e) => self.finish(e.task_id, stored_at),
            Event::TaskExpired(e) => self.finish(e.task_id, stored_at),
            Event::TaskRejected(e) => self.finish(e.task_id, stored_at),
            Event::AllocationRevoked(e) => {
                self.epoch_seen = self.epoch_seen.max(e.allocator_epoch);
                // The attempt is over for the worker; the requeue (or expiry) that goes with it follows on
                // TASKS. Release now so the capacity is not held until then.
                if let Some(t) = self.tasks.get(&e.task_id)
                    && t.attempt == e.attempt
                {
                    self.release(e.task_id);
                }
            }
            Event::WorkerRegistered(e) => {
                let slot = self.slot(&e.worker_id, at);
                let w = &mut self.workers[slot as usize];
                w.registered = true;
                w.deregistered = false;
                w.draining = false;
                w.lost_at_heartbeat = None;
                w.last_seen = w.last_seen.max(stored_at);
                w.price = e.price_per_gpu_second;
                w.max_concurrent = e.max_concurrent_tasks;
                w.model_tags = e.model_tags.clone();
                w.gpus = e
                    .gpus
                    .iter()
                    .map(|g| GpuSlot {
                        index: g.index,
                        memory_total_mib: g.memory_total_mib,
                        memory_used_mib: 0,
                        memory_reserved_mib: 0,
                        utilization_pct: 0,
                    })
                    .collect();
                // Reservations made before the registration was read (a standby reads streams side by
                // side) are counted again on the GPUs as now registered.
                let held: Vec<(Vec<u32>, u64)> = w
                    .tasks
                    .iter()
                    .filter_map(|id| self.tasks.get(id)?.reservation.as_ref())
                    .map(|r| (r.gpus.clone(), r.memory_mib))
                    .collect();
                let w = &mut self.workers[slot as usize];
                for (gpus, mib) in held {
                    for g in w.gpus.iter_mut().filter(|g| gpus.contains(&g.index)) {
                        g.memory_reserved_mib = g.memory_reserved_mib.saturating_add(mib);
                    }
                }
                self.reindex(slot, at);
            }
            Event::WorkerHeartbeat(e) => {
                let slot = self.slot(&e.worker_id, at);
                let w = &mut self.workers[slot as usize];
                if stored_at < w.last_seen {
                    return;
                }
                w.last_seen = stored_at;
                if e.sequence < w.heartbeat_sequence {
                    w.restarted_at = Some(stored_at);
                }
                w.heartbeat_sequence = e.sequence;
                if w.lost_at_heartbeat.is_some_and(|lost| stored_at > lost) {
                    w.lost_at_heartbeat = None;
                }
                if e.latency_us.is_some() {
                    w.latency_us = e.latency_us;
                }
                for t in &e.gpus {
                    if let Some(g) = w.gpus.iter_mut().find(|g| g.index == t.index) {
                        g.memory_used_mib = t.memory_used_mib;
                        g.utilization_pct = t.utilization_pct;
                    }
                }
                self.reindex(slot, at);
            }
            Event::WorkerDraining(e) => {
                let slot = self.slot(&e.worker_id, at);
                self.workers[slot as usize].draining = true;
                self.reindex(slot, at);
            }
            Event::WorkerDeregistered(e) => {
                let slot = self.slot(&e.worker_id, at);
                self.workers[slot as usize].deregistered = true;
                self.reindex(slot, at);
            }
            Event::WorkerLost(e) => {
                let slot = self.slot(&e.worker_id, at);
                let w = &mut self.workers[slot as usize];
                if w.last_seen <= e.last_heartbeat_at {
                    w.lost_at_heartbeat = Some(e.last_heartbeat_at);
                }
                self.reindex(slot, at);
            }
            Event::AttestationVerified(e) => {
                let slot = self.slot(&e.worker_id, at);
                self.workers[slot as usize].attested_until = Some(e.valid_until);
                self.reindex(slot, at);
            }
            Event::AttestationRejected(e) => {
                let slot = self.slot(&e.worker_id, at);
                self.workers[slot as usize].attested_until = None;
                self.reindex(slot, at);
            }
            _ => {}
        }
    }

    /// Places waiting tasks, best worker by score, in queue order; at most `batch_size` looked at. Returns
    /// the allocations (already applied) and the rejections of tasks no worker could ever fit.
    pub fn allocate(&mut self, now: Timestamp, epoch: u64) -> Vec<EventRecord> {
        let mut out = Vec::new();
        if self.queue.is_empty() {
            return out;
        }
        // Needs that found no worker this round: a task needing at least as much cannot fit either, so it
        // skips the search (which, in a full pool, would look at every worker).
        let mut failed: Vec<Requirements> = Vec::new();
        let mut failed_price: Vec<Nanoton> = Vec::new();
        // Look past tasks that cannot be placed now (so small tasks are not stuck behind big ones), but
        // search for at most `batch_size` of them per round.
        let mut searches = 0;
        for task_id in self
            .queue
            .peek_order(now, self.config.batch_size.saturating_mul(8))
        {
            if searches >= self.config.batch_size {
                break;
            }
            let Some(spec) = self.tasks.get(&task_id).map(|t| &t.spec) else {
                continue;
            };
            if spec.requirements.gpu_count == 0 {
                let record = self.reject(task_id, "invalid task: it asks for 0 GPUs".into(), now);
                if let Some(record) = record {
                    self.apply(&record);
                    out.push(record);
                }
                continue;
            }
            let hopeless = failed.iter().zip(&failed_price).any(|(f, price)| {
                let r = &spec.requirements;
                f.gpu_count <= r.gpu_count
                    && f.gpu_memory_mib <= r.gpu_memory_mib
                    && *price >= spec.max_price_per_gpu_second
                    && (f.model_tag.is_none() || f.model_tag == r.model_tag)
            });
            let found = if hopeless {
                None
            } else {
                searches += 1;
                let found = self.best_for(&task_id, now);
                if found.is_none() && failed.len() < 64 {
                    failed.push(spec.requirements.clone());
                    failed_price.push(spec.max_price_per_gpu_second);
                }
                found
            };
            match found {
                Some((slot, gpus, score)) => {
                    let record = self.allocation(task_id, slot, gpus, score, epoch, now);
                    self.apply(&record);
                    out.push(record);
                }
                None => {
                    if let Some(record) = self.rejection(&task_id, now) {
                        self.apply(&record);
                        out.push(record);
                    }
                }
            }
        }
        out
    }

    /// What the passing of time decides at `now`: workers lost, attempts taken back and requeued or expired.
    /// The events are applied before they are returned.
    pub fn tick(&mut self, now: Timestamp, epoch: u64) -> Vec<EventRecord> {
        let mut out = Vec::new();
        let timeout = self.config.heartbeat_timeout;
        for slot in 0..self.workers.len() {
            let w = &self.workers[slot];
            if !w.gone()
                && (w.registered || !w.tasks.is_empty())
                && w.last_seen.saturating_add(timeout) < now
            {
                let mut lost = EventRecord::new(
                    self.producer.clone(),
                    WorkerLost {
                        worker_id: w.id.clone(),
                        last_heartbeat_at: w.last_seen,
                    },
                );
                lost.envelope.occurred_at = now;
                self.apply(&lost);
                out.push(lost);
            }
        }
        let mut take_back = Vec::new();
        for (id, t) in &self.tasks {
            match t.phase {
                Phase::Allocated | Phase::Started => match &t.reservation {
                    // Revoked (its requeue was not stored, e.g. the holder died in between): now.
                    None => take_back.push((*id, RequeueReason::Revoked)),
                    Some(r) if self.workers[r.slot as usize].gone() => {
                        take_back.push((*id, RequeueReason::WorkerLost));
                    }
                    // Its agent restarted after this attempt reached it: the new run does not have it.
                    Some(r)
                        if self.workers[r.slot as usize]
                            .restarted_at
                            .is_some_and(|restart| t.since < restart) =>
                    {
                        take_back.push((*id, RequeueReason::WorkerLost));
                    }
                    // A timeout of 0 means none (as the agent reads it).
                    Some(_) if t.spec.timeout_ms > 0 => {
                        let deadline = t
                            .since
                            .saturating_add(Duration::from_millis(t.spec.timeout_ms))
                            .saturating_add(self.config.timeout_grace);
                        if deadline < now {
                            take_back.push((*id, RequeueReason::TimedOut));
                        }
                    }
                    Some(_) => {}
                },
                Phase::Ended => {
                    if let Some(reason) = t.retry.clone() {
                        take_back.push((*id, reason));
                    }
                }
                Phase::Waiting => {}
            }
        }
        take_back.sort_by_key(|(id, _)| *id);
        for (id, reason) in take_back {
            for record in self.take_back(id, reason, now, epoch) {
                self.apply(&record);
                out.push(record);
            }
        }
        out
    }

    /// Ends the current attempt of `id` for `reason`: revoke it from its worker if it still runs there, then
    /// requeue it, or expire it when it has had its attempts.
    fn take_back(
        &self,
        id: TaskId,
        reason: RequeueReason,
        now: Timestamp,
        epoch: u64,
    ) -> Vec<EventRecord> {
        let Some(t) = self.tasks.get(&id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if matches!(t.phase, Phase::Allocated | Phase::Started)
            && let Some(worker) = &t.worker
        {
            out.push(emit(
                &self.producer,
                &t.cause,
                now,
                AllocationRevoked {
                    task_id: id,
                    worker_id: worker.clone(),
                    attempt: t.attempt,
                    allocator_epoch: epoch,
                    reason: match reason {
                        RequeueReason::WorkerLost => "worker lost".to_owned(),
                        RequeueReason::TimedOut => {
                            format!("timed out after {} ms", t.spec.timeout_ms)
                        }
                        _ => "revoked".to_owned(),
                    },
                },
            ));
        }
        if t.attempt >= self.config.max_attempts {
            out.push(emit(
                &self.producer,
                &t.cause,
                now,
                TaskExpired {
                    task_id: id,
                    attempts: t.attempt,
                    deadline: now,
                },
            ));
        } else {
            out.push(emit(
                &self.producer,
                &t.cause,
                now,
                TaskRequeued {
                    task_id: id,
                    attempt: t.attempt,
                    previous_worker: t.worker.clone(),
                    reason,
                },
            ));
        }
        out
    }

    /// Moves a task forward to (attempt, phase) if that is ahead of where it is; returns whether it moved.
    fn advance(
        &mut self,
        id: TaskId,
        attempt: u32,
        phase: Phase,
        at: Timestamp,
        placed: Option<(&WorkerId, &Vec<u32>)>,
    ) -> bool {
        let Some(t) = self.tasks.get_mut(&id) else {
            return false;
        };
        if (attempt, phase) <= (t.attempt, t.phase) {
            return false;
        }
        let new_attempt = attempt != t.attempt;
        t.attempt = attempt;
        t.phase = phase;
        t.since = at;
        t.retry = None;
        if new_attempt || phase == Phase::Waiting {
            t.worker = None;
        }
        if let Some((worker, _)) = placed {
            t.worker = Some(worker.clone());
        }
        let priority = t.spec.priority;
        let holds_this_attempt = t.reservation.as_ref().is_some_and(|r| r.attempt == attempt);
        match phase {
            Phase::Waiting => {
                self.release(id);
                self.queue.push(id, priority, at);
            }
            Phase::Allocated | Phase::Started => {
                self.queue.remove(&id);
                if !holds_this_attempt {
                    self.release(id);
                    if let Some((worker, gpus)) = placed {
                        self.reserve(id, worker, gpus, attempt, at);
                    }
                }
            }
            Phase::Ended => {
                self.queue.remove(&id);
                self.release(id);
            }
        }
        true
    }

    fn reserve(
        &mut self,
        id: TaskId,
        worker: &WorkerId,
        gpus: &[u32],
        attempt: u32,
        at: Timestamp,
    ) {
        let slot = self.slot(worker, at);
        let Some(t) = self.tasks.get_mut(&id) else {
            return;
        };
        let memory_mib = t.spec.requirements.gpu_memory_mib;
        t.reservation = Some(Reservation {
            slot,
            attempt,
            gpus: gpus.to_vec(),
            memory_mib,
        });
        let w = &mut self.workers[slot as usize];
        w.tasks.insert(id);
        for g in w.gpus.iter_mut().filter(|g| gpus.contains(&g.index)) {
            g.memory_reserved_mib = g.memory_reserved_mib.saturating_add(memory_mib);
        }
        self.reindex(slot, at);
    }

    fn release(&mut self, id: TaskId) {
        let Some(r) = self.tasks.get_mut(&id).and_then(|t| t.reservation.take()) else {
            return;
        };
        let w = &mut self.workers[r.slot as usize];
        w.tasks.remove(&id);
        for g in w.gpus.iter_mut().filter(|g| r.gpus.contains(&g.index)) {
            g.memory_reserved_mib = g.memory_reserved_mib.saturating_sub(r.memory_mib);
        }
        let seen = w.last_seen;
        self.reindex(r.slot, seen);
    }

    /// Ends a task; `at` is the log's time (when the server stored the event that ended it).
    fn finish(&mut self, id: TaskId, at: Timestamp) {
        self.parked.remove(&id);
        self.release(id);
        self.queue.remove(&id);
        self.tasks.remove(&id);
        self.finished.insert(id, at);
    }

    /// A completed task teaches the worker's history and affinity.
    fn learn(&mut self, worker: &WorkerId, wall_ms: u64, tag: Option<String>) {
        let Some(&slot) = self.slots.get(worker) else {
            return;
        };
        let w = &mut self.workers[slot as usize];
        let ms = wall_ms as f64;
        w.mean_task_ms = Some(w.mean_task_ms.map_or(ms, |m| 0.8 * m + 0.2 * ms));
        if let Some(tag) = tag {
            if let Some(pos) = w.recent_tags.iter().position(|t| *t == tag) {
                w.recent_tags.remove(pos);
            }
            w.recent_tags.push_front(tag);
            w.recent_tags.truncate(self.config.affinity_memory.max(1));
        }
        let seen = w.last_seen;
        self.reindex(slot, seen);
    }

    fn slot(&mut self, id: &WorkerId, at: Timestamp) -> Slot {
        if let Some(&slot) = self.slots.get(id) {
            return slot;
        }
        let slot = Slot::try_from(self.workers.len()).expect("fewer than 2^32 workers");
        self.workers.push(Worker::new(id.clone(), at));
        self.slots.insert(id.clone(), slot);
        slot
    }

    /// Puts the worker where its base score says in the indexes, or takes it out when it cannot take work.
    fn reindex(&mut self, slot: Slot, now: Timestamp) {
        let allow_unattested = self.config.allow_unattested;
        let w = &mut self.workers[slot as usize];
        if let Some(old) = w.key.take() {
            self.index.remove(&old);
            for tag in w.indexed_tags.drain(..) {
                if let Some(set) = self.by_tag.get_mut(&tag) {
                    set.remove(&old);
                    if set.is_empty() {
                        self.by_tag.remove(&tag);
                    }
                }
            }
        }
        let tags: Vec<String> = w.recent_tags.iter().cloned().collect();
        let eligible = w.present()
            && !w.draining
            && !w.gpus.is_empty()
            && w.running() < w.max_concurrent
            && (allow_unattested || w.attested(now));
        if !eligible {
            return;
        }
        let key = (Reverse(scoring::base(&w.load()).total.to_bits()), slot);
        w.key = Some(key);
        self.index.insert(key);
        for tag in &tags {
            self.by_tag.entry(tag.clone()).or_default().insert(key);
        }
        w.indexed_tags = tags;
    }

    /// The GPUs `slot` would give the task now, if it can take it.
    fn try_place(&self, slot: Slot, spec: &TaskSpec, now: Timestamp) -> Option<Vec<u32>> {
        let w = &self.workers[slot as usize];
        if w.key.is_none()
            || w.last_seen.saturating_add(self.config.heartbeat_timeout) < now
            || !(self.config.allow_unattested || w.attested(now))
        {
            return None;
        }
        scoring::place(
            &w.offer(),
            &spec.requirements,
            spec.max_price_per_gpu_second,
        )
        .ok()
    }

    fn score(&self, slot: Slot, spec: &TaskSpec) -> ScoreBreakdown {
        let w = &self.workers[slot as usize];
        let affine = spec
            .requirements
            .model_tag
            .as_ref()
            .is_some_and(|tag| w.recent_tags.contains(tag));
        scoring::with_affinity(scoring::base(&w.load()), affine)
    }

    fn best_for(&self, id: &TaskId, now: Timestamp) -> Option<(Slot, Vec<u32>, ScoreBreakdown)> {
        let spec = &self.tasks.get(id)?.spec;
        let first = |set: &BTreeSet<Key>| {
            set.iter()
                .find_map(|&(_, slot)| self.try_place(slot, spec, now).map(|gpus| (slot, gpus)))
        };
        let mut best = first(&self.index).map(|(slot, gpus)| (slot, gpus, self.score(slot, spec)));
        if let Some(tag) = &spec.requirements.model_tag
            && let Some(set) = self.by_tag.get(tag)
            && let Some((slot, gpus)) = first(set)
        {
            let score = self.score(slot, spec);
            if best.as_ref().is_none_or(|(_, _, b)| score.total > b.total) {
                best = Some((slot, gpus, score));
            }
        }
        best
    }

    fn allocation(
        &self,
        id: TaskId,
        slot: Slot,
        gpus: Vec<u32>,
        score: ScoreBreakdown,
        epoch: u64,
        now: Timestamp,
    ) -> EventRecord {
        let t = &self.tasks[&id];
        // Only waiting tasks are placed, and a waiting task's attempt is the one it waits for.
        let attempt = t.attempt;
        emit(
            &self.producer,
            &t.cause,
            now,
            TaskAllocated {
                task_id: id,
                client_id: t.client.clone(),
                worker_id: self.workers[slot as usize].id.clone(),
                attempt,
                allocator_epoch: epoch,
                gpu_indices: gpus,
                score,
                spec: t.spec.clone(),
            },
        )
    }

    /// A rejection for a waiting task that no registered worker could ever fit, once it has waited
    /// `reject_after` (checked again at most once per that period).
    fn rejection(&mut self, id: &TaskId, now: Timestamp) -> Option<EventRecord> {
        let after = self.config.reject_after;
        let t = self.tasks.get(id)?;
        if t.since.saturating_add(after) > now
            || t.unfit_checked_at
                .is_some_and(|c| c.saturating_add(after) > now)
        {
            return None;
        }
        let reason = self.never_fits(&t.spec);
        let t = self.tasks.get_mut(id)?;
        t.unfit_checked_at = Some(now);
        let reason = reason?;
        Some(emit(
            &self.producer,
            &t.cause,
            now,
            TaskRejected {
                task_id: *id,
                reason,
            },
        ))
    }

    fn reject(&self, id: TaskId, reason: String, now: Timestamp) -> Option<EventRecord> {
        let t = self.tasks.get(&id)?;
        Some(emit(
            &self.producer,
            &t.cause,
            now,
            TaskRejected {
                task_id: id,
                reason,
            },
        ))
    }

    /// Why no registered worker could ever take `spec`, or `None` when one could (or none is registered yet).
    pub fn never_fits(&self, spec: &TaskSpec) -> Option<String> {
        let req = &spec.requirements;
        let (mut registered, mut gpus, mut memory, mut price, mut tag) = (0, 0, 0, 0, 0);
        for w in self
            .workers
            .iter()
            .filter(|w| w.registered && !w.deregistered)
        {
            registered += 1;
            match scoring::could_ever_fit(&w.offer(), req, spec.max_price_per_gpu_second) {
                Ok(()) => return None,
                Err(Misfit::TooFewGpus { .. }) => gpus += 1,
                Err(Misfit::NotEnoughMemory { .. }) => memory += 1,
                Err(Misfit::TooExpensive { .. }) => price += 1,
                Err(Misfit::ModelTag { .. }) => tag += 1,
            }
        }
        if registered == 0 {
            return None;
        }
        let model = req
            .model_tag
            .as_ref()
            .map(|t| format!(", model tag {t:?}"))
            .unwrap_or_default();
        Some(format!(
            "no worker in the pool can ever fit this task: it needs {} GPU(s) with {} MiB each{model}, at most \
             {} nanoton per GPU-second; of {registered} registered workers {gpus} have too few GPUs, {memory} \
             too little memory per GPU, {price} a higher price, {tag} do not serve the model",
            req.gpu_count, req.gpu_memory_mib, spec.max_price_per_gpu_second.0,
        ))
    }
}

/// An event the allocator decided at `now`, caused by the event that created the task.
fn emit(
    producer: &ProducerId,
    cause: &Envelope,
    now: Timestamp,
    event: impl Into<Event>,
) -> EventRecord {
    let mut record = EventRecord::caused_by(cause, producer.clone(), event);
    record.envelope.occurred_at = now;
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::GpuMillis;
    use events::attestations::AttestationRejected;
    use events::payload::{Blob, Priority, Requirements};
    use events::tasks::{
        TaskCancelled, TaskCompleted, TaskFailed, TaskStarted, TaskSubmitted, Usage,
    };
    use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
    use proptest::prelude::*;

    const S: i64 = 1_000_000;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_micros(1_800_000_000 * S + secs * S)
    }

    fn rec(event: impl Into<Event>, when: Timestamp) -> EventRecord {
        let mut r = EventRecord::new(ProducerId::new("test").unwrap(), event);
        r.envelope.occurred_at = when;
        r
    }

    fn wid(name: &str) -> WorkerId {
        WorkerId::new(name).unwrap()
    }

    fn pool() -> Pool {
        Pool::new(
            PoolConfig::default(),
            ProducerId::new("allocator-test").unwrap(),
        )
    }

    struct W<'a> {
        name: &'a str,
        gpus: u32,
        mib: u64,
        price: u64,
        max: u32,
        tags: &'a [&'a str],
    }

    /// A worker with one 80 GB GPU at price 1 that serves any model.
    fn one_gpu(name: &str, max: u32) -> W<'_> {
        W {
            name,
            gpus: 1,
            mib: 80_000,
            price: 1,
            max,
            tags: &[],
        }
    }

    fn worker(p: &mut Pool, w: W<'_>, when: Timestamp) {
        let name = w.name;
        register(p, w, when);
        attest(p, name, when);
    }

    fn register(p: &mut Pool, w: W<'_>, when: Timestamp) {
        p.apply(&rec(
            WorkerRegistered {
                worker_id: wid(w.name),
                gpus: (0..w.gpus)
                    .map(|i| GpuInfo {
                        index: i,
                        uuid: format!("{}-{i}", w.name),
                        name: "gpu".into(),
                        memory_total_mib: w.mib,
                        simulated: true,
                    })
                    .collect(),
                price_per_gpu_second: Nanoton(w.price),
                payout_address: "UQ".into(),
                region: "local".into(),
                max_concurrent_tasks: w.max,
                public_key: vec![1; 32],
                agent_version: "t".into(),
                model_tags: w.tags.iter().map(|t| t.to_string()).collect(),
            },
            when,
        ));
    }

    fn attest(p: &mut Pool, name: &str, when: Timestamp) {
        attest_until(p, name, at(1_000_000), when);
    }

    fn attest_until(p: &mut Pool, name: &str, until: Timestamp, when: Timestamp) {
        let [_, mut verdict] = events::sample::stand_in_attestation(&wid(name), until);
        verdict.envelope.occurred_at = when;
        p.apply(&verdict);
    }

    fn heartbeat(
        p: &mut Pool,
        name: &str,
        used: &[(u64, u8)],
        latency_us: Option<u32>,
        when: Timestamp,
    ) {
        p.apply(&rec(
            WorkerHeartbeat {
                worker_id: wid(name),
                sequence: 1,
                gpus: used
                    .iter()
                    .enumerate()
                    .map(|(i, (mib, util))| GpuTelemetry {
                        index: i as u32,
                        memory_used_mib: *mib,
                        memory_total_mib: 80_000,
                        utilization_pct: *util,
                        temperature_c: 40,
                        power_mw: 100_000,
                        process_count: 0,
                    })
                    .collect(),
                running_tasks: vec![],
                latency_us,
            },
            when,
        ));
    }

    fn heartbeat_seq(p: &mut Pool, name: &str, sequence: u64, when: Timestamp) {
        p.apply(&rec(
            WorkerHeartbeat {
                worker_id: wid(name),
                sequence,
                gpus: vec![],
                running_tasks: vec![],
                latency_us: None,
            },
            when,
        ));
    }

    fn spec(gpus: u16, mib: u64, price: u64, priority: u8, tag: Option<&str>) -> TaskSpec {
        TaskSpec {
            requirements: Requirements {
                gpu_count: gpus,
                gpu_memory_mib: mib,
                model_tag: tag.map(str::to_owned),
            },
            priority: Priority::new(priority).unwrap(),
            max_price_per_gpu_second: Nanoton(price),
            timeout_ms: 30_000,
            input: Blob::Inline(vec![]),
        }
    }

    fn submit(p: &mut Pool, spec: TaskSpec, when: Timestamp) -> TaskId {
        let id = TaskId::new();
        submit_as(p, id, spec, when);
        id
    }

    fn submit_as(p: &mut Pool, id: TaskId, spec: TaskSpec, when: Timestamp) {
        p.apply(&rec(
            TaskSubmitted {
                task_id: id,
                client_id: ClientId::new("client").unwrap(),
                spec,
            },
            when,
        ));
    }

    fn completed(
        task: TaskId,
        worker: &str,
        attempt: u32,
        wall_ms: u64,
        when: Timestamp,
    ) -> EventRecord {
        rec(
            TaskCompleted {
                task_id: task,
                worker_id: wid(worker),
                attempt,
                usage: Usage {
                    gpu_millis: GpuMillis(wall_ms),
                    peak_gpu_memory_mib: None,
                    wall_ms,
                },
            },
            when,
        )
    }

    fn started(task: TaskId, worker: &str, attempt: u32, when: Timestamp) -> EventRecord {
        rec(
            TaskStarted {
                task_id: task,
                worker_id: wid(worker),
                attempt,
                gpu_indices: vec![0],
            },
            when,
        )
    }

    fn failed(task: TaskId, worker: &str, attempt: u32, when: Timestamp) -> EventRecord {
        rec(
            TaskFailed {
                task_id: task,
                worker_id: Some(wid(worker)),
                attempt,
                reason: "made up".into(),
                retryable: false,
            },
            when,
        )
    }

    fn allocated(records: &[EventRecord]) -> Vec<(TaskId, String, u32)> {
        records
            .iter()
            .filter_map(|r| match &r.event {
                Event::TaskAllocated(a) => Some((a.task_id, a.worker_id.to_string(), a.attempt)),
                _ => None,
            })
            .collect()
    }

    fn kinds(records: &[EventRecord]) -> Vec<&'static str> {
        records.iter().map(|r| r.event.kind()).collect()
    }

    #[test]
    fn places_on_the_best_scoring_worker_and_carries_the_epoch() {
        let mut p = pool();
        let t0 = at(0);
        for name in ["busy", "idle", "full"] {
            worker(
                &mut p,
                W {
                    name,
                    gpus: 1,
                    mib: 80_000,
                    price: 10,
                    max: 4,
                    tags: &[],
                },
                t0,
            );
        }
        heartbeat(&mut p, "busy", &[(10_000, 90)], Some(1_000), t0);
        heartbeat(&mut p, "idle", &[(10_000, 5)], Some(1_000), t0);
        heartbeat(&mut p, "full", &[(70_000, 5)], Some(1_000), t0);
        let task = submit(&mut p, spec(1, 8_000, 10, 5, None), t0);
        let out = p.allocate(at(1), 7);
        assert_eq!(allocated(&out), vec![(task, "idle".to_owned(), 1)]);
        let Event::TaskAllocated(a) = &out[0].event else {
            unreachable!()
        };
        assert_eq!(a.allocator_epoch, 7);
        assert_eq!(a.gpu_indices, vec![0]);
        assert!(a.score.total > 0.0 && a.score.total <= 1.0);
        assert_eq!(p.holder(&task), Some(&wid("idle")));
        // Allocating again changes nothing: the task is no longer waiting.
        assert!(p.allocate(at(2), 7).is_empty());
    }

    #[test]
    fn candidates_must_be_attested_alive_not_draining_and_fit() {
        let mut p = pool();
        let t0 = at(0);
        worker(
            &mut p,
            W {
                name: "cheap-small",
                gpus: 1,
                mib: 24_000,
                price: 5,
                max: 4,
                tags: &[],
            },
            t0,
        );
        worker(
            &mut p,
            W {
                name: "pricey",
                gpus: 2,
                mib: 80_000,
                price: 50,
                max: 4,
                tags: &[],
            },
            t0,
        );
        worker(
            &mut p,
            W {
                name: "mistral-only",
                gpus: 2,
                mib: 80_000,
                price: 5,
                max: 4,
                tags: &["mistral"],
            },
            t0,
        );
        // Registered but never attested: not a candidate under the default policy.
        register(&mut p, one_gpu("unattested", 4), t0);
        let llama = submit(&mut p, spec(2, 40_000, 10, 5, Some("llama")), t0);
        let mistral = submit(&mut p, spec(2, 40_000, 10, 5, Some("mistral")), t0);
        let small = submit(&mut p, spec(1, 20_000, 10, 5, None), t0);
        let out = p.allocate(at(1), 1);
        let mut got = allocated(&out);
        got.sort();
        let mut want = vec![
            (mistral, "mistral-only".to_owned(), 1),
            (small, "cheap-small".to_owned(), 1),
        ];
        want.sort();
        assert_eq!(got, want);
        assert!(p.is_waiting(&llama));

        // The development policy admits the unattested worker.
        let mut dev = Pool::new(
            PoolConfig {
                allow_unattested: true,
                ..PoolConfig::default()
            },
            ProducerId::new("a").unwrap(),
        );
        register(&mut dev, one_gpu("unattested", 4), t0);
        let t = submit(&mut dev, spec(1, 1, 10, 5, None), t0);
        assert_eq!(
            allocated(&dev.allocate(at(1), 1)),
            vec![(t, "unattested".to_owned(), 1)]
        );
    }

    #[test]
    fn reservations_bound_memory_and_concurrency_and_are_released_once() {
        let mut p = pool();
        let t0 = at(0);
        worker(&mut p, one_gpu("w", 2), t0);
        let a = submit(&mut p, spec(1, 50_000, 10, 5, None), t0);
        let b = submit(&mut p, spec(1, 50_000, 10, 5, None), t0);
        let c = submit(&mut p, spec(1, 10_000, 10, 5, None), t0);
        let out = p.allocate(at(1), 1);
        // a takes 50 GB; b does not fit beside it; c does, and then the worker is at its 2 slots.
        let got: Vec<TaskId> = allocated(&out).into_iter().map(|(t, _, _)| t).collect();
        assert_eq!(got, vec![a, c]);
        assert!(p.is_waiting(&b));
        assert_eq!(p.stats().workers_eligible, 0);
        // a completes: its memory and slot come back, b fits.
        p.apply(&completed(a, "w", 1, 1_000, at(2)));
        // A duplicate completion releases nothing more.
        p.apply(&completed(a, "w", 1, 1_000, at(2)));
        let out = p.allocate(at(3), 1);
        assert_eq!(allocated(&out), vec![(b, "w".to_owned(), 1)]);
        // c fails for good: released, and the worker has room for one more again.
        p.apply(&rec(
            TaskFailed {
                task_id: c,
                worker_id: Some(wid("w")),
                attempt: 1,
                reason: "exit 1".into(),
                retryable: false,
            },
            at(4),
        ));
        assert_eq!(p.stats().workers_eligible, 1);
        let out = p.tick(at(5), 1);
        assert!(
            out.is_empty(),
            "a non-retryable failure is final: {:?}",
            kinds(&out)
        );
    }

    #[test]
    fn a_lost_worker_s_task_is_requeued_and_placed_elsewhere_then_expires_after_max_attempts() {
        let mut p = Pool::new(
            PoolConfig {
                max_attempts: 2,
                ..PoolConfig::default()
            },
            ProducerId::new("a").unwrap(),
        );
        let t0 = at(0);
        worker(&mut p, one_gpu("a", 4), t0);
        heartbeat(&mut p, "a", &[(0, 0)], Some(100), t0);
        let task = submit(&mut p, spec(1, 1_000, 10, 5, None), t0);
        assert_eq!(
            allocated(&p.allocate(at(1), 1)),
            vec![(task, "a".to_owned(), 1)]
        );
        p.apply(&rec(
            TaskStarted {
                task_id: task,
                worker_id: wid("a"),
                attempt: 1,
                gpu_indices: vec![0],
            },
            at(1),
        ));
        worker(&mut p, one_gpu("b", 4), at(8));
        // a is silent past the 10 s timeout; b heartbeats.
        heartbeat(&mut p, "b", &[(0, 0)], None, at(12));
        let out = p.tick(at(12), 1);
        assert_eq!(
            kinds(&out),
            ["WorkerLost", "AllocationRevoked", "TaskRequeued"]
        );
        let Event::TaskRequeued(r) = &out[2].event else {
            unreachable!()
        };
        assert_eq!(
            (r.attempt, r.reason.clone(), r.previous_worker.clone()),
            (1, RequeueReason::WorkerLost, Some(wid("a")))
        );
        // Applying the same events again (as they come back from the log) changes nothing.
        for r in &out {
            p.apply(r);
        }
        assert_eq!(
            allocated(&p.allocate(at(12), 1)),
            vec![(task, "b".to_owned(), 2)]
        );
        // The zombie's late completion of attempt 1 does not end attempt 2.
        p.apply(&completed(task, "a", 1, 1, at(13)));
        assert_eq!(p.holder(&task), Some(&wid("b")));
        // b is lost too: attempt 2 was the last one, so the task expires.
        let out = p.tick(at(30), 1);
        assert_eq!(
            kinds(&out),
            ["WorkerLost", "AllocationRevoked", "TaskExpired"]
        );
        assert_eq!(p.stats().tasks_in_flight, 0);
        assert_eq!(p.stats().tasks_waiting, 0);
    }

    /// A worker's report about an attempt another worker holds (anyone with a worker's credentials can name
    /// any task) changes nothing; the holder's own reports do.
    #[test]
    fn reports_about_an_attempt_another_worker_holds_are_ignored() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        worker(&mut p, one_gpu("intruder", 4), at(0));
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(0));
        let placed = allocated(&p.allocate(at(0), 1));
        assert_eq!(placed.len(), 1);
        let (holder, other) = if placed[0].1 == "w" {
            ("w", "intruder")
        } else {
            ("intruder", "w")
        };
        p.apply(&completed(task, other, 1, 1_000, at(1)));
        p.apply(&failed(task, other, 1, at(1)));
        // Nor about a later attempt, not placed on anyone (kept until its allocation is read, if ever).
        p.apply(&failed(task, other, 2, at(1)));
        p.apply(&completed(task, other, 2, 1_000, at(1)));
        assert_eq!(p.holder(&task).map(WorkerId::as_str), Some(holder));
        p.apply(&completed(task, holder, 1, 1_000, at(2)));
        assert_eq!(p.holder(&task), None, "the holder's completion ends it");

        // A waiting task is not taken over by a worker's report about it.
        let waiting = submit(&mut p, spec(1, 1, 10, 5, None), at(3));
        p.apply(&started(waiting, other, 1, at(3)));
        assert!(p.is_waiting(&waiting), "still waiting for a placement");
    }

    /// The streams are read side by side: a worker's completion read before its attempt's allocation is
    /// applied once the allocation is read.
    #[test]
    fn a_report_read_before_its_allocation_is_applied_with_it() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(0));
        let decided = p.allocate(at(0), 1);
        assert_eq!(allocated(&decided), vec![(task, "w".to_owned(), 1)]);
        // Another instance, replaying the log, reads the completion first.
        let mut replica = pool();
        worker(&mut replica, one_gpu("w", 4), at(0));
        submit_as(&mut replica, task, spec(1, 1, 10, 5, None), at(0));
        replica.apply(&completed(task, "w", 1, 1_000, at(1)));
        assert!(
            replica.is_waiting(&task),
            "kept until the allocation is read"
        );
        for record in &decided {
            replica.apply(record);
        }
        assert!(!replica.is_waiting(&task));
        assert_eq!(replica.holder(&task), None, "completed with its allocation");
    }

    /// Events read from the log count from when the server stored them, not from their senders' clocks: a
    /// worker whose clock is an hour behind does not have its attempt taken back at once.
    #[test]
    fn a_senders_clock_does_not_time_an_attempt() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        let mut s = spec(1, 1, 10, 5, None);
        s.timeout_ms = 2_000;
        let task = submit(&mut p, s, at(0));
        p.allocate(at(0), 1);
        // Stored at 1 s; the worker's clock says an hour earlier.
        p.apply_stored(&started(task, "w", 1, at(1 - 3_600)), at(1));
        heartbeat(&mut p, "w", &[(0, 0)], None, at(8));
        assert!(p.tick(at(8), 1).is_empty(), "timed from the store time");
        assert_eq!(
            kinds(&p.tick(at(9), 1)),
            ["AllocationRevoked", "TaskRequeued"]
        );
    }

    #[test]
    fn an_attempt_past_its_timeout_is_taken_back_and_retryable_failures_are_requeued() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        let mut s = spec(1, 1, 10, 5, None);
        s.timeout_ms = 2_000;
        let task = submit(&mut p, s, at(0));
        p.allocate(at(0), 1);
        p.apply(&started(task, "w", 1, at(1)));
        heartbeat(&mut p, "w", &[(0, 0)], None, at(8));
        // 1 s started + 2 s timeout + 5 s grace = 8 s: not yet at 8, taken back at 9.
        assert!(p.tick(at(8), 1).is_empty());
        let out = p.tick(at(9), 1);
        assert_eq!(kinds(&out), ["AllocationRevoked", "TaskRequeued"]);
        let Event::TaskRequeued(r) = &out[1].event else {
            unreachable!()
        };
        assert_eq!(r.reason, RequeueReason::TimedOut);
        assert_eq!(
            allocated(&p.allocate(at(9), 1)),
            vec![(task, "w".to_owned(), 2)]
        );
        p.apply(&rec(
            TaskFailed {
                task_id: task,
                worker_id: Some(wid("w")),
                attempt: 2,
                reason: "oom".into(),
                retryable: true,
            },
            at(10),
        ));
        let out = p.tick(at(10), 1);
        assert_eq!(kinds(&out), ["TaskRequeued"]);
        let Event::TaskRequeued(r) = &out[0].event else {
            unreachable!()
        };
        assert_eq!(
            (r.attempt, r.reason.clone()),
            (2, RequeueReason::RetryableFailure)
        );
    }

    #[test]
    fn a_task_no_worker_can_ever_fit_is_rejected_with_the_reason() {
        let mut p = pool();
        worker(
            &mut p,
            W {
                name: "w",
                gpus: 2,
                mib: 80_000,
                price: 100,
                max: 4,
                tags: &[],
            },
            at(0),
        );
        let huge = submit(&mut p, spec(4, 1_000, 1_000, 5, None), at(0));
        let busy_now = submit(&mut p, spec(2, 80_000, 1_000, 5, None), at(0));
        heartbeat(&mut p, "w", &[(80_000, 100), (80_000, 100)], None, at(0));
        // Not before reject_after (10 s): workers may still be registering.
        assert!(p.allocate(at(5), 1).is_empty());
        heartbeat(&mut p, "w", &[(80_000, 100), (80_000, 100)], None, at(11));
        let out = p.allocate(at(11), 1);
        assert_eq!(kinds(&out), ["TaskRejected"]);
        let Event::TaskRejected(r) = &out[0].event else {
            unreachable!()
        };
        assert_eq!(r.task_id, huge);
        assert!(
            r.reason.contains("needs 4 GPU(s)") && r.reason.contains("1 have too few GPUs"),
            "{}",
            r.reason
        );
        // The other one could fit once the GPUs free up: it waits.
        assert!(p.is_waiting(&busy_now));
    }

    #[test]
    fn affinity_prefers_a_worker_that_ran_the_model() {
        let mut p = pool();
        for name in ["a", "b"] {
            worker(
                &mut p,
                W {
                    name,
                    gpus: 1,
                    mib: 80_000,
                    price: 1,
                    max: 8,
                    tags: &[],
                },
                at(0),
            );
            heartbeat(&mut p, name, &[(0, 0)], Some(1_000), at(0));
        }
        // b is slightly less loaded than a, so it wins without affinity...
        heartbeat(&mut p, "a", &[(0, 10)], Some(1_000), at(0));
        let t = submit(&mut p, spec(1, 1, 10, 5, Some("llama")), at(0));
        assert_eq!(allocated(&p.allocate(at(0), 1))[0].1, "b");
        p.apply(&completed(t, "b", 1, 60_000, at(1)));
        // ...and now a "llama" task still goes to b (affinity), while an untagged one goes to a, since b's
        // history (60 s per task) costs it more than a's utilization.
        let llama = submit(&mut p, spec(1, 1, 10, 5, Some("llama")), at(2));
        let out = p.allocate(at(2), 1);
        assert_eq!(allocated(&out), vec![(llama, "b".to_owned(), 1)]);
        let Event::TaskAllocated(a) = &out[0].event else {
            unreachable!()
        };
        assert_eq!(a.score.affinity, 1.0);
        let plain = submit(&mut p, spec(1, 1, 10, 5, None), at(3));
        assert_eq!(
            allocated(&p.allocate(at(3), 1)),
            vec![(plain, "a".to_owned(), 1)]
        );
    }

    #[test]
    fn interleaved_streams_reserve_once_per_attempt() {
        // A standby reads TASKS ahead of ALLOCATIONS: the start arrives before the allocation.
        let mut p = pool();
        worker(&mut p, one_gpu("w", 1), at(0));
        let task = submit(&mut p, spec(1, 60_000, 10, 5, None), at(0));
        let mut active = pool();
        worker(&mut active, one_gpu("w", 1), at(0));
        active.apply(&rec(
            TaskSubmitted {
                task_id: task,
                client_id: ClientId::new("client").unwrap(),
                spec: spec(1, 60_000, 10, 5, None),
            },
            at(0),
        ));
        let allocation = active.allocate(at(1), 3).remove(0);
        p.apply(&rec(
            TaskStarted {
                task_id: task,
                worker_id: wid("w"),
                attempt: 1,
                gpu_indices: vec![0],
            },
            at(2),
        ));
        p.apply(&allocation);
        assert_eq!(p.epoch_seen(), 3);
        assert_eq!(p.holder(&task), Some(&wid("w")));
        assert_eq!(p.stats().workers_eligible, 0, "one slot, held once");
        p.apply(&completed(task, "w", 1, 1, at(3)));
        assert_eq!(p.stats().workers_eligible, 1);
        // A late allocation of a finished task is ignored.
        p.apply(&allocation);
        assert_eq!(p.stats().workers_eligible, 1);
        assert!(p.allocate(at(4), 3).is_empty());
    }

    #[test]
    fn a_finished_task_is_remembered_for_the_retention_of_log_time_and_then_forgotten() {
        let mut p = Pool::new(
            PoolConfig {
                finished_retention: Duration::from_secs(60),
                ..PoolConfig::default()
            },
            ProducerId::new("allocator-test").unwrap(),
        );
        worker(&mut p, one_gpu("w", 1), at(0));
        let submitted = |task: TaskId, when: Timestamp| {
            rec(
                TaskSubmitted {
                    task_id: task,
                    client_id: ClientId::new("client").unwrap(),
                    spec: spec(1, 60_000, 10, 5, None),
                },
                when,
            )
        };
        let task = TaskId::new();
        p.apply(&submitted(task, at(0)));
        let (_, _, attempt) = allocated(&p.allocate(at(1), 1)).remove(0);
        p.apply(&completed(task, "w", attempt, 1, at(2)));
        assert_eq!(p.stats().finished_remembered, 1);
        // The same submission stored again within the retention (a producer's retry) is ignored.
        p.apply(&submitted(task, at(50)));
        assert_eq!(p.stats().tasks_waiting, 0);
        // The retention is the server's store time, not the events' own: a worker clock far ahead does not
        // make it forget early.
        let other = TaskId::new();
        p.apply_stored(&submitted(other, at(10_000)), at(55));
        heartbeat(&mut p, "w", &[(0, 0)], None, at(55));
        let (_, _, attempt) = allocated(&p.allocate(at(56), 1)).remove(0);
        p.apply_stored(&completed(other, "w", attempt, 1, at(20_000)), at(57));
        assert_eq!(p.stats().finished_remembered, 2);
        // Past the retention of log time (by one and a half times it at the latest), the first is forgotten:
        // memory stays bounded.
        let third = TaskId::new();
        p.apply_stored(&submitted(third, at(93)), at(93));
        p.apply_stored(
            &rec(
                TaskCancelled {
                    task_id: third,
                    reason: "test".into(),
                },
                at(93),
            ),
            at(93),
        );
        assert_eq!(p.stats().finished_remembered, 2);
        p.apply_stored(&submitted(task, at(94)), at(94));
        assert_eq!(
            p.stats().tasks_waiting,
            1,
            "forgotten: the same id is a new task"
        );
    }

    #[test]
    fn a_full_worker_serves_high_priority_first_and_aged_low_priority_before_newer_high() {
        // One slot, so the queue order is the order of service. Aging: 5 s per band.
        let mut p = pool();
        worker(&mut p, one_gpu("w", 1), at(0));
        let low = submit(&mut p, spec(1, 1, 10, 2, None), at(0));
        let medium = submit(&mut p, spec(1, 1, 10, 5, None), at(0));
        let high = submit(&mut p, spec(1, 1, 10, 9, None), at(0));
        let mut served = Vec::new();
        let mut now = 1;
        let serve = |p: &mut Pool, now: i64| {
            heartbeat(p, "w", &[(0, 0)], None, at(now));
            let (task, _, attempt) = allocated(&p.allocate(at(now), 1)).remove(0);
            p.apply(&rec(
                TaskCompleted {
                    task_id: task,
                    worker_id: wid("w"),
                    attempt,
                    usage: Usage {
                        gpu_millis: GpuMillis(1),
                        peak_gpu_memory_mib: None,
                        wall_ms: 1,
                    },
                },
                at(now),
            ));
            task
        };
        served.push(serve(&mut p, now));
        served.push(serve(&mut p, now));
        assert_eq!(served, vec![high, medium], "bands first");
        // A new high task arrives at 11 s, when the low one has waited 11 s (two bands' worth): the low
        // one goes first, then the newer high one.
        now = 11;
        let newer_high = submit(&mut p, spec(1, 1, 10, 10, None), at(now));
        served.push(serve(&mut p, now));
        served.push(serve(&mut p, now));
        assert_eq!(served, vec![high, medium, low, newer_high]);
    }

    #[test]
    fn verdicts_decide_eligibility_missing_expired_rejected_and_renewed() {
        let mut p = pool();
        register(&mut p, one_gpu("w", 8), at(0));
        let place = |p: &mut Pool, now: i64| {
            heartbeat(p, "w", &[(0, 0)], None, at(now));
            let task = submit(p, spec(1, 1, 10, 5, None), at(now));
            let placed = !allocated(&p.allocate(at(now), 1)).is_empty();
            p.queue.remove(&task);
            placed
        };
        assert!(!place(&mut p, 1), "no verdict yet");
        attest_until(&mut p, "w", at(100), at(2));
        assert!(place(&mut p, 3), "verified, valid until 100 s");
        // Attested again before expiry: still eligible after the first verdict's end.
        attest_until(&mut p, "w", at(200), at(90));
        assert!(place(&mut p, 150));
        // Expired at 200 s: not a candidate, though it heartbeats.
        assert!(!place(&mut p, 201));
        // A rejection ends eligibility at once, whatever the earlier verdict said.
        attest_until(&mut p, "w", at(1_000), at(202));
        assert!(place(&mut p, 203));
        p.apply(&rec(
            AttestationRejected {
                worker_id: wid("w"),
                quote_hash: "h".into(),
                reason: "signature".into(),
            },
            at(204),
        ));
        assert!(!place(&mut p, 205));
    }

    #[test]
    fn a_tag_forgotten_by_affinity_leaves_no_way_onto_a_full_worker() {
        let mut p = Pool::new(
            PoolConfig {
                affinity_memory: 2,
                ..PoolConfig::default()
            },
            ProducerId::new("a").unwrap(),
        );
        worker(&mut p, one_gpu("w", 1), at(0));
        // Three tags through a memory of two: "t0" is forgotten.
        for (i, tag) in ["t0", "t1", "t2"].into_iter().enumerate() {
            let t = submit(&mut p, spec(1, 1, 10, 5, Some(tag)), at(i as i64));
            assert_eq!(allocated(&p.allocate(at(i as i64), 1)).len(), 1);
            p.apply(&completed(t, "w", 1, 1, at(i as i64)));
        }
        // The worker is full now.
        let busy = submit(&mut p, spec(1, 1, 10, 5, None), at(5));
        assert_eq!(allocated(&p.allocate(at(5), 1))[0].0, busy);
        let t0 = submit(&mut p, spec(1, 1, 10, 5, Some("t0")), at(6));
        assert!(p.allocate(at(6), 1).is_empty(), "placed on a full worker");
        assert!(p.is_waiting(&t0));
        assert!(!p.by_tag.contains_key("t0"), "no stale entry left behind");
    }

    #[test]
    fn invalid_and_revoked_tasks_do_not_wait_for_timeouts() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        let zero = submit(&mut p, spec(0, 1, 10, 5, None), at(0));
        let out = p.allocate(at(0), 1);
        assert_eq!(kinds(&out), ["TaskRejected"]);
        let Event::TaskRejected(r) = &out[0].event else {
            unreachable!()
        };
        assert_eq!(r.task_id, zero);
        // A revocation whose requeue never made it to the log (its allocator died in between): the next
        // holder requeues at its first tick, not after the task's timeout.
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(1));
        p.allocate(at(1), 1);
        p.apply(&rec(
            AllocationRevoked {
                task_id: task,
                worker_id: wid("w"),
                attempt: 1,
                allocator_epoch: 1,
                reason: "worker lost".into(),
            },
            at(2),
        ));
        heartbeat(&mut p, "w", &[(0, 0)], None, at(3));
        let out = p.tick(at(3), 2);
        assert_eq!(kinds(&out), ["AllocationRevoked", "TaskRequeued"]);
        assert!(p.is_waiting(&task));
        assert_eq!(p.epoch_seen(), 2, "revocations count for the epoch too");
    }

    #[test]
    fn a_heartbeating_worker_without_a_registration_keeps_what_it_runs() {
        // After a cold start whose log no longer holds the registration (WORKERS retention), the worker's
        // running attempts are not taken back while it heartbeats; it just gets no new work.
        let mut p = pool();
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(0));
        let mut active = pool();
        worker(&mut active, one_gpu("old", 4), at(0));
        active.apply(&rec(
            TaskSubmitted {
                task_id: task,
                client_id: ClientId::new("client").unwrap(),
                spec: spec(1, 1, 10, 5, None),
            },
            at(0),
        ));
        let allocation = active.allocate(at(0), 1).remove(0);
        p.apply(&allocation);
        heartbeat(&mut p, "old", &[(0, 0)], None, at(1));
        assert!(p.tick(at(2), 2).is_empty());
        assert_eq!(p.holder(&task), Some(&wid("old")));
        // Silent past the timeout, it is lost like any other.
        let out = p.tick(at(20), 2);
        assert_eq!(
            kinds(&out),
            ["WorkerLost", "AllocationRevoked", "TaskRequeued"]
        );
    }

    #[test]
    fn an_agent_restart_gives_back_what_the_old_run_held() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(0));
        p.allocate(at(0), 1);
        p.apply(&rec(
            TaskStarted {
                task_id: task,
                worker_id: wid("w"),
                attempt: 1,
                gpu_indices: vec![0],
            },
            at(1),
        ));
        for (seq, t) in [(1, 1), (2, 3), (3, 5)] {
            heartbeat_seq(&mut p, "w", seq, at(t));
        }
        assert!(p.tick(at(5), 1).is_empty());
        // The agent restarted: its heartbeats count from 1 again, well within the heartbeat timeout.
        heartbeat_seq(&mut p, "w", 1, at(6));
        let out = p.tick(at(6), 1);
        assert_eq!(kinds(&out), ["AllocationRevoked", "TaskRequeued"]);
        // The next attempt, placed after the restart, stays.
        assert_eq!(
            allocated(&p.allocate(at(7), 1)),
            vec![(task, "w".to_owned(), 2)]
        );
        heartbeat_seq(&mut p, "w", 2, at(8));
        assert!(p.tick(at(8), 1).is_empty());
    }

    #[test]
    fn small_tasks_are_not_stuck_behind_big_ones_that_cannot_be_placed() {
        let mut p = Pool::new(
            PoolConfig {
                batch_size: 2,
                ..PoolConfig::default()
            },
            ProducerId::new("a").unwrap(),
        );
        worker(
            &mut p,
            W {
                name: "w",
                gpus: 2,
                mib: 80_000,
                price: 1,
                max: 8,
                tags: &[],
            },
            at(0),
        );
        // One of the worker's two GPUs is full: three 2-GPU tasks cannot be placed now, a 1-GPU task can.
        heartbeat(&mut p, "w", &[(0, 0), (80_000, 100)], None, at(0));
        let big: Vec<TaskId> = (0..3)
            .map(|_| submit(&mut p, spec(2, 40_000, 10, 9, None), at(0)))
            .collect();
        let small = submit(&mut p, spec(1, 40_000, 10, 1, None), at(0));
        // Two searches per round: the first big task fails, the other two are skipped as no easier, and
        // the small one (lowest priority, last in line) is placed.
        let out = p.allocate(at(1), 1);
        assert_eq!(allocated(&out), vec![(small, "w".to_owned(), 1)]);
        assert!(big.iter().all(|t| p.is_waiting(t)));
    }

    #[test]
    fn liveness_follows_the_server_s_clock_not_the_agent_s() {
        let mut p = pool();
        worker(&mut p, one_gpu("w", 4), at(0));
        // The agent's clock is an hour behind; the server stored its heartbeats just now.
        for t in [5, 10, 15] {
            let hb = rec(
                WorkerHeartbeat {
                    worker_id: wid("w"),
                    sequence: t as u64,
                    gpus: vec![],
                    running_tasks: vec![],
                    latency_us: None,
                },
                at(t - 3_600),
            );
            p.apply_stored(&hb, at(t));
        }
        assert!(
            p.tick(at(20), 1).is_empty(),
            "heard from 5 s ago by the server's clock"
        );
        let task = submit(&mut p, spec(1, 1, 10, 5, None), at(20));
        assert_eq!(
            allocated(&p.allocate(at(20), 1)),
            vec![(task, "w".to_owned(), 1)]
        );
    }

    proptest! {
        /// The indexed search finds a worker with the highest score among all that fit, as brute force would.
        #[test]
        fn indexed_search_finds_the_best_score(
            workers in proptest::collection::vec((1u32..4, 0u64..80_000, 0u8..100, 0u64..20, 1u32..4, proptest::option::of(0u32..50_000), any::<bool>()), 1..40),
            need in (1u16..3, 0u64..60_000, 0u64..20, proptest::option::of(any::<bool>())),
        ) {
            let mut p = pool();
            for (i, (gpus, used, util, price, max, latency, llama)) in workers.iter().enumerate() {
                let name = format!("w{i}");
                worker(&mut p, W { name: &name, gpus: *gpus, mib: 80_000, price: *price, max: *max, tags: &[] }, at(0));
                let telemetry: Vec<(u64, u8)> = (0..*gpus).map(|_| (*used, *util)).collect();
                heartbeat(&mut p, &name, &telemetry, *latency, at(0));
                if *llama {
                    let t = submit(&mut p, spec(1, 0, 100, 5, Some("llama")), at(0));
                    let out = p.allocate(at(0), 1);
                    if let Some((task, w, _)) = allocated(&out).into_iter().find(|(id, _, _)| *id == t) {
                        p.apply(&rec(TaskCompleted { task_id: task, worker_id: wid(&w), attempt: 1, usage: Usage { gpu_millis: GpuMillis(1), peak_gpu_memory_mib: None, wall_ms: 1_000 } }, at(0)));
                    }
                }
            }
            let tag = need.3.map(|llama| if llama { "llama" } else { "other" });
            let s = spec(need.0, need.1, need.2, 5, tag);
            let brute = (0..p.workers.len() as Slot)
                .filter(|&slot| p.workers[slot as usize].key.is_some() && p.try_place(slot, &s, at(1)).is_some())
                .map(|slot| p.score(slot, &s).total)
                .fold(None, |best: Option<f64>, x| Some(best.map_or(x, |b| b.max(x))));
            let task = submit(&mut p, s, at(1));
            let found = p.best_for(&task, at(1)).map(|(_, _, score)| score.total);
            prop_assert_eq!(found, brute);
        }
    }
}
