//! Pure decision logic: folds a batch of events into one change per row, with the same join rules the
//! SQL upserts apply against the stored row. No IO.
//!
//! Why fold first: one `INSERT … ON CONFLICT DO UPDATE` may not touch a row twice, and a batch often
//! holds several events of one task. Why the same rules in SQL: another stream's projection may have
//! written the row in between, and the join must hold across transactions too.
//!
//! Every join here is commutative, associative and idempotent (a semilattice), so any interleaving of
//! streams, and any redelivery, converges to the same rows. `tests` below check that as a property.

use std::collections::BTreeMap;

use events::{Event, EventRecord, Stream, Timestamp};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Where an event sits in the log: `(stream sequence << 16) | index in frame`, totally ordered per stream.
pub fn position(seq: u64, index: u32) -> i64 {
    i64::try_from((seq << 16) | u64::from(index & 0xffff)).unwrap_or(i64::MAX)
}

/// An event with its place in the log.
#[derive(Debug, Clone, Copy)]
pub struct Positioned<'a> {
    pub stream: Stream,
    pub seq: u64,
    pub index: u32,
    pub record: &'a EventRecord,
}

/// The state part of a task row, ordered by [`TaskState::key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub status: &'static str,
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub failure_reason: Option<String>,
    pub retryable: Option<bool>,
    pub event_id: Uuid,
}

/// Mirrors the generated `status_rank` column.
pub fn status_rank(status: &str) -> i16 {
    match status {
        "submitted" | "requeued" => 0,
        "allocated" => 1,
        "running" => 2,
        _ => 3,
    }
}

/// Mirrors the generated `final` column: final whatever the attempt.
pub fn is_final(status: &str) -> bool {
    matches!(status, "cancelled" | "expired" | "rejected")
}

impl TaskState {
    /// The order in which states win; the SQL compares the same tuple.
    pub fn key(&self) -> (bool, i32, i16, Uuid) {
        let fin = is_final(self.status);
        (
            fin,
            if fin { 0 } else { self.attempt },
            status_rank(self.status),
            self.event_id,
        )
    }
}

/// What a client asked for; set once, identical in every copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub client_id: String,
    pub priority: i16,
    pub gpu_count: i32,
    pub gpu_memory_mib: i64,
    pub model_tag: Option<String>,
    pub max_price_nanoton: i64,
    pub timeout_ms: i64,
    pub submitted_at: i64,
}

/// A change to one `tasks` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskChange {
    pub task_id: Uuid,
    pub submission: Option<Submission>,
    pub state: TaskState,
    /// Highest attempt seen (the row keeps the max).
    pub attempt: i32,
    pub allocated_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub gpu_millis: Option<i64>,
    pub peak_gpu_memory_mib: Option<i64>,
}

fn max_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn min_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl TaskChange {
    /// The join: what both changes together say about the row.
    pub fn join(&mut self, other: TaskChange) {
        if self.submission.is_none() {
            self.submission = other.submission;
        }
        if other.state.key() > self.state.key() {
            self.state = other.state;
        }
        self.attempt = self.attempt.max(other.attempt);
        self.allocated_at = max_opt(self.allocated_at, other.allocated_at);
        self.started_at = max_opt(self.started_at, other.started_at);
        self.finished_at = max_opt(self.finished_at, other.finished_at);
        self.gpu_millis = max_opt(self.gpu_millis, other.gpu_millis);
        self.peak_gpu_memory_mib = max_opt(self.peak_gpu_memory_mib, other.peak_gpu_memory_mib);
    }
}

/// Registration fields of a worker; all or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub region: String,
    pub price_per_gpu_second_nanoton: i64,
    pub payout_address: String,
    pub max_concurrent: i32,
    pub registered_at: i64,
}

/// A change to one `workers` row. All its events share one ordered subject: the later position wins,
/// except that fields an event does not carry keep their value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerChange {
    pub worker_id: String,
    pub position: i64,
    pub registration: Option<Registration>,
    pub status: Option<&'static str>,
    pub running_tasks: Option<i32>,
    pub last_heartbeat_at: Option<i64>,
    pub event_id: Uuid,
}

impl WorkerChange {
    /// Applies `later` on top of `self` (the caller folds in log order).
    pub fn then(&mut self, later: WorkerChange) {
        if later.position < self.position {
            let mut earlier = later;
            std::mem::swap(self, &mut earlier);
            self.then_inner(earlier, false);
        } else {
            self.then_inner(later, true);
        }
    }

    fn then_inner(&mut self, other: WorkerChange, other_is_later: bool) {
        macro_rules! pick {
            ($field:ident) => {
                if other_is_later {
                    if other.$field.is_some() {
                        self.$field = other.$field;
                    }
                } else if self.$field.is_none() {
                    self.$field = other.$field;
                }
            };
        }
        pick!(registration);
        pick!(status);
        pick!(running_tasks);
        pick!(last_heartbeat_at);
        if other_is_later {
            self.position = other.position;
            self.event_id = other.event_id;
        }
    }
}

/// A change to one `worker_gpus` row: static fields from the registration, telemetry from heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuChange {
    pub worker_id: String,
    pub gpu_index: i16,
    pub position: i64,
    pub gpu_uuid: Option<String>,
    pub name: Option<String>,
    pub simulated: Option<bool>,
    pub memory_total_mib: i64,
    pub memory_used_mib: i64,
    pub utilization_pct: i16,
    pub temperature_c: Option<i16>,
    pub power_mw: Option<i64>,
    pub telemetry_at: i64,
}

impl GpuChange {
    fn then(&mut self, later: GpuChange) {
        let (mut newer, older) = if later.position >= self.position {
            (later, self.clone())
        } else {
            (self.clone(), later)
        };
        newer.gpu_uuid = newer.gpu_uuid.or(older.gpu_uuid);
        newer.name = newer.name.or(older.name);
        newer.simulated = newer.simulated.or(older.simulated);
        *self = newer;
    }
}

/// A change to one `attestations` row (id = the submission's event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationChange {
    pub attestation_id: Uuid,
    pub worker_id: String,
    pub quote_hash: String,
    /// `submitted`, `verified` or `rejected`; a verdict outranks the submission.
    pub status: &'static str,
    pub tcb_status: Option<String>,
    pub measurements: Option<serde_json::Value>,
    pub valid_until: Option<i64>,
    pub reason: Option<String>,
    /// The earliest time known for the submission (a verdict alone supplies its own time).
    pub submitted_at: i64,
    pub decided_at: Option<i64>,
    pub event_id: Uuid,
}

impl AttestationChange {
    fn rank(&self) -> (i16, Uuid) {
        (i16::from(self.status != "submitted"), self.event_id)
    }

    fn join(&mut self, other: AttestationChange) {
        let submitted_at = self.submitted_at.min(other.submitted_at);
        if other.rank() > self.rank() {
            *self = other;
        }
        self.submitted_at = submitted_at;
    }
}

/// A new `allocations` row.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationRow {
    pub task_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    pub allocator_epoch: i64,
    pub score: f64,
    pub score_breakdown: serde_json::Value,
    pub gpu_count: i32,
    pub gpu_memory_mib: i64,
    pub allocated_at: i64,
    pub event_id: Uuid,
}

/// A revocation of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub task_id: Uuid,
    pub attempt: i32,
    pub revoked_at: i64,
    pub reason: String,
    pub event_id: Uuid,
}

/// A new `task_results` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRow {
    pub task_id: Uuid,
    pub attempt: i32,
    pub client_id: String,
    pub worker_id: String,
    pub stream_sequence: i64,
    pub size_bytes: i64,
    pub digest: String,
    pub published_at: i64,
    pub event_id: Uuid,
}

/// A new `payment_accruals` row (one per task, first wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccrualRow {
    pub task_id: Uuid,
    pub worker_id: String,
    pub attempt: i32,
    pub amount_nanoton: i64,
    pub gpu_millis: i64,
    pub price_per_gpu_second_nanoton: i64,
    pub accrued_at: i64,
    pub event_id: Uuid,
}

/// A payout inside a prepared settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRow {
    pub settlement_id: Uuid,
    pub worker_id: String,
    pub destination: String,
    pub amount_nanoton: i64,
}

/// A new `settlements` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRow {
    pub settlement_id: Uuid,
    pub wallet_seqno: i64,
    pub valid_until: i64,
    pub message_hash: String,
    pub total_nanoton: i64,
    pub payout_count: i32,
    pub prepared_at: i64,
    pub event_id: Uuid,
}

/// A new `settlement_tasks` row: an accrual that a prepared settlement carries (insert-once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementTaskRow {
    pub settlement_id: Uuid,
    pub task_id: Uuid,
    /// The worker of the payout that lists the task.
    pub worker_id: String,
}

/// A change to one `parked_payouts` row: an accrual held back. The latest park wins, by `(parked_at, event id)`,
/// so a park read again (redelivery, replay) or out of order never replaces a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRow {
    pub task_id: Uuid,
    pub worker_id: String,
    pub destination: String,
    pub reason: String,
    pub parked_at: i64,
    pub event_id: Uuid,
}

impl ParkedRow {
    /// The order in which parks win; the SQL compares the same tuple.
    pub fn key(&self) -> (i64, Uuid) {
        (self.parked_at, self.event_id)
    }

    /// The join: the later park of the two.
    pub fn join(&mut self, other: ParkedRow) {
        if other.key() > self.key() {
            *self = other;
        }
    }
}

/// A later step of a settlement; only ever moves its status forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementStep {
    pub settlement_id: Uuid,
    pub status: &'static str,
    pub at: i64,
    /// The send this step records (`SettlementSubmitted.send_attempt`); 0 for the other steps.
    pub send_attempt: i32,
    pub tx_hash: Option<String>,
    pub tx_lt: Option<i64>,
    pub failure_reason: Option<String>,
    /// Workers whose transfer did not go out (confirmed settlements only).
    pub failed_workers: Vec<(String, String)>,
    pub event_id: Uuid,
}

/// Why an event cannot be applied: permanent, so its frame is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{kind}: value out of range: {what}")]
    OutOfRange { kind: &'static str, what: String },
    #[error("{kind} without a causation id (it must name the submission it answers)")]
    MissingCausation { kind: &'static str },
    #[error("settlement {0} has {1} payouts; a settlement carries 1 to 255")]
    PayoutCount(Uuid, usize),
}

/// Everything one batch changes, one entry per row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub tasks: BTreeMap<Uuid, TaskChange>,
    pub allocations: BTreeMap<(Uuid, i32), AllocationRow>,
    pub revocations: BTreeMap<(Uuid, i32), Revocation>,
    pub results: BTreeMap<(Uuid, i32), ResultRow>,
    pub workers: BTreeMap<String, WorkerChange>,
    pub gpus: BTreeMap<(String, i16), GpuChange>,
    pub attestations: BTreeMap<Uuid, AttestationChange>,
    pub accruals: BTreeMap<Uuid, AccrualRow>,
    pub settlements: BTreeMap<Uuid, SettlementRow>,
    pub payouts: BTreeMap<(Uuid, String), PayoutRow>,
    pub settlement_tasks: BTreeMap<(Uuid, Uuid), SettlementTaskRow>,
    pub parked: BTreeMap<Uuid, ParkedRow>,
    pub settlement_steps: Vec<SettlementStep>,
}

/// A batch's furthest step of one settlement, with what the other steps of the batch add to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducedStep {
    pub step: SettlementStep,
    /// The first send's time, if the batch holds a send.
    pub submitted_at: Option<i64>,
    /// The highest send attempt in the batch (0: none).
    pub sends: i32,
}

fn int<T: TryInto<i64> + Copy + std::fmt::Debug>(
    kind: &'static str,
    what: &str,
    v: T,
) -> Result<i64, ApplyError> {
    v.try_into().map_err(|_| ApplyError::OutOfRange {
        kind,
        what: format!("{what} = {v:?}"),
    })
}

fn int32<T: TryInto<i32> + Copy + std::fmt::Debug>(
    kind: &'static str,
    what: &str,
    v: T,
) -> Result<i32, ApplyError> {
    v.try_into().map_err(|_| ApplyError::OutOfRange {
        kind,
        what: format!("{what} = {v:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
            && self.allocations.is_empty()
            && self.revocations.is_empty()
            && self.results.is_empty()
            && self.workers.is_empty()
            && self.gpus.is_empty()
            && self.attestations.is_empty()
            && self.accruals.is_empty()
            && self.settlements.is_empty()
            && self.payouts.is_empty()
            && self.settlement_tasks.is_empty()
            && self.parked.is_empty()
            && self.settlement_steps.is_empty()
    }

    fn task(&mut self, change: TaskChange) {
        match self.tasks.get_mut(&change.task_id) {
            Some(existing) => existing.join(change),
            None => {
                self.tasks.insert(change.task_id, change);
            }
        }
    }

    /// Adds one event. Events of one stream must be added in log order (positions ascending).
    pub fn add(&mut self, e: Positioned<'_>) -> Result<(), ApplyError> {
        let record = e.record;
        let kind = record.event.kind();
        let at = record.envelope.occurred_at.as_micros();
        let event_id = record.envelope.event_id.0;
        let pos = position(e.seq, e.index);
        let state = |status: &'static str,
                     attempt: u32,
                     worker: Option<&events::WorkerId>|
         -> Result<TaskState, ApplyError> {
            Ok(TaskState {
                status,
                attempt: int32(kind, "attempt", attempt)?,
                worker_id: worker.map(|w| w.to_string()),
                failure_reason: None,
                retryable: None,
                event_id,
            })
        };
        let task = |task_id: &events::TaskId, state: TaskState| TaskChange {
            task_id: task_id.0,
            submission: None,
            attempt: state.attempt,
            state,
            allocated_at: None,
            started_at: None,
            finished_at: None,
            gpu_millis: None,
            peak_gpu_memory_mib: None,
        };
        match &record.event {
            Event::TaskSubmitted(t) => {
                let req = &t.spec.requirements;
                let mut change = task(&t.task_id, state("submitted", 0, None)?);
                change.submission = Some(Submission {
                    client_id: t.client_id.to_string(),
                    priority: i16::from(t.spec.priority.get()),
                    gpu_count: i32::from(req.gpu_count),
                    gpu_memory_mib: int(kind, "gpu_memory_mib", req.gpu_memory_mib)?,
                    model_tag: req.model_tag.clone(),
                    max_price_nanoton: int(kind, "max_price", t.spec.max_price_per_gpu_second.0)?,
                    timeout_ms: int(kind, "timeout_ms", t.spec.timeout_ms)?,
                    submitted_at: at,
                });
                if change
                    .submission
                    .as_ref()
                    .is_some_and(|s| s.gpu_count == 0 || s.timeout_ms == 0)
                {
                    return Err(ApplyError::OutOfRange {
                        kind,
                        what: "gpu_count and timeout_ms must be positive".into(),
                    });
                }
                self.task(change);
            }
            Event::TaskAllocated(a) => {
                let mut change = task(
                    &a.task_id,
                    state("allocated", a.attempt, Some(&a.worker_id))?,
                );
                change.allocated_at = Some(at);
                self.task(change);
                let attempt = int32(kind, "attempt", a.attempt)?;
                let gpu_count = i32::from(a.spec.requirements.gpu_count);
                if gpu_count == 0 {
                    return Err(ApplyError::OutOfRange {
                        kind,
                        what: "gpu_count = 0".into(),
                    });
                }
                self.allocations.entry((a.task_id.0, attempt)).or_insert(AllocationRow {
                    task_id: a.task_id.0,
                    attempt,
                    worker_id: a.worker_id.to_string(),
                    allocator_epoch: int(kind, "allocator_epoch", a.allocator_epoch)?,
                    score: a.score.total,
                    score_breakdown: serde_json::json!({
                        "load": a.score.load, "memory": a.score.memory, "history": a.score.history,
                        "latency": a.score.latency, "affinity": a.score.affinity,
                    }),
                    gpu_count,
                    gpu_memory_mib: int(kind, "gpu_memory_mib", a.spec.requirements.gpu_memory_mib)?,
                    allocated_at: at,
                    event_id,
                });
            }
            Event::AllocationRevoked(r) => {
                let attempt = int32(kind, "attempt", r.attempt)?;
                self.revocations
                    .entry((r.task_id.0, attempt))
                    .or_insert(Revocation {
                        task_id: r.task_id.0,
                        attempt,
                        revoked_at: at,
                        reason: r.reason.clone(),
                        event_id,
                    });
            }
            Event::TaskStarted(t) => {
                let mut change = task(&t.task_id, state("running", t.attempt, Some(&t.worker_id))?);
                change.started_at = Some(at);
                self.task(change);
            }
            Event::TaskProgress(t) => {
                self.task(task(
                    &t.task_id,
                    state("running", t.attempt, Some(&t.worker_id))?,
                ));
            }
            Event::TaskCompleted(t) => {
                let mut change = task(
                    &t.task_id,
                    state("completed", t.attempt, Some(&t.worker_id))?,
                );
                change.finished_at = Some(at);
                change.gpu_millis = Some(int(kind, "gpu_millis", t.usage.gpu_millis.0)?);
                change.peak_gpu_memory_mib = t
                    .usage
                    .peak_gpu_memory_mib
                    .map(|m| int(kind, "peak_gpu_memory_mib", m))
                    .transpose()?;
                self.task(change);
            }
            Event::TaskFailed(t) => {
                let mut s = state("failed", t.attempt, t.worker_id.as_ref())?;
                s.failure_reason = Some(t.reason.clone());
                s.retryable = Some(t.retryable);
                let mut change = task(&t.task_id, s);
                change.finished_at = Some(at);
                self.task(change);
            }
            Event::TaskCancelled(t) => {
                let mut s = state("cancelled", 0, None)?;
                s.failure_reason = Some(t.reason.clone());
                let mut change = task(&t.task_id, s);
                change.finished_at = Some(at);
                self.task(change);
            }
            Event::TaskRequeued(t) => {
                let next = t.attempt.checked_add(1).ok_or(ApplyError::OutOfRange {
                    kind,
                    what: "attempt".into(),
                })?;
                self.task(task(&t.task_id, state("requeued", next, None)?));
            }
            Event::TaskExpired(t) => {
                let mut change = task(&t.task_id, state("expired", t.attempts, None)?);
                change.finished_at = Some(at);
                self.task(change);
            }
            Event::TaskRejected(t) => {
                let mut s = state("rejected", 0, None)?;
                s.failure_reason = Some(t.reason.clone());
                let mut change = task(&t.task_id, s);
                change.finished_at = Some(at);
                self.task(change);
            }
            Event::TaskResult(r) => {
                let attempt = int32(kind, "attempt", r.attempt)?;
                self.results
                    .entry((r.task_id.0, attempt))
                    .or_insert(ResultRow {
                        task_id: r.task_id.0,
                        attempt,
                        client_id: r.client_id.to_string(),
                        worker_id: r.worker_id.to_string(),
                        stream_sequence: int(kind, "stream_sequence", e.seq)?,
                        size_bytes: int(kind, "size", r.output.len())?,
                        digest: r.checksum.clone(),
                        published_at: at,
                        event_id,
                    });
            }
            Event::WorkerRegistered(w) => {
                self.worker(WorkerChange {
                    worker_id: w.worker_id.to_string(),
                    position: pos,
                    registration: Some(Registration {
                        region: w.region.clone(),
                        price_per_gpu_second_nanoton: int(kind, "price", w.price_per_gpu_second.0)?,
                        payout_address: w.payout_address.clone(),
                        max_concurrent: int32(
                            kind,
                            "max_concurrent_tasks",
                            w.max_concurrent_tasks,
                        )?
                        .max(1),
                        registered_at: at,
                    }),
                    status: Some("active"),
                    running_tasks: None,
                    last_heartbeat_at: None,
                    event_id,
                });
                for g in &w.gpus {
                    let gpu_index = i16::try_from(g.index).map_err(|_| ApplyError::OutOfRange {
                        kind,
                        what: format!("gpu index {}", g.index),
                    })?;
                    self.gpu(GpuChange {
                        worker_id: w.worker_id.to_string(),
                        gpu_index,
                        position: pos,
                        gpu_uuid: Some(g.uuid.clone()),
                        name: Some(g.name.clone()),
                        simulated: Some(g.simulated),
                        memory_total_mib: int(kind, "memory_total_mib", g.memory_total_mib)?,
                        memory_used_mib: 0,
                        utilization_pct: 0,
                        temperature_c: None,
                        power_mw: None,
                        telemetry_at: at,
                    });
                }
            }
            Event::WorkerHeartbeat(h) => {
                self.worker(WorkerChange {
                    worker_id: h.worker_id.to_string(),
                    position: pos,
                    registration: None,
                    status: None,
                    running_tasks: Some(int32(kind, "running_tasks", h.running_tasks.len())?),
                    last_heartbeat_at: Some(at),
                    event_id,
                });
                for g in &h.gpus {
                    let gpu_index = i16::try_from(g.index).map_err(|_| ApplyError::OutOfRange {
                        kind,
                        what: format!("gpu index {}", g.index),
                    })?;
                    if g.utilization_pct > 100 {
                        return Err(ApplyError::OutOfRange {
                            kind,
                            what: format!("utilization {}%", g.utilization_pct),
                        });
                    }
                    self.gpu(GpuChange {
                        worker_id: h.worker_id.to_string(),
                        gpu_index,
                        position: pos,
                        gpu_uuid: None,
                        name: None,
                        simulated: None,
                        memory_total_mib: int(kind, "memory_total_mib", g.memory_total_mib)?,
                        memory_used_mib: int(kind, "memory_used_mib", g.memory_used_mib)?,
                        utilization_pct: i16::from(g.utilization_pct),
                        temperature_c: Some(g.temperature_c),
                        power_mw: Some(i64::from(g.power_mw)),
                        telemetry_at: at,
                    });
                }
            }
            Event::WorkerDraining(w) => self.worker_status(&w.worker_id, "draining", pos, event_id),
            Event::WorkerDeregistered(w) => {
                self.worker_status(&w.worker_id, "deregistered", pos, event_id)
            }
            Event::WorkerLost(w) => self.worker_status(&w.worker_id, "lost", pos, event_id),
            Event::AttestationSubmitted(a) => {
                self.attestation(AttestationChange {
                    attestation_id: event_id,
                    worker_id: a.worker_id.to_string(),
                    quote_hash: hex(&Sha256::digest(&a.quote)),
                    status: "submitted",
                    tcb_status: None,
                    measurements: None,
                    valid_until: None,
                    reason: None,
                    submitted_at: at,
                    decided_at: None,
                    event_id,
                });
            }
            Event::AttestationVerified(v) => {
                let cause = record
                    .envelope
                    .causation_id
                    .ok_or(ApplyError::MissingCausation { kind })?;
                self.attestation(AttestationChange {
                    attestation_id: cause.0,
                    worker_id: v.worker_id.to_string(),
                    quote_hash: v.quote_hash.clone(),
                    status: "verified",
                    tcb_status: Some(v.tcb_status.clone()),
                    measurements: Some(serde_json::json!({
                        "mrtd": v.measurements.mrtd, "rtmr0": v.measurements.rtmr0, "rtmr1": v.measurements.rtmr1,
                        "rtmr2": v.measurements.rtmr2, "rtmr3": v.measurements.rtmr3,
                    })),
                    valid_until: Some(v.valid_until.as_micros()),
                    reason: None,
                    submitted_at: at,
                    decided_at: Some(at),
                    event_id,
                });
            }
            Event::AttestationRejected(r) => {
                let cause = record
                    .envelope
                    .causation_id
                    .ok_or(ApplyError::MissingCausation { kind })?;
                self.attestation(AttestationChange {
                    attestation_id: cause.0,
                    worker_id: r.worker_id.to_string(),
                    quote_hash: r.quote_hash.clone(),
                    status: "rejected",
                    tcb_status: None,
                    measurements: None,
                    valid_until: None,
                    reason: Some(r.reason.clone()),
                    submitted_at: at,
                    decided_at: Some(at),
                    event_id,
                });
            }
            Event::PaymentAccrued(p) => {
                self.accruals.entry(p.task_id.0).or_insert(AccrualRow {
                    task_id: p.task_id.0,
                    worker_id: p.worker_id.to_string(),
                    attempt: int32(kind, "attempt", p.attempt)?,
                    amount_nanoton: int(kind, "amount", p.amount.0)?,
                    gpu_millis: int(kind, "gpu_millis", p.gpu_millis.0)?,
                    price_per_gpu_second_nanoton: int(kind, "price", p.price_per_gpu_second.0)?,
                    accrued_at: at,
                    event_id,
                });
            }
            Event::SettlementPrepared(s) => {
                if s.payouts.is_empty() || s.payouts.len() > 255 {
                    return Err(ApplyError::PayoutCount(s.settlement_id.0, s.payouts.len()));
                }
                let mut total: i64 = 0;
                for p in &s.payouts {
                    let amount = int(kind, "payout amount", p.amount.0)?;
                    if amount == 0 {
                        return Err(ApplyError::OutOfRange {
                            kind,
                            what: format!("zero payout to {}", p.worker_id),
                        });
                    }
                    total = total.checked_add(amount).ok_or(ApplyError::OutOfRange {
                        kind,
                        what: "total".into(),
                    })?;
                    self.payouts
                        .entry((s.settlement_id.0, p.worker_id.to_string()))
                        .or_insert(PayoutRow {
                            settlement_id: s.settlement_id.0,
                            worker_id: p.worker_id.to_string(),
                            destination: p.destination.clone(),
                            amount_nanoton: amount,
                        });
                    for task in &p.task_ids {
                        self.settlement_tasks
                            .entry((s.settlement_id.0, task.0))
                            .or_insert(SettlementTaskRow {
                                settlement_id: s.settlement_id.0,
                                task_id: task.0,
                                worker_id: p.worker_id.to_string(),
                            });
                    }
                }
                self.settlements
                    .entry(s.settlement_id.0)
                    .or_insert(SettlementRow {
                        settlement_id: s.settlement_id.0,
                        wallet_seqno: i64::from(s.wallet_seqno),
                        valid_until: s.valid_until.as_micros(),
                        message_hash: s.message_hash.clone(),
                        total_nanoton: total,
                        payout_count: int32(kind, "payouts", s.payouts.len())?,
                        prepared_at: at,
                        event_id,
                    });
            }
            Event::SettlementSubmitted(s) => self.settlement_steps.push(SettlementStep {
                settlement_id: s.settlement_id.0,
                status: "submitted",
                at,
                send_attempt: int32(kind, "send_attempt", s.send_attempt)?,
                tx_hash: None,
                tx_lt: None,
                failure_reason: None,
                failed_workers: vec![],
                event_id,
            }),
            Event::SettlementConfirmed(s) => self.settlement_steps.push(SettlementStep {
                settlement_id: s.settlement_id.0,
                status: "confirmed",
                at,
                send_attempt: 0,
                tx_hash: Some(s.tx_hash.clone()),
                tx_lt: Some(int(kind, "logical_time", s.logical_time)?),
                failure_reason: None,
                failed_workers: s
                    .failed_transfers
                    .iter()
                    .map(|f| (f.worker_id.to_string(), f.reason.clone()))
                    .collect(),
                event_id,
            }),
            Event::SettlementExpired(s) => self.settlement_steps.push(SettlementStep {
                settlement_id: s.settlement_id.0,
                status: "expired",
                at,
                send_attempt: 0,
                tx_hash: None,
                tx_lt: None,
                failure_reason: Some(format!(
                    "valid until {} passed unexecuted",
                    Timestamp::from_micros(s.valid_until.as_micros())
                )),
                failed_workers: vec![],
                event_id,
            }),
            Event::SettlementFailed(s) => self.settlement_steps.push(SettlementStep {
                settlement_id: s.settlement_id.0,
                status: "failed",
                at,
                send_attempt: 0,
                tx_hash: None,
                tx_lt: None,
                failure_reason: Some(s.reason.clone()),
                failed_workers: vec![],
                event_id,
            }),
            Event::PayoutParked(p) => {
                for task in &p.task_ids {
                    self.park(ParkedRow {
                        task_id: task.0,
                        worker_id: p.worker_id.to_string(),
                        destination: p.destination.clone(),
                        reason: p.reason.clone(),
                        parked_at: at,
                        event_id,
                    });
                }
            }
        }
        Ok(())
    }

    fn worker(&mut self, change: WorkerChange) {
        match self.workers.get_mut(&change.worker_id) {
            Some(existing) => existing.then(change),
            None => {
                self.workers.insert(change.worker_id.clone(), change);
            }
        }
    }

    fn worker_status(
        &mut self,
        worker: &events::WorkerId,
        status: &'static str,
        position: i64,
        event_id: Uuid,
    ) {
        self.worker(WorkerChange {
            worker_id: worker.to_string(),
            position,
            registration: None,
            status: Some(status),
            running_tasks: None,
            last_heartbeat_at: None,
            event_id,
        });
    }

    fn gpu(&mut self, change: GpuChange) {
        let key = (change.worker_id.clone(), change.gpu_index);
        match self.gpus.get_mut(&key) {
            Some(existing) => existing.then(change),
            None => {
                self.gpus.insert(key, change);
            }
        }
    }

    fn park(&mut self, row: ParkedRow) {
        match self.parked.get_mut(&row.task_id) {
            Some(existing) => existing.join(row),
            None => {
                self.parked.insert(row.task_id, row);
            }
        }
    }

    fn attestation(&mut self, change: AttestationChange) {
        match self.attestations.get_mut(&change.attestation_id) {
            Some(existing) => existing.join(change),
            None => {
                self.attestations.insert(change.attestation_id, change);
            }
        }
    }
}

impl Changes {
    /// Joins the changes of a later frame into this batch's.
    pub fn merge(&mut self, other: Changes) {
        for (_, change) in other.tasks {
            self.task(change);
        }
        for (key, row) in other.allocations {
            self.allocations.entry(key).or_insert(row);
        }
        for (key, row) in other.revocations {
            self.revocations.entry(key).or_insert(row);
        }
        for (key, row) in other.results {
            self.results.entry(key).or_insert(row);
        }
        for (_, change) in other.workers {
            self.worker(change);
        }
        for (_, change) in other.gpus {
            self.gpu(change);
        }
        for (_, change) in other.attestations {
            self.attestation(change);
        }
        for (key, row) in other.accruals {
            self.accruals.entry(key).or_insert(row);
        }
        for (key, row) in other.settlements {
            self.settlements.entry(key).or_insert(row);
        }
        for (key, row) in other.payouts {
            self.payouts.entry(key).or_insert(row);
        }
        for (key, row) in other.settlement_tasks {
            self.settlement_tasks.entry(key).or_insert(row);
        }
        for (_, row) in other.parked {
            self.park(row);
        }
        self.settlement_steps.extend(other.settlement_steps);
    }

    /// One step per settlement: the furthest one (ties: the first in log order), with the time of the first
    /// send and the number of sends kept. The first send, not the last: the SQL keeps the earliest
    /// `submitted_at` across transactions, so a batch must too, or the row would depend on where batches cut.
    pub fn settlement_steps_reduced(&self) -> Vec<ReducedStep> {
        let rank = |s: &str| if s == "submitted" { 1 } else { 2 };
        let mut best: BTreeMap<Uuid, ReducedStep> = BTreeMap::new();
        for step in &self.settlement_steps {
            let submitted_at = (step.status == "submitted").then_some(step.at);
            match best.get_mut(&step.settlement_id) {
                None => {
                    best.insert(
                        step.settlement_id,
                        ReducedStep {
                            step: step.clone(),
                            submitted_at,
                            sends: step.send_attempt,
                        },
                    );
                }
                Some(current) => {
                    current.submitted_at = min_opt(current.submitted_at, submitted_at);
                    current.sends = current.sends.max(step.send_attempt);
                    if rank(step.status) > rank(current.step.status) {
                        current.step = step.clone();
                    }
                }
            }
        }
        best.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::sample::all_records;
    use proptest::prelude::*;

    fn fold(records: &[(Stream, u64, &EventRecord)]) -> Changes {
        let mut c = Changes::default();
        for (stream, seq, record) in records {
            c.add(Positioned {
                stream: *stream,
                seq: *seq,
                index: 0,
                record,
            })
            .unwrap();
        }
        c
    }

    fn task_events() -> Vec<EventRecord> {
        all_records()
            .into_iter()
            .filter(|r| matches!(r.event.stream(), Stream::Tasks | Stream::Allocations))
            .collect()
    }

    #[test]
    fn started_before_allocated_does_not_go_backwards() {
        let records = all_records();
        let allocated = records
            .iter()
            .find(|r| r.event.kind() == "TaskAllocated")
            .unwrap();
        let started = records
            .iter()
            .find(|r| r.event.kind() == "TaskStarted")
            .unwrap();
        let a = fold(&[
            (Stream::Tasks, 1, started),
            (Stream::Allocations, 1, allocated),
        ]);
        let b = fold(&[
            (Stream::Allocations, 1, allocated),
            (Stream::Tasks, 1, started),
        ]);
        assert_eq!(a.tasks, b.tasks);
        let row = a.tasks.values().next().unwrap();
        assert_eq!(row.state.status, "running");
        assert!(row.allocated_at.is_some() && row.started_at.is_some());
        assert_eq!(row.state.worker_id.as_deref(), Some("worker-7"));
    }

    #[test]
    fn a_final_state_wins_over_any_attempt() {
        let records = all_records();
        let cancelled = records
            .iter()
            .find(|r| r.event.kind() == "TaskCancelled")
            .unwrap();
        let requeued = records
            .iter()
            .find(|r| r.event.kind() == "TaskRequeued")
            .unwrap();
        let c = fold(&[(Stream::Tasks, 1, cancelled), (Stream::Tasks, 2, requeued)]);
        let row = c.tasks.values().next().unwrap();
        assert_eq!(row.state.status, "cancelled");
        assert_eq!(
            row.attempt, 2,
            "the row still records the highest attempt seen"
        );
    }

    #[test]
    fn events_that_cannot_be_applied_are_refused_with_a_reason() {
        let mut verdict = all_records()
            .into_iter()
            .find(|r| r.event.kind() == "AttestationVerified")
            .unwrap();
        verdict.envelope.causation_id = None;
        let err = Changes::default()
            .add(Positioned {
                stream: Stream::Attestations,
                seq: 1,
                index: 0,
                record: &verdict,
            })
            .unwrap_err();
        assert_eq!(
            err,
            ApplyError::MissingCausation {
                kind: "AttestationVerified"
            }
        );
    }

    fn payments_record(event: impl Into<Event>, at: i64) -> EventRecord {
        let mut r = EventRecord::new(events::ProducerId::new("settler").unwrap(), event);
        r.envelope.occurred_at = Timestamp::from_micros(at);
        r
    }

    #[test]
    fn a_prepared_settlement_records_the_accruals_each_payout_carries() {
        use events::payments::{Payout, SettlementPrepared};
        let (a, b, c) = (
            events::TaskId::new(),
            events::TaskId::new(),
            events::TaskId::new(),
        );
        let payout = |worker: &str, tasks: Vec<events::TaskId>| Payout {
            worker_id: events::WorkerId::new(worker).unwrap(),
            destination: format!("UQ-{worker}"),
            amount: events::Nanoton(10),
            task_ids: tasks,
        };
        let prepared = payments_record(
            SettlementPrepared {
                settlement_id: events::SettlementId::new(),
                wallet_seqno: 3,
                valid_until: Timestamp::from_micros(2_000),
                payouts: vec![payout("w1", vec![a, b]), payout("w2", vec![c])],
                signed_message: vec![1],
                message_hash: "h".into(),
            },
            1_000,
        );
        let changes = fold(&[
            (Stream::Payments, 1, &prepared),
            (Stream::Payments, 1, &prepared),
        ]);
        let rows: Vec<(Uuid, &str)> = changes
            .settlement_tasks
            .values()
            .map(|r| (r.task_id, r.worker_id.as_str()))
            .collect();
        let mut expected = vec![(a.0, "w1"), (b.0, "w1"), (c.0, "w2")];
        expected.sort();
        let mut rows = rows;
        rows.sort();
        assert_eq!(rows, expected);
    }

    #[test]
    fn the_latest_park_of_an_accrual_wins_in_any_order() {
        use events::payments::PayoutParked;
        let task = events::TaskId::new();
        let park = |reason: &str, at: i64| {
            payments_record(
                PayoutParked {
                    worker_id: events::WorkerId::new("w1").unwrap(),
                    destination: "bad".into(),
                    amount: events::Nanoton(5),
                    task_ids: vec![task],
                    reason: reason.into(),
                },
                at,
            )
        };
        let (first, second) = (park("first", 1_000), park("second", 2_000));
        let forward = fold(&[
            (Stream::Payments, 1, &first),
            (Stream::Payments, 2, &second),
        ]);
        let backward = fold(&[
            (Stream::Payments, 2, &second),
            (Stream::Payments, 1, &first),
        ]);
        let mut merged = fold(&[(Stream::Payments, 2, &second)]);
        merged.merge(fold(&[
            (Stream::Payments, 1, &first),
            (Stream::Payments, 2, &second),
        ]));
        assert_eq!(forward.parked, backward.parked);
        assert_eq!(merged.parked, forward.parked);
        let row = &forward.parked[&task.0];
        assert_eq!((row.reason.as_str(), row.parked_at), ("second", 2_000));
    }

    #[test]
    fn a_batch_keeps_the_first_send_time_and_the_highest_send() {
        use events::payments::{SettlementConfirmed, SettlementSubmitted};
        let id = events::SettlementId::new();
        let send = |attempt: u32, at: i64| {
            payments_record(
                SettlementSubmitted {
                    settlement_id: id,
                    message_hash: "h".into(),
                    send_attempt: attempt,
                },
                at,
            )
        };
        let confirmed = payments_record(
            SettlementConfirmed {
                settlement_id: id,
                tx_hash: "t".into(),
                logical_time: 1,
                failed_transfers: vec![],
            },
            4_000,
        );
        let (s1, s2, s3) = (send(1, 1_000), send(2, 2_000), send(3, 3_000));
        let c = fold(&[
            (Stream::Payments, 1, &s1),
            (Stream::Payments, 2, &s2),
            (Stream::Payments, 3, &confirmed),
            (Stream::Payments, 4, &s3),
        ]);
        let reduced = c.settlement_steps_reduced();
        assert_eq!(reduced.len(), 1);
        assert_eq!(reduced[0].step.status, "confirmed");
        assert_eq!(reduced[0].submitted_at, Some(1_000));
        assert_eq!(reduced[0].sends, 3);
    }

    proptest! {
        /// Any order of the task events (a stand-in for any interleaving of TASKS and ALLOCATIONS), and any
        /// duplication, folds to the same task row.
        #[test]
        fn task_fold_is_order_independent(order in Just((0..task_events().len()).collect::<Vec<_>>()).prop_shuffle(), dup in 0usize..11) {
            let events = task_events();
            let reference = fold(&events.iter().map(|r| (Stream::Tasks, 1, r)).collect::<Vec<_>>());
            let mut shuffled: Vec<_> = order.iter().map(|&i| (Stream::Tasks, 1, &events[i])).collect();
            shuffled.push(shuffled[dup % shuffled.len()]);
            prop_assert_eq!(fold(&shuffled).tasks, reference.tasks);
        }

        /// Splitting the same events into two batches and joining the results equals one batch.
        #[test]
        fn task_fold_is_associative(order in Just((0..task_events().len()).collect::<Vec<_>>()).prop_shuffle(), cut in 0usize..11) {
            let events = task_events();
            let all: Vec<_> = order.iter().map(|&i| (Stream::Tasks, 1, &events[i])).collect();
            let cut = cut % all.len();
            let (left, right) = all.split_at(cut);
            let mut joined = fold(left).tasks;
            for (id, change) in fold(right).tasks {
                match joined.get_mut(&id) {
                    Some(existing) => existing.join(change),
                    None => { joined.insert(id, change); }
                }
            }
            prop_assert_eq!(joined, fold(&all).tasks);
        }
    }
}
