//! WORKERS stream payloads: membership and telemetry of GPU nodes. Keyed by worker id.

use serde::{Deserialize, Serialize};

use crate::ids::{TaskId, WorkerId};
use crate::money::Nanoton;
use crate::time::Timestamp;

/// A GPU as the worker registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    /// True when the agent runs simulated GPUs (load tests); never true for real hardware.
    pub simulated: bool,
}

/// A worker joined the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistered {
    pub worker_id: WorkerId,
    pub gpus: Vec<GpuInfo>,
    pub price_per_gpu_second: Nanoton,
    /// TON address (user-friendly form) that payouts go to.
    pub payout_address: String,
    pub region: String,
    pub max_concurrent_tasks: u32,
    /// The worker's public key; attestation quotes must bind it.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    pub agent_version: String,
    /// Model tags this worker serves (v2). Empty: it takes any model. A task with a tag fits only a worker that
    /// lists it or lists none.
    pub model_tags: Vec<String>,
}

/// Older payload versions, kept so that every event ever written still decodes (see [`crate::event`]).
pub mod legacy {
    use super::*;

    /// `WorkerRegistered` v1: before `model_tags`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WorkerRegisteredV1 {
        pub worker_id: WorkerId,
        pub gpus: Vec<GpuInfo>,
        pub price_per_gpu_second: Nanoton,
        pub payout_address: String,
        pub region: String,
        pub max_concurrent_tasks: u32,
        #[serde(with = "serde_bytes")]
        pub public_key: Vec<u8>,
        pub agent_version: String,
    }

    impl From<WorkerRegisteredV1> for WorkerRegistered {
        /// A v1 worker named no tags, so it takes any model.
        fn from(v1: WorkerRegisteredV1) -> Self {
            WorkerRegistered {
                worker_id: v1.worker_id,
                gpus: v1.gpus,
                price_per_gpu_second: v1.price_per_gpu_second,
                payout_address: v1.payout_address,
                region: v1.region,
                max_concurrent_tasks: v1.max_concurrent_tasks,
                public_key: v1.public_key,
                agent_version: v1.agent_version,
                model_tags: Vec::new(),
            }
        }
    }
}

/// One GPU's telemetry at heartbeat time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuTelemetry {
    pub index: u32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    /// 0..=100.
    pub utilization_pct: u8,
    pub temperature_c: i16,
    pub power_mw: u32,
    pub process_count: u32,
}

/// Periodic liveness and telemetry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    pub worker_id: WorkerId,
    /// Increases by one per heartbeat of one agent run, so a stale heartbeat can be told from a newer one.
    pub sequence: u64,
    pub gpus: Vec<GpuTelemetry>,
    pub running_tasks: Vec<TaskId>,
    /// Round-trip time the agent measured to the bus, in microseconds.
    pub latency_us: Option<u32>,
}

/// The worker finishes what it runs and takes no new tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerDraining {
    pub worker_id: WorkerId,
    pub reason: String,
}

/// The worker left the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerDeregistered {
    pub worker_id: WorkerId,
    pub reason: String,
}

/// The allocator stopped hearing from the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLost {
    pub worker_id: WorkerId,
    pub last_heartbeat_at: Timestamp,
}
