//! A **stand-in PCCS** for tests: this machine has no route to Intel's PCS or a real PCCS, so a small
//! tokio HTTP/1.1 server serves Intel's sample collateral (`fixtures/collateral/tdx_quote_collateral.json`,
//! FMSPC `B0C06F000000`, PCK Platform CA) in PCCS v4 form, as a PCCS sends it:
//! - `/sgx/certification/v4/pckcrl?ca=platform&encoding=der`: the DER CRL, `SGX-PCK-CRL-Issuer-Chain`;
//! - `/tdx/certification/v4/tcb?fmspc=B0C06F000000&update=standard`: `{"tcbInfo": <raw>, "signature": hex}`,
//!   `TCB-Info-Issuer-Chain`;
//! - `/tdx/certification/v4/qe/identity?update=standard`: `{"enclaveIdentity": <raw>, "signature": hex}`,
//!   `SGX-Enclave-Identity-Issuer-Chain`;
//! - `/sgx/certification/v4/rootcacrl`: the root CA CRL as hex.
//!
//! Issuer chains are URL-encoded (`encodeURIComponent`, as the Node.js PCCS does). Any route can be replaced
//! ([`StandInPccs::set`]) by an error status, a broken reply, raw bytes or a connection that never answers,
//! and every request is recorded. [`StandInPccs::start_tls`] serves https with a test certificate for
//! 127.0.0.1 (`fixtures/pccs-tls/`: `server.pem` issued by `ca.pem`, valid 2020 to 2120).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

pub const PCK_CRL: &str = "/sgx/certification/v4/pckcrl?ca=platform&encoding=der";
pub const TCB: &str = "/tdx/certification/v4/tcb?fmspc=B0C06F000000&update=standard";
pub const QE_IDENTITY: &str = "/tdx/certification/v4/qe/identity?update=standard";
pub const ROOT_CRL: &str = "/sgx/certification/v4/rootcacrl";
pub const ROUTES: [&str; 4] = [PCK_CRL, TCB, QE_IDENTITY, ROOT_CRL];

/// What the stand-in answers on a route.
#[derive(Debug, Clone)]
pub enum Reply {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// Send the body with `Transfer-Encoding: chunked`, in chunks of this many bytes.
        chunked: Option<usize>,
    },
    /// These bytes, then close.
    Raw(Vec<u8>),
    /// Read the request and never answer.
    Hang,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply::Http {
            status,
            headers: vec![],
            body: b"{\"error\":\"stand-in\"}".to_vec(),
            chunked: None,
        }
    }
}

#[derive(Debug)]
pub struct StandInPccs {
    tls: bool,
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandInPccs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `encodeURIComponent`.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The PCCS v4 replies for a collateral JSON document (dcap-qvl's `QuoteCollateralV3`, hex byte fields).
pub fn replies_for(collateral_json: &Path, chunked: Option<usize>) -> HashMap<String, Reply> {
    let c: dcap_qvl::QuoteCollateralV3 =
        serde_json::from_slice(&std::fs::read(collateral_json).unwrap()).unwrap();
    let reply = |chain: Option<(&str, &str)>, content_type: &str, body: Vec<u8>| Reply::Http {
        status: 200,
        headers: chain
            .map(|(name, pem)| (name.to_owned(), url_encode(pem)))
            .into_iter()
            .chain([("Content-Type".to_owned(), content_type.to_owned())])
            .collect(),
        body,
        chunked,
    };
    HashMap::from([
        (
            PCK_CRL.to_owned(),
            reply(
                Some(("SGX-PCK-CRL-Issuer-Chain", &c.pck_crl_issuer_chain)),
                "application/pkix-crl",
                c.pck_crl.clone(),
            ),
        ),
        (
            TCB.to_owned(),
            reply(
                Some(("TCB-Info-Issuer-Chain", &c.tcb_info_issuer_chain)),
                "application/json",
                format!(
                    r#"{{"tcbInfo":{},"signature":"{}"}}"#,
                    c.tcb_info,
                    hex(&c.tcb_info_signature)
                )
                .into_bytes(),
            ),
        ),
        (
            QE_IDENTITY.to_owned(),
            reply(
                Some((
                    "SGX-Enclave-Identity-Issuer-Chain",
                    &c.qe_identity_issuer_chain,
                )),
                "application/json",
                format!(
                    r#"{{"enclaveIdentity":{},"signature":"{}"}}"#,
                    c.qe_identity,
                    hex(&c.qe_identity_signature)
                )
                .into_bytes(),
            ),
        ),
        (
            ROOT_CRL.to_owned(),
            reply(None, "text/plain", hex(&c.root_ca_crl).into_bytes()),
        ),
    ])
}

pub fn sample_collateral_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/collateral/tdx_quote_collateral.json")
}

impl StandInPccs {
    /// Serves the sample collateral on 127.0.0.1 (an ephemeral port).
    pub async fn start() -> Self {
        Self::start_with(replies_for(&sample_collateral_path(), None)).await
    }

    pub async fn start_with(routes: HashMap<String, Reply>) -> Self {
        Self::start_on(routes, None).await
    }

    /// Serves the sample collateral over https, with the certificate in `fixtures/pccs-tls/`.
    pub async fn start_tls() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pccs-tls");
        let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_on(replies_for(&sample_collateral_path(), None), Some(acceptor)).await
    }

    async fn start_on(
        routes: HashMap<String, Reply>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Arc::new(Mutex::new(routes));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (r, q) = (routes.clone(), requests.clone());
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, q, tls) = (r.clone(), q.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(stream, r, q).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, r, q).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            tls: is_tls,
            addr,
            routes,
            requests,
            task,
        }
    }

    /// The base URL (`http://127.0.0.1:PORT`, or `https://` from [`start_tls`](Self::start_tls)).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The CA that issued the https certificate.
    pub fn ca_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pccs-tls/ca.pem")
    }

    /// Replaces what `path` (with its query) answers.
    pub fn set(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    /// Every request path so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests `path` has had.
    pub fn count(&self, path: &str) -> usize {
        self.requests().iter().filter(|p| *p == path).count()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        // Not HTTP (a TLS ClientHello): answer plain text, which the client must refuse.
        if head.first().is_some_and(|b| !b.is_ascii_alphabetic()) {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            return;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let path = line
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.strip_suffix(" HTTP/1.1"))
        .unwrap_or("?")
        .to_owned();
    assert!(
        line.contains("\r\nConnection: close\r\n") && line.contains("\r\nHost: 127.0.0.1:"),
        "{line}"
    );
    requests.lock().unwrap().push(path.clone());
    let reply = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_else(|| Reply::status(404));
    let bytes = match reply {
        Reply::Hang => {
            let _ = stream.read(&mut buf).await; // until the client gives up
            return;
        }
        Reply::Raw(bytes) => bytes,
        Reply::Http {
            status,
            headers,
            body,
            chunked,
        } => {
            let mut out = format!("HTTP/1.1 {status} Stand-in\r\n");
            for (name, value) in headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            let mut out = match chunked {
                None => format!("{out}Content-Length: {}\r\n\r\n", body.len()).into_bytes(),
                Some(size) => {
                    let mut out = format!("{out}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
                    for chunk in body.chunks(size.max(1)) {
                        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        out.extend_from_slice(chunk);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    return write_slowly(stream, out).await;
                }
            };
            out.extend_from_slice(&body);
            out
        }
    };
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// Writes in small pieces, so the client reads a chunked body across many reads.
async fn write_slowly<S: AsyncWrite + Unpin>(mut stream: S, bytes: Vec<u8>) {
    for piece in bytes.chunks(97) {
        if stream.write_all(piece).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
    let _ = stream.shutdown().await;
}
