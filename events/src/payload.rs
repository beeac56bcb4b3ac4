//! Shared value types used inside several payloads: task input and output, priorities, requirements.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::money::Nanoton;

/// A task's priority, 1 (lowest) to 10 (highest). Out-of-range values are refused when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

/// A priority outside 1..=10.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority {0} is outside 1..=10")]
pub struct PriorityError(pub u8);

impl Priority {
    pub const MIN: Priority = Priority(1);
    pub const MAX: Priority = Priority(10);

    pub fn new(value: u8) -> Result<Self, PriorityError> {
        if (1..=10).contains(&value) {
            Ok(Self(value))
        } else {
            Err(PriorityError(value))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for Priority {
    type Error = PriorityError;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Bytes carried inline in the event, or a reference to where they are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blob {
    /// Small data travels inside the event (bounded by the frame's maximum size).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Large data lives elsewhere (object store, URL); the event carries where and how to check it.
    Reference {
        uri: String,
        size_bytes: u64,
        /// `sha256:<hex>` of the referenced bytes.
        checksum: String,
    },
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::Inline(bytes) => bytes.len() as u64,
            Blob::Reference { size_bytes, .. } => *size_bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a task needs from a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    pub gpu_count: u16,
    /// GPU memory needed on each GPU, in MiB.
    pub gpu_memory_mib: u64,
    /// Model or affinity tag: workers that recently ran the same tag score higher.
    pub model_tag: Option<String>,
}

/// Everything a worker needs to run a task; copied into the allocation so the agent reads only its own stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub requirements: Requirements,
    pub priority: Priority,
    /// The most the client pays per GPU-second.
    pub max_price_per_gpu_second: Nanoton,
    /// Wall-clock limit of one attempt, in milliseconds.
    pub timeout_ms: u64,
    pub input: Blob,
}
