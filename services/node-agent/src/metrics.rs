//! Metric names (constants; labels never carry ids). Many agents in one process add to the same series.

pub const TASKS_STARTED: &str = "cocoon_agent_tasks_started_total";
pub const TASKS_COMPLETED: &str = "cocoon_agent_tasks_completed_total";
/// Label `retryable` = `true` | `false`.
pub const TASKS_FAILED: &str = "cocoon_agent_tasks_failed_total";
pub const TASKS_REVOKED: &str = "cocoon_agent_tasks_revoked_total";
/// Gauge: attempts executing now (incremented and decremented, so agents sharing a process add up).
pub const TASKS_RUNNING: &str = "cocoon_agent_tasks_running";
/// Label `why` = `stale_epoch` | `duplicate`.
pub const ALLOCATIONS_IGNORED: &str = "cocoon_agent_allocations_ignored_total";
pub const HEARTBEATS: &str = "cocoon_agent_heartbeats_total";
