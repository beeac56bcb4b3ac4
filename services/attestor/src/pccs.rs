//! A PCCS (or Intel PCS) v4 client: fetches one platform's collateral and assembles the same
//! [`Collateral`] a collateral file gives.
//!
//! It asks what `dcap-qvl`'s own client asks (`CollateralClient::fetch_for_fmspc_without_pck_chain`, which
//! is built on `reqwest` and so is not used here), with the same URLs and selectors:
//! - `{base}/sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der`: the PCK CRL (DER body),
//!   issuer chain in `SGX-PCK-CRL-Issuer-Chain`;
//! - `{base}/tdx/certification/v4/tcb?fmspc={FMSPC}&update=standard`: `{"tcbInfo": …, "signature": hex}`,
//!   issuer chain in `SGX-TCB-Info-Issuer-Chain` (or `TCB-Info-Issuer-Chain`);
//! - `{base}/tdx/certification/v4/qe/identity?update=standard`: `{"enclaveIdentity": …, "signature": hex}`,
//!   issuer chain in `SGX-Enclave-Identity-Issuer-Chain`;
//! - `{base}/sgx/certification/v4/rootcacrl`: the root CA CRL, hex (a PCCS; DER is accepted too). Intel's
//!   PCS has no such endpoint: for it, and when a PCCS fails to answer, the CRL is fetched from the
//!   distribution point named in the root certificate of the QE identity issuer chain.
//!
//! Issuer-chain headers are URL-decoded (PCCS percent-encodes the PEM). One difference from `dcap-qvl`: the
//! TCB info and QE identity are kept as the exact bytes served (`serde_json`'s `RawValue`) rather than
//! re-serialised from a parsed value, since Intel's signature is over those bytes.
//!
//! The transport is the `httpc` crate's HTTP/1.1 GET ([`httpc::HttpClient`]: `Connection: close`, a size
//! bound and a timeout per request, rustls with the ring provider for `https://`, the system's roots plus
//! an optional extra CA file for a PCCS with its own certificate). Redirects are not followed. Every
//! failure is a typed [`PccsError`] naming the URL (`httpc`'s errors keep their variant names here);
//! [`PccsError::is_transient`] says whether asking again later may help.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::config::PckCa;
use httpc::{ClientConfig, HttpClient, HttpError, Target};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::collateral::{Collateral, der_tlv};
use crate::hex;

/// What [`PccsClient::get`] returns (`httpc`'s response).
pub use httpc::HttpResponse;

/// Intel's PCS, which serves no `rootcacrl` (see the module doc).
pub const INTEL_PCS_URL: &str = "https://api.trustedservices.intel.com";

/// Why collateral could not be fetched. Each names the URL that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PccsError {
    /// A URL (the configured one, or a CRL distribution point) that this client cannot use.
    #[error("URL {url:?} is not usable: {reason}")]
    Invalid { url: String, reason: String },
    /// The extra CA file cannot be read or holds no certificate; or no trust roots at all for https.
    #[error("TLS trust roots: {reason}")]
    Roots {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("TLS with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("{url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    /// The connection failed after it was made (reset, closed mid-write).
    #[error("{url}: connection failed: {reason}")]
    Io { url: String, reason: String },
    #[error("{url} answered more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url} answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: the response has no {header} header")]
    MissingHeader { url: String, header: &'static str },
    /// Not an HTTP response, a truncated one, or a body that is not what the endpoint serves.
    #[error("{url}: bad response: {reason}")]
    Body { url: String, reason: String },
    /// The items fetched do not make a collateral for the platform asked for.
    #[error("collateral from {url}: {reason}")]
    Collateral { url: String, reason: String },
}

impl From<HttpError> for PccsError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Invalid { url, reason } => PccsError::Invalid { url, reason },
            HttpError::Roots { path, reason } => PccsError::Roots { path, reason },
            HttpError::Connect { url, reason } => PccsError::Connect { url, reason },
            HttpError::Tls { url, reason } => PccsError::Tls { url, reason },
            HttpError::Timeout { url, after } => PccsError::Timeout { url, after },
            HttpError::Io { url, reason } => PccsError::Io { url, reason },
            HttpError::TooLarge { url, limit } => PccsError::TooLarge { url, limit },
            HttpError::Body { url, reason } => PccsError::Body { url, reason },
        }
    }
}

impl PccsError {
    /// Whether the same request may succeed later: the network, a timeout, HTTP 5xx, 408 or 429. A 404 (the
    /// PCCS does not know the platform), a malformed answer or a TLS failure is not.
    pub fn is_transient(&self) -> bool {
        match self {
            PccsError::Connect { .. } | PccsError::Timeout { .. } | PccsError::Io { .. } => true,
            PccsError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// How to reach a PCCS.
#[derive(Debug, Clone)]
pub struct PccsConfig {
    /// Base URL, e.g. `https://pccs.internal:8081` (a trailing `/sgx/certification/v4` is accepted).
    pub url: String,
    /// A PEM file of extra trusted CA certificates (a PCCS with a self-signed certificate).
    pub extra_ca: Option<PathBuf>,
    /// Each request (connect, TLS, request, response) at most.
    pub timeout: Duration,
    /// A response (head and body) larger than this is refused.
    pub max_response: usize,
}

impl PccsConfig {
    /// `httpc`'s defaults: no extra CA, 8 s per request, responses up to 4 MiB.
    pub fn new(url: impl Into<String>) -> Self {
        let ClientConfig {
            extra_ca,
            timeout,
            max_response,
        } = ClientConfig::new();
        Self {
            url: url.into(),
            extra_ca,
            timeout,
            max_response,
        }
    }
}

/// A PCCS client; cheap to clone.
#[derive(Debug, Clone)]
pub struct PccsClient {
    base: String,
    http: HttpClient,
}

#[derive(Deserialize)]
struct TcbInfoResponse {
    #[serde(rename = "tcbInfo")]
    tcb_info: Box<RawValue>,
    signature: String,
}

#[derive(Deserialize)]
struct QeIdentityResponse {
    #[serde(rename = "enclaveIdentity")]
    enclave_identity: Box<RawValue>,
    signature: String,
}

impl PccsClient {
    /// Checks the URL and builds the TLS trust roots (the system's, plus `extra_ca`).
    pub fn new(config: &PccsConfig) -> Result<Self, PccsError> {
        let base = config
            .url
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_owned();
        let target = Target::parse(&format!("{base}/")).map_err(|e| match e {
            HttpError::Invalid { reason, .. } => PccsError::Invalid {
                url: config.url.clone(),
                reason,
            },
            other => other.into(),
        })?;
        let http = ClientConfig {
            extra_ca: config.extra_ca.clone(),
            timeout: config.timeout,
            max_response: config.max_response,
        };
        let http = HttpClient::new(&http, target.is_https()).map_err(|e| match e {
            HttpError::Roots { path: None, reason } => PccsError::Roots {
                path: None,
                reason: format!("{reason}; give the PCCS's CA with --pccs-ca"),
            },
            other => other.into(),
        })?;
        Ok(Self { base, http })
    }

    /// The base URL the endpoints hang off.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The URLs asked for a TDX platform: PCK CRL, TCB info, QE identity, root CA CRL.
    pub fn urls(&self, fmspc: &[u8; 6], ca: PckCa) -> [String; 4] {
        let v4 = |tee: &str, path: &str| format!("{}/{tee}/certification/v4/{path}", self.base);
        [
            v4("sgx", &format!("pckcrl?ca={}&encoding=der", ca.as_id_str())),
            v4(
                "tdx",
                &format!("tcb?fmspc={}&update=standard", hex::encode_upper(fmspc)),
            ),
            v4("tdx", "qe/identity?update=standard"),
            v4("sgx", "rootcacrl"),
        ]
    }

    /// Fetches and parses the collateral of the TDX platform `fmspc`, whose PCK certificate `ca` issued.
    pub async fn fetch(&self, fmspc: &[u8; 6], ca: PckCa) -> Result<Collateral, PccsError> {
        let raw = self.fetch_raw(fmspc, ca).await?;
        let [_, tcb_url, ..] = self.urls(fmspc, ca);
        let collateral =
            Collateral::new(raw, Path::new(&tcb_url)).map_err(|e| PccsError::Collateral {
                url: tcb_url.clone(),
                reason: e.to_string(),
            })?;
        if collateral.fmspc() != *fmspc {
            return Err(PccsError::Collateral {
                url: tcb_url,
                reason: format!(
                    "TCB info is for FMSPC {}, not the {} asked for",
                    hex::encode(&collateral.fmspc()),
                    hex::encode(fmspc)
                ),
            });
        }
        Ok(collateral)
    }

    /// The collateral items, as `dcap-qvl`'s `QuoteCollateralV3` (no PCK chain: TDX quotes carry theirs).
    pub async fn fetch_raw(
        &self,
        fmspc: &[u8; 6],
        ca: PckCa,
    ) -> Result<QuoteCollateralV3, PccsError> {
        let [pck_crl_url, tcb_url, qe_url, root_crl_url] = self.urls(fmspc, ca);
        let pck_crl = async {
            let response = self.checked_get(&pck_crl_url).await?;
            let chain = header_text(&response, &pck_crl_url, &["SGX-PCK-CRL-Issuer-Chain"])?;
            Ok::<_, PccsError>((chain, response.body))
        };
        let tcb = async {
            let response = self.checked_get(&tcb_url).await?;
            let chain = header_text(
                &response,
                &tcb_url,
                &["SGX-TCB-Info-Issuer-Chain", "TCB-Info-Issuer-Chain"],
            )?;
            let parsed: TcbInfoResponse =
                serde_json::from_slice(&response.body).map_err(|e| PccsError::Body {
                    url: tcb_url.clone(),
                    reason: format!("not a TCB info response: {e}"),
                })?;
            let signature = hex::decode_vec(&parsed.signature).map_err(|e| PccsError::Body {
                url: tcb_url.clone(),
                reason: format!("TCB info signature: {e}"),
            })?;
            Ok((chain, parsed.tcb_info.get().to_owned(), signature))
        };
        let qe = async {
            let response = self.checked_get(&qe_url).await?;
            let chain = header_text(&response, &qe_url, &["SGX-Enclave-Identity-Issuer-Chain"])?;
            let parsed: QeIdentityResponse =
                serde_json::from_slice(&response.body).map_err(|e| PccsError::Body {
                    url: qe_url.clone(),
                    reason: format!("not a QE identity response: {e}"),
                })?;
            let signature = hex::decode_vec(&parsed.signature).map_err(|e| PccsError::Body {
                url: qe_url.clone(),
                reason: format!("QE identity signature: {e}"),
            })?;
            Ok((chain, parsed.enclave_identity.get().to_owned(), signature))
        };
        let root_crl = async {
            if self.base.starts_with(INTEL_PCS_URL) {
                return Ok(None);
            }
            match self.checked_get(&root_crl_url).await {
                Ok(response) => {
                    root_crl_body(&response.body)
                        .map(Some)
                        .map_err(|reason| PccsError::Body {
                            url: root_crl_url.clone(),
                            reason,
                        })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no root CA CRL from the PCCS; trying the root certificate's distribution point");
                    Ok(None)
                }
            }
        };
        let (
            (pck_crl_issuer_chain, pck_crl),
            (tcb_info_issuer_chain, tcb_info, tcb_info_signature),
            (qe_identity_issuer_chain, qe_identity, qe_identity_signature),
            root_ca_crl,
        ) = tokio::try_join!(pck_crl, tcb, qe, root_crl)?;
        let root_ca_crl = match root_ca_crl {
            Some(crl) => crl,
            None => {
                let url =
                    root_crl_distribution_point(&qe_identity_issuer_chain).map_err(|reason| {
                        PccsError::Collateral {
                            url: qe_url.clone(),
                            reason: format!("QE identity issuer chain: {reason}"),
                        }
                    })?;
                self.checked_get(&url).await?.body
            }
        };
        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            tcb_info,
            tcb_info_signature,
            qe_identity_issuer_chain,
            qe_identity,
            qe_identity_signature,
            pck_certificate_chain: None,
        })
    }

    /// GET `url`; a status other than 2xx is [`PccsError::Http`].
    async fn checked_get(&self, url: &str) -> Result<HttpResponse, PccsError> {
        let response = self.get(url).await?;
        if response.is_success() {
            Ok(response)
        } else {
            Err(PccsError::Http {
                url: url.to_owned(),
                status: response.status,
            })
        }
    }

    /// One HTTP/1.1 GET, whatever its status, under the client's timeout and size bound.
    pub async fn get(&self, url: &str) -> Result<HttpResponse, PccsError> {
        Ok(self.http.get(url, &[]).await?)
    }
}

/// The value of the first of `names` present, URL-decoded (PCCS percent-encodes its issuer chains).
fn header_text(
    response: &HttpResponse,
    url: &str,
    names: &[&'static str],
) -> Result<String, PccsError> {
    let (name, value) = names
        .iter()
        .find_map(|name| response.header(name).map(|v| (*name, v)))
        .ok_or_else(|| PccsError::MissingHeader {
            url: url.to_owned(),
            header: names[0],
        })?;
    String::from_utf8(percent_decode(value)).map_err(|_| PccsError::Body {
        url: url.to_owned(),
        reason: format!("{name} is not UTF-8 once URL-decoded"),
    })
}

/// `%XX` escapes decoded; anything else, a `%` not followed by two hex digits included, kept as is. A `+`
/// stays a `+` (base64 has them; this is not form encoding).
fn percent_decode(value: &[u8]) -> Vec<u8> {
    let hex_digit = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                value.get(i + 1).copied().and_then(hex_digit),
                value.get(i + 2).copied().and_then(hex_digit),
            )
        {
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    out
}

/// A PCCS serves the root CA CRL as hex; DER (a SEQUENCE) is taken as it is.
fn root_crl_body(body: &[u8]) -> Result<Vec<u8>, String> {
    if body.first() == Some(&0x30) {
        return Ok(body.to_vec());
    }
    let text = std::str::from_utf8(body).map_err(|_| "root CA CRL is neither hex nor DER")?;
    hex::decode_vec(text.trim()).map_err(|e| format!("root CA CRL is neither hex nor DER: {e}"))
}

/// The CRL distribution point URL of the last (root) certificate of a PEM chain.
fn root_crl_distribution_point(pem_chain: &str) -> Result<String, String> {
    let certs = CertificateDer::pem_slice_iter(pem_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    let root = certs.last().ok_or("no certificate")?;
    crl_distribution_point(root)?
        .ok_or_else(|| "the root certificate names no CRL distribution point".into())
}

/// The first URI of a certificate's CRL distribution points extension (OID 2.5.29.31), by DER walking.
fn crl_distribution_point(cert: &[u8]) -> Result<Option<String>, String> {
    const CRL_DP_OID: [u8; 3] = [0x55, 0x1d, 0x1f];
    let (_, certificate, _) = der_tlv(cert)?;
    let (_, tbs, _) = der_tlv(certificate)?;
    let mut fields = tbs;
    while !fields.is_empty() {
        let (tag, contents, next) = der_tlv(fields)?;
        fields = next;
        if tag != 0xa3 {
            continue; // not [3] extensions
        }
        let (_, mut extensions, _) = der_tlv(contents)?;
        while !extensions.is_empty() {
            let (_, extension, next) = der_tlv(extensions)?;
            extensions = next;
            let (tag, oid, rest) = der_tlv(extension)?;
            if tag != 0x06 || oid != CRL_DP_OID {
                continue;
            }
            let (mut tag, mut value, rest) = der_tlv(rest)?;
            if tag == 0x01 {
                (tag, value, _) = der_tlv(rest)?; // skip `critical`
            }
            if tag != 0x04 {
                return Err("CRL distribution points extension is not an OCTET STRING".into());
            }
            return Ok(find_uri(value, 0));
        }
    }
    Ok(None)
}

/// The first `[6] uniformResourceIdentifier` inside `der`.
fn find_uri(mut der: &[u8], depth: usize) -> Option<String> {
    while depth < 8 && !der.is_empty() {
        let (tag, contents, next) = der_tlv(der).ok()?;
        if tag == 0x86 {
            return String::from_utf8(contents.to_vec()).ok();
        }
        if tag & 0x20 != 0
            && let Some(uri) = find_uri(contents, depth + 1)
        {
            return Some(uri);
        }
        der = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collateral_fixture() -> QuoteCollateralV3 {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/collateral/tdx_quote_collateral.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn urls_are_dcap_qvls() {
        let client = PccsClient::new(&PccsConfig::new(
            "https://pccs.example.com/sgx/certification/v4/",
        ))
        .unwrap();
        assert_eq!(client.base_url(), "https://pccs.example.com");
        let fmspc = [0xb0, 0xc0, 0x6f, 0, 0, 0];
        assert_eq!(
            client.urls(&fmspc, PckCa::Processor),
            [
                "https://pccs.example.com/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
                "https://pccs.example.com/tdx/certification/v4/tcb?fmspc=B0C06F000000&update=standard",
                "https://pccs.example.com/tdx/certification/v4/qe/identity?update=standard",
                "https://pccs.example.com/sgx/certification/v4/rootcacrl",
            ]
        );
        assert!(
            client.urls(&fmspc, PckCa::Platform)[0].ends_with("pckcrl?ca=platform&encoding=der")
        );
    }

    #[test]
    fn an_unusable_base_url_is_invalid() {
        // URL parsing itself is `httpc`'s (and tested there); the error names the URL as configured.
        for bad in ["pccs.example", "ftp://pccs.example/", "http://pccs/a b"] {
            let err = PccsClient::new(&PccsConfig::new(bad)).unwrap_err();
            assert!(
                matches!(&err, PccsError::Invalid { url, .. } if url == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn header_values_are_url_decoded() {
        assert_eq!(percent_decode(b"a%2Bb%0A%3d+c"), b"a+b\n=+c");
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz%4"), b"%zz%4");
        assert_eq!(percent_decode("%C3%A9".as_bytes()), "é".as_bytes());
    }

    #[test]
    fn root_crl_bodies_are_hex_or_der() {
        let crl = collateral_fixture().root_ca_crl;
        assert_eq!(root_crl_body(hex::encode(&crl).as_bytes()).unwrap(), crl);
        assert_eq!(
            root_crl_body(format!("{}\n", hex::encode(&crl)).as_bytes()).unwrap(),
            crl
        );
        assert_eq!(root_crl_body(&crl).unwrap(), crl);
        assert!(root_crl_body(b"not a crl").is_err());
        assert!(root_crl_body(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn the_root_crl_distribution_point_is_read_from_intels_root_certificate() {
        let c = collateral_fixture();
        assert_eq!(
            root_crl_distribution_point(&c.qe_identity_issuer_chain).unwrap(),
            "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
        );
        assert!(root_crl_distribution_point("no pem here").is_err());
        // Truncated certificates are errors or nothing, never panics.
        let der: Vec<Vec<u8>> =
            CertificateDer::pem_slice_iter(c.qe_identity_issuer_chain.as_bytes())
                .map(|c| c.unwrap().to_vec())
                .collect();
        let root = der.last().unwrap();
        for len in 0..root.len() {
            let _ = crl_distribution_point(&root[..len]);
        }
    }

    #[test]
    fn transient_errors_are_the_networks_and_5xx() {
        let url = String::new;
        assert!(
            PccsError::Connect {
                url: url(),
                reason: String::new()
            }
            .is_transient()
        );
        assert!(
            PccsError::Http {
                url: url(),
                status: 503
            }
            .is_transient()
        );
        assert!(
            PccsError::Http {
                url: url(),
                status: 429
            }
            .is_transient()
        );
        assert!(
            !PccsError::Http {
                url: url(),
                status: 404
            }
            .is_transient()
        );
        assert!(
            !PccsError::MissingHeader {
                url: url(),
                header: "x"
            }
            .is_transient()
        );
    }
}
