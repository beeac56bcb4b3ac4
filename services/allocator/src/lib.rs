//! `allocator`: places tasks on the best attested GPU worker.
//!
//! - consumes: TASKS, ALLOCATIONS (its own and earlier holders' decisions), WORKERS, ATTESTATIONS, each read
//!   from the start into memory ([`pool`]);
//! - produces: `TaskAllocated` (with the lease epoch) on `allocations.<worker>`, `AllocationRevoked`,
//!   `TaskRequeued`, `TaskExpired`, `TaskRejected`, `WorkerLost`;
//! - owns: the in-memory pool and the lease in the KV bucket `cocoon-allocator` ([`lease`]);
//! - guarantees: one active instance places tasks at a time, and it places nothing before it has read every
//!   decision made before its epoch; a task's attempt is allocated once; reservations are released exactly
//!   once per attempt.
//!
//! Pure modules: [`scoring`] (the Cocoon weights, fit), [`queue`] (bands and aging), [`pool`] (the state and
//! every decision). [`service`] is the IO around them.

pub mod lease;
pub mod pool;
pub mod queue;
pub mod recent;
pub mod scoring;
pub mod service;

pub use pool::{Pool, PoolConfig, PoolStats};
pub use service::{AllocatorConfig, AllocatorError, RunReport, run};
