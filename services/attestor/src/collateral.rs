//! Quote collateral: Intel's signed TCB info, QE identity and CRLs that a quote is verified against,
//! loaded from files or fetched from a PCCS ([`crate::pccs`]), and indexed by platform (FMSPC).
//!
//! A collateral file is the JSON that `dcap-qvl` (and its PCCS client) produces: a `QuoteCollateralV3`
//! with the byte fields hex-encoded (see `tests/fixtures/tdx_quote_collateral.json`).
//!
//! Each collateral carries a validity window: the latest of its items' issue dates to the earliest of
//! their next updates (TCB info and QE identity `issueDate`/`nextUpdate`, the two CRLs'
//! `thisUpdate`/`nextUpdate`). The verifier refuses to verify outside it, so an expired collateral is
//! reported as such rather than as an opaque chain-of-trust failure. Verification itself never does IO:
//! with files, refreshing collateral means building a new [`CollateralStore`] (and verifier); with a PCCS,
//! the service fetches a platform's collateral before verifying a quote that needs it and adds it to the
//! verifier's store ([`crate::Verifier::add_collateral`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dcap_qvl::QuoteCollateralV3;
use events::Timestamp;

use crate::hex;

/// Where collateral comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollateralSource {
    /// A collateral JSON file, or a directory whose `*.json` files are each one collateral (one per
    /// FMSPC, typically named `<fmspc>.json`; the name is not trusted, the FMSPC is read from the TCB info).
    Files(PathBuf),
    /// A PCCS base URL (`https://pccs.example:8081`; a trailing `/sgx/certification/v4` is accepted).
    /// Nothing is loaded up front: [`CollateralStore::load`] gives an empty store, and the service fetches
    /// each platform's collateral with a [`crate::pccs::PccsClient`] when a quote first needs it.
    Url(String),
}

/// Why collateral could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CollateralError {
    #[error("cannot read collateral {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("collateral {path} is not a dcap-qvl QuoteCollateralV3 JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The JSON parsed, but a field inside it (TCB info, QE identity, a CRL) does not.
    #[error("collateral {path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("collateral {path} is for FMSPC {fmspc}, which {other} also covers")]
    DuplicateFmspc {
        path: PathBuf,
        other: PathBuf,
        fmspc: String,
    },
    #[error("no collateral files (*.json) in {0}")]
    Empty(PathBuf),
}

/// One dated item of a collateral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dated {
    pub what: &'static str,
    /// Unix seconds: `issueDate` / `thisUpdate`.
    pub issued: u64,
    /// Unix seconds: `nextUpdate`, when the item has one.
    pub next_update: Option<u64>,
}

/// Why a collateral cannot be used at some instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsideWindow {
    pub item: Dated,
    pub at: u64,
}

impl fmt::Display for OutsideWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = secs_to_string(self.at);
        match self.item.next_update {
            Some(next) if self.at >= next => write!(
                f,
                "{} expired at {} (verification time {at})",
                self.item.what,
                secs_to_string(next)
            ),
            _ => write!(
                f,
                "{} issued at {}, after verification time {at}",
                self.item.what,
                secs_to_string(self.item.issued)
            ),
        }
    }
}

fn secs_to_string(secs: u64) -> String {
    Timestamp::from_micros(
        i64::try_from(secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000),
    )
    .to_string()
}

/// One platform's collateral, parsed enough to index and date it.
#[derive(Debug, Clone)]
pub struct Collateral {
    raw: QuoteCollateralV3,
    fmspc: [u8; 6],
    dates: Vec<Dated>,
    origin: PathBuf,
}

impl Collateral {
    /// Parses a collateral JSON document; `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &Path) -> Result<Self, CollateralError> {
        let raw: QuoteCollateralV3 =
            serde_json::from_slice(bytes).map_err(|source| CollateralError::Json {
                path: origin.to_owned(),
                source,
            })?;
        Self::new(raw, origin)
    }

    /// Wraps a collateral already in memory.
    pub fn new(raw: QuoteCollateralV3, origin: &Path) -> Result<Self, CollateralError> {
        let field = |field: &'static str, reason: String| CollateralError::Field {
            path: origin.to_owned(),
            field,
            reason,
        };
        let tcb_info: dcap_qvl::TcbInfo =
            serde_json::from_str(&raw.tcb_info).map_err(|e| field("tcb_info", e.to_string()))?;
        let qe_identity: dcap_qvl::QeIdentity = serde_json::from_str(&raw.qe_identity)
            .map_err(|e| field("qe_identity", e.to_string()))?;
        let fmspc =
            hex::decode_array::<6>(&tcb_info.fmspc).map_err(|e| field("tcb_info.fmspc", e))?;

        let json_item =
            |what: &'static str, issue: &str, next: &str| -> Result<Dated, CollateralError> {
                Ok(Dated {
                    what,
                    issued: parse_rfc3339(issue)
                        .map_err(|e| field(what, format!("issueDate: {e}")))?,
                    next_update: Some(
                        parse_rfc3339(next).map_err(|e| field(what, format!("nextUpdate: {e}")))?,
                    ),
                })
            };
        let crl_item = |what: &'static str, der: &[u8]| -> Result<Dated, CollateralError> {
            let (issued, next_update) = crl_dates(der).map_err(|e| field(what, e))?;
            Ok(Dated {
                what,
                issued,
                next_update,
            })
        };
        let dates = vec![
            json_item("TCB info", &tcb_info.issue_date, &tcb_info.next_update)?,
            json_item(
                "QE identity",
                &qe_identity.issue_date,
                &qe_identity.next_update,
            )?,
            crl_item("root CA CRL", &raw.root_ca_crl)?,
            crl_item("PCK CRL", &raw.pck_crl)?,
        ];
        Ok(Self {
            raw,
            fmspc,
            dates,
            origin: origin.to_owned(),
        })
    }

    pub fn raw(&self) -> &QuoteCollateralV3 {
        &self.raw
    }

    pub fn fmspc(&self) -> [u8; 6] {
        self.fmspc
    }

    pub fn dates(&self) -> &[Dated] {
        &self.dates
    }

    /// The earliest next update among the dated items: after it, this collateral is stale.
    pub fn expires_at(&self) -> Option<u64> {
        self.dates.iter().filter_map(|d| d.next_update).min()
    }

    /// `Err` naming the first item whose window `[issued, next_update)` excludes `at` (Unix seconds). The
    /// end is exclusive, as webpki treats a CRL at its nextUpdate.
    pub fn check_window(&self, at: u64) -> Result<(), OutsideWindow> {
        match self
            .dates
            .iter()
            .find(|d| at < d.issued || d.next_update.is_some_and(|next| at >= next))
        {
            Some(item) => Err(OutsideWindow { item: *item, at }),
            None => Ok(()),
        }
    }
}

/// Collateral for every platform the pool knows, by FMSPC.
#[derive(Debug, Clone, Default)]
pub struct CollateralStore {
    by_fmspc: HashMap<[u8; 6], Arc<Collateral>>,
}

impl CollateralStore {
    /// Loads every collateral the source names; a PCCS source starts empty (its collateral is fetched
    /// when quotes need it).
    pub fn load(source: &CollateralSource) -> Result<Self, CollateralError> {
        match source {
            CollateralSource::Url(_) => Ok(Self::default()),
            CollateralSource::Files(path) => {
                let read_err = |path: &Path| {
                    let path = path.to_owned();
                    move |source| CollateralError::Read { path, source }
                };
                let files = if path.is_dir() {
                    let mut files = Vec::new();
                    for entry in std::fs::read_dir(path).map_err(read_err(path))? {
                        let file = entry.map_err(read_err(path))?.path();
                        if file.extension().is_some_and(|e| e == "json") {
                            files.push(file);
                        }
                    }
                    files.sort();
                    if files.is_empty() {
                        return Err(CollateralError::Empty(path.clone()));
                    }
                    files
                } else {
                    vec![path.clone()]
                };
                let collaterals = files
                    .iter()
                    .map(|file| {
                        Collateral::from_json(&std::fs::read(file).map_err(read_err(file))?, file)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Self::from_collaterals(collaterals)
            }
        }
    }

    /// A store of these collaterals; two for the same FMSPC are refused.
    pub fn from_collaterals(
        collaterals: impl IntoIterator<Item = Collateral>,
    ) -> Result<Self, CollateralError> {
        let mut by_fmspc: HashMap<[u8; 6], Arc<Collateral>> = HashMap::new();
        for c in collaterals {
            if let Some(other) = by_fmspc.get(&c.fmspc) {
                return Err(CollateralError::DuplicateFmspc {
                    path: c.origin.clone(),
                    other: other.origin.clone(),
                    fmspc: hex::encode(&c.fmspc),
                });
            }
            by_fmspc.insert(c.fmspc, Arc::new(c));
        }
        Ok(Self { by_fmspc })
    }

    pub fn get(&self, fmspc: &[u8; 6]) -> Option<&Collateral> {
        self.by_fmspc.get(fmspc).map(|c| &**c)
    }

    /// The collateral for `fmspc`, shared (to use it after a lock on the store is released).
    pub fn get_shared(&self, fmspc: &[u8; 6]) -> Option<Arc<Collateral>> {
        self.by_fmspc.get(fmspc).cloned()
    }

    /// Adds `collateral`, replacing (and returning) the one held for its FMSPC: a refresh.
    pub fn insert(&mut self, collateral: Collateral) -> Option<Arc<Collateral>> {
        self.by_fmspc.insert(collateral.fmspc, Arc::new(collateral))
    }

    pub fn len(&self) -> usize {
        self.by_fmspc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fmspc.is_empty()
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|+00:00)`, the form Intel's collateral uses, to Unix seconds.
fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 UTC time");
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<u64, String> {
        let digits = b.get(range).ok_or_else(bad)?;
        digits.iter().try_fold(0u64, |acc, d| {
            d.is_ascii_digit()
                .then(|| acc * 10 + u64::from(d - b'0'))
                .ok_or_else(bad)
        })
    };
    // Parse the fields first: once bytes 0..19 are known ASCII, index 19 is a char boundary.
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    if rest != "Z" && rest != "+00:00" {
        return Err(bad());
    }
    civil_to_unix(year, month, day, hour, min, sec).ok_or_else(bad)
}

/// Unix seconds of a UTC civil time (days-from-civil, Howard Hinnant); `None` when a field is out of range.
fn civil_to_unix(year: u64, month: u64, day: u64, hour: u64, min: u64, sec: u64) -> Option<u64> {
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let (y, m, d) = (year as i64, month as i64, day as i64);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|days| days * 86_400 + hour * 3600 + min * 60 + sec)
}

/// A DER tag-length-value: the tag, the contents, and what follows.
pub(crate) fn der_tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let (&tag, rest) = input.split_first().ok_or("truncated DER: no tag")?;
    let (&first, rest) = rest.split_first().ok_or("truncated DER: no length")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(format!("unsupported DER length form 0x{first:02x}"));
        }
        let bytes = rest.get(..n).ok_or("truncated DER length")?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    let contents = rest.get(..len).ok_or("truncated DER contents")?;
    Ok((tag, contents, &rest[len..]))
}

const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_UTC_TIME: u8 = 0x17;
const DER_GENERALIZED_TIME: u8 = 0x18;

/// `thisUpdate` and `nextUpdate` of a DER CRL (RFC 5280 §5.1): the only fields we need, so a few lines
/// of DER walking instead of an X.509 dependency. The CRL's signature is checked by `dcap-qvl`, not here.
fn crl_dates(der: &[u8]) -> Result<(u64, Option<u64>), String> {
    let expect = |want: u8, input| -> Result<(&[u8], &[u8]), String> {
        let (tag, contents, rest) = der_tlv(input)?;
        if tag == want {
            Ok((contents, rest))
        } else {
            Err(format!("expected DER tag 0x{want:02x}, found 0x{tag:02x}"))
        }
    };
    let (cert_list, _) = expect(DER_SEQUENCE, der)?;
    let (tbs, _) = expect(DER_SEQUENCE, cert_list)?;
    let mut rest = tbs;
    if rest.first() == Some(&DER_INTEGER) {
        rest = expect(DER_INTEGER, rest)?.1; // version
    }
    rest = expect(DER_SEQUENCE, rest)?.1; // signature algorithm
    rest = expect(DER_SEQUENCE, rest)?.1; // issuer
    let (tag, this_update, rest) = der_tlv(rest)?;
    let this_update = der_time(tag, this_update)?;
    let next_update = match der_tlv(rest) {
        Ok((tag @ (DER_UTC_TIME | DER_GENERALIZED_TIME), contents, _)) => {
            Some(der_time(tag, contents)?)
        }
        _ => None,
    };
    Ok((this_update, next_update))
}

/// A DER UTCTime (`YYMMDDHHMMSSZ`, years 1950..2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, contents: &[u8]) -> Result<u64, String> {
    if !contents.is_ascii() {
        return Err("DER time is not ASCII".to_string());
    }
    let text = std::str::from_utf8(contents).map_err(|_| "DER time is not ASCII".to_string())?;
    let (year, rest) = match tag {
        DER_UTC_TIME if text.len() == 13 => {
            let yy: u64 = text[..2]
                .parse()
                .map_err(|_| format!("bad UTCTime {text:?}"))?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        DER_GENERALIZED_TIME if text.len() == 15 => (
            text[..4]
                .parse()
                .map_err(|_| format!("bad GeneralizedTime {text:?}"))?,
            &text[4..],
        ),
        _ => return Err(format!("unsupported DER time (tag 0x{tag:02x}) {text:?}")),
    };
    let field = |i: usize| -> Result<u64, String> {
        let digits = rest
            .get(i..i + 2)
            .ok_or_else(|| format!("bad DER time {text:?}"))?;
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse().map_err(|_| format!("bad DER time {text:?}"))
        } else {
            Err(format!("bad DER time {text:?}"))
        }
    };
    if !rest.ends_with('Z') {
        return Err(format!("DER time {text:?} is not UTC"));
    }
    civil_to_unix(year, field(0)?, field(2)?, field(4)?, field(6)?, field(8)?)
        .ok_or_else(|| format!("DER time {text:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_unix_seconds() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2025-06-19T10:16:03Z"), Ok(1_750_328_163));
        assert_eq!(parse_rfc3339("2025-06-19T10:16:03.250Z"), Ok(1_750_328_163));
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00+00:00"),
            Ok(1_709_164_800)
        );
        for bad in [
            "",
            "2025-06-19",
            "2025-06-19T10:16:03",
            "2025-06-19T10:16:03+02:00",
            "2025-13-01T00:00:00Z",
            "2025-06-19T1x:16:03Z",
            "2025-06-19T10:16:03.Z",
            "2025-06-19T10:16:03é",
            "2025-06-19T10:16:0€Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn der_times_parse() {
        assert_eq!(der_time(DER_UTC_TIME, b"250619100035Z"), Ok(1_750_327_235));
        assert_eq!(
            der_time(DER_GENERALIZED_TIME, b"20250619100035Z"),
            Ok(1_750_327_235)
        );
        assert_eq!(der_time(DER_UTC_TIME, b"700101000000Z"), Ok(0));
        assert!(der_time(DER_UTC_TIME, b"2506191000+5Z").is_err());
        assert!(der_time(DER_UTC_TIME, b"250619100035").is_err());
        assert!(der_time(0x04, b"250619100035Z").is_err());
        assert!(der_time(DER_UTC_TIME, "€50619100035".as_bytes()).is_err());
    }

    #[test]
    fn truncated_crls_are_errors_not_panics() {
        let der = [0x30, 0x82, 0x01, 0x00, 0x30];
        for len in 0..=der.len() {
            assert!(crl_dates(&der[..len]).is_err());
        }
        assert!(crl_dates(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
    }

    #[test]
    fn a_url_source_starts_empty() {
        let store =
            CollateralStore::load(&CollateralSource::Url("https://pccs.example/".into())).unwrap();
        assert!(store.is_empty());
    }
}
