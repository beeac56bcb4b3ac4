//! A private Postgres cluster per test, which the test may crash and start again.
//!
//! [`TestDb`](crate::TestDb) shares the stack's Postgres (port 55432) with every other test, so a test must
//! never stop it. [`PrivatePostgres`] runs a cluster of its own instead: `initdb` into a temporary
//! directory, the postmaster on a random loopback port, `pg_ctl stop -m immediate` to crash it (no shutdown
//! checkpoint, so the next start runs crash recovery), and a start again on the same data directory.
//!
//! The binaries are found as `infra/stack.sh` finds them: `$COCOON_PG_BINDIR`, `pg_config --bindir`, the
//! newest `/usr/lib/postgresql/*/bin`, then `initdb` on `PATH`. initdb and postgres refuse to run as root,
//! so as root they run as the unprivileged account `cocoon` (the one `infra/stack.sh up` creates; made here
//! the same way when missing), through `setpriv`. The postmaster is this process's child with a parent-death
//! signal, so it does not outlive a test process that is killed.
//!
//! ```no_run
//! # async fn demo() {
//! let mut pg = tests::postgres::PrivatePostgres::start().await;
//! let url = pg.create_database("readmodel").await;
//! pg.crash().await;
//! pg.start_again().await;
//! # let _ = url;
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::{TempDir, error_chain, free_port};

/// The superuser role the cluster is initialised with (as `infra/stack.sh` does).
pub const ROLE: &str = "cocoon";
/// The OS account that owns the data directory when the test runs as root.
const OS_USER: &str = "cocoon";
/// How long the postmaster may take to accept connections (crash recovery included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `pg_ctl stop` and the postmaster's exit may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A Postgres cluster in a temporary directory, on a random loopback port. Stopped (immediately) and
/// removed on drop.
#[derive(Debug)]
pub struct PrivatePostgres {
    bindir: PathBuf,
    /// `Some((uid, gid))` when running as root: the account that owns the data directory.
    owner: Option<(u32, u32)>,
    port: u16,
    /// `None` while crashed or stopped.
    child: Option<Child>,
    /// Starts of the postmaster so far (1 after [`PrivatePostgres::start`]).
    starts: u32,
    log_path: PathBuf,
    data_dir: PathBuf,
    /// Holds the data directory, the socket directory and the log; dropped last.
    dir: TempDir,
}

impl PrivatePostgres {
    /// Initialises a cluster (superuser [`ROLE`], trust authentication on loopback) and starts it.
    ///
    /// # Panics
    ///
    /// When no Postgres binaries are found, `initdb` fails, or the server does not get ready; the message
    /// says what to install or carries the server's log.
    pub async fn start() -> PrivatePostgres {
        let bindir = pg_bindir();
        let owner = if running_as_root() {
            Some(ensure_os_user().await)
        } else {
            None
        };
        let dir = TempDir::new("cocoon-test-pg");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {}: {e}", dir.path().display()));
        }
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("postgres.log");
        let mut pg = PrivatePostgres {
            bindir,
            owner,
            port: 0,
            child: None,
            starts: 0,
            log_path,
            data_dir,
            dir,
        };
        pg.initdb().await;
        pg.port = free_port();
        pg.spawn_and_wait().await;
        pg
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `dbname` as the superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// How many times the postmaster has been started (1 after [`PrivatePostgres::start`]).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Creates database `name` (letters, digits and `_` only) and returns its URL.
    ///
    /// # Panics
    ///
    /// When the name is not plain or Postgres refuses.
    pub async fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {name:?}: letters, digits and '_' only"
        );
        let admin = crate::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to the private Postgres: {}",
                    error_chain(&e)
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {}", error_chain(&e)));
        self.url(name)
    }

    /// Crashes the server: `pg_ctl stop -m immediate` (every backend quits at once, no shutdown
    /// checkpoint), then waits until the postmaster has exited. No-op when it is not running.
    pub async fn crash(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = self
            .as_owner(&self.bindir.join("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !matches!(status, Ok(s) if s.success()) {
            // pg_ctl could not do it; SIGKILL is a crash too.
            let _ = child.start_kill();
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and data directory (crash recovery runs first) and waits
    /// until it accepts connections.
    ///
    /// # Panics
    ///
    /// When it is still running, or does not get ready; the message carries its log.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: Postgres is running");
        self.spawn_and_wait().await;
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::services::tail(&self.log_path, lines)
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    async fn initdb(&self) {
        let out = self
            .as_owner(&self.bindir.join("initdb"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", ROLE, "--auth=trust", "-E", "UTF8", "--no-locale"])
            // The data directory lives as long as the test; an OS crash is not among the faults.
            .arg("--no-sync")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {}/initdb: {e}", self.bindir.display()));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Spawns the postmaster in the foreground (so it is our child) and waits until it answers a query.
    async fn spawn_and_wait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
        let sockets = self.dir.path().to_string_lossy().into_owned();
        let mut child = self
            .as_owner(&self.bindir.join("postgres"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={sockets}")])
            .args(["-c", "max_connections=100"])
            .args(["-c", "shared_buffers=64MB"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}/postgres: {e}", self.bindir.display()));
        self.starts += 1;
        let url = self.url("postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the private Postgres exited during start-up with {status} (port {}):\n{}",
                    self.port,
                    self.log_tail(40)
                );
            }
            if let Ok(Ok(client)) =
                tokio::time::timeout(Duration::from_secs(2), crate::connect(&url)).await
                && client.simple_query("SELECT 1").await.is_ok()
            {
                self.child = Some(child);
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                panic!(
                    "the private Postgres was not ready on port {} within {READY_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `program` as the data directory's owner: through `setpriv` as root (with a parent-death signal, so
    /// the postmaster dies with this process), directly otherwise.
    fn as_owner(&self, program: &Path) -> Command {
        match self.owner {
            Some((uid, gid)) => {
                let mut command = Command::new("setpriv");
                command
                    .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                    .args(["--clear-groups", "--pdeathsig", "KILL", "--"])
                    .arg(program);
                command
            }
            None => Command::new(program),
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Stop it before the directory goes: immediate (nothing to keep), then SIGKILL if that failed.
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pg_ctl = self.bindir.join("pg_ctl");
        let mut command = match self.owner {
            Some((uid, gid)) => {
                let mut c = std::process::Command::new("setpriv");
                c.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                    .args(["--clear-groups", "--"])
                    .arg(&pg_ctl);
                c
            }
            None => std::process::Command::new(&pg_ctl),
        };
        let _ = command
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The uid and gid of [`OS_USER`], creating the system account as `infra/stack.sh` does when missing.
async fn ensure_os_user() -> (u32, u32) {
    let id = |flag: &'static str| async move {
        let out = Command::new("id")
            .args([flag, OS_USER])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .ok()
    };
    if id("-u").await.is_none() {
        let nologin = if Path::new("/usr/sbin/nologin").exists() {
            "/usr/sbin/nologin"
        } else {
            "/bin/false"
        };
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", nologin, OS_USER])
            .status()
            .await;
        assert!(
            matches!(status, Ok(s) if s.success()),
            "running as root, Postgres needs the unprivileged account {OS_USER:?}, and `useradd` could not \
             create it ({status:?}); run `infra/stack.sh up` once, which creates it"
        );
    }
    match (id("-u").await, id("-g").await) {
        (Some(uid), Some(gid)) => (uid, gid),
        _ => panic!("cannot read the uid and gid of {OS_USER:?}"),
    }
}

/// The directory with `initdb`, `pg_ctl` and `postgres`, found as `infra/stack.sh` finds it.
///
/// # Panics
///
/// When there is none.
pub fn pg_bindir() -> PathBuf {
    let has_bins = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(explicit) = std::env::var_os("COCOON_PG_BINDIR") {
        let explicit = PathBuf::from(explicit);
        assert!(
            has_bins(&explicit),
            "COCOON_PG_BINDIR={} lacks initdb, pg_ctl or postgres",
            explicit.display()
        );
        return explicit;
    }
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    debian.sort_by_key(|d| std::cmp::Reverse(d.0));
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("initdb"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    from_pg_config
        .into_iter()
        .chain(debian.into_iter().map(|(_, d)| d))
        .chain(on_path)
        .find(|d| has_bins(d))
        .unwrap_or_else(|| {
            panic!(
                "no Postgres binaries found (COCOON_PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin, \
                 initdb on PATH); install PostgreSQL, e.g. `infra/stack.sh install`"
            )
        })
}
