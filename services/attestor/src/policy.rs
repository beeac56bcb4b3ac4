//! The attestation policy: which TD measurements, TCB statuses and lifetimes the pool accepts.
//!
//! A policy is a JSON file (see `tests/fixtures/policy.json`):
//!
//! ```json
//! {
//!   "mrtd": ["<96 hex chars>", "..."],
//!   "rtmr0": ["<96 hex chars>"],
//!   "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
//!   "max_validity_secs": 86400
//! }
//! ```
//!
//! - `mrtd` is required and non-empty: a pool that accepts any TD firmware attests nothing.
//! - `rtmr0`..`rtmr3` are optional: absent means any value; present means the value must be one listed
//!   (an empty list therefore accepts nothing, which is almost certainly a mistake and is refused).
//! - `accepted_tcb_statuses` names Intel TCB statuses as `dcap-qvl` spells them; `Revoked` cannot be
//!   accepted (`dcap-qvl` refuses revoked platforms unconditionally).
//! - `max_validity_secs` caps how long a verdict stands even when the collateral lasts longer.
//!
//! There is deliberately no switch for debug TDs: a TD with any TUD bit set (TDATTRIBUTES bits 7:0,
//! bit 0 being DEBUG) exposes its memory and registers to the host and is refused always.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcap_qvl::TcbStatus;
use serde::Deserialize;

use crate::hex;

/// A TD measurement register: MRTD (the initial TD image) or one of the run-time registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Register {
    Mrtd,
    Rtmr0,
    Rtmr1,
    Rtmr2,
    Rtmr3,
}

impl Register {
    pub const ALL: [Register; 5] = [
        Register::Mrtd,
        Register::Rtmr0,
        Register::Rtmr1,
        Register::Rtmr2,
        Register::Rtmr3,
    ];

    /// The policy file's field name for this register.
    pub const fn field(self) -> &'static str {
        match self {
            Register::Mrtd => "mrtd",
            Register::Rtmr0 => "rtmr0",
            Register::Rtmr1 => "rtmr1",
            Register::Rtmr2 => "rtmr2",
            Register::Rtmr3 => "rtmr3",
        }
    }
}

impl fmt::Display for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Register::Mrtd => "MRTD",
            Register::Rtmr0 => "RTMR0",
            Register::Rtmr1 => "RTMR1",
            Register::Rtmr2 => "RTMR2",
            Register::Rtmr3 => "RTMR3",
        })
    }
}

/// One 48-byte (SHA-384) measurement value.
pub type Measurement = [u8; 48];

/// TDATTRIBUTES bits 7:0 (TUD, "TD under debug"): bit 0 is DEBUG; bits 4..6 enable debug-like
/// profiling features; the others are reserved and must be zero. Any set bit makes the TD untrusted.
pub const TD_ATTRIBUTES_TUD_MASK: u64 = 0xff;
/// TDATTRIBUTES.DEBUG (bit 0).
pub const TD_ATTRIBUTES_DEBUG: u64 = 1;

/// A validated policy. Build it with [`Policy::load`], [`Policy::from_json`] or [`Policy::builder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mrtd: BTreeSet<Measurement>,
    rtmrs: [Option<BTreeSet<Measurement>>; 4],
    accepted_tcb_statuses: BTreeSet<String>,
    max_validity: Duration,
}

/// Why a policy file could not be loaded. Each variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not JSON, an unknown field, a missing field or a wrong type; serde's message names the field.
    #[error("policy is not valid: {0}")]
    Json(#[source] serde_json::Error),
    /// A field parsed but its value is not acceptable.
    #[error("policy field `{field}`: {reason}")]
    Field { field: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mrtd: Vec<String>,
    #[serde(default)]
    rtmr0: Option<Vec<String>>,
    #[serde(default)]
    rtmr1: Option<Vec<String>>,
    #[serde(default)]
    rtmr2: Option<Vec<String>>,
    #[serde(default)]
    rtmr3: Option<Vec<String>>,
    accepted_tcb_statuses: Vec<String>,
    max_validity_secs: u64,
}

fn field_error(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn parse_measurements(
    field: &str,
    values: &[String],
) -> Result<BTreeSet<Measurement>, PolicyError> {
    if values.is_empty() {
        return Err(field_error(
            field,
            "empty list accepts no TD; omit the field to accept any value",
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            hex::decode_array::<48>(v).map_err(|e| field_error(format!("{field}[{i}]"), e))
        })
        .collect()
}

/// The statuses `dcap-qvl` can report that a policy may accept (everything but `Revoked`).
const ACCEPTABLE_STATUSES: [TcbStatus; 8] = [
    TcbStatus::UpToDate,
    TcbStatus::SWHardeningNeeded,
    TcbStatus::ConfigurationNeeded,
    TcbStatus::ConfigurationAndSWHardeningNeeded,
    TcbStatus::OutOfDate,
    TcbStatus::OutOfDateConfigurationNeeded,
    TcbStatus::TDRelaunchAdvised,
    TcbStatus::TDRelaunchAdvisedConfigurationNeeded,
];

fn parse_statuses(values: &[String]) -> Result<BTreeSet<String>, PolicyError> {
    let field = "accepted_tcb_statuses";
    if values.is_empty() {
        return Err(field_error(field, "empty list accepts no platform"));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if ACCEPTABLE_STATUSES.iter().any(|s| s.to_string() == *v) {
                Ok(v.clone())
            } else {
                let known: Vec<String> =
                    ACCEPTABLE_STATUSES.iter().map(|s| s.to_string()).collect();
                Err(field_error(
                    format!("{field}[{i}]"),
                    format!("unknown or unacceptable TCB status {v:?}; expected one of {known:?}"),
                ))
            }
        })
        .collect()
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// Parses and validates a policy document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PolicyError> {
        let raw: RawPolicy = serde_json::from_slice(bytes).map_err(PolicyError::Json)?;
        let optional = |field: &str, v: &Option<Vec<String>>| {
            v.as_deref()
                .map(|v| parse_measurements(field, v))
                .transpose()
        };
        if raw.max_validity_secs == 0 {
            return Err(field_error("max_validity_secs", "must be positive"));
        }
        Ok(Self {
            mrtd: parse_measurements("mrtd", &raw.mrtd)?,
            rtmrs: [
                optional("rtmr0", &raw.rtmr0)?,
                optional("rtmr1", &raw.rtmr1)?,
                optional("rtmr2", &raw.rtmr2)?,
                optional("rtmr3", &raw.rtmr3)?,
            ],
            accepted_tcb_statuses: parse_statuses(&raw.accepted_tcb_statuses)?,
            max_validity: Duration::from_secs(raw.max_validity_secs),
        })
    }

    /// A policy built in code (tests, dev tools): accepts `mrtd`, any RTMRs, only `UpToDate`, for a day.
    pub fn builder(mrtd: Measurement) -> PolicyBuilder {
        PolicyBuilder(Self {
            mrtd: BTreeSet::from([mrtd]),
            rtmrs: [None, None, None, None],
            accepted_tcb_statuses: BTreeSet::from([TcbStatus::UpToDate.to_string()]),
            max_validity: Duration::from_secs(86_400),
        })
    }

    /// Whether a TCB status (as `dcap-qvl` displays it) is accepted.
    pub fn accepts_tcb_status(&self, status: &str) -> bool {
        self.accepted_tcb_statuses.contains(status)
    }

    /// Whether `value` is allowed for `register`.
    pub fn allows(&self, register: Register, value: &Measurement) -> bool {
        let allowed = match register {
            Register::Mrtd => Some(&self.mrtd),
            Register::Rtmr0 => self.rtmrs[0].as_ref(),
            Register::Rtmr1 => self.rtmrs[1].as_ref(),
            Register::Rtmr2 => self.rtmrs[2].as_ref(),
            Register::Rtmr3 => self.rtmrs[3].as_ref(),
        };
        allowed.is_none_or(|set| set.contains(value))
    }

    /// The first register whose value the policy does not allow, in the order MRTD, RTMR0..3.
    pub fn first_disallowed(
        &self,
        values: &[(Register, Measurement)],
    ) -> Option<(Register, Measurement)> {
        values.iter().copied().find(|(r, v)| !self.allows(*r, v))
    }

    /// The cap on a verdict's lifetime.
    pub fn max_validity(&self) -> Duration {
        self.max_validity
    }
}

/// `Err(td_attributes)` when any TUD bit (TDATTRIBUTES 7:0, DEBUG being bit 0) is set. `td_attributes`
/// is the 8-byte little-endian field of the TD report.
pub fn check_not_debug(td_attributes: [u8; 8]) -> Result<(), u64> {
    let attributes = u64::from_le_bytes(td_attributes);
    if attributes & TD_ATTRIBUTES_TUD_MASK != 0 {
        Err(attributes)
    } else {
        Ok(())
    }
}

/// Builds a [`Policy`] in code.
#[derive(Debug, Clone)]
pub struct PolicyBuilder(Policy);

impl PolicyBuilder {
    /// Also allow `value` for `register`. For an RTMR this turns "any value" into "one of those allowed".
    pub fn allow(mut self, register: Register, value: Measurement) -> Self {
        let set = match register {
            Register::Mrtd => &mut self.0.mrtd,
            Register::Rtmr0 => self.0.rtmrs[0].get_or_insert_with(BTreeSet::new),
            Register::Rtmr1 => self.0.rtmrs[1].get_or_insert_with(BTreeSet::new),
            Register::Rtmr2 => self.0.rtmrs[2].get_or_insert_with(BTreeSet::new),
            Register::Rtmr3 => self.0.rtmrs[3].get_or_insert_with(BTreeSet::new),
        };
        set.insert(value);
        self
    }

    /// Replace the accepted TCB statuses.
    pub fn accepted_tcb_statuses(mut self, statuses: &[TcbStatus]) -> Self {
        self.0.accepted_tcb_statuses = statuses.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn max_validity(mut self, max: Duration) -> Self {
        self.0.max_validity = max;
        self
    }

    pub fn build(self) -> Policy {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn json(extra: &str) -> String {
        format!(
            r#"{{"mrtd": ["{M}"], "accepted_tcb_statuses": ["UpToDate"], "max_validity_secs": 60{extra}}}"#
        )
    }

    fn field_of(err: PolicyError) -> String {
        match err {
            PolicyError::Field { field, .. } => field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn a_minimal_policy_accepts_any_rtmr() {
        let p = Policy::from_json(json("").as_bytes()).unwrap();
        let m = hex::decode_array::<48>(M).unwrap();
        assert!(p.allows(Register::Mrtd, &m));
        assert!(!p.allows(Register::Mrtd, &[0; 48]));
        for r in [
            Register::Rtmr0,
            Register::Rtmr1,
            Register::Rtmr2,
            Register::Rtmr3,
        ] {
            assert!(p.allows(r, &[7; 48]));
        }
        assert!(p.accepts_tcb_status("UpToDate"));
        assert!(!p.accepts_tcb_status("OutOfDate"));
        assert_eq!(p.max_validity(), Duration::from_secs(60));
    }

    #[test]
    fn a_listed_rtmr_must_match() {
        let p =
            Policy::from_json(json(&format!(r#", "rtmr2": ["{}"]"#, M.to_uppercase())).as_bytes())
                .unwrap();
        let m = hex::decode_array::<48>(M).unwrap();
        assert!(p.allows(Register::Rtmr2, &m));
        assert!(!p.allows(Register::Rtmr2, &[0; 48]));
        assert_eq!(
            p.first_disallowed(&[(Register::Mrtd, m), (Register::Rtmr2, [0; 48])]),
            Some((Register::Rtmr2, [0; 48]))
        );
    }

    #[test]
    fn loading_errors_name_the_field() {
        let bad_hex = format!(
            r#"{{"mrtd": ["{M}", "abc"], "accepted_tcb_statuses": ["UpToDate"], "max_validity_secs": 60}}"#
        );
        assert_eq!(
            field_of(Policy::from_json(bad_hex.as_bytes()).unwrap_err()),
            "mrtd[1]"
        );

        let empty_rtmr = json(r#", "rtmr1": []"#);
        assert_eq!(
            field_of(Policy::from_json(empty_rtmr.as_bytes()).unwrap_err()),
            "rtmr1"
        );

        let bad_status = format!(
            r#"{{"mrtd": ["{M}"], "accepted_tcb_statuses": ["UpToDate", "Revoked"], "max_validity_secs": 60}}"#
        );
        assert_eq!(
            field_of(Policy::from_json(bad_status.as_bytes()).unwrap_err()),
            "accepted_tcb_statuses[1]"
        );

        let zero = format!(
            r#"{{"mrtd": ["{M}"], "accepted_tcb_statuses": ["UpToDate"], "max_validity_secs": 0}}"#
        );
        assert_eq!(
            field_of(Policy::from_json(zero.as_bytes()).unwrap_err()),
            "max_validity_secs"
        );

        let unknown = json(r#", "allow_debug": true"#);
        let err = Policy::from_json(unknown.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `allow_debug`"), "{err}");

        let missing = r#"{"accepted_tcb_statuses": ["UpToDate"], "max_validity_secs": 60}"#;
        let err = Policy::from_json(missing.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `mrtd`"), "{err}");

        let err = Policy::load(Path::new("/nonexistent/policy.json")).unwrap_err();
        assert!(matches!(err, PolicyError::Read { .. }), "{err}");
    }

    #[test]
    fn any_tud_bit_is_a_debug_td() {
        assert_eq!(check_not_debug([0; 8]), Ok(()));
        // SEPT_VE_DISABLE (bit 28), as production TDs set it, is not a debug bit.
        assert_eq!(check_not_debug((1u64 << 28).to_le_bytes()), Ok(()));
        assert_eq!(check_not_debug(TD_ATTRIBUTES_DEBUG.to_le_bytes()), Err(1));
        for bit in 0..8 {
            assert!(
                check_not_debug((1u64 << bit).to_le_bytes()).is_err(),
                "bit {bit}"
            );
        }
        for bit in 8..64 {
            assert!(
                check_not_debug((1u64 << bit).to_le_bytes()).is_ok(),
                "bit {bit}"
            );
        }
    }
}
