//! ATTESTATIONS stream payloads: TDX quotes and verdicts. Keyed by worker id.

use serde::{Deserialize, Serialize};

use crate::ids::WorkerId;
use crate::time::Timestamp;

/// A worker presented a TDX quote that binds its public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationSubmitted {
    pub worker_id: WorkerId,
    #[serde(with = "serde_bytes")]
    pub quote: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Freshness nonce mixed into the quote's report data.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// TD measurements, hex-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurements {
    pub mrtd: String,
    pub rtmr0: String,
    pub rtmr1: String,
    pub rtmr2: String,
    pub rtmr3: String,
}

/// The quote verified and satisfies the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationVerified {
    pub worker_id: WorkerId,
    /// SHA-256 of the quote, hex.
    pub quote_hash: String,
    pub tcb_status: String,
    pub measurements: Measurements,
    pub valid_until: Timestamp,
}

/// The quote did not verify or violates the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationRejected {
    pub worker_id: WorkerId,
    pub quote_hash: String,
    pub reason: String,
}
