//! A local toncenter over the real TVM: `infra/ton-local/server.mjs`
//! (`@ton/sandbox` with one wallet v5r1 deployed and funded), one per test.
//!
//! [`TonLocal::start`] runs it with `node` on a random loopback port, with
//! `--exit-with-stdin` and a stdin pipe held here, so the server goes away
//! with the test process even when that one is killed. The toncenter v2
//! endpoints are at [`TonLocal::url`]; the development endpoints (`/dev/...`:
//! funding, balances, dropped external messages) have methods here.
//!
//! ```no_run
//! # async fn demo() {
//! let ton = tests::TonLocal::start(&[7; 32], 1_000_000_000_000).await;
//! assert_eq!(ton.balance(ton.wallet()).await, 1_000_000_000_000);
//! # }
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, Command};

use crate::workspace_root;

/// How long the server may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP request to it may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the server's stderr is kept for panic messages.
const LOG_LIMIT: usize = 64 * 1024;

/// A running `infra/ton-local/server.mjs`; killed on drop.
#[derive(Debug)]
pub struct TonLocal {
    child: Child,
    /// Held open: the server exits when it closes (`--exit-with-stdin`).
    _stdin: ChildStdin,
    url: String,
    /// `host:port`, for the HTTP client.
    authority: String,
    wallet: String,
    wallet_raw: String,
    logs: Arc<Mutex<String>>,
}

impl TonLocal {
    /// Starts the server with a wallet v5r1 of `public_key` (default wallet
    /// id, workchain 0) holding exactly `balance_nanoton`, and waits for its
    /// ready line.
    ///
    /// # Panics
    ///
    /// When `node` or `infra/ton-local/node_modules` is missing, or the server
    /// does not get ready within 30 s; the message carries its stderr.
    pub async fn start(public_key: &[u8; 32], balance_nanoton: u64) -> TonLocal {
        Self::start_with(public_key, balance_nanoton, false).await
    }

    /// As [`TonLocal::start`], but the wallet is funded and not deployed (uninitialized): its first message
    /// must carry its state init.
    pub async fn start_undeployed(public_key: &[u8; 32], balance_nanoton: u64) -> TonLocal {
        Self::start_with(public_key, balance_nanoton, true).await
    }

    async fn start_with(public_key: &[u8; 32], balance_nanoton: u64, undeployed: bool) -> TonLocal {
        let dir = workspace_root().join("infra/ton-local");
        assert!(
            dir.join("node_modules/@ton/sandbox").is_dir(),
            "{}/node_modules is missing: run `make ton-local-deps` or `npm ci --prefix infra/ton-local`",
            dir.display()
        );
        let node = node_binary();
        let key_hex: String = public_key.iter().map(|b| format!("{b:02x}")).collect();
        let mut child = Command::new(&node)
            .arg("server.mjs")
            .args(["--public-key", &key_hex])
            .args(["--balance", &balance_nanoton.to_string()])
            .args(undeployed.then_some("--undeployed"))
            .args(["--host", "127.0.0.1", "--port", "0", "--exit-with-stdin"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot spawn {} (Node.js 20+ is needed for infra/ton-local): {e}",
                    node.display()
                )
            });
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        let logs = Arc::new(Mutex::new(String::new()));
        let stderr_task = tokio::spawn(collect_lines(stderr, Arc::clone(&logs)));
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut line)).await;
        let failure = match read {
            Ok(Ok(n)) if n > 0 => None,
            Ok(Ok(_)) => Some("exited before it was ready".to_string()),
            Ok(Err(e)) => Some(format!("stdout unreadable: {e}")),
            Err(_) => Some(format!("not ready within {READY_TIMEOUT:?}")),
        };
        if let Some(failure) = failure {
            let _ = child.start_kill();
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            // The pipe closes when the process is gone; then all of stderr is in.
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
            panic!(
                "ton-local ({} infra/ton-local/server.mjs) {failure} ({status:?}); stderr:\n{}",
                node.display(),
                logs.lock().map(|l| l.clone()).unwrap_or_default()
            );
        }
        // Nothing else comes on stdout; drain it anyway so a write never blocks.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink).await;
        });

        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ton-local ready line is not JSON ({e}): {line:?}"));
        let field = |name: &str| -> String {
            ready[name]
                .as_str()
                .unwrap_or_else(|| panic!("ton-local ready line lacks {name}: {line:?}"))
                .to_string()
        };
        let url = field("url");
        let authority = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("ton-local url is not http://: {url}"))
            .trim_end_matches('/')
            .to_string();
        TonLocal {
            child,
            _stdin: stdin,
            authority,
            wallet: field("wallet"),
            wallet_raw: field("wallet_raw"),
            url,
            logs,
        }
    }

    /// The toncenter base URL, `http://127.0.0.1:PORT` (the v2 API is under
    /// `/api/v2/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The wallet's user-friendly address (bounceable, url-safe).
    pub fn wallet(&self) -> &str {
        &self.wallet
    }

    /// The wallet's raw address, `0:<hex>`.
    pub fn wallet_raw(&self) -> &str {
        &self.wallet_raw
    }

    /// What the server has logged to stderr so far (the last 64 KiB).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The balance of any account, in nanoton (0 for an unknown one).
    pub async fn balance(&self, address: &str) -> u64 {
        let result = self
            .ok("/api/v2/getAddressBalance", json!({ "address": address }))
            .await;
        parse_nanoton(&result)
    }

    /// Sends `amount` nanoton from the sandbox treasury to `address`
    /// (non-bounceable, so a fresh address keeps it).
    pub async fn fund(&self, address: &str, amount: u64) {
        self.ok(
            "/dev/fund",
            json!({ "address": address, "amount": amount.to_string() }),
        )
        .await;
    }

    /// Sets the balance of `address` to `amount` nanoton directly.
    pub async fn set_balance(&self, address: &str, amount: u64) {
        self.ok(
            "/dev/set-balance",
            json!({ "address": address, "amount": amount.to_string() }),
        )
        .await;
    }

    /// Fault injection: with `true`, `sendBocReturnHash` answers with the
    /// hash but does not execute the message (lost on its way to the
    /// validators); `false` restores normal execution.
    pub async fn set_drop_externals(&self, drop: bool) {
        let mode = if drop { "drop" } else { "execute" };
        self.ok("/dev/externals", json!({ "mode": mode })).await;
    }

    /// One request: `body` is sent as JSON (POST), or nothing (GET) when it
    /// is `None`. Returns the HTTP status and the JSON answer, whatever the
    /// status.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or answers something that is not
    /// JSON.
    pub async fn request(&self, path_and_query: &str, body: Option<&Value>) -> (u16, Value) {
        let exchange = async {
            let mut stream = TcpStream::connect(&self.authority).await?;
            let (method, payload) = match body {
                Some(body) => ("POST", body.to_string()),
                None => ("GET", String::new()),
            };
            let head = format!(
                "{method} {path_and_query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.authority,
                payload.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(payload.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("ton-local: {path_and_query} timed out"))
            .unwrap_or_else(|e| panic!("ton-local: {path_and_query} failed: {e}"));
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("ton-local: {path_and_query}: malformed response {text:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("ton-local: {path_and_query}: no status in {head:?}"));
        let json = serde_json::from_str(body).unwrap_or_else(|e| {
            panic!("ton-local: {path_and_query}: answer is not JSON ({e}): {body:?}")
        });
        (status, json)
    }

    /// A POST that must succeed; returns its `result`.
    async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.request(path, Some(&body)).await;
        assert!(
            status == 200 && answer["ok"] == true,
            "ton-local: {path} {body} answered {status}: {answer}"
        );
        answer["result"].clone()
    }
}

impl Drop for TonLocal {
    fn drop(&mut self) {
        // Closing stdin would stop it too; kill and wait briefly so that no
        // server outlives its test.
        let _ = self.child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `$COCOON_NODE`, else `node` on `PATH` (spawning reports if there is none).
fn node_binary() -> PathBuf {
    std::env::var_os("COCOON_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("node"))
}

/// Appends the lines of `reader` to `logs`, keeping the last [`LOG_LIMIT`]
/// bytes.
async fn collect_lines(reader: impl tokio::io::AsyncRead + Unpin, logs: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(mut logs) = logs.lock() else { return };
        logs.push_str(&line);
        logs.push('\n');
        if logs.len() > LOG_LIMIT {
            let mut cut = logs.len() - LOG_LIMIT;
            while !logs.is_char_boundary(cut) {
                cut += 1;
            }
            logs.drain(..cut);
        }
    }
}

/// A nanoton amount as the server writes it: a decimal string.
fn parse_nanoton(value: &Value) -> u64 {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("ton-local: not a nanoton amount: {value}"))
}
