//! `workers list`: the workers of the read model as a table. Simulated GPUs are marked in the row, and the
//! ADMISSION column says whether the worker's newest attestation verdict verified and is still valid.

use std::io::Write;
use std::process::ExitCode;

use client::WorkerView;
use events::Timestamp;

use crate::cli::{Connection, WorkersCommand};

pub async fn run(
    conn: &Connection,
    command: WorkersCommand,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    match command {
        WorkersCommand::List => {
            let model = crate::tasks::read_model(conn).await?;
            let workers = model.workers().await?;
            write_table(out, &workers, Timestamp::now())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The admission column: `attested` only while the newest verdict verified and is unexpired.
pub fn admission(w: &WorkerView) -> &'static str {
    if w.attested { "attested" } else { "unattested" }
}

/// `2 x H100 80 GiB`, with ` [simulated]` when any GPU is simulated.
pub fn gpus(w: &WorkerView) -> String {
    let Some(first) = w.gpus.first() else {
        return "-".into();
    };
    let same = w
        .gpus
        .iter()
        .all(|g| g.name == first.name && g.memory_total_mib == first.memory_total_mib);
    let mut s = if same {
        format!(
            "{} x {} {} GiB",
            w.gpus.len(),
            first.name,
            first.memory_total_mib / 1024
        )
    } else {
        format!("{} GPUs (mixed)", w.gpus.len())
    };
    if w.simulated() {
        s.push_str(" [simulated]");
    }
    s
}

fn age(t: Option<Timestamp>, now: Timestamp) -> String {
    let Some(t) = t else {
        return "never".into();
    };
    let secs = (now.as_micros() - t.as_micros()).max(0) / 1_000_000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

pub fn write_table(
    out: &mut dyn Write,
    workers: &[WorkerView],
    now: Timestamp,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20}  {:<12}  {:<10}  {:<8}  {:>13}  {:>7}  {:>5}  {:<10}  {:<27}  GPUS",
        "WORKER",
        "STATUS",
        "ADMISSION",
        "REGION",
        "NANOTON/GPU-S",
        "RUN/MAX",
        "UTIL",
        "HEARTBEAT",
        "VALID UNTIL"
    )?;
    for w in workers {
        let util = if w.gpus.is_empty() {
            "-".to_owned()
        } else {
            let sum: u32 = w.gpus.iter().map(|g| u32::from(g.utilization_pct)).sum();
            format!("{}%", sum / w.gpus.len() as u32)
        };
        writeln!(
            out,
            "{:<20}  {:<12}  {:<10}  {:<8}  {:>13}  {:>7}  {:>5}  {:<10}  {:<27}  {}",
            w.worker_id.as_str(),
            w.status.as_str(),
            admission(w),
            w.region,
            w.price_per_gpu_second.0,
            format!("{}/{}", w.running_tasks, w.max_concurrent),
            util,
            age(w.last_heartbeat_at, now),
            w.attestation
                .as_ref()
                .and_then(|a| a.valid_until)
                .map_or_else(|| "-".to_owned(), |t| t.to_string()),
            gpus(w),
        )?;
    }
    if workers.is_empty() {
        writeln!(out, "(no workers)")?;
    }
    Ok(())
}
