//! The pool's services as separate processes, for end-to-end and fault tests: started from the workspace's
//! built binaries, killed with SIGKILL (`kill -9`), stopped with a signal, started again, each with its
//! output in a log file whose tail goes into failure messages.
//!
//! The binaries are the ones next to the running test binary (`target/<profile>/`), or in
//! `$COCOON_BIN_DIR`; [`bin_dir`] says how to build them when one is missing. Each service runs through
//! `setpriv --pdeathsig KILL` where that exists, so no service outlives a test process that is itself
//! killed (a test runner's time-out).
//!
//! ```no_run
//! # async fn demo() {
//! let bin = tests::services::bin_dir(&["projector"], "cargo build -p projector");
//! let logs = std::env::temp_dir().join("cocoon-demo-logs");
//! let mut services = tests::services::Services::new(bin, &logs, vec![]);
//! services.start(tests::services::ServiceSpec::new("projector", "projector", ["--until-idle"]));
//! services.kill9("projector").await;
//! services.restart("projector");
//! # }
//! ```

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, Command};

/// How long a service may take to stop after its stop signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The directory holding the built service binaries: `$COCOON_BIN_DIR`, else the directory of the running
/// test binary's profile (`target/debug` for `target/debug/deps/<test>-<hash>`).
///
/// # Panics
///
/// When one of `names` is not there; the message names `build` (the command that builds them).
pub fn bin_dir(names: &[&str], build: &str) -> PathBuf {
    let dir = match std::env::var_os("COCOON_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the test binary knows where it is");
            let deps = exe.parent().expect("the test binary has a directory");
            // `target/debug/deps/<test>`: the binaries are one level up.
            if deps.file_name().is_some_and(|n| n == "deps") {
                deps.parent().unwrap_or(deps).to_path_buf()
            } else {
                deps.to_path_buf()
            }
        }
    };
    let missing: Vec<String> = names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "missing service binaries: {}; build them first with `{build}` (cargo nextest run --workspace \
         builds them too), or point COCOON_BIN_DIR at a directory holding them",
        missing.join(", ")
    );
    dir
}

/// The last `lines` lines of a file, each prefixed with `| ` (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    // Only the end matters, and a log can be large.
    let start = bytes.len().saturating_sub(lines * 400);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    | {l}\n"))
        .collect()
}

/// A service that exited on its own.
#[derive(Debug, Clone)]
pub struct Exited {
    pub name: String,
    pub status: ExitStatus,
    pub log: PathBuf,
    /// The end of its log.
    pub tail: String,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited on its own ({}); the end of {}:\n{}",
            self.name,
            self.status,
            self.log.display(),
            self.tail
        )
    }
}

/// How to start one service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Its name in the set (and its log file's: `<name>.log`).
    pub name: String,
    /// The binary's file name in the binaries directory.
    pub program: String,
    pub args: Vec<String>,
    /// Variables for this service only (on top of the set's).
    pub env: Vec<(String, String)>,
    /// What stops it cleanly: `INT` or `TERM`.
    pub stop_signal: &'static str,
}

impl ServiceSpec {
    pub fn new(
        name: impl Into<String>,
        program: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stop_signal: "INT",
        }
    }

    /// Adds a variable for this service.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ServiceSpec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Stops it with SIGTERM instead of SIGINT.
    pub fn stop_with_term(mut self) -> ServiceSpec {
        self.stop_signal = "TERM";
        self
    }
}

#[derive(Debug)]
struct Running {
    spec: ServiceSpec,
    /// `None` once it was killed or stopped by the test.
    child: Option<Child>,
    starts: u32,
    log: PathBuf,
}

/// A set of service processes sharing a binaries directory, a log directory and environment.
/// Every process still running is killed on drop.
#[derive(Debug)]
pub struct Services {
    bin_dir: PathBuf,
    logs: PathBuf,
    env: Vec<(String, String)>,
    setpriv: Option<PathBuf>,
    running: BTreeMap<String, Running>,
}

impl Services {
    /// A set whose processes get `env` and write their output to `<logs>/<name>.log` (the directory is
    /// created; logs of an earlier run with the same names are replaced).
    pub fn new(bin_dir: PathBuf, logs: &Path, env: Vec<(String, String)>) -> Services {
        std::fs::create_dir_all(logs)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", logs.display()));
        let setpriv = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("setpriv"))
            .find(|p| p.is_file());
        Services {
            bin_dir,
            logs: logs.to_path_buf(),
            env,
            setpriv,
            running: BTreeMap::new(),
        }
    }

    /// The directory the logs are written to.
    pub fn logs_dir(&self) -> &Path {
        &self.logs
    }

    /// Starts a service (its log is truncated first).
    ///
    /// # Panics
    ///
    /// When the name is taken or the binary cannot be spawned.
    pub fn start(&mut self, spec: ServiceSpec) {
        assert!(
            !self.running.contains_key(&spec.name),
            "a service named {} is already in the set",
            spec.name
        );
        let log = self.logs.join(format!("{}.log", spec.name));
        let _ = std::fs::remove_file(&log);
        let mut running = Running {
            spec,
            child: None,
            starts: 0,
            log,
        };
        self.spawn(&mut running);
        self.running.insert(running.spec.name.clone(), running);
    }

    /// Starts a killed or stopped service again with the same command line; its log is appended to.
    ///
    /// # Panics
    ///
    /// When it is unknown or still running.
    pub fn restart(&mut self, name: &str) {
        let mut running = self
            .running
            .remove(name)
            .unwrap_or_else(|| panic!("no service named {name}"));
        assert!(running.child.is_none(), "{name} is still running");
        self.spawn(&mut running);
        self.running.insert(name.to_string(), running);
    }

    /// Kills a service with SIGKILL (`kill -9`) and waits until it is gone.
    ///
    /// # Panics
    ///
    /// When it is unknown, not running, or had already exited on its own (with its log's tail).
    pub async fn kill9(&mut self, name: &str) {
        let running = self.get_mut(name);
        let mut child = running
            .child
            .take()
            .unwrap_or_else(|| panic!("{name} is not running"));
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{name} had exited on its own ({status}) before it was killed:\n{}",
                tail(&running.log, 30)
            );
        }
        note(&running.log, "killed with SIGKILL by the test");
        let _ = child.kill().await;
    }

    /// Stops a service with its stop signal and waits until it exits (killed after 15 s); returns how it
    /// exited. `None` when it was not running.
    pub async fn stop(&mut self, name: &str) -> Option<ExitStatus> {
        let running = self.get_mut(name);
        let mut child = running.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        note(
            &running.log,
            &format!("stopped with SIG{} by the test", running.spec.stop_signal),
        );
        if let Some(pid) = child.id() {
            // kill(1) instead of libc: the workspace forbids unsafe code.
            let _ = Command::new("kill")
                .args(["-s", running.spec.stop_signal, &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.kill().await;
                child.wait().await.ok()
            }
        }
    }

    /// The services that should be running but have exited on their own, taken out of the running ones
    /// (so that [`Services::restart`] can start them again); empty when all are up.
    pub fn exited(&mut self) -> Vec<Exited> {
        let mut out = Vec::new();
        for running in self.running.values_mut() {
            let Some(child) = running.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                running.child = None;
                out.push(Exited {
                    name: running.spec.name.clone(),
                    status,
                    log: running.log.clone(),
                    tail: tail(&running.log, 30),
                });
            }
        }
        out
    }

    /// How many times a service has been started.
    pub fn starts(&self, name: &str) -> u32 {
        self.running.get(name).map_or(0, |r| r.starts)
    }

    /// The pid of a running service.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.running.get(name)?.child.as_ref()?.id()
    }

    /// The last `lines` lines of every service's log, for failure messages.
    pub fn tails(&self, lines: usize) -> String {
        self.running
            .values()
            .map(|r| {
                format!(
                    "--- {} ({}) ---\n{}",
                    r.spec.name,
                    r.log.display(),
                    tail(&r.log, lines)
                )
            })
            .collect()
    }

    fn get_mut(&mut self, name: &str) -> &mut Running {
        self.running
            .get_mut(name)
            .unwrap_or_else(|| panic!("no service named {name}"))
    }

    fn spawn(&self, running: &mut Running) {
        let spec = &running.spec;
        running.starts += 1;
        note(&running.log, &format!("start #{}", running.starts));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&running.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", running.log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a log handle: {e}"));
        let program = self.bin_dir.join(&spec.program);
        let mut command = match &self.setpriv {
            // setpriv execs the program, so the pid (and `kill -9` on it) is the service's own.
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let child = command
            .args(&spec.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        running.child = Some(child);
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for running in self.running.values_mut() {
            if let Some(child) = running.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for running in self.running.values_mut() {
            if let Some(child) = running.child.as_mut() {
                while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// Appends a line saying what the test did to a service's log, so the log reads in order.
fn note(log: &Path, what: &str) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(
            file,
            "===== test harness: {what} (unix time {secs:.3}) ====="
        );
    }
}
