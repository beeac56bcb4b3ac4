//! ATTESTATIONS stream payloads: TDX quotes and verdicts. Keyed by worker id.

use serde::{Deserialize, Serialize};

use crate::ids::WorkerId;
use crate::time::Timestamp;

/// The report data a worker's quote must carry: SHA-512 over the worker id, the worker's public key and the
/// nonce, each length-prefixed: `u8 len ‖ worker id ‖ u16 len (big-endian) ‖ key ‖ nonce`. This binds the
/// quote to one worker, the key it registered and one submission (the nonce starts with the time it was
/// made, so the attestor can refuse an old quote replayed), so a quote cannot be presented for another
/// worker, even one that registered the same key.
pub fn binding_report_data(worker_id: &str, public_key: &[u8], nonce: &[u8]) -> [u8; 64] {
    use sha2::{Digest, Sha512};
    let mut hasher = Sha512::new();
    let id = worker_id.as_bytes();
    // Worker ids are at most 64 bytes and keys far below 64 KiB (both validated where they enter).
    hasher.update([u8::try_from(id.len()).unwrap_or(u8::MAX)]);
    hasher.update(id);
    hasher.update(
        u16::try_from(public_key.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    hasher.update(public_key);
    hasher.update(nonce);
    hasher.finalize().into()
}

/// Length of a submission's nonce: 8 bytes of Unix milliseconds (big-endian), then 24 bytes that differ per
/// submission.
pub const NONCE_LEN: usize = 32;

/// A nonce for a submission made at `at`, its last 24 bytes from `unique`.
pub fn nonce_at(at: Timestamp, unique: [u8; 24]) -> Vec<u8> {
    let mut nonce = Vec::with_capacity(NONCE_LEN);
    nonce.extend_from_slice(&at.as_millis().to_be_bytes());
    nonce.extend_from_slice(&unique);
    nonce
}

/// When a nonce made by [`nonce_at`] was made; `None` when it is not one.
pub fn nonce_time(nonce: &[u8]) -> Option<Timestamp> {
    let millis: [u8; 8] = nonce.get(..8)?.try_into().ok()?;
    (nonce.len() == NONCE_LEN)
        .then(|| Timestamp::from_micros(i64::from_be_bytes(millis).saturating_mul(1_000)))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_depends_on_worker_key_and_nonce() {
        let a = binding_report_data("w1", &[1; 32], &[2; 32]);
        assert_eq!(a, binding_report_data("w1", &[1; 32], &[2; 32]));
        assert_ne!(a, binding_report_data("w2", &[1; 32], &[2; 32]));
        assert_ne!(a, binding_report_data("w1", &[9; 32], &[2; 32]));
        assert_ne!(a, binding_report_data("w1", &[1; 32], &[9; 32]));
        // The lengths keep the parts apart: ("ab", "c…") is not ("a", "bc…").
        assert_ne!(
            binding_report_data("ab", b"c", b""),
            binding_report_data("a", b"bc", b"")
        );
        // A fixed vector guards the layout: SHA-512 of [0, 0, 0] (empty id, empty key, empty nonce).
        use sha2::{Digest, Sha512};
        assert_eq!(
            binding_report_data("", &[], &[]),
            <[u8; 64]>::from(Sha512::digest([0u8, 0, 0]))
        );
    }

    #[test]
    fn a_nonce_carries_its_time() {
        let at = Timestamp::from_micros(1_795_000_000_123_000);
        let nonce = nonce_at(at, [7; 24]);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert_eq!(nonce_time(&nonce), Some(at));
        assert_eq!(nonce_time(&nonce[..31]), None);
        assert_eq!(nonce_time(b""), None);
    }
}
