//! Read-model queries: a task's state, lists of tasks, the workers with their GPUs and attestation standing, and
//! [`TaskWatch`], which follows one task to its final state.
//!
//! Everything here reads the Postgres tables the projector writes (`tasks`, `task_results`, `workers`,
//! `worker_gpus`, the `worker_attestation_state` view) and nothing else; it never writes. Rows reach Postgres
//! through the projector, so what these queries see trails the log by the projector's lag.
//!
//! `watch_task` polls the read model (every 250 ms by default) rather than following the TASKS partition: the
//! read model already holds the folded state (attempt, worker, failure, usage, result), which a reader of
//! `tasks.<partition>` would have to fold again from every event, while reading through 1/8 of everyone's
//! task traffic to find one task's events.

use std::collections::BTreeMap;
use std::time::Duration;

use events::{ClientId, EventId, GpuMillis, Nanoton, TaskId, Timestamp, WorkerId};

/// Why a read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("cannot connect to Postgres at {url}: {source}")]
    Connect {
        /// The URL without its password.
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The query failed: the connection dropped, or the database is not migrated.
    #[error("read-model query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// A row holds a value this build does not understand (a newer schema, or corruption).
    #[error("read model column {column} holds unexpected value {value:?}")]
    Unexpected { column: &'static str, value: String },
}

/// A task's state in the read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Submitted,
    Allocated,
    Running,
    Completed,
    Failed,
    Cancelled,
    Requeued,
    Expired,
    Rejected,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 9] = [
        TaskStatus::Submitted,
        TaskStatus::Allocated,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::Requeued,
        TaskStatus::Expired,
        TaskStatus::Rejected,
    ];

    /// The spelling in the `tasks.status` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Submitted => "submitted",
            TaskStatus::Allocated => "allocated",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Requeued => "requeued",
            TaskStatus::Expired => "expired",
            TaskStatus::Rejected => "rejected",
        }
    }

    /// Parses the column's spelling, case-insensitively.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the client asked for. The read model fills these all together, when the `TaskSubmitted` is projected
/// (an allocation may be projected before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmissionView {
    pub client_id: ClientId,
    pub priority: u8,
    pub gpu_count: u32,
    pub gpu_memory_mib: u64,
    pub model_tag: Option<String>,
    pub max_price_per_gpu_second: Nanoton,
    pub timeout_ms: u64,
    pub submitted_at: Timestamp,
}

/// Where a task's result is: its metadata from `task_results` (the bytes stay in the RESULTS stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultView {
    pub attempt: u32,
    pub worker_id: WorkerId,
    /// Stream sequence of the frame on `results.<client>` that carries it.
    pub stream_sequence: u64,
    pub size_bytes: u64,
    /// `sha256:<hex>` of the output.
    pub checksum: String,
    pub published_at: Timestamp,
}

/// One task, in its newest projected state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub attempt: u32,
    /// `None` until the submission is projected.
    pub submission: Option<SubmissionView>,
    /// The worker of the current attempt.
    pub worker_id: Option<WorkerId>,
    pub allocated_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub gpu_millis: Option<GpuMillis>,
    pub peak_gpu_memory_mib: Option<u64>,
    pub failure_reason: Option<String>,
    /// Set on failure: whether another attempt could succeed.
    pub retryable: Option<bool>,
    /// The newest attempt's result, if one was published.
    pub result: Option<ResultView>,
    /// UUIDv7 of the newest event applied to the row.
    pub last_event_id: EventId,
}

impl TaskView {
    /// Whether the task will not change again: completed, cancelled, expired, rejected, or failed without a
    /// retry. A retryable failure is not final: the allocator may requeue it for another attempt.
    pub fn is_final(&self) -> bool {
        match self.status {
            TaskStatus::Completed
            | TaskStatus::Cancelled
            | TaskStatus::Expired
            | TaskStatus::Rejected => true,
            TaskStatus::Failed => self.retryable != Some(true),
            TaskStatus::Submitted
            | TaskStatus::Allocated
            | TaskStatus::Running
            | TaskStatus::Requeued => false,
        }
    }
}

/// Which tasks [`ReadModel::tasks`] returns; the conditions combine with AND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub client: Option<ClientId>,
    pub worker: Option<WorkerId>,
    /// At most this many, newest first.
    pub limit: u32,
}

impl Default for TaskFilter {
    fn default() -> Self {
        Self {
            status: None,
            client: None,
            worker: None,
            limit: 50,
        }
    }
}

/// A worker's membership state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerStatus {
    Active,
    Draining,
    Deregistered,
    Lost,
}

impl WorkerStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Active => "active",
            WorkerStatus::Draining => "draining",
            WorkerStatus::Deregistered => "deregistered",
            WorkerStatus::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<WorkerStatus> {
        [
            WorkerStatus::Active,
            WorkerStatus::Draining,
            WorkerStatus::Deregistered,
            WorkerStatus::Lost,
        ]
        .into_iter()
        .find(|w| w.as_str() == s)
    }
}

impl std::fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One GPU of a worker, with its newest telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub utilization_pct: u8,
    pub temperature_c: Option<i16>,
    pub power_mw: Option<u64>,
    /// A simulated GPU (the agent ran without NVML, on request): never to be taken for real hardware.
    pub simulated: bool,
    pub telemetry_at: Timestamp,
}

/// The newest attestation verdict on a worker (from the `worker_attestation_state` view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationView {
    /// `verified` or `rejected`.
    pub status: String,
    pub tcb_status: Option<String>,
    pub valid_until: Option<Timestamp>,
    pub decided_at: Option<Timestamp>,
}

/// One worker, its GPUs and its admission standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub worker_id: WorkerId,
    pub status: WorkerStatus,
    pub region: String,
    pub price_per_gpu_second: Nanoton,
    pub payout_address: String,
    pub max_concurrent: u32,
    /// As the agent reported in its newest heartbeat.
    pub running_tasks: u32,
    pub registered_at: Timestamp,
    pub last_heartbeat_at: Option<Timestamp>,
    /// The newest verdict verified and is still valid now (the database's `now()` when queried).
    pub attested: bool,
    pub attestation: Option<AttestationView>,
    /// In index order.
    pub gpus: Vec<GpuView>,
}

impl WorkerView {
    /// Whether any of the worker's GPUs is simulated.
    pub fn simulated(&self) -> bool {
        self.gpus.iter().any(|g| g.simulated)
    }
}

/// A read-only connection to the read models.
#[derive(Debug)]
pub struct ReadModel {
    pub(crate) client: tokio_postgres::Client,
}

/// `timestamptz` as integer microseconds, which is what [`Timestamp`] holds (tokio-postgres is built without a
/// date library here).
macro_rules! micros {
    ($col:literal) => {
        concat!("(extract(epoch FROM ", $col, ") * 1000000)::bigint")
    };
}
pub(crate) use micros;

const TASK_SELECT: &str = concat!(
    "SELECT t.task_id, t.status, t.attempt, t.client_id, t.priority, t.gpu_count, t.gpu_memory_mib, ",
    "t.model_tag, t.max_price_nanoton, t.timeout_ms, ",
    micros!("t.submitted_at"),
    ", t.worker_id, ",
    micros!("t.allocated_at"),
    ", ",
    micros!("t.started_at"),
    ", ",
    micros!("t.finished_at"),
    ", t.gpu_millis, t.peak_gpu_memory_mib, t.failure_reason, t.retryable, t.last_event_id, ",
    "r.attempt, r.worker_id, r.stream_sequence, r.size_bytes, r.digest, ",
    micros!("r.published_at"),
    " FROM tasks t LEFT JOIN LATERAL (",
    "SELECT * FROM task_results x WHERE x.task_id = t.task_id ORDER BY x.attempt DESC LIMIT 1",
    ") r ON true"
);

const WORKER_SELECT: &str = concat!(
    "SELECT w.worker_id, w.status, w.region, w.price_per_gpu_second_nanoton, w.payout_address, ",
    "w.max_concurrent, w.running_tasks, ",
    micros!("w.registered_at"),
    ", ",
    micros!("w.last_heartbeat_at"),
    ", a.status, a.tcb_status, ",
    micros!("a.valid_until"),
    ", ",
    micros!("a.decided_at"),
    ", coalesce(a.attested, false) ",
    "FROM workers w LEFT JOIN worker_attestation_state a USING (worker_id) ORDER BY w.worker_id"
);

const GPU_SELECT: &str = concat!(
    "SELECT worker_id, gpu_index, gpu_uuid, name, memory_total_mib, memory_used_mib, utilization_pct, ",
    "temperature_c, power_mw, simulated, ",
    micros!("telemetry_at"),
    " FROM worker_gpus ORDER BY worker_id, gpu_index"
);

impl ReadModel {
    /// Connects to the read models' database; the connection runs on the current runtime.
    pub async fn connect(database_url: &str) -> Result<ReadModel, ReadModelError> {
        let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
            .await
            .map_err(|source| ReadModelError::Connect {
                url: redact(database_url),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "read-model connection ended");
            }
        });
        Ok(ReadModel { client })
    }

    /// Reads through an existing connection.
    pub fn from_client(client: tokio_postgres::Client) -> ReadModel {
        ReadModel { client }
    }

    /// One task, or `None` if the read model does not (yet) know it.
    pub async fn task(&self, task_id: TaskId) -> Result<Option<TaskView>, ReadModelError> {
        let sql = format!("{TASK_SELECT} WHERE t.task_id = $1");
        let row = self.client.query_opt(&sql, &[&task_id.0]).await?;
        row.map(|r| task_view(&r)).transpose()
    }

    /// Tasks matching `filter`, newest first (task ids are UUIDv7, so id order is submission order).
    pub async fn tasks(&self, filter: &TaskFilter) -> Result<Vec<TaskView>, ReadModelError> {
        let mut conditions = Vec::new();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        let status = filter.status.map(TaskStatus::as_str);
        let client = filter.client.as_ref().map(ClientId::as_str);
        let worker = filter.worker.as_ref().map(WorkerId::as_str);
        for (column, value) in [
            ("t.status", &status),
            ("t.client_id", &client),
            ("t.worker_id", &worker),
        ] {
            if let Some(value) = value {
                params.push(value);
                conditions.push(format!("{column} = ${}", params.len()));
            }
        }
        let limit = i64::from(filter.limit);
        params.push(&limit);
        let sql = format!(
            "{TASK_SELECT} {} ORDER BY t.task_id DESC LIMIT ${}",
            if conditions.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conditions.join(" AND "))
            },
            params.len()
        );
        let rows = self.client.query(&sql, &params).await?;
        rows.iter().map(task_view).collect()
    }

    /// Every worker the read model knows, by id, with its GPUs and attestation standing.
    pub async fn workers(&self) -> Result<Vec<WorkerView>, ReadModelError> {
        let rows = self.client.query(WORKER_SELECT, &[]).await?;
        let gpu_rows = self.client.query(GPU_SELECT, &[]).await?;
        let mut gpus: BTreeMap<String, Vec<GpuView>> = BTreeMap::new();
        for r in &gpu_rows {
            let worker: String = r.try_get(0)?;
            let gpu = GpuView {
                index: unsigned(r.try_get::<_, i16>(1)?, "worker_gpus.gpu_index")?,
                uuid: r.try_get(2)?,
                name: r.try_get(3)?,
                memory_total_mib: unsigned(
                    r.try_get::<_, i64>(4)?,
                    "worker_gpus.memory_total_mib",
                )?,
                memory_used_mib: unsigned(r.try_get::<_, i64>(5)?, "worker_gpus.memory_used_mib")?,
                utilization_pct: unsigned(r.try_get::<_, i16>(6)?, "worker_gpus.utilization_pct")?,
                temperature_c: r.try_get(7)?,
                power_mw: r
                    .try_get::<_, Option<i64>>(8)?
                    .map(|v| unsigned(v, "worker_gpus.power_mw"))
                    .transpose()?,
                simulated: r.try_get(9)?,
                telemetry_at: Timestamp(r.try_get(10)?),
            };
            gpus.entry(worker).or_default().push(gpu);
        }
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                let attestation = r
                    .try_get::<_, Option<String>>(9)?
                    .map(|status| -> Result<_, ReadModelError> {
                        Ok(AttestationView {
                            status,
                            tcb_status: r.try_get(10)?,
                            valid_until: r.try_get::<_, Option<i64>>(11)?.map(Timestamp),
                            decided_at: r.try_get::<_, Option<i64>>(12)?.map(Timestamp),
                        })
                    })
                    .transpose()?;
                let status: String = r.try_get(1)?;
                Ok(WorkerView {
                    status: WorkerStatus::parse(&status).ok_or(ReadModelError::Unexpected {
                        column: "workers.status",
                        value: status,
                    })?,
                    region: r.try_get(2)?,
                    price_per_gpu_second: Nanoton(unsigned(
                        r.try_get::<_, i64>(3)?,
                        "workers.price_per_gpu_second_nanoton",
                    )?),
                    payout_address: r.try_get(4)?,
                    max_concurrent: unsigned(r.try_get::<_, i32>(5)?, "workers.max_concurrent")?,
                    running_tasks: unsigned(r.try_get::<_, i32>(6)?, "workers.running_tasks")?,
                    registered_at: Timestamp(r.try_get(7)?),
                    last_heartbeat_at: r.try_get::<_, Option<i64>>(8)?.map(Timestamp),
                    attested: r.try_get(13)?,
                    attestation,
                    gpus: gpus.remove(&id).unwrap_or_default(),
                    worker_id: worker_id(id, "workers.worker_id")?,
                })
            })
            .collect()
    }

    /// Follows one task until it reaches a final state (see [`TaskWatch`]).
    pub fn watch_task(&self, task_id: TaskId) -> TaskWatch<'_> {
        TaskWatch {
            model: self,
            task_id,
            interval: None,
            every: DEFAULT_WATCH_INTERVAL,
            result_grace: DEFAULT_RESULT_GRACE,
            last: None,
            final_since: None,
            done: false,
        }
    }
}

/// How often [`TaskWatch`] polls.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long [`TaskWatch`] goes on after a completion for the result's row, which may be projected a little later.
pub const DEFAULT_RESULT_GRACE: Duration = Duration::from_secs(2);

/// Yields a task's state each time it changes, first as soon as the read model knows the task, and ends after
/// a final state ([`TaskView::is_final`]). It has no deadline of its own: a task the read model never learns
/// about is waited for until the caller stops (wrap it in a timeout, or select on a shutdown signal).
/// A completed task's result row may land a moment after the completion: the watch yields the completion at
/// once and keeps polling up to [`DEFAULT_RESULT_GRACE`] for the result, yielding the view again when it lands.
#[derive(Debug)]
pub struct TaskWatch<'a> {
    model: &'a ReadModel,
    task_id: TaskId,
    interval: Option<tokio::time::Interval>,
    every: Duration,
    result_grace: Duration,
    last: Option<TaskView>,
    final_since: Option<tokio::time::Instant>,
    done: bool,
}

impl TaskWatch<'_> {
    /// Polls every `every` instead of [`DEFAULT_WATCH_INTERVAL`].
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every.max(Duration::from_millis(1));
        self
    }

    /// Waits this long for a completed task's result instead of [`DEFAULT_RESULT_GRACE`].
    pub fn result_grace(mut self, grace: Duration) -> Self {
        self.result_grace = grace;
        self
    }

    /// The next change; `None` once the task is final. A query error is returned as an item, and the next
    /// call polls again.
    pub async fn next(&mut self) -> Option<Result<TaskView, ReadModelError>> {
        if self.done {
            return None;
        }
        let every = self.every;
        let interval = self.interval.get_or_insert_with(|| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            interval.tick().await;
            if let Some(since) = self.final_since
                && since.elapsed() >= self.result_grace
            {
                self.done = true;
                return None;
            }
            let view = match self.model.task(self.task_id).await {
                Err(e) => return Some(Err(e)),
                Ok(None) => continue,
                Ok(Some(view)) => view,
            };
            if self.last.as_ref() == Some(&view) {
                continue;
            }
            if view.is_final() {
                if view.status == TaskStatus::Completed && view.result.is_none() {
                    self.final_since
                        .get_or_insert_with(tokio::time::Instant::now);
                } else {
                    self.done = true;
                }
            }
            self.last = Some(view.clone());
            return Some(Ok(view));
        }
    }
}

pub(crate) fn unsigned<T, U>(value: T, column: &'static str) -> Result<U, ReadModelError>
where
    T: Copy + std::fmt::Display,
    U: TryFrom<T>,
{
    U::try_from(value).map_err(|_| ReadModelError::Unexpected {
        column,
        value: value.to_string(),
    })
}

pub(crate) fn worker_id(value: String, column: &'static str) -> Result<WorkerId, ReadModelError> {
    WorkerId::new(value.as_str()).map_err(|_| ReadModelError::Unexpected { column, value })
}

fn task_view(r: &tokio_postgres::Row) -> Result<TaskView, ReadModelError> {
    let status: String = r.try_get(1)?;
    let opt_u64 = |i: usize, column: &'static str| -> Result<Option<u64>, ReadModelError> {
        r.try_get::<_, Option<i64>>(i)?
            .map(|v| unsigned(v, column))
            .transpose()
    };
    let submission = match r.try_get::<_, Option<String>>(3)? {
        None => None,
        Some(client) => Some(SubmissionView {
            client_id: ClientId::new(client.as_str()).map_err(|_| ReadModelError::Unexpected {
                column: "tasks.client_id",
                value: client.clone(),
            })?,
            priority: unsigned(r.try_get::<_, i16>(4)?, "tasks.priority")?,
            gpu_count: unsigned(r.try_get::<_, i32>(5)?, "tasks.gpu_count")?,
            gpu_memory_mib: unsigned(r.try_get::<_, i64>(6)?, "tasks.gpu_memory_mib")?,
            model_tag: r.try_get(7)?,
            max_price_per_gpu_second: Nanoton(unsigned(
                r.try_get::<_, i64>(8)?,
                "tasks.max_price_nanoton",
            )?),
            timeout_ms: unsigned(r.try_get::<_, i64>(9)?, "tasks.timeout_ms")?,
            submitted_at: Timestamp(r.try_get(10)?),
        }),
    };
    let result = match r.try_get::<_, Option<i32>>(20)? {
        None => None,
        Some(attempt) => Some(ResultView {
            attempt: unsigned(attempt, "task_results.attempt")?,
            worker_id: worker_id(r.try_get(21)?, "task_results.worker_id")?,
            stream_sequence: unsigned(r.try_get::<_, i64>(22)?, "task_results.stream_sequence")?,
            size_bytes: unsigned(r.try_get::<_, i64>(23)?, "task_results.size_bytes")?,
            checksum: r.try_get(24)?,
            published_at: Timestamp(r.try_get(25)?),
        }),
    };
    Ok(TaskView {
        task_id: TaskId(r.try_get(0)?),
        status: TaskStatus::parse(&status).ok_or(ReadModelError::Unexpected {
            column: "tasks.status",
            value: status,
        })?,
        attempt: unsigned(r.try_get::<_, i32>(2)?, "tasks.attempt")?,
        submission,
        worker_id: r
            .try_get::<_, Option<String>>(11)?
            .map(|w| worker_id(w, "tasks.worker_id"))
            .transpose()?,
        allocated_at: r.try_get::<_, Option<i64>>(12)?.map(Timestamp),
        started_at: r.try_get::<_, Option<i64>>(13)?.map(Timestamp),
        finished_at: r.try_get::<_, Option<i64>>(14)?.map(Timestamp),
        gpu_millis: opt_u64(15, "tasks.gpu_millis")?.map(GpuMillis),
        peak_gpu_memory_mib: opt_u64(16, "tasks.peak_gpu_memory_mib")?,
        failure_reason: r.try_get(17)?,
        retryable: r.try_get(18)?,
        result,
        last_event_id: EventId(r.try_get(19)?),
    })
}

/// The URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_finality_follows_retries() {
        for s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskStatus::parse("RUNNING"), Some(TaskStatus::Running));
        assert_eq!(TaskStatus::parse("done"), None);
        let mut v = TaskView {
            task_id: TaskId::new(),
            status: TaskStatus::Failed,
            attempt: 1,
            submission: None,
            worker_id: None,
            allocated_at: None,
            started_at: None,
            finished_at: None,
            gpu_millis: None,
            peak_gpu_memory_mib: None,
            failure_reason: Some("oom".into()),
            retryable: Some(true),
            result: None,
            last_event_id: EventId::new(),
        };
        assert!(!v.is_final());
        v.retryable = Some(false);
        assert!(v.is_final());
        v.status = TaskStatus::Running;
        assert!(!v.is_final());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
