//! Test harness: a real `nats-server` per test and a fresh Postgres database per test.
//!
//! [`NatsServer`] runs the pinned binary with JetStream on a random loopback
//! port and a temporary store directory. [`TestDb`] creates a uniquely named
//! database on the Postgres that `infra/stack.sh up` runs, and drops it.
//!
//! Everything here is test support: setup failures panic with a message that
//! says what to run, and cleanup (in `Drop`) never panics.
//!
//! ```no_run
//! # async fn demo() {
//! let nats = tests::NatsServer::start().await;
//! let js = async_nats::jetstream::new(nats.client().await);
//! let db = tests::TestDb::create().await;
//! let pg = db.client().await;
//! # let _ = (js, pg);
//! # }
//! ```

pub mod cluster;
pub use cluster::NatsCluster;
pub mod postgres;
pub mod services;
pub mod ton_local;
pub use ton_local::TonLocal;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

/// How long a server may take to accept clients after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop (SIGTERM) may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness polls: short, because tests wait on it.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Start attempts when the randomly chosen port turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// The Postgres admin connection used when `COCOON_TEST_PG_URL` is unset:
/// the stack from `infra/stack.sh up`.
const DEFAULT_ADMIN_PG_URL: &str = "postgres://cocoon@127.0.0.1:55432/postgres";

/// The URL of the Postgres admin connection that [`TestDb`] creates and drops
/// databases through: `$COCOON_TEST_PG_URL`, else the stack from
/// `infra/stack.sh up` (`postgres://cocoon@127.0.0.1:55432/postgres`).
pub fn admin_pg_url() -> String {
    std::env::var("COCOON_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_PG_URL.to_string())
}

/// The repository root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// The `nats-server` binary to run: `$COCOON_NATS_SERVER`, else the pinned
/// one that `infra/stack.sh install` puts in the state directory
/// (`$COCOON_HOME` or `<root>/.cocoon`), else `nats-server` on `PATH`.
///
/// # Panics
///
/// When none exists.
pub fn nats_server_binary() -> PathBuf {
    if let Some(explicit) = std::env::var_os("COCOON_NATS_SERVER") {
        let explicit = PathBuf::from(explicit);
        assert!(
            explicit.is_file(),
            "COCOON_NATS_SERVER={} does not exist",
            explicit.display()
        );
        return explicit;
    }
    let state_dir = std::env::var_os("COCOON_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cocoon"));
    let pinned = state_dir.join("venv/bin/nats-server");
    if pinned.is_file() {
        return pinned;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no nats-server found (looked at $COCOON_NATS_SERVER, {}, $PATH); \
                 run `infra/stack.sh install`",
                pinned.display()
            )
        })
}

/// A scratch directory `<system temp dir>/<prefix>-<uuid>`, removed with its
/// contents on drop (also when a test panics). Made by hand to avoid a
/// `tempfile` dependency.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates the directory.
    ///
    /// # Panics
    ///
    /// When it cannot be created.
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A real `nats-server` with JetStream, listening on a random loopback port,
/// storing in a temporary directory; both survive [`NatsServer::restart`],
/// so a test can check what persists. Killed and cleaned up on drop.
#[derive(Debug)]
pub struct NatsServer {
    /// `None` between [`NatsServer::stop`] and the next start.
    child: Option<Child>,
    port: u16,
    /// Extra command-line arguments, kept to start the same server again.
    extra_args: Vec<String>,
    /// Holds the store, the server's log and its ports files; removed when
    /// dropped, which happens after `Drop for NatsServer` has reaped the
    /// child.
    dir: TempDir,
    store_dir: PathBuf,
    log_path: PathBuf,
}

impl NatsServer {
    /// Starts a server with JetStream on a random port and waits until it
    /// accepts clients.
    ///
    /// # Panics
    ///
    /// When it cannot start; the message carries the server's output.
    pub async fn start() -> NatsServer {
        NatsServer::start_with_args(&[]).await
    }

    /// Like [`NatsServer::start`], with extra command-line arguments after the
    /// harness's own (so they win where both set a flag), e.g.
    /// `["-c", "limits.conf"]`. Many limits (`max_payload`, ...) have no flag
    /// and need a config file; such a file must not set `jetstream.store_dir`,
    /// which nats-server rejects together with `-sd`.
    pub async fn start_with_args(extra: &[&str]) -> NatsServer {
        let dir = TempDir::new("cocoon-test-nats");
        let store_dir = dir.path.join("store");
        let log_path = dir.path.join("nats-server.log");
        let mut server = NatsServer {
            child: None,
            port: 0,
            extra_args: extra.iter().map(|arg| arg.to_string()).collect(),
            dir,
            store_dir,
            log_path,
        };
        // A port found free can be taken before the server binds it (another
        // test doing the same thing); then try a fresh one.
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            // Each attempt starts with an empty log, so that "address already
            // in use" is about this attempt.
            let _ = std::fs::remove_file(&server.log_path);
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(failure) if failure.port_taken && attempt < PORT_ATTEMPTS => continue,
                Err(failure) => panic!("{}", failure.message),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// A connected client (default options, so it reconnects across a
    /// restart).
    ///
    /// # Panics
    ///
    /// When the server does not accept the connection.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to nats-server at {}: {e}", self.url()))
    }

    /// Makes a pull request on the durable `durable` of `stream` whose answer another subscriber takes, as a
    /// request given up on during a reconnect would: the server delivers the next message there and counts it
    /// delivered. Returns that message (a frame, its reply subject an ack subject); panics if none comes.
    pub async fn steal_next_delivery(&self, stream: &str, durable: &str) -> async_nats::Message {
        use futures_util::StreamExt as _;
        let client = self.client().await;
        let inbox = client.new_inbox();
        let mut stray = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"),
                inbox,
                r#"{"batch":1,"no_wait":true}"#.into(),
            )
            .await
            .unwrap();
        let stolen = tokio::time::timeout(Duration::from_secs(10), stray.next())
            .await
            .expect("the stray pull request was answered")
            .expect("a message");
        assert!(
            stolen
                .reply
                .as_ref()
                .is_some_and(|r| r.starts_with("$JS.ACK.")),
            "the stray pull took a message, not a status: {:?}",
            stolen.headers
        );
        stolen
    }

    /// Stops the server gracefully (SIGTERM, so JetStream flushes its store)
    /// and waits until it has exited; it is killed if it takes longer than
    /// 10 s. No-op when already stopped.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SIGTERM without `unsafe` (libc) or another crate: the kill(1)
            // binary. If it is missing, the timeout below falls back to
            // SIGKILL.
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Kills the server abruptly (SIGKILL) and waits until it has exited, to
    /// simulate a crash. No-op when already stopped.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server and starts it again on the same port and store
    /// directory, waiting until it accepts clients. Clients from
    /// [`NatsServer::client`] reconnect by themselves.
    ///
    /// # Panics
    ///
    /// When it cannot start again; the message carries the server's output.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(failure) = self.spawn_and_wait().await {
            panic!("restart: {}", failure.message);
        }
    }

    /// Spawns the server on `self.port` and waits until it is ready.
    async fn spawn_and_wait(&mut self) -> Result<(), StartFailure> {
        let binary = nats_server_binary();
        // Append: after a restart the log still shows the earlier run.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
        let port = self.port.to_string();
        let mut child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port])
            .arg("-sd")
            .arg(&self.store_dir)
            // The server writes `<exe>_<pid>.ports` here once it listens:
            // proof that *our* process holds the port, not another one
            // that took it in the meantime.
            .arg("--ports_file_dir")
            .arg(&self.dir.path)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", binary.display()));
        let pid = child.id().expect("a just-spawned child has a pid");
        let ports_suffix = format!("_{pid}.ports");

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log_tail();
                return Err(StartFailure {
                    port_taken: log.contains("address already in use"),
                    message: format!(
                        "nats-server ({}) exited during start-up with {status} on port {}:\n{log}",
                        binary.display(),
                        self.port
                    ),
                });
            }
            if self.has_file_ending_with(&ports_suffix) && self.accepts_clients().await {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(StartFailure {
                    port_taken: false,
                    message: format!(
                        "nats-server ({}) not ready on port {} within {READY_TIMEOUT:?}:\n{}",
                        binary.display(),
                        self.port,
                        self.log_tail()
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn has_file_ending_with(&self, suffix: &str) -> bool {
        std::fs::read_dir(&self.dir.path)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().ends_with(suffix))
            })
            .unwrap_or(false)
    }

    /// One connection attempt; the ports file says the listener is up, this
    /// says the server also completes a handshake.
    /// A server with users refuses the anonymous attempt after the handshake: that is ready too.
    async fn accepts_clients(&self) -> bool {
        match async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(self.url())
            .await
        {
            Ok(_) => true,
            Err(e) => e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation,
        }
    }

    /// The last lines of the server's output, for panic messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // kill_on_drop would SIGKILL the child too, but without waiting; the
        // temp dir is removed right after this (when the fields drop), so make
        // sure the process is gone first and cannot write into it any more.
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let deadline = std::time::Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Why a start attempt failed, and whether another port may help.
#[derive(Debug)]
struct StartFailure {
    port_taken: bool,
    message: String,
}

/// A loopback port that was free a moment ago (the OS picks it for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}

/// A fresh, uniquely named database on the test Postgres, dropped (with any
/// sessions still connected) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
}

impl TestDb {
    /// Creates `test_<uuid>` through the admin connection [`admin_pg_url`].
    /// The database is empty: migrating it is the caller's business.
    ///
    /// # Panics
    ///
    /// When Postgres is unreachable or refuses to create the database.
    pub async fn create() -> TestDb {
        let admin_url = admin_pg_url();
        let name = format!("test_{}", Uuid::now_v7().simple());
        let admin = connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach Postgres at {admin_url}: {}; start it with `infra/stack.sh up`",
                error_chain(&e)
            )
        });
        // The name is ours (a uuid), so quoting it is enough.
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {}", error_chain(&e)));
        let url = with_database(&admin_url, &name);
        TestDb {
            name,
            url,
            admin_url,
        }
    }

    /// The connection URL of the new database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name, `test_<uuid>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to the database; its connection task runs on the
    /// current runtime.
    ///
    /// # Panics
    ///
    /// When the connection fails.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {}", self.url, error_chain(&e)))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be a current-thread
        // one that is blocked right here; so drop the database from a thread
        // with its own runtime, and wait for it. Errors are ignored: a
        // leftover test_* database is harmless, a panic in Drop is not.
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let handle = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(STOP_TIMEOUT, async {
                    if let Ok(admin) = connect(&admin_url).await {
                        let _ = admin.batch_execute(&sql).await;
                    }
                })
                .await;
            });
        });
        let _ = handle.join();
    }
}

/// Connects without TLS (loopback only) and drives the connection on a
/// spawned task, as tokio-postgres requires.
async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // Ends when the client is dropped; an error here surfaces as a
        // failed query on the client, so only note it.
        if let Err(e) = connection.await {
            eprintln!("postgres connection closed with an error: {e}");
        }
    });
    Ok(client)
}

/// An error with its sources: tokio-postgres's own message alone ("error
/// connecting to server") hides the reason (connection refused, no such
/// role, ...).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `url` with its database replaced by `dbname`. Handles both forms
/// tokio-postgres accepts: `postgres://user@host:port/db?params` and
/// `key=value` strings (where a later key wins).
fn with_database(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = ["postgres://", "postgresql://"]
        .iter()
        .find(|scheme| url.starts_with(*scheme))
        .map(|scheme| scheme.len())
    else {
        return format!("{url} dbname={dbname}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |slash| scheme_end + slash);
    format!("{}/{dbname}{query}", &base[..authority_end])
}

#[cfg(test)]
mod unit {
    use super::with_database;

    #[test]
    fn with_database_replaces_the_path_of_a_url() {
        assert_eq!(
            with_database("postgres://cocoon@127.0.0.1:55432/postgres", "t1"),
            "postgres://cocoon@127.0.0.1:55432/t1"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/postgres?sslmode=disable", "t1"),
            "postgresql://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:1", "t1"),
            "postgres://u@h:1/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:1?application_name=x", "t1"),
            "postgres://u@h:1/t1?application_name=x"
        );
    }

    #[test]
    fn with_database_appends_to_a_key_value_string() {
        assert_eq!(
            with_database(
                "host=127.0.0.1 port=55432 user=cocoon dbname=postgres",
                "t1"
            ),
            "host=127.0.0.1 port=55432 user=cocoon dbname=postgres dbname=t1"
        );
    }
}
