//! Quote verification: one quote, one binding, one instant in, one [`Verdict`] out.
//!
//! The checks, in order (the first that fails is the verdict's reason):
//! 1. the bytes parse as a DCAP quote with nothing left over, else [`RejectReason::Malformed`];
//! 2. it is a TDX quote, else [`RejectReason::NotTdx`];
//! 3. no TUD (debug) bit is set in its TD attributes, else [`RejectReason::DebugTd`]. This runs on the
//!    parsed body *before* the signature is checked: refusing on an unauthenticated field can only refuse,
//!    never admit, and a debug TD is refused whatever else is true of it (`dcap-qvl` refuses it too, later);
//! 4. collateral exists for its platform (FMSPC), else [`RejectReason::NoCollateral`], and is valid at the
//!    verification time, else [`RejectReason::CollateralExpired`];
//! 5. `dcap-qvl` verifies the chain of trust: Intel root → PCK certificate → QE report → attestation key →
//!    TD report, and the signed TCB info and QE identity, else [`RejectReason::Cryptographic`];
//!    (a platform older than every level in the TCB info is [`RejectReason::TcbUnappraisable`]);
//! 6. the converged TCB status is accepted by the policy, else [`RejectReason::TcbStatus`];
//! 7. MRTD and RTMR0..3 (now authenticated) are allowed, else [`RejectReason::MeasurementNotAllowed`];
//! 8. the report data binds the submitter's key and nonce, else [`RejectReason::Binding`].
//!
//! A `Verified` verdict holds until the earliest of: the collateral's first expiry (TCB info, QE identity,
//! CRLs and certificates, as `dcap-qvl` computes it), and the verification time plus the policy's cap.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dcap_qvl::QuoteClaims;
use dcap_qvl::quote::Quote;
use dcap_qvl::verify::QuoteVerifier;
use events::attestations::{AttestationRejected, AttestationVerified, Measurements};
use events::{Event, Timestamp, WorkerId};
use sha2::{Digest, Sha256};

use crate::binding::{self, Binding, BindingError};
use crate::collateral::{Collateral, CollateralError, CollateralSource, CollateralStore};
use crate::hex;
use crate::policy::{self, Policy, Register};

/// The outcome of verifying one quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Verified {
        /// SHA-256 of the quote bytes, hex.
        quote_hash: String,
        /// The TCB status `dcap-qvl` converged, e.g. `UpToDate`.
        tcb_status: String,
        measurements: Measurements,
        valid_until: Timestamp,
    },
    Rejected {
        quote_hash: String,
        reason: RejectReason,
    },
}

impl Verdict {
    pub fn quote_hash(&self) -> &str {
        match self {
            Verdict::Verified { quote_hash, .. } | Verdict::Rejected { quote_hash, .. } => {
                quote_hash
            }
        }
    }

    pub fn is_verified(&self) -> bool {
        matches!(self, Verdict::Verified { .. })
    }

    /// The rejection reason, if rejected.
    pub fn reason(&self) -> Option<&RejectReason> {
        match self {
            Verdict::Verified { .. } => None,
            Verdict::Rejected { reason, .. } => Some(reason),
        }
    }

    /// The event announcing this verdict for `worker_id`.
    pub fn into_event(self, worker_id: WorkerId) -> Event {
        match self {
            Verdict::Verified {
                quote_hash,
                tcb_status,
                measurements,
                valid_until,
            } => AttestationVerified {
                worker_id,
                quote_hash,
                tcb_status,
                measurements,
                valid_until,
            }
            .into(),
            Verdict::Rejected { quote_hash, reason } => AttestationRejected {
                worker_id,
                quote_hash,
                reason: reason.to_string(),
            }
            .into(),
        }
    }
}

/// Why a quote was rejected. `Display` is the precise message published in `AttestationRejected`;
/// [`kind`](Self::kind) is a stable label for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Not a DCAP quote: truncated, non-zero trailing bytes, random bytes, an unparsable embedded PCK certificate.
    #[error("malformed quote: {detail}")]
    Malformed { detail: String },
    /// A well-formed quote from another TEE (SGX).
    #[error("not a TDX quote (TEE type 0x{tee_type:08x})")]
    NotTdx { tee_type: u32 },
    /// The TD runs with a TUD bit set (DEBUG is bit 0): the host can read its memory.
    #[error("debug TD refused: TD attributes 0x{td_attributes:016x} have TUD bits (7:0) set")]
    DebugTd { td_attributes: u64 },
    /// No collateral is loaded for the quote's platform (and, with a PCCS, fetching it failed: the
    /// service says why in `fetch_error`, and does not cache the verdict).
    #[error(
        "no collateral for the quote's platform (FMSPC {fmspc}){}",
        fetch_failure(fetch_error)
    )]
    NoCollateral {
        fmspc: String,
        fetch_error: Option<String>,
    },
    /// The collateral (or a certificate it or the quote carries) is expired or not yet valid at the
    /// verification time.
    #[error("collateral not valid at the verification time: {detail}")]
    CollateralExpired { detail: String },
    /// The DCAP chain of trust does not hold: a bad signature (a tampered quote), a certificate not
    /// chaining to Intel's root, or a platform the TCB info cannot appraise.
    #[error("quote failed DCAP verification: {detail}")]
    Cryptographic { detail: String },
    /// The collateral's TCB info has no level the platform meets (its CPU, PCE or TDX module SVNs are below
    /// every level listed): the platform cannot be appraised, which Intel treats as unsupported.
    #[error("platform TCB cannot be appraised against the collateral's TCB info: {detail}")]
    TcbUnappraisable { detail: String },
    /// The platform's TCB status is not one the policy accepts.
    #[error(
        "TCB status {status} is not accepted by the policy{}",
        advisories(advisory_ids)
    )]
    TcbStatus {
        status: String,
        advisory_ids: Vec<String>,
    },
    /// A measurement register holds a value the policy does not list.
    #[error("{which} {value} is not allowed by the policy")]
    MeasurementNotAllowed { which: Register, value: String },
    /// The quote is genuine but does not bind the submitted key and nonce.
    #[error("quote does not bind the submitted key: {0}")]
    Binding(BindingError),
}

fn fetch_failure(error: &Option<String>) -> String {
    error
        .as_deref()
        .map(|e| format!(": fetching it from the PCCS failed: {e}"))
        .unwrap_or_default()
}

fn advisories(ids: &[String]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(" (advisories: {})", ids.join(", "))
    }
}

impl RejectReason {
    /// Every [`kind`](Self::kind) label, for pre-registering metrics.
    pub const KINDS: [&'static str; 10] = [
        "malformed",
        "not_tdx",
        "debug_td",
        "no_collateral",
        "collateral_expired",
        "cryptographic",
        "tcb_unappraisable",
        "tcb_status",
        "measurement_not_allowed",
        "binding",
    ];

    /// A stable, low-cardinality label for this reason.
    pub fn kind(&self) -> &'static str {
        match self {
            RejectReason::Malformed { .. } => "malformed",
            RejectReason::NotTdx { .. } => "not_tdx",
            RejectReason::DebugTd { .. } => "debug_td",
            RejectReason::NoCollateral { .. } => "no_collateral",
            RejectReason::CollateralExpired { .. } => "collateral_expired",
            RejectReason::Cryptographic { .. } => "cryptographic",
            RejectReason::TcbUnappraisable { .. } => "tcb_unappraisable",
            RejectReason::TcbStatus { .. } => "tcb_status",
            RejectReason::MeasurementNotAllowed { .. } => "measurement_not_allowed",
            RejectReason::Binding(_) => "binding",
        }
    }
}

/// Verifies quotes against a policy and the collateral in its store: loaded at construction, and added at
/// run time with [`add_collateral`](Self::add_collateral) (the service does, after fetching from a PCCS).
/// Cheap to share (`Arc<Verifier>`); `verify` takes `&self` and does no IO.
pub struct Verifier {
    policy: Policy,
    collateral: RwLock<CollateralStore>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("policy", &self.policy)
            .field("collateral_platforms", &self.collateral_platforms())
            .finish()
    }
}

/// A `dcap-qvl` policy that accepts every verified quote: the attestor applies its own [`Policy`] to the
/// claims afterwards, so that each rejection gets its own typed reason.
struct ClaimsOnly;

impl dcap_qvl::Policy for ClaimsOnly {
    fn validate(&self, _: &QuoteClaims) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Verifier {
    pub fn new(policy: Policy, collateral: CollateralStore) -> Self {
        Self {
            policy,
            collateral: RwLock::new(collateral),
        }
    }

    /// Loads the collateral from `source` (files; a PCCS source starts with an empty store, which the
    /// service fills as quotes need it). `verify` does no IO either way.
    pub fn from_source(policy: Policy, source: &CollateralSource) -> Result<Self, CollateralError> {
        Ok(Self::new(policy, CollateralStore::load(source)?))
    }

    /// Adds a platform's collateral, replacing the one held for its FMSPC (a refresh); returns the old one.
    /// Verifications already running keep the collateral they started with.
    pub fn add_collateral(&self, collateral: Collateral) -> Option<Arc<Collateral>> {
        self.collateral
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(collateral)
    }

    /// The collateral held for a platform.
    pub fn collateral(&self, fmspc: &[u8; 6]) -> Option<Arc<Collateral>> {
        self.collateral
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get_shared(fmspc)
    }

    /// How many platforms have collateral.
    pub fn collateral_platforms(&self) -> usize {
        self.collateral
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Verifies `quote` as of `now`, expecting its report data to satisfy `binding`. Never panics.
    pub fn verify(&self, quote: &[u8], binding: &Binding, now: SystemTime) -> Verdict {
        let quote_hash = hex::encode(&Sha256::digest(quote));
        match self.check(quote, binding, now) {
            Ok(Accepted {
                tcb_status,
                measurements,
                valid_until,
            }) => Verdict::Verified {
                quote_hash,
                tcb_status,
                measurements,
                valid_until,
            },
            Err(reason) => Verdict::Rejected { quote_hash, reason },
        }
    }

    fn check(
        &self,
        raw: &[u8],
        binding: &Binding,
        now: SystemTime,
    ) -> Result<Accepted, RejectReason> {
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| RejectReason::CollateralExpired {
                detail: "verification time is before 1970".into(),
            })?
            .as_secs();

        let quote = decode_exact(raw).map_err(|detail| RejectReason::Malformed { detail })?;
        let td = quote.report.as_td10().ok_or(RejectReason::NotTdx {
            tee_type: quote.header.tee_type,
        })?;
        policy::check_not_debug(td.td_attributes)
            .map_err(|td_attributes| RejectReason::DebugTd { td_attributes })?;

        // The FMSPC comes from the (not yet verified) PCK certificate in the quote: it only selects which
        // collateral to verify against; a lie here fails the chain of trust below.
        let fmspc = dcap_qvl::intel::quote_fmspc(&quote).map_err(|e| RejectReason::Malformed {
            detail: format!("PCK certificate: {e:#}"),
        })?;
        let collateral = self
            .collateral(&fmspc)
            .ok_or_else(|| RejectReason::NoCollateral {
                fmspc: hex::encode(&fmspc),
                fetch_error: None,
            })?;
        collateral
            .check_window(now_secs)
            .map_err(|outside| RejectReason::CollateralExpired {
                detail: outside.to_string(),
            })?;

        let claims = QuoteVerifier::new_prod()
            .verify_with_policy(raw, collateral.raw(), now_secs, &ClaimsOnly)
            .map_err(classify)?;

        let tcb_status = claims.tcb.status.to_string();
        if !self.policy.accepts_tcb_status(&tcb_status) {
            return Err(RejectReason::TcbStatus {
                status: tcb_status,
                advisory_ids: claims.tcb.advisory_ids,
            });
        }

        // From here on, read the verified report in the claims, not the parsed input.
        let td = claims.report.as_td10().ok_or(RejectReason::NotTdx {
            tee_type: claims.tee_type,
        })?;
        let registers = [
            (Register::Mrtd, td.mr_td),
            (Register::Rtmr0, td.rt_mr0),
            (Register::Rtmr1, td.rt_mr1),
            (Register::Rtmr2, td.rt_mr2),
            (Register::Rtmr3, td.rt_mr3),
        ];
        if let Some((which, value)) = self.policy.first_disallowed(&registers) {
            return Err(RejectReason::MeasurementNotAllowed {
                which,
                value: hex::encode(&value),
            });
        }

        binding::check(&td.report_data, binding).map_err(RejectReason::Binding)?;

        let collateral_expiry = claims
            .earliest_expiration_date
            .min(collateral.expires_at().unwrap_or(u64::MAX));
        let valid_until = secs_to_timestamp(collateral_expiry)
            .min(Timestamp::from_system_time(now).saturating_add(self.policy.max_validity()));

        Ok(Accepted {
            tcb_status,
            measurements: Measurements {
                mrtd: hex::encode(&td.mr_td),
                rtmr0: hex::encode(&td.rt_mr0),
                rtmr1: hex::encode(&td.rt_mr1),
                rtmr2: hex::encode(&td.rt_mr2),
                rtmr3: hex::encode(&td.rt_mr3),
            },
            valid_until,
        })
    }
}

struct Accepted {
    tcb_status: String,
    measurements: Measurements,
    valid_until: Timestamp,
}

fn secs_to_timestamp(secs: u64) -> Timestamp {
    Timestamp::from_micros(
        i64::try_from(secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000),
    )
}

/// Sorts a `dcap-qvl` failure into a reason. `dcap-qvl` reports errors as text; the few it has that are
/// not chain-of-trust failures are recognised by their wording, and everything else is `Cryptographic`
/// with the full message as detail, so a change of wording upstream degrades a label, not a decision.
fn classify(err: anyhow::Error) -> RejectReason {
    let detail = format!("{err:#}");
    let lower = detail.to_ascii_lowercase();
    if lower.contains("tcb status is invalid: revoked") {
        RejectReason::TcbStatus {
            status: "Revoked".into(),
            advisory_ids: Vec::new(),
        }
    } else if lower.contains("no matching tcb level")
        || lower.contains("below minimum required")
        || lower.contains("evaluate the current tdx tcb")
    {
        RejectReason::TcbUnappraisable { detail }
    } else if lower.contains("expired")
        || lower.contains("notvalidyet")
        || lower.contains("in the future")
    {
        RejectReason::CollateralExpired { detail }
    } else {
        RejectReason::Cryptographic { detail }
    }
}

/// Parses a quote. Bytes after it must be zero: quote buffers come zero-padded (Intel's sample is, by 70
/// bytes), and anything else there would be unauthenticated data riding along with a genuine quote.
fn decode_exact(raw: &[u8]) -> Result<Quote, String> {
    let quote = Quote::parse(raw).map_err(|e| format!("{e:#}"))?;
    // The signed header and body are followed by a u32 length and that many bytes of auth data.
    let signed = quote.signed_length();
    let auth_len = raw
        .get(signed..signed.saturating_add(4))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or("no auth data length")?;
    let total = usize::try_from(auth_len)
        .ok()
        .and_then(|len| len.checked_add(signed)?.checked_add(4))
        .ok_or("auth data length overflows")?;
    match raw.get(total..) {
        Some(padding) if padding.iter().all(|b| *b == 0) => Ok(quote),
        Some(padding) => Err(format!(
            "{} bytes after the quote's {total} are not zero padding",
            padding.len()
        )),
        None => Err(format!("quote declares {total} bytes, has {}", raw.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_and_distinct() {
        let reasons = [
            RejectReason::Malformed { detail: "x".into() },
            RejectReason::NotTdx { tee_type: 0 },
            RejectReason::DebugTd { td_attributes: 1 },
            RejectReason::NoCollateral {
                fmspc: "x".into(),
                fetch_error: None,
            },
            RejectReason::CollateralExpired { detail: "x".into() },
            RejectReason::Cryptographic { detail: "x".into() },
            RejectReason::TcbUnappraisable { detail: "x".into() },
            RejectReason::TcbStatus {
                status: "OutOfDate".into(),
                advisory_ids: vec!["INTEL-SA-00001".into()],
            },
            RejectReason::MeasurementNotAllowed {
                which: Register::Rtmr1,
                value: "00".into(),
            },
            RejectReason::Binding(BindingError {
                actual: Box::new([0; 64]),
                expected: Box::new([1; 64]),
                how: "exact bytes",
            }),
        ];
        let kinds: Vec<_> = reasons.iter().map(RejectReason::kind).collect();
        assert_eq!(kinds, RejectReason::KINDS);
        assert_eq!(
            reasons[7].to_string(),
            "TCB status OutOfDate is not accepted by the policy (advisories: INTEL-SA-00001)"
        );
        assert_eq!(
            reasons[8].to_string(),
            "RTMR1 00 is not allowed by the policy"
        );
        assert_eq!(
            reasons[3].to_string(),
            "no collateral for the quote's platform (FMSPC x)"
        );
        let fetch_failed = RejectReason::NoCollateral {
            fmspc: "x".into(),
            fetch_error: Some("http://pccs/ answered HTTP 503".into()),
        };
        assert_eq!(fetch_failed.kind(), "no_collateral");
        assert_eq!(
            fetch_failed.to_string(),
            "no collateral for the quote's platform (FMSPC x): fetching it from the PCCS failed: http://pccs/ answered HTTP 503"
        );
    }

    /// The wording `classify` relies on, as `dcap-qvl` 0.7 really produces it: the sample quote at its PCK
    /// CRL's nextUpdate (which the verifier's own window check would normally catch first).
    #[test]
    fn dcap_qvl_expiry_wording_is_recognised() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let quote = std::fs::read(dir.join("tdx_quote")).unwrap();
        let collateral: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(
            &std::fs::read(dir.join("collateral/tdx_quote_collateral.json")).unwrap(),
        )
        .unwrap();
        for at in [1_752_919_235, 1_752_919_236 + 86_400, 1_700_000_000] {
            let err = QuoteVerifier::new_prod()
                .verify_with_policy(&quote, collateral.clone(), at, &ClaimsOnly)
                .unwrap_err();
            assert_eq!(classify(err).kind(), "collateral_expired", "at {at}");
        }
    }

    #[test]
    fn dcap_errors_are_classified_by_wording() {
        let reason = |msg: &'static str| classify(anyhow::anyhow!(msg).context("outer")).kind();
        assert_eq!(reason("TCB status is invalid: Revoked"), "tcb_status");
        assert_eq!(reason("TCBInfo expired"), "collateral_expired");
        assert_eq!(
            reason("CrlExpired { time: 1, next_update: 0 }"),
            "collateral_expired"
        );
        assert_eq!(reason("CertNotValidYet"), "collateral_expired");
        assert_eq!(reason("No matching TCB level found"), "tcb_unappraisable");
        assert_eq!(
            reason("ISV enclave report signature is invalid"),
            "cryptographic"
        );
    }
}
