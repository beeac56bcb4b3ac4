//! Executors: what running an attempt means. `exec` runs a configured command with the task's input on stdin;
//! `simulated` (load tests only, labelled as such) echoes the input after a fixed time.
//!
//! Guarantees of the `exec` executor: the command never outlives its attempt (it runs in its own process
//! group, which is killed on timeout, on a kill request, and when the attempt's future is dropped); output
//! capture is bounded (stdout up to `max_output_bytes`, the rest read and discarded so the command never
//! blocks on a full pipe; the last `stderr_tail_bytes` of stderr), whatever the command writes.

use std::fmt;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use events::TaskId;
use events::payload::Blob;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Default stdout capture limit: 960 KiB, so that an output that does not compress still fits, with the
/// result's other fields, in a frame (1 MiB). A larger limit is allowed (compressible outputs fit), but an
/// output whose result does not fit fails the attempt (permanently) instead of completing it.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 960 * 1024;
/// Default stderr tail kept for failure reasons: 4 KiB.
pub const DEFAULT_STDERR_TAIL_BYTES: usize = 4 * 1024;

/// After the command exits, how long its output pipes may stay open (held by a leftover child) before the
/// rest of its process group is killed.
const PIPE_GRACE: Duration = Duration::from_millis(100);

/// One attempt to run.
#[derive(Debug)]
pub struct Job<'a> {
    pub task_id: TaskId,
    pub attempt: u32,
    pub gpu_indices: &'a [u32],
    pub input: &'a Blob,
    /// Wall-clock limit; `None` for none.
    pub timeout: Option<Duration>,
    /// Cancelled when the attempt must stop now (revoked, or the drain ran out of time).
    pub kill: CancellationToken,
    /// Receives the pid of the started process, so the agent can sample its GPU memory.
    pub started: Option<oneshot::Sender<u32>>,
}

/// Why an attempt failed, as it goes into `TaskFailed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub reason: String,
    /// Whether another attempt (elsewhere, later) could succeed.
    pub retryable: bool,
}

impl TaskFailure {
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: false,
        }
    }

    pub fn retryable(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: true,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Succeeded {
        output: Vec<u8>,
        /// The output was cut at the capture limit.
        truncated: bool,
    },
    Failed(TaskFailure),
    /// Stopped through [`Job::kill`]; the caller decides what (if anything) to report.
    Killed,
}

/// Runs attempts. Implementations must stop promptly when [`Job::kill`] is cancelled.
pub trait Executor: Send + Sync + fmt::Debug {
    /// `exec` or `simulated`, for logs.
    fn kind(&self) -> &'static str;

    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, ExecOutcome>;
}

/// The message for inputs the executors cannot fetch.
pub const REFERENCE_INPUT_UNSUPPORTED: &str =
    "reference inputs are not supported by the exec executor";

/// Settings of the `exec` executor.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub program: String,
    pub args: Vec<String>,
    pub max_output_bytes: usize,
    pub stderr_tail_bytes: usize,
}

impl ExecConfig {
    pub fn new(
        program: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            stderr_tail_bytes: DEFAULT_STDERR_TAIL_BYTES,
        }
    }
}

/// Runs a command per attempt: input on stdin, output from stdout.
///
/// Environment: `CUDA_VISIBLE_DEVICES` (the allocation's GPU indices joined by commas, also for simulated
/// GPUs), `COCOON_TASK_ID`, `COCOON_ATTEMPT`.
#[derive(Debug, Clone)]
pub struct ExecExecutor {
    config: ExecConfig,
}

impl ExecExecutor {
    pub fn new(config: ExecConfig) -> Self {
        Self { config }
    }
}

impl Executor for ExecExecutor {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, ExecOutcome> {
        Box::pin(run_command(&self.config, job))
    }
}

/// Kills a process group. There is no safe signal API in std and this workspace forbids `unsafe`, so it
/// asks `kill(1)`; the group leader is also killed through its handle, which needs neither.
async fn kill_group(pgid: u32) {
    let result = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(pgid, error = %e, "cannot run kill(1) on a task's process group");
    }
}

async fn run_command(config: &ExecConfig, mut job: Job<'_>) -> ExecOutcome {
    let input = match job.input {
        Blob::Inline(bytes) => bytes.clone(),
        Blob::Reference { .. } => {
            return ExecOutcome::Failed(TaskFailure::permanent(REFERENCE_INPUT_UNSUPPORTED));
        }
    };
    let devices = job
        .gpu_indices
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut command = tokio::process::Command::new(&config.program);
    command
        .args(&config.args)
        .env("CUDA_VISIBLE_DEVICES", devices)
        .env("COCOON_TASK_ID", job.task_id.to_string())
        .env("COCOON_ATTEMPT", job.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that the whole tree can be killed, not just the shell at its top.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return ExecOutcome::Failed(TaskFailure::permanent(format!(
                "cannot start {:?}: {e}",
                config.program
            )));
        }
    };
    let Some(pid) = child.id() else {
        return ExecOutcome::Failed(TaskFailure::permanent("the command exited at once"));
    };
    // If this future is dropped, kill_on_drop takes the leader; the guard takes the rest of the group.
    let mut group = GroupGuard {
        pgid: pid,
        armed: true,
    };
    if let Some(started) = job.started.take() {
        let _ = started.send(pid);
    }
    let stdin = child.stdin.take();
    let writer = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            // A command that does not read its input closes the pipe; that is its business, not an error.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    });
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let max_output = config.max_output_bytes;
    let tail = config.stderr_tail_bytes;
    let mut out_reader = tokio::spawn(read_bounded(stdout, max_output));
    let mut err_reader = tokio::spawn(read_tail(stderr, tail));

    let timeout = async {
        match job.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        () = timeout => {
            group.kill(&mut child).await;
            writer.abort();
            out_reader.abort();
            err_reader.abort();
            let limit = job.timeout.unwrap_or_default();
            return ExecOutcome::Failed(TaskFailure::retryable(format!(
                "timed out after {} ms", limit.as_millis()
            )));
        }
        () = job.kill.cancelled() => {
            group.kill(&mut child).await;
            writer.abort();
            out_reader.abort();
            err_reader.abort();
            return ExecOutcome::Killed;
        }
    };
    writer.abort();
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            group.kill(&mut child).await;
            return ExecOutcome::Failed(TaskFailure::retryable(format!(
                "cannot wait for the command: {e}"
            )));
        }
    };
    // The leader is gone; a leftover child may still hold the pipes. Give it a moment, then end the group.
    let both = async {
        (
            Pin::new(&mut out_reader).await,
            Pin::new(&mut err_reader).await,
        )
    };
    let (stdout, stderr) = match tokio::time::timeout(PIPE_GRACE, both).await {
        Ok(done) => done,
        Err(_) => {
            kill_group(pid).await;
            let rest = async {
                (
                    Pin::new(&mut out_reader).await,
                    Pin::new(&mut err_reader).await,
                )
            };
            match tokio::time::timeout(PIPE_GRACE, rest).await {
                Ok(done) => done,
                Err(_) => {
                    // A process that left the group (setsid, a daemon) holds the pipes: do not wait on it.
                    out_reader.abort();
                    err_reader.abort();
                    group.armed = false;
                    return ExecOutcome::Failed(TaskFailure::permanent(
                        "the command left a process outside its process group holding its output open; \
                         its output is lost"
                            .to_owned(),
                    ));
                }
            }
        }
    };
    group.armed = false;
    let (output, truncated) = stdout.unwrap_or_default();
    let stderr = stderr.unwrap_or_default();
    if status.success() {
        ExecOutcome::Succeeded { output, truncated }
    } else {
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr = stderr.trim();
        ExecOutcome::Failed(TaskFailure::permanent(if stderr.is_empty() {
            format!("command failed with {status}")
        } else {
            format!("command failed with {status}; stderr: {stderr}")
        }))
    }
}

/// Kills the process group when dropped while armed, i.e. when the attempt's future is dropped mid-run.
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl GroupGuard {
    async fn kill(&mut self, child: &mut tokio::process::Child) {
        kill_group(self.pgid).await;
        let _ = child.kill().await;
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Best effort and non-blocking: a future dropped mid-run (its attempt abandoned) must not leave the
        // command's children running. After a clean exit the group is usually empty and this is a no-op.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pgid)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|mut c| std::thread::spawn(move || c.wait()));
    }
}

/// Reads everything, keeping the first `max` bytes; says whether more came.
async fn read_bounded(reader: Option<impl AsyncRead + Unpin>, max: usize) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

/// Reads everything, keeping the last `max` bytes.
async fn read_tail(reader: Option<impl AsyncRead + Unpin>, max: usize) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                // Trim in amortised steps rather than on every read.
                if tail.len() > 2 * max {
                    tail.drain(..tail.len() - max);
                }
            }
        }
    }
    if tail.len() > max {
        tail.drain(..tail.len() - max);
    }
    tail
}

/// The load-test executor: waits `duration`, then echoes the input. It runs nothing; the agent labels it as
/// simulated in its logs.
#[derive(Debug, Clone, Default)]
pub struct SimulatedExecutor {
    pub duration: Duration,
}

impl SimulatedExecutor {
    pub fn new(duration: Duration) -> Self {
        Self { duration }
    }
}

impl Executor for SimulatedExecutor {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn execute<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, ExecOutcome> {
        Box::pin(async move {
            let Blob::Inline(input) = job.input else {
                return ExecOutcome::Failed(TaskFailure::permanent(
                    "reference inputs are not supported by the simulated executor",
                ));
            };
            if !self.duration.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(self.duration) => {}
                    () = job.kill.cancelled() => return ExecOutcome::Killed,
                }
            }
            ExecOutcome::Succeeded {
                output: input.clone(),
                truncated: false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> ExecExecutor {
        ExecExecutor::new(ExecConfig::new("sh", ["-c", script]))
    }

    async fn run(
        executor: &dyn Executor,
        input: &[u8],
        gpus: &[u32],
        timeout: Option<Duration>,
    ) -> ExecOutcome {
        let input = Blob::Inline(input.to_vec());
        executor
            .execute(Job {
                task_id: TaskId::from_u128(7),
                attempt: 2,
                gpu_indices: gpus,
                input: &input,
                timeout,
                kill: CancellationToken::new(),
                started: None,
            })
            .await
    }

    fn succeeded(outcome: ExecOutcome) -> (Vec<u8>, bool) {
        match outcome {
            ExecOutcome::Succeeded { output, truncated } => (output, truncated),
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn input_reaches_stdin() {
        let cat = ExecExecutor::new(ExecConfig::new("cat", Vec::<String>::new()));
        let (output, truncated) = succeeded(run(&cat, b"hello gpu", &[0], None).await);
        assert_eq!(output, b"hello gpu");
        assert!(!truncated);
    }

    #[tokio::test]
    async fn environment_names_the_gpus_and_the_attempt() {
        let e = sh("echo $CUDA_VISIBLE_DEVICES $COCOON_TASK_ID $COCOON_ATTEMPT");
        let (output, _) = succeeded(run(&e, b"", &[1, 3], None).await);
        assert_eq!(
            String::from_utf8(output).unwrap().trim(),
            format!("1,3 {} 2", TaskId::from_u128(7))
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_command_and_is_retryable() {
        let started = Instant::now();
        let outcome = run(&sh("sleep 30"), b"", &[0], Some(Duration::from_millis(200))).await;
        match outcome {
            ExecOutcome::Failed(f) => {
                assert!(f.retryable);
                assert!(f.reason.contains("timed out after 200 ms"), "{}", f.reason);
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_is_bounded_and_marked_truncated() {
        let e = sh("head -c 3000000 /dev/zero");
        let (output, truncated) = succeeded(run(&e, b"", &[0], None).await);
        assert_eq!(output.len(), DEFAULT_MAX_OUTPUT_BYTES);
        assert!(truncated);
    }

    #[tokio::test]
    async fn output_at_exactly_the_limit_is_not_truncated() {
        let mut config = ExecConfig::new("sh", ["-c", "head -c 1000 /dev/zero"]);
        config.max_output_bytes = 1000;
        let (output, truncated) = succeeded(run(&ExecExecutor::new(config), b"", &[], None).await);
        assert_eq!(output.len(), 1000);
        assert!(!truncated);
    }

    #[tokio::test]
    async fn non_zero_exit_is_permanent_with_the_stderr_tail() {
        let e = sh("head -c 10000 /dev/zero | tr '\\0' x >&2; echo 'model not found' >&2; exit 3");
        match run(&e, b"", &[0], None).await {
            ExecOutcome::Failed(f) => {
                assert!(!f.retryable);
                assert!(f.reason.contains("exit status: 3"), "{}", f.reason);
                assert!(f.reason.ends_with("model not found"), "{}", f.reason);
                assert!(f.reason.len() < DEFAULT_STDERR_TAIL_BYTES + 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_program_is_permanent() {
        let e = ExecExecutor::new(ExecConfig::new("/nonexistent/cocoon-model", ["x"]));
        match run(&e, b"", &[0], None).await {
            ExecOutcome::Failed(f) => {
                assert!(!f.retryable);
                assert!(f.reason.starts_with("cannot start"), "{}", f.reason);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reference_inputs_are_refused() {
        let input = Blob::Reference {
            uri: "s3://bucket/x".into(),
            size_bytes: 3,
            checksum: "sha256:00".into(),
        };
        let outcome = sh("cat")
            .execute(Job {
                task_id: TaskId::from_u128(1),
                attempt: 1,
                gpu_indices: &[0],
                input: &input,
                timeout: None,
                kill: CancellationToken::new(),
                started: None,
            })
            .await;
        assert_eq!(
            outcome,
            ExecOutcome::Failed(TaskFailure::permanent(REFERENCE_INPUT_UNSUPPORTED))
        );
    }

    #[tokio::test]
    async fn kill_stops_the_whole_process_group() {
        // The shell forks `sleep`, which holds stdout: only killing the group lets the attempt end.
        let e = sh("sleep 30; echo never");
        let kill = CancellationToken::new();
        let (tx, rx) = oneshot::channel();
        let input = Blob::Inline(Vec::new());
        let killer = kill.clone();
        tokio::spawn(async move {
            let _pid = rx.await;
            killer.cancel();
        });
        let started = Instant::now();
        let outcome = e
            .execute(Job {
                task_id: TaskId::from_u128(1),
                attempt: 1,
                gpu_indices: &[0],
                input: &input,
                timeout: None,
                kill,
                started: Some(tx),
            })
            .await;
        assert_eq!(outcome, ExecOutcome::Killed);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_process_escaping_the_group_with_the_pipes_does_not_hang_the_attempt() {
        // `setsid` puts `sleep` in a new session, out of reach of the group kill, holding stdout.
        let e = sh("setsid sleep 30 & echo started");
        let input = Blob::Inline(Vec::new());
        let started = Instant::now();
        let outcome = e
            .execute(Job {
                task_id: TaskId::from_u128(2),
                attempt: 1,
                gpu_indices: &[0],
                input: &input,
                timeout: None,
                kill: CancellationToken::new(),
                started: None,
            })
            .await;
        let ExecOutcome::Failed(failure) = outcome else {
            panic!("expected a failure, got {outcome:?}")
        };
        assert!(!failure.retryable);
        assert!(
            failure.reason.contains("outside its process group"),
            "{}",
            failure.reason
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn simulated_executor_echoes_after_its_duration() {
        let e = SimulatedExecutor::new(Duration::from_millis(20));
        assert_eq!(e.kind(), "simulated");
        let started = Instant::now();
        let (output, truncated) = succeeded(run(&e, b"abc", &[0], None).await);
        assert_eq!(output, b"abc");
        assert!(!truncated);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
