//! RESULTS stream payloads: what a task produced, addressed to its client (`results.<client>`).

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, TaskId, WorkerId};
use crate::payload::Blob;

/// The output of a completed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: TaskId,
    pub client_id: ClientId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    pub output: Blob,
    /// `sha256:<hex>` of the output bytes.
    pub checksum: String,
    /// True when the output was cut at the agent's capture limit.
    pub truncated: bool,
}
