//! ALLOCATIONS stream payloads: placement decisions, addressed to one worker (`allocations.<worker>`).

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, TaskId, WorkerId};
use crate::payload::TaskSpec;

/// How a placement scored, per the Cocoon weights (load 30%, memory 30%, history 20%, latency 10%, affinity 10%).
/// Scores are not money, so floats are fine here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreBreakdown {
    pub total: f64,
    pub load: f64,
    pub memory: f64,
    pub history: f64,
    pub latency: f64,
    pub affinity: f64,
}

/// The allocator placed an attempt of a task on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAllocated {
    pub task_id: TaskId,
    pub client_id: ClientId,
    pub worker_id: WorkerId,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Fencing epoch of the allocator's lease: a worker ignores allocations older than the newest epoch it saw.
    pub allocator_epoch: u64,
    pub gpu_indices: Vec<u32>,
    pub score: ScoreBreakdown,
    pub spec: TaskSpec,
}

/// The allocator took an allocation back (worker lost, task cancelled or timed out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationRevoked {
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    pub allocator_epoch: u64,
    pub reason: String,
}
