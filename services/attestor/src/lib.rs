//! `attestor`: decides whether a worker's TDX quote proves that the worker runs the code we expect, on a
//! genuine, patched Intel platform, and holds the key it claims.
//!
//! Consumes `AttestationSubmitted` (ATTESTATIONS); produces `AttestationVerified` or `AttestationRejected`
//! (ATTESTATIONS), each caused by its submission, through the durable consumer `attestor` ([`service`]). It
//! owns no state other than a verdict cache and the registered keys it reads from WORKERS.
//!
//! The core, in the order a quote meets it:
//! - [`verify::Verifier`] parses the quote, finds its collateral ([`collateral`]: from files, or fetched
//!   from a PCCS by the service with [`pccs::PccsClient`] before the quote is verified), has `dcap-qvl` check
//!   the Intel chain of trust, then applies the [`policy::Policy`] (TCB status, measurements, no debug
//!   TDs) and the key binding ([`binding`]), and returns a [`verify::Verdict`];
//! - [`cache::VerdictCache`] remembers verdicts by quote hash and binding;
//! - [`pool::verify_blocking`] runs verification off the async runtime threads, with bounded concurrency.
//!
//! Guarantees:
//! - verification does no IO: collateral is loaded when the verifier is built, or fetched by the service
//!   and added to the verifier before the verification that needs it;
//! - no input panics the verifier: every malformed quote is a [`verify::RejectReason::Malformed`];
//! - a `Verified` verdict never outlives the collateral it was checked against, nor the policy's cap;
//! - a rejection says which check failed, with a stable [`verify::RejectReason::kind`] label.

pub mod binding;
pub mod cache;
pub mod collateral;
pub mod pccs;
pub mod policy;
pub mod pool;
pub mod service;
pub mod verify;

mod hex;

pub use binding::{Binding, BindingError, check_binding, report_data_for};
pub use cache::{CacheKey, VerdictCache};
pub use collateral::{Collateral, CollateralError, CollateralSource, CollateralStore};
pub use pccs::{PccsClient, PccsConfig, PccsError};
pub use policy::{Policy, PolicyError, Register};
pub use pool::{PoolError, verify_blocking};
pub use service::{AttestorConfig, AttestorError, AttestorReport, run};
pub use verify::{RejectReason, Verdict, Verifier};
