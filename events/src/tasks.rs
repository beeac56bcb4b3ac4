//! TASKS stream payloads: a task's life from submission to a terminal state. Keyed by task id.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, TaskId, WorkerId};
use crate::money::GpuMillis;
use crate::payload::TaskSpec;
use crate::time::Timestamp;

/// A client asked for a task to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSubmitted {
    pub task_id: TaskId,
    pub client_id: ClientId,
    pub spec: TaskSpec,
}

/// The worker began executing an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    pub gpu_indices: Vec<u32>,
}

/// The worker reports progress on an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    /// 0..=100.
    pub percent: u8,
    pub message: Option<String>,
}

/// What an attempt consumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// GPU-seconds, in thousandths, summed over the task's GPUs.
    pub gpu_millis: GpuMillis,
    /// Highest GPU memory seen for the task's processes, where NVML could tell.
    pub peak_gpu_memory_mib: Option<u64>,
    pub wall_ms: u64,
}

/// The attempt succeeded; its result is on the client's result subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCompleted {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    pub usage: Usage,
}

/// The attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub task_id: TaskId,
    /// `None` when the task failed before reaching a worker (e.g. attempts exhausted).
    pub worker_id: Option<WorkerId>,
    pub attempt: u32,
    pub reason: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

/// The client cancelled the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancelled {
    pub task_id: TaskId,
    pub reason: String,
}

/// Why a task went back to the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    WorkerLost,
    TimedOut,
    Revoked,
    RetryableFailure,
}

/// The task went back to the queue for another attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequeued {
    pub task_id: TaskId,
    /// The attempt that ended; the next allocation has `attempt + 1`.
    pub attempt: u32,
    pub previous_worker: Option<WorkerId>,
    pub reason: RequeueReason,
}

/// The task ran out of time or attempts before completing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskExpired {
    pub task_id: TaskId,
    pub attempts: u32,
    pub deadline: Timestamp,
}

/// No worker in the pool can ever fit the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRejected {
    pub task_id: TaskId,
    pub reason: String,
}
