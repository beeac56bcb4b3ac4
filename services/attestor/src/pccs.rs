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
//! The transport is a minimal HTTP/1.1 GET over a tokio `TcpStream` (`Connection: close`, identity
//! encoding, `Content-Length`, chunked or read-to-close bodies, a size bound and a timeout per request), and
//! rustls with the ring provider for `https://` (the system's roots plus an optional extra CA file, for a
//! PCCS with its own certificate). Redirects are not followed. Every failure is a typed [`PccsError`]
//! naming the URL; [`PccsError::is_transient`] says whether asking again later may help.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::config::PckCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::collateral::{Collateral, der_tlv};
use crate::hex;

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
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            extra_ca: None,
            timeout: Duration::from_secs(8),
            max_response: 4 << 20,
        }
    }
}

/// A PCCS client; cheap to clone.
#[derive(Clone)]
pub struct PccsClient {
    base: String,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    max_response: usize,
}

impl fmt::Debug for PccsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PccsClient")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("max_response", &self.max_response)
            .finish_non_exhaustive()
    }
}

/// An HTTP response: status, headers (names as sent) and the de-chunked body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
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
        let target = Target::parse(&format!("{base}/")).map_err(|reason| PccsError::Invalid {
            url: config.url.clone(),
            reason,
        })?;
        let tls = tls_config(config.extra_ca.as_deref(), target.tls)?;
        Ok(Self {
            base,
            tls,
            timeout: config.timeout,
            max_response: config.max_response,
        })
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
        if (200..300).contains(&response.status) {
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
        let target = Target::parse(url).map_err(|reason| PccsError::Invalid {
            url: url.to_owned(),
            reason,
        })?;
        match tokio::time::timeout(self.timeout, self.exchange(&target, url)).await {
            Ok(result) => result,
            Err(_) => Err(PccsError::Timeout {
                url: url.to_owned(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange(&self, target: &Target, url: &str) -> Result<HttpResponse, PccsError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| PccsError::Connect {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let request = target.request();
        if target.tls {
            let name =
                ServerName::try_from(target.host.clone()).map_err(|e| PccsError::Invalid {
                    url: url.to_owned(),
                    reason: format!("host is not a TLS server name: {e}"),
                })?;
            let mut stream = TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| PccsError::Tls {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
            exchange_on(&mut stream, &request, url, self.max_response).await
        } else {
            let mut stream = tcp;
            exchange_on(&mut stream, &request, url, self.max_response).await
        }
    }
}

/// The trust roots for https: the system's, plus the certificates in `extra_ca`. With `required` (an
/// https PCCS), having none at all is an error.
fn tls_config(
    extra_ca: Option<&Path>,
    required: bool,
) -> Result<Arc<rustls::ClientConfig>, PccsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "a system root certificate could not be loaded");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let bad = |reason: String| PccsError::Roots {
            path: Some(path.to_owned()),
            reason,
        };
        let pem =
            std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("{}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(format!("{} holds no PEM certificate", path.display())));
        }
    }
    if required && roots.is_empty() {
        return Err(PccsError::Roots {
            path: None,
            reason: "no system root certificates were found; give the PCCS's CA with --pccs-ca"
                .into(),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PccsError::Roots {
        path: None,
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
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

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// Without brackets, for connecting and for TLS.
    host: String,
    port: u16,
    /// As written, for the Host header.
    authority: String,
    /// Path and query, at least `/`.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let scheme_end = url.find("://").ok_or("no scheme (http:// or https://)")?;
        let tls = match url[..scheme_end].to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let rest = &url[scheme_end + 3..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("user info in the URL is not supported".into());
        }
        let default_port = if tls { 443 } else { 80 };
        let bad_port = |p: &str| format!("bad port {p:?}");
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed [ in host")?;
            let port = match after {
                "" => default_port,
                _ => {
                    let p = after.strip_prefix(':').ok_or_else(|| bad_port(after))?;
                    p.parse().map_err(|_| bad_port(p))?
                }
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, p)) => (host, p.parse().map_err(|_| bad_port(p))?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        if !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the host has spaces or control characters".into());
        }
        let path = path.split('#').next().unwrap_or_default();
        let path = match path.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_owned(),
        };
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the path has spaces, control or non-ASCII characters".into());
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }

    fn request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cocoon-attestor/{}\r\nAccept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n",
            self.path,
            self.authority,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes()
    }
}

/// Writes the request and reads one response, at most `limit` bytes of it.
async fn exchange_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    url: &str,
    limit: usize,
) -> Result<HttpResponse, PccsError> {
    let io = |e: std::io::Error| PccsError::Io {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    stream.write_all(request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut reader = ResponseReader::default();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer closing without close_notify: judge what came as if the connection had closed.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io(e)),
        };
        if reader.buf.len() + n > limit {
            return Err(PccsError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        reader.buf.extend_from_slice(&chunk[..n]);
        let progress = reader.advance(n == 0).map_err(|reason| PccsError::Body {
            url: url.to_owned(),
            reason,
        })?;
        if let Some(response) = progress {
            return Ok(response);
        }
        // A declared length over the bound is refused before it is read.
        if let Some(Head {
            len: head_len,
            framing: Framing::Length(len),
            ..
        }) = &reader.head
            && head_len.saturating_add(*len) > limit
        {
            return Err(PccsError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        if n == 0 {
            return Err(PccsError::Body {
                url: url.to_owned(),
                reason: "the connection closed before the response was complete".into(),
            });
        }
    }
}

#[derive(Debug)]
enum Framing {
    Length(usize),
    Chunked(ChunkDecoder),
    UntilClose,
}

#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
    framing: Framing,
}

/// An HTTP/1.1 response read incrementally: the head once, then the body as its framing says.
#[derive(Debug, Default)]
struct ResponseReader {
    buf: Vec<u8>,
    head: Option<Head>,
}

impl ResponseReader {
    /// The response, once complete; `eof`: the connection has closed.
    fn advance(&mut self, eof: bool) -> Result<Option<HttpResponse>, String> {
        if self.head.is_none() {
            match parse_head(&self.buf)? {
                Some(head) => self.head = Some(head),
                None if eof && self.buf.is_empty() => {
                    return Err("the connection closed without a response".into());
                }
                None if eof => return Err("the connection closed inside the response head".into()),
                None => return Ok(None),
            }
        }
        let Some(head) = self.head.as_mut() else {
            return Ok(None);
        };
        let body = &self.buf[head.len..];
        let body = match &mut head.framing {
            Framing::Length(len) if body.len() >= *len => body[..*len].to_vec(),
            Framing::Length(len) if eof => {
                return Err(format!(
                    "the body ended after {} of its {len} bytes",
                    body.len()
                ));
            }
            Framing::Length(_) => return Ok(None),
            Framing::Chunked(decoder) => match decoder.advance(body)? {
                true => std::mem::take(&mut decoder.body),
                false if eof => return Err("the chunked body ended before its last chunk".into()),
                false => return Ok(None),
            },
            Framing::UntilClose if eof => body.to_vec(),
            Framing::UntilClose => return Ok(None),
        };
        Ok(Some(HttpResponse {
            status: head.status,
            headers: std::mem::take(&mut head.headers),
            body,
        }))
    }
}

/// The response head, when all of it is in `buf`.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("not an HTTP/1.x response head: {e}")),
    };
    let status = response.code.ok_or("no status code")?;
    let headers: Vec<(String, Vec<u8>)> = response
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let framing = if let Some(te) = find("transfer-encoding").last() {
        if te.rsplit(',').next().map(str::trim) == Some("chunked") {
            Framing::Chunked(ChunkDecoder::default())
        } else {
            return Err(format!("unsupported Transfer-Encoding {te:?}"));
        }
    } else if let Some(cl) = find("content-length").first() {
        if find("content-length").iter().any(|other| other != cl) {
            return Err("conflicting Content-Length headers".into());
        }
        Framing::Length(
            cl.parse()
                .map_err(|_| format!("bad Content-Length {cl:?}"))?,
        )
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        headers,
        len,
        framing,
    }))
}

/// A chunked body decoded as it arrives: `pos` is where the next chunk's size line starts.
#[derive(Debug, Default)]
struct ChunkDecoder {
    pos: usize,
    body: Vec<u8>,
    in_trailer: bool,
}

impl ChunkDecoder {
    /// Decodes what `encoded` (the whole body so far) adds; `true` once the last chunk and trailer are in.
    fn advance(&mut self, encoded: &[u8]) -> Result<bool, String> {
        loop {
            let rest = &encoded[self.pos..];
            if self.in_trailer {
                // Trailer fields, ignored, end with an empty line.
                if rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n") {
                    return Ok(true);
                }
                return Ok(false);
            }
            let (used, size) = match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete(found)) => found,
                Ok(httparse::Status::Partial) => return Ok(false),
                Err(_) => return Err("bad chunk size line".into()),
            };
            if size == 0 {
                self.pos += used;
                self.in_trailer = true;
                continue;
            }
            let size = usize::try_from(size).map_err(|_| "chunk too large")?;
            let start = used;
            let end = start.checked_add(size).ok_or("chunk too large")?;
            let Some(after) = rest.get(end..end.saturating_add(2)) else {
                return Ok(false);
            };
            if after.len() < 2 {
                return Ok(false);
            }
            if after != b"\r\n" {
                return Err("a chunk is not followed by CRLF".into());
            }
            self.body.extend_from_slice(&rest[start..end]);
            self.pos += end + 2;
        }
    }
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
    fn urls_parse_or_say_why_not() {
        let t =
            Target::parse("http://127.0.0.1:8081/sgx/certification/v4/rootcacrl?x=1#frag").unwrap();
        assert_eq!(
            (
                t.tls,
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            (
                false,
                "127.0.0.1",
                8081,
                "127.0.0.1:8081",
                "/sgx/certification/v4/rootcacrl?x=1"
            )
        );
        let t = Target::parse("HTTPS://[::1]?a").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "::1", 443, "/?a")
        );
        let t = Target::parse("https://[::1]:9/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("::1", 9, "[::1]:9")
        );
        for bad in [
            "pccs.example",
            "ftp://pccs.example/",
            "http://",
            "http://:80/",
            "http://u:p@pccs/",
            "http://pccs:http/",
            "http://[::1/",
            "http://pccs/a b",
            "http://pccs/é",
            "http://pc cs/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let err = PccsClient::new(&PccsConfig::new("pccs.example")).unwrap_err();
        assert!(matches!(err, PccsError::Invalid { .. }), "{err}");
    }

    #[test]
    fn header_values_are_url_decoded() {
        assert_eq!(percent_decode(b"a%2Bb%0A%3d+c"), b"a+b\n=+c");
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz%4"), b"%zz%4");
        assert_eq!(percent_decode("%C3%A9".as_bytes()), "é".as_bytes());
    }

    #[test]
    fn responses_are_framed_by_length_chunks_or_close() {
        let read = |bytes: &[u8], split: usize| {
            let mut reader = ResponseReader::default();
            reader.buf.extend_from_slice(&bytes[..split]);
            if let Some(r) = reader.advance(false).unwrap() {
                return Ok(r);
            }
            reader.buf.extend_from_slice(&bytes[split..]);
            match reader.advance(false)? {
                Some(r) => Ok(r),
                None => reader.advance(true).map(Option::unwrap),
            }
        };
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        let lengthed = b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nhello";
        let closed = b"HTTP/1.0 200 OK\r\n\r\nhello world";
        for split in 0..chunked.len() {
            let r = read(chunked, split).unwrap();
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, &b"hello world"[..]),
                "{split}"
            );
            assert_eq!(r.header("x-a"), Some(&b"1"[..]));
        }
        for split in 0..lengthed.len() {
            let r = read(lengthed, split).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (404, &b"hello"[..]));
        }
        let r = read(closed, 5).unwrap();
        assert_eq!(r.body, b"hello world");

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"",
            b"garbage garbage\r\n\r\n",
        ] {
            assert!(read(bad, 0).is_err(), "{}", String::from_utf8_lossy(bad));
        }
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
