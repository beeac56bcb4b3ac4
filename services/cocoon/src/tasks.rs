//! `tasks submit|get|list|watch`: the producer's side, through the `client` library.
//!
//! Submissions go through `client::Producer` (validated, then published and acknowledged); everything else reads
//! the read model, so it shows what the projector has written so far.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use client::{
    Producer, ProducerConfig, ReadModel, TaskFilter, TaskRequest, TaskRequirements, TaskStatus,
    TaskView,
};
use events::{ClientId, Nanoton, TaskId, Timestamp, WorkerId};

use crate::Shutdown;
use crate::cli::{Connection, ListArgs, SubmitArgs, TasksCommand};

/// Most bad lines of a file reported before giving up listing them.
const MAX_LINE_ERRORS: usize = 20;

pub async fn run(
    conn: &Connection,
    command: TasksCommand,
    out: &mut dyn Write,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    match command {
        TasksCommand::Submit(args) => submit(conn, &args, out, shutdown).await,
        TasksCommand::Get { task_id } => {
            let task_id = parse_task_id(&task_id)?;
            let model = read_model(conn).await?;
            match model.task(task_id).await? {
                Some(view) => {
                    write_task(out, &view)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => bail!(
                    "task {task_id} is not in the read model (not submitted, or not projected yet: is the projector running?)"
                ),
            }
        }
        TasksCommand::List(args) => {
            let filter = filter(&args)?;
            let model = read_model(conn).await?;
            let views = model.tasks(&filter).await?;
            write_table(out, &views)?;
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Watch { task_id } => {
            let task_id = parse_task_id(&task_id)?;
            let model = read_model(conn).await?;
            let completed = watch(&model, task_id, out, &shutdown).await?;
            Ok(exit_code(completed.unwrap_or(false)))
        }
    }
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn parse_task_id(s: &str) -> anyhow::Result<TaskId> {
    s.trim()
        .parse()
        .with_context(|| format!("{s:?} is not a task id (a UUID)"))
}

/// Opens the read model with advice when it cannot.
pub async fn read_model(conn: &Connection) -> anyhow::Result<ReadModel> {
    ReadModel::connect(&conn.database_url)
        .await
        .context("is the stack running? start it with `cocoon dev up` or `infra/stack.sh up`")
}

fn filter(args: &ListArgs) -> anyhow::Result<TaskFilter> {
    let status = args
        .status
        .as_deref()
        .map(|s| {
            TaskStatus::parse(s).with_context(|| {
                format!(
                    "unknown status {s:?}; statuses are {}",
                    TaskStatus::ALL.map(TaskStatus::as_str).join(", ")
                )
            })
        })
        .transpose()?;
    Ok(TaskFilter {
        status,
        client: args
            .client_id
            .as_deref()
            .map(ClientId::new)
            .transpose()
            .context("--client")?,
        worker: args
            .worker_id
            .as_deref()
            .map(WorkerId::new)
            .transpose()
            .context("--worker")?,
        limit: args.limit,
    })
}

/// The request the flags describe (validated when submitted).
fn request_from_flags(args: &SubmitArgs) -> anyhow::Result<TaskRequest> {
    let (Some(client_id), Some(max_price)) = (&args.client_id, args.max_price) else {
        bail!("--client and --max-price are required without --file");
    };
    let input = match (&args.input, &args.input_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path)
            .with_context(|| format!("cannot read --input-file {}", path.display()))?,
        (None, None) => Vec::new(),
    };
    Ok(TaskRequest {
        client_id: client_id.clone(),
        requirements: TaskRequirements {
            gpu_count: args.gpus,
            gpu_memory_mib: args.gpu_memory_mib,
            model_tag: args.model_tag.clone(),
        },
        priority: args.priority,
        max_price_per_gpu_second: Nanoton(max_price),
        timeout_ms: args.timeout_ms,
        input,
    })
}

/// Reads and checks a whole JSON Lines file; every bad line is reported (up to a limit) and nothing is returned
/// unless all lines are good.
pub fn read_requests(reader: impl BufRead, name: &str) -> anyhow::Result<Vec<TaskRequest>> {
    let mut requests = Vec::new();
    let mut errors = Vec::new();
    let mut bad = 0usize;
    for item in client::read_jsonl(reader) {
        match item {
            Ok((_, request)) => requests.push(request),
            Err(e) => {
                bad += 1;
                if errors.len() < MAX_LINE_ERRORS {
                    errors.push(e.to_string());
                }
            }
        }
    }
    if bad > 0 {
        let more = if bad > errors.len() {
            format!("\n… and {} more", bad - errors.len())
        } else {
            String::new()
        };
        bail!(
            "{name}: {bad} bad line(s), nothing submitted:\n{}{more}",
            errors.join("\n")
        );
    }
    if requests.is_empty() {
        bail!("{name}: no requests in the file");
    }
    Ok(requests)
}

async fn submit(
    conn: &Connection,
    args: &SubmitArgs,
    out: &mut dyn Write,
    shutdown: Shutdown,
) -> anyhow::Result<ExitCode> {
    let (requests, from_file) = match &args.file {
        Some(path) if path.as_os_str() == "-" => {
            (read_requests(std::io::stdin().lock(), "stdin")?, true)
        }
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            (
                read_requests(std::io::BufReader::new(file), &path.display().to_string())?,
                true,
            )
        }
        None => {
            let request = request_from_flags(args)?;
            request.validate().context("cannot submit")?;
            (vec![request], false)
        }
    };
    let bus = crate::connect(conn).await?;
    let producer = Producer::from_bus(&bus, ProducerConfig::default())?;
    let started = Instant::now();
    let results = producer.submit_many(&requests).await;
    let elapsed = started.elapsed();
    let mut ids = Vec::with_capacity(results.len());
    let mut failed = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(s) => {
                writeln!(out, "{}", s.task_id)?;
                ids.push(s.task_id);
            }
            Err(e) => failed.push(if from_file {
                format!("request {} of the file: {e}", i + 1)
            } else {
                e.to_string()
            }),
        }
    }
    out.flush()?;
    if from_file {
        let secs = elapsed.as_secs_f64().max(1e-6);
        eprintln!(
            "submitted {} tasks in {:.2}s ({:.0} tasks/s){}",
            ids.len(),
            secs,
            ids.len() as f64 / secs,
            if failed.is_empty() {
                String::new()
            } else {
                format!("; {} failed", failed.len())
            }
        );
    }
    if !failed.is_empty() {
        for f in failed.iter().take(MAX_LINE_ERRORS) {
            eprintln!("error: {f}");
        }
        bail!("{} of {} submissions failed", failed.len(), requests.len());
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let model = read_model(conn).await?;
    let mut all_completed = true;
    for id in ids {
        match watch(&model, id, out, &shutdown).await? {
            Some(completed) => all_completed &= completed,
            None => return Ok(ExitCode::FAILURE), // interrupted
        }
    }
    Ok(exit_code(all_completed))
}

/// Prints each change of the task until it is final; `Some(completed?)` then, `None` when interrupted.
async fn watch(
    model: &ReadModel,
    task_id: TaskId,
    out: &mut dyn Write,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<bool>> {
    let mut watch = model.watch_task(task_id);
    let mut last = None;
    loop {
        let change = tokio::select! {
            change = watch.next() => change,
            () = shutdown.wait() => return Ok(None),
        };
        match change {
            None => break,
            Some(Err(e)) => {
                // The database may come back; say so and keep polling.
                eprintln!("warning: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {},
                    () = shutdown.wait() => return Ok(None),
                }
            }
            Some(Ok(view)) => {
                writeln!(out, "{}", change_line(&view))?;
                out.flush()?;
                last = Some(view);
            }
        }
    }
    Ok(last.map(|v| v.status == TaskStatus::Completed))
}

/// One line per change: task, status, attempt, worker, and what is new.
pub fn change_line(v: &TaskView) -> String {
    let mut line = format!(
        "{} {} {:<9} attempt {}",
        Timestamp::now(),
        v.task_id,
        v.status,
        v.attempt
    );
    if let Some(w) = &v.worker_id {
        line.push_str(&format!(" worker {w}"));
    }
    if let Some(reason) = &v.failure_reason {
        line.push_str(&format!(" reason {reason:?}"));
    }
    if let Some(r) = &v.result {
        line.push_str(&format!(
            " result {} ({} bytes, results seq {})",
            r.checksum, r.size_bytes, r.stream_sequence
        ));
    }
    if v.is_final() {
        line.push_str(" [final]");
    }
    line
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// `tasks get`: one field per line.
pub fn write_task(out: &mut dyn Write, v: &TaskView) -> std::io::Result<()> {
    let row = |out: &mut dyn Write, k: &str, val: String| writeln!(out, "{k:<12} {val}");
    row(out, "task", v.task_id.to_string())?;
    row(
        out,
        "status",
        format!("{}{}", v.status, if v.is_final() { " (final)" } else { "" }),
    )?;
    row(out, "attempt", v.attempt.to_string())?;
    match &v.submission {
        None => row(out, "submission", "not projected yet".into())?,
        Some(s) => {
            row(out, "client", s.client_id.to_string())?;
            row(out, "priority", s.priority.to_string())?;
            row(
                out,
                "gpus",
                format!("{} x {} MiB", s.gpu_count, s.gpu_memory_mib),
            )?;
            row(out, "model tag", opt(&s.model_tag))?;
            row(
                out,
                "max price",
                format!("{} per GPU-second", s.max_price_per_gpu_second),
            )?;
            row(out, "timeout", format!("{} ms", s.timeout_ms))?;
            row(out, "submitted", s.submitted_at.to_string())?;
        }
    }
    row(out, "worker", opt(&v.worker_id))?;
    row(out, "allocated", opt(&v.allocated_at))?;
    row(out, "started", opt(&v.started_at))?;
    row(out, "finished", opt(&v.finished_at))?;
    row(
        out,
        "gpu usage",
        v.gpu_millis.map_or_else(
            || "-".into(),
            |g| format!("{}.{:03} GPU-seconds", g.0 / 1000, g.0 % 1000),
        ),
    )?;
    row(
        out,
        "peak memory",
        v.peak_gpu_memory_mib
            .map_or_else(|| "-".into(), |m| format!("{m} MiB")),
    )?;
    if let Some(reason) = &v.failure_reason {
        let retry = match v.retryable {
            Some(true) => " (retryable)",
            Some(false) => " (not retryable)",
            None => "",
        };
        row(out, "failure", format!("{reason}{retry}"))?;
    }
    match &v.result {
        None => row(out, "result", "-".into())?,
        Some(r) => {
            row(out, "result", r.checksum.clone())?;
            row(
                out,
                "result from",
                format!(
                    "attempt {} on {}, {} bytes, results seq {}, {}",
                    r.attempt, r.worker_id, r.size_bytes, r.stream_sequence, r.published_at
                ),
            )?;
        }
    }
    row(out, "last event", v.last_event_id.to_string())
}

/// `tasks list`: a table, one task per row.
pub fn write_table(out: &mut dyn Write, views: &[TaskView]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<36}  {:<9}  {:>3}  {:<16}  {:<16}  {:>3}  {:>4}  {:<27}  RESULT",
        "TASK", "STATUS", "ATT", "CLIENT", "WORKER", "PRI", "GPUS", "SUBMITTED"
    )?;
    for v in views {
        let (client, priority, gpus, submitted) = match &v.submission {
            Some(s) => (
                s.client_id.to_string(),
                s.priority.to_string(),
                s.gpu_count.to_string(),
                s.submitted_at.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:<36}  {:<9}  {:>3}  {:<16}  {:<16}  {:>3}  {:>4}  {:<27}  {}",
            v.task_id,
            v.status.as_str(),
            v.attempt,
            client,
            opt(&v.worker_id),
            priority,
            gpus,
            submitted,
            v.result.as_ref().map_or("-", |r| r.checksum.as_str())
        )?;
    }
    if views.is_empty() {
        writeln!(out, "(no tasks)")?;
    }
    Ok(())
}
