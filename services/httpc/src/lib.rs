//! `httpc`: a small HTTP/1.1 client for the services' outbound calls (a PCCS, a toncenter API, …).
//!
//! One request per connection: a GET or a POST over a tokio `TcpStream` (`Connection: close`, identity
//! encoding), and rustls with the ring provider for `https://` (the system's roots plus an optional extra CA
//! file, for a server with its own certificate). The response is read whole: `Content-Length`, chunked or
//! read-to-close bodies, under a size bound ([`ClientConfig::max_response`], head and body) and a timeout
//! ([`ClientConfig::timeout`], connect, TLS, request and response together). Redirects are not followed and
//! any status is returned as it is: what a status means is the caller's business.
//!
//! The client sets `Host`, `User-Agent: cocoon/<version>`, `Accept: */*` (unless the caller gives an
//! `Accept`), `Accept-Encoding: identity`, `Connection: close` and, for a POST, `Content-Type` and
//! `Content-Length`; the caller's headers must not name those. Header names must be tokens and values
//! must hold no control characters (no CR/LF injection): otherwise [`HttpError::Invalid`], before anything
//! is sent. Request header values are never logged nor put in an error (an API key travels there). The
//! URL's query string is sent as given; a fragment is dropped.
//!
//! Every failure is a typed [`HttpError`] naming the URL; [`HttpError::is_transient`] says whether asking
//! again later may help.

use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The `User-Agent` every request carries.
pub const USER_AGENT: &str = concat!("cocoon/", env!("CARGO_PKG_VERSION"));

/// Request headers the client sets itself; a caller's header of one of these names is refused.
const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "user-agent",
    "accept-encoding",
    "connection",
    "content-type",
    "content-length",
    "transfer-encoding",
];

/// Why a request failed. Each names the URL that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// A URL this client cannot use, or a request header it will not send.
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
    /// Not an HTTP response, or a truncated one.
    #[error("{url}: bad response: {reason}")]
    Body { url: String, reason: String },
}

impl HttpError {
    /// Whether the same request may succeed later: the network or a timeout. A TLS failure, a malformed
    /// or oversized answer, or a bad request is not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::Timeout { .. } | HttpError::Io { .. }
        )
    }
}

/// How the client connects and how much it waits for and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// A PEM file of extra trusted CA certificates (a server with a self-signed certificate).
    pub extra_ca: Option<PathBuf>,
    /// Each request (connect, TLS, request, response) at most.
    pub timeout: Duration,
    /// A response (head and body) larger than this is refused.
    pub max_response: usize,
}

impl ClientConfig {
    /// No extra CA, 8 s per request, responses up to 4 MiB.
    pub fn new() -> Self {
        Self {
            extra_ca: None,
            timeout: Duration::from_secs(8),
            max_response: 4 << 20,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// An HTTP/1.1 client; cheap to clone. It holds no credentials: headers are given per request.
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    max_response: usize,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
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

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl HttpClient {
    /// Builds the TLS trust roots: the system's, plus `config.extra_ca`. With `require_roots` (https is
    /// needed), having no root at all is [`HttpError::Roots`].
    pub fn new(config: &ClientConfig, require_roots: bool) -> Result<Self, HttpError> {
        let tls = tls_config(config.extra_ca.as_deref(), require_roots)?;
        Ok(Self {
            tls,
            timeout: config.timeout,
            max_response: config.max_response,
        })
    }

    /// The time each request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest response read.
    pub fn max_response(&self) -> usize {
        self.max_response
    }

    /// One GET with these extra headers, whatever its status.
    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, HttpError> {
        self.send("GET", url, headers, None).await
    }

    /// One POST of `body` as `content_type` with these extra headers, whatever its status.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        content_type: &str,
        body: &[u8],
    ) -> Result<HttpResponse, HttpError> {
        self.send("POST", url, headers, Some((content_type, body)))
            .await
    }

    async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Result<HttpResponse, HttpError> {
        let target = Target::parse(url)?;
        let request = encode_request(method, &target, headers, body).map_err(|reason| {
            HttpError::Invalid {
                url: url.to_owned(),
                reason,
            }
        })?;
        match tokio::time::timeout(self.timeout, self.exchange(&target, &request, url)).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                url: url.to_owned(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        target: &Target,
        request: &[u8],
        url: &str,
    ) -> Result<HttpResponse, HttpError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| HttpError::Connect {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        if target.tls {
            let name =
                ServerName::try_from(target.host.clone()).map_err(|e| HttpError::Invalid {
                    url: url.to_owned(),
                    reason: format!("host is not a TLS server name: {e}"),
                })?;
            let mut stream = TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::Tls {
                    url: url.to_owned(),
                    reason: e.to_string(),
                })?;
            exchange_on(&mut stream, request, url, self.max_response).await
        } else {
            let mut stream = tcp;
            exchange_on(&mut stream, request, url, self.max_response).await
        }
    }
}

/// The trust roots for https: the system's, plus the certificates in `extra_ca`. With `required`, having
/// none at all is an error.
fn tls_config(
    extra_ca: Option<&Path>,
    required: bool,
) -> Result<Arc<rustls::ClientConfig>, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "a system root certificate could not be loaded");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let bad = |reason: String| HttpError::Roots {
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
        return Err(HttpError::Roots {
            path: None,
            reason: "no system root certificates were found and no extra CA was given".into(),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| HttpError::Roots {
        path: None,
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Where a URL points: `http://` or `https://`, a host, an optional port, a path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
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
    /// Parses `url`, or says why this client cannot use it ([`HttpError::Invalid`]).
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        Self::parse_parts(url).map_err(|reason| HttpError::Invalid {
            url: url.to_owned(),
            reason,
        })
    }

    /// Whether the URL is `https://`.
    pub fn is_https(&self) -> bool {
        self.tls
    }

    /// The host, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, given or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query sent in the request line, at least `/`.
    pub fn path_and_query(&self) -> &str {
        &self.path
    }

    fn parse_parts(url: &str) -> Result<Self, String> {
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
}

/// The request's bytes: head, then `body` (with its content type) if any. A header the client sets
/// itself, a name that is not a token or a value with control characters is refused; the reason never
/// holds a value.
fn encode_request(
    method: &str,
    target: &Target,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Result<Vec<u8>, String> {
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {USER_AGENT}\r\n",
        target.path, target.authority
    );
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("accept"))
    {
        head.push_str("Accept: */*\r\n");
    }
    head.push_str("Accept-Encoding: identity\r\nConnection: close\r\n");
    for (i, (name, value)) in headers.iter().enumerate() {
        if !is_token(name) {
            // Not echoed: a value given as a name by mistake would be logged with the error.
            return Err(format!("header {} has a name that is not a token", i + 1));
        }
        if RESERVED_HEADERS
            .iter()
            .any(|reserved| name.eq_ignore_ascii_case(reserved))
        {
            return Err(format!("the client sets the {name} header itself"));
        }
        if !is_field_value(value) {
            return Err(format!(
                "the value of the {name} header has control characters"
            ));
        }
        let _ = write!(head, "{name}: {value}\r\n");
    }
    let body = match body {
        Some((content_type, body)) => {
            if !is_field_value(content_type) {
                return Err("the content type has control characters".into());
            }
            let _ = write!(
                head,
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                body.len()
            );
            body
        }
        None => &[],
    };
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    Ok(request)
}

/// An HTTP token (RFC 9110 `tchar`s), as a header name must be.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value: no control characters (CR and LF above all) but tabs.
fn is_field_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Writes the request and reads one response, at most `limit` bytes of it.
async fn exchange_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    url: &str,
    limit: usize,
) -> Result<HttpResponse, HttpError> {
    let io = |e: std::io::Error| HttpError::Io {
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
            return Err(HttpError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        reader.buf.extend_from_slice(&chunk[..n]);
        let progress = reader.advance(n == 0).map_err(|reason| HttpError::Body {
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
            return Err(HttpError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        if n == 0 {
            return Err(HttpError::Body {
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
            (t.is_https(), t.host(), t.port(), t.path_and_query()),
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
            let err = Target::parse(bad).unwrap_err();
            assert!(
                matches!(&err, HttpError::Invalid { url, .. } if url == bad),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn requests_carry_the_clients_headers_then_the_callers() {
        let target = Target::parse("http://api.example:8080/v2/run?x=%20y").unwrap();
        let get = encode_request("GET", &target, &[("X-API-Key", "k\tey")], None).unwrap();
        assert_eq!(
            String::from_utf8(get).unwrap(),
            format!(
                "GET /v2/run?x=%20y HTTP/1.1\r\nHost: api.example:8080\r\nUser-Agent: {USER_AGENT}\r\n\
                 Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\nX-API-Key: k\tey\r\n\r\n"
            )
        );
        let post = encode_request(
            "POST",
            &target,
            &[("accept", "application/json")],
            Some(("application/json", b"{}")),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(post).unwrap(),
            format!(
                "POST /v2/run?x=%20y HTTP/1.1\r\nHost: api.example:8080\r\nUser-Agent: {USER_AGENT}\r\n\
                 Accept-Encoding: identity\r\nConnection: close\r\naccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            )
        );
        assert!(USER_AGENT.starts_with("cocoon/"));
    }

    #[test]
    fn bad_or_reserved_headers_are_refused_without_their_values() {
        let target = Target::parse("http://api.example/").unwrap();
        let secret = "s3cr3t";
        for (name, value) in [
            ("X-API-Key", "s3cr3t\r\nX-Evil: 1"),
            ("X-API-Key", "s3cr3t\n"),
            ("X-API-Key", "s3cr3t\0"),
            ("X-API-Key", "s3cr3t\x7f"),
            ("X-API-Key: s3cr3t\r\nX", "1"),
            ("", secret),
            ("X API", secret),
            ("Host", secret),
            ("content-length", secret),
            ("Transfer-Encoding", secret),
            ("CONNECTION", secret),
            ("User-Agent", secret),
            ("Content-Type", secret),
            ("Accept-Encoding", secret),
        ] {
            let reason = encode_request("GET", &target, &[(name, value)], None).unwrap_err();
            assert!(!reason.contains(secret), "{name}: {reason}");
        }
        assert!(
            encode_request("POST", &target, &[], Some(("text/plain\r\nX-Evil: 1", b""))).is_err()
        );
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
            assert!(r.is_success());
        }
        for split in 0..lengthed.len() {
            let r = read(lengthed, split).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (404, &b"hello"[..]));
            assert!(!r.is_success());
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
    fn transient_errors_are_the_networks() {
        let url = String::new;
        let reason = String::new;
        assert!(
            HttpError::Connect {
                url: url(),
                reason: reason()
            }
            .is_transient()
        );
        assert!(
            HttpError::Io {
                url: url(),
                reason: reason()
            }
            .is_transient()
        );
        assert!(
            HttpError::Timeout {
                url: url(),
                after: Duration::ZERO
            }
            .is_transient()
        );
        for permanent in [
            HttpError::Invalid {
                url: url(),
                reason: reason(),
            },
            HttpError::Tls {
                url: url(),
                reason: reason(),
            },
            HttpError::TooLarge {
                url: url(),
                limit: 1,
            },
            HttpError::Body {
                url: url(),
                reason: reason(),
            },
        ] {
            assert!(!permanent.is_transient(), "{permanent:?}");
        }
    }
}
