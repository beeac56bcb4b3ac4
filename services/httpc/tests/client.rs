//! The client against a tiny local server spawned per test (a `TcpListener` that reads one request and
//! answers canned bytes): GET and POST round trips as the server sees them, chunked bodies, the size
//! bound, the timeout, a refused connection, refused headers, https to a server that does not speak TLS
//! and bad trust roots.

use std::path::Path;
use std::time::{Duration, Instant};

use httpc::{ClientConfig, HttpClient, HttpError, USER_AGENT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A request as the server read it.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// What the server does once it has read the request.
enum Answer {
    /// Writes these pieces, a few milliseconds apart, then closes.
    Pieces(Vec<Vec<u8>>),
    /// Keeps the connection open without a word.
    Never,
}

/// Serves one connection; the handle gives the request read (`None`: not an HTTP request).
async fn serve_once(answer: Answer) -> (String, JoinHandle<Option<Request>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request = read_request(&mut stream).await;
        match answer {
            Answer::Pieces(pieces) => {
                for piece in pieces {
                    // The client may have hung up (a refused size): not the server's concern.
                    if stream.write_all(&piece).await.is_err() {
                        break;
                    }
                    let _ = stream.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = stream.shutdown().await;
            }
            Answer::Never => tokio::time::sleep(Duration::from_secs(60)).await,
        }
        request
    });
    (url, handle)
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let mut request = Request {
                    method: parsed.method?.to_owned(),
                    target: parsed.path?.to_owned(),
                    headers,
                    body: buf[len..].to_vec(),
                };
                let want = request
                    .header("content-length")
                    .map_or(0, |v| v.parse::<usize>().unwrap());
                while request.body.len() < want {
                    let n = stream.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    request.body.extend_from_slice(&chunk[..n]);
                }
                return Some(request);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return None,
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn client_with(config: ClientConfig) -> HttpClient {
    HttpClient::new(&config, false).unwrap()
}

fn client() -> HttpClient {
    let mut config = ClientConfig::new();
    config.timeout = Duration::from_secs(5);
    client_with(config)
}

/// A URL nobody listens on any more.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[test]
fn the_defaults_are_8_s_and_4_mib() {
    let config = ClientConfig::new();
    assert_eq!(config.timeout, Duration::from_secs(8));
    assert_eq!(config.max_response, 4 << 20);
    assert_eq!(config.extra_ca, None);
    assert_eq!(ClientConfig::default(), config);
}

#[tokio::test]
async fn a_get_round_trip() {
    let (url, server) = serve_once(Answer::Pieces(vec![
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Seqno: 42\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
            .to_vec(),
    ]))
    .await;
    let response = client()
        .get(
            &format!("{url}/api/v2/getAddressBalance?address=EQ%2Babc&x=1#fragment"),
            &[("X-API-Key", "k-123")],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(response.is_success());
    assert_eq!(response.header("x-seqno"), Some(&b"42"[..]));
    assert_eq!(response.body, b"{\"ok\":true}");

    let request = server.await.unwrap().unwrap();
    assert_eq!(request.method, "GET");
    assert_eq!(
        request.target,
        "/api/v2/getAddressBalance?address=EQ%2Babc&x=1"
    );
    let authority = url.strip_prefix("http://").unwrap();
    assert_eq!(request.header("host"), Some(authority));
    assert_eq!(request.header("x-api-key"), Some("k-123"));
    assert_eq!(request.header("user-agent"), Some(USER_AGENT));
    assert_eq!(request.header("connection"), Some("close"));
    assert_eq!(request.header("accept"), Some("*/*"));
    assert_eq!(request.header("content-length"), None);
    assert!(request.body.is_empty());
}

#[tokio::test]
async fn a_post_round_trip() {
    let (url, server) = serve_once(Answer::Pieces(vec![
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\n".to_vec(),
        b"done".to_vec(),
    ]))
    .await;
    let body = br#"{"id":1,"jsonrpc":"2.0","method":"sendBoc","params":{"boc":"te6c"}}"#;
    let response = client()
        .post(
            &format!("{url}/api/v2/jsonRPC"),
            &[("X-API-Key", "k-123"), ("Accept", "application/json")],
            "application/json",
            body,
        )
        .await
        .unwrap();
    assert_eq!(
        (response.status, response.body.as_slice()),
        (201, &b"done"[..])
    );

    let request = server.await.unwrap().unwrap();
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, "/api/v2/jsonRPC");
    let authority = url.strip_prefix("http://").unwrap();
    assert_eq!(request.header("host"), Some(authority));
    assert_eq!(request.header("x-api-key"), Some("k-123"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    // The caller's Accept replaces the default one.
    assert_eq!(request.header("accept"), Some("application/json"));
    assert_eq!(request.count("accept"), 1);
    assert_eq!(request.body, body);
}

#[tokio::test]
async fn an_error_status_is_a_response() {
    let (url, _server) = serve_once(Answer::Pieces(vec![
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ]))
    .await;
    let response = client().get(&url, &[]).await.unwrap();
    assert_eq!(response.status, 429);
    assert!(!response.is_success());
}

#[tokio::test]
async fn a_chunked_response_is_decoded() {
    let (url, _server) = serve_once(Answer::Pieces(vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
        b"lo\r\n".to_vec(),
        b"1;name=value\r\n \r\n6\r\nworld!\r\n0\r\n".to_vec(),
        b"X-Trailer: t\r\n\r\n".to_vec(),
    ]))
    .await;
    let response = client().get(&url, &[]).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello world!");
}

#[tokio::test]
async fn a_response_over_the_bound_is_too_large() {
    let mut config = ClientConfig::new();
    config.max_response = 1_000;
    config.timeout = Duration::from_secs(5);
    let client = client_with(config);

    // Declared: refused once the head is read.
    let mut declared = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n".to_vec();
    declared.extend_from_slice(&[b'x'; 5000]);
    // Read to close: refused as it passes the bound.
    let mut undeclared = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    undeclared.extend_from_slice(&[b'x'; 5000]);
    for answer in [declared, undeclared] {
        let (url, _server) = serve_once(Answer::Pieces(vec![answer])).await;
        let err = client.get(&url, &[]).await.unwrap_err();
        assert!(
            matches!(&err, HttpError::TooLarge { url: u, limit: 1_000 } if *u == url),
            "{err:?}"
        );
        assert!(!err.is_transient());
    }

    // Just under the bound is fine.
    let mut fits = b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n".to_vec();
    fits.extend_from_slice(&[b'x'; 900]);
    let (url, _server) = serve_once(Answer::Pieces(vec![fits])).await;
    assert_eq!(client.get(&url, &[]).await.unwrap().body.len(), 900);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let (url, _server) = serve_once(Answer::Never).await;
    let mut config = ClientConfig::new();
    config.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = client_with(config).get(&url, &[]).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, HttpError::Timeout { url: u, after } if *u == url && *after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_connect_and_transient() {
    let url = refused_url();
    let err = client().get(&url, &[]).await.unwrap_err();
    assert!(
        matches!(&err, HttpError::Connect { url: u, .. } if *u == url),
        "{err:?}"
    );
    assert!(err.is_transient());
    let err = client()
        .post(&url, &[], "application/json", b"{}")
        .await
        .unwrap_err();
    assert!(matches!(&err, HttpError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn cr_lf_in_a_header_is_invalid_before_connecting() {
    // A refused port: Invalid, not Connect, shows nothing was attempted.
    let url = refused_url();
    let client = client();
    for headers in [
        &[("X-API-Key", "secret-key\r\nX-Evil: 1")][..],
        &[("X-API-Key", "secret-key\n")],
        &[("X-API-Key: secret-key\r\nX-Evil", "1")],
        &[("Host", "secret-key")],
    ] {
        let err = client.get(&url, headers).await.unwrap_err();
        assert!(matches!(&err, HttpError::Invalid { .. }), "{err:?}");
        assert!(!err.is_transient());
        // The value (an API key) is neither displayed nor debugged.
        assert!(!err.to_string().contains("secret-key"), "{err}");
        assert!(!format!("{err:?}").contains("secret-key"), "{err:?}");
    }
    let err = client
        .post(&url, &[], "application/json\r\nX-Evil: 1", b"{}")
        .await
        .unwrap_err();
    assert!(matches!(&err, HttpError::Invalid { .. }), "{err:?}");

    for bad in ["ftp://example.com/", "example.com", "http://exa mple/"] {
        let err = client.get(bad, &[]).await.unwrap_err();
        assert!(
            matches!(&err, HttpError::Invalid { url, .. } if url == bad),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn https_to_a_server_without_tls_is_a_tls_error() {
    let (url, _server) = serve_once(Answer::Pieces(vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ]))
    .await;
    let https = url.replace("http://", "https://");
    let err = client().get(&https, &[]).await.unwrap_err();
    assert!(
        matches!(&err, HttpError::Tls { url, .. } if *url == https),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[test]
fn bad_extra_roots_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = ClientConfig::new();
    config.extra_ca = Some(dir.join("no-such-ca.pem"));
    let err = HttpClient::new(&config, false).unwrap_err();
    assert!(
        matches!(&err, HttpError::Roots { path: Some(p), .. } if p.ends_with("no-such-ca.pem")),
        "{err:?}"
    );
    config.extra_ca = Some(dir.join("Cargo.toml"));
    let err = HttpClient::new(&config, true).unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
}
