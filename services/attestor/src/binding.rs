//! The binding protocol: a quote counts for a worker only if its 64-byte report data is
//! `SHA-512(len ‖ worker id ‖ len ‖ public key ‖ nonce)` ([`events::attestations::binding_report_data`]).
//!
//! The node agent asks the TDX module for a quote over exactly these bytes, so a quote taken from one
//! worker cannot be presented for another worker or with another key, and a fresh nonce per submission
//! keeps an old quote from being replayed for a new one.

use crate::hex;

/// What the quote's report data must be for the quote to count as the submitter's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Binding {
    /// The production protocol: report data = SHA-512(worker id, public key, nonce), length-prefixed.
    Sha512 {
        worker_id: String,
        public_key: Vec<u8>,
        nonce: Vec<u8>,
    },
    /// The quote must carry exactly these report-data bytes.
    ///
    /// For tests and dev tools only: Intel's sample quotes carry report data that binds no key we hold,
    /// so the only way to drive a genuine sample quote through the whole verifier to `Verified` is to
    /// expect the bytes it actually carries. The service never builds this variant from a submission.
    Exact([u8; 64]),
}

impl Binding {
    /// The report data a quote must carry to satisfy this binding.
    pub fn expected_report_data(&self) -> [u8; 64] {
        match self {
            Binding::Sha512 {
                worker_id,
                public_key,
                nonce,
            } => report_data_for(worker_id, public_key, nonce),
            Binding::Exact(bytes) => *bytes,
        }
    }
}

/// The quote's report data does not match the binding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "report data {} does not match the expected {} ({})",
    short(actual),
    short(expected),
    how
)]
pub struct BindingError {
    // Boxed: a `Result` carrying two inline 64-byte arrays would be needlessly large on the happy path.
    pub actual: Box<[u8; 64]>,
    pub expected: Box<[u8; 64]>,
    /// How `expected` was derived: "SHA-512(worker id, public key, nonce)" or "exact bytes".
    pub how: &'static str,
}

fn short(bytes: &[u8; 64]) -> String {
    format!("{}…", hex::encode(&bytes[..8]))
}

/// The report data a worker's quote must carry. The node agent computes the same through the one
/// definition in `events`, which this delegates to.
pub fn report_data_for(worker_id: &str, public_key: &[u8], nonce: &[u8]) -> [u8; 64] {
    events::attestations::binding_report_data(worker_id, public_key, nonce)
}

/// `Ok` when `report_data` binds this worker, key and nonce.
pub fn check_binding(
    report_data: &[u8; 64],
    worker_id: &str,
    public_key: &[u8],
    nonce: &[u8],
) -> Result<(), BindingError> {
    check(
        report_data,
        &Binding::Sha512 {
            worker_id: worker_id.to_owned(),
            public_key: public_key.to_vec(),
            nonce: nonce.to_vec(),
        },
    )
}

/// `Ok` when `report_data` satisfies `binding`.
pub fn check(report_data: &[u8; 64], binding: &Binding) -> Result<(), BindingError> {
    let expected = binding.expected_report_data();
    // Not secret: both values are public, so a plain comparison leaks nothing.
    if *report_data == expected {
        Ok(())
    } else {
        Err(BindingError {
            actual: Box::new(*report_data),
            expected: Box::new(expected),
            how: match binding {
                Binding::Sha512 { .. } => "SHA-512(worker id, public key, nonce)",
                Binding::Exact(_) => "exact bytes",
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_worker_key_and_nonce_bind() {
        let rd = report_data_for("w1", b"worker-key-32-bytes-............", b"nonce-1");
        assert_eq!(
            check_binding(&rd, "w1", b"worker-key-32-bytes-............", b"nonce-1"),
            Ok(())
        );
        assert_eq!(
            check(&rd, &Binding::Exact(rd)),
            Ok(()),
            "the exact form accepts the same bytes"
        );
    }

    #[test]
    fn another_worker_key_or_nonce_does_not_bind() {
        let rd = report_data_for("w1", b"key-a", b"nonce-1");
        let err = check_binding(&rd, "w1", b"key-b", b"nonce-1").unwrap_err();
        assert_eq!(*err.actual, rd);
        assert_eq!(*err.expected, report_data_for("w1", b"key-b", b"nonce-1"));
        assert!(
            err.to_string()
                .contains("SHA-512(worker id, public key, nonce)"),
            "{err}"
        );
        assert!(check_binding(&rd, "w1", b"key-a", b"nonce-2").is_err());
        // The same key and nonce presented for another worker: refused.
        assert!(check_binding(&rd, "w2", b"key-a", b"nonce-1").is_err());
        assert!(check(&rd, &Binding::Exact([0; 64])).is_err());
    }

    #[test]
    fn the_digest_is_sha512_of_the_length_prefixed_parts() {
        use sha2::{Digest, Sha512};
        let mut bytes = vec![1u8, b'w', 0, 3];
        bytes.extend_from_slice(b"keynonce");
        assert_eq!(
            report_data_for("w", b"key", b"nonce"),
            <[u8; 64]>::from(Sha512::digest(&bytes))
        );
    }
}
