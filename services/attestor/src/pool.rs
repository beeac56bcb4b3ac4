//! Verification off the async runtime: quote verification is CPU-bound (ECDSA, X.509, a few ms), so it
//! runs on tokio's blocking pool, with a semaphore bounding how many run at once.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Semaphore;

use crate::binding::Binding;
use crate::verify::{Verdict, Verifier};

/// Why no verdict was produced. Neither is the quote's fault, so neither may be published as a rejection.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The semaphore was closed: the service is shutting down. Transient: redeliver later.
    #[error("verification pool is closed")]
    Closed,
    /// Verification panicked (a bug in the verifier or `dcap-qvl`). It will panic again on redelivery:
    /// permanent, dead-letter the submission.
    #[error("verification panicked: {0}")]
    Panicked(String),
}

/// Verifies `quote` on the blocking pool once a `semaphore` permit is free.
pub async fn verify_blocking(
    verifier: Arc<Verifier>,
    semaphore: &Semaphore,
    quote: Vec<u8>,
    binding: Binding,
    now: SystemTime,
) -> Result<Verdict, PoolError> {
    let _permit = semaphore.acquire().await.map_err(|_| PoolError::Closed)?;
    tokio::task::spawn_blocking(move || verifier.verify(&quote, &binding, now))
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => PoolError::Panicked(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into()),
            ),
            // Cancelled: only when the runtime shuts down.
            Err(_) => PoolError::Closed,
        })
}
