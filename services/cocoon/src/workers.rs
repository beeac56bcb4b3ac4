//! `workers list`: the workers of the read model as a table. Simulated GPUs are marked in the row, and the
//! ADMISSION column says whether the worker's newest attestation verdict verified and is still valid. While the
//! active allocator's published policy admits unattested workers, a banner line above the table says so.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use allocator::lease::PolicyValue;
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
            let policy = pool_policy(conn).await;
            write_listing(out, policy.as_ref(), &workers, Timestamp::now())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The pool policy the allocator published, and whether that allocator still holds the lease (`None`: unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPolicy {
    pub value: PolicyValue,
    pub active: Option<bool>,
}

/// The pool policy the active allocator published, or `None` when none is published or it cannot be read
/// (then a warning on stderr: the listing itself only needs the read model).
pub async fn pool_policy(conn: &Connection) -> Option<PoolPolicy> {
    let read = async {
        let bus = crate::connect(conn).await?;
        anyhow::Ok(read_pool_policy(&bus.jetstream).await?)
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(policy)) => policy,
        Ok(Err(e)) => {
            eprintln!("warning: cannot read the pool policy: {e:#}");
            None
        }
        Err(_) => {
            eprintln!("warning: cannot read the pool policy: NATS did not answer within 5 s");
            None
        }
    }
}

/// Reads the policy (`allocator::lease::read_policy`) and whether its allocator's lease is still unexpired.
pub async fn read_pool_policy(
    js: &async_nats::jetstream::Context,
) -> Result<Option<PoolPolicy>, allocator::lease::LeaseError> {
    let Some(value) = allocator::lease::read_policy(js).await? else {
        return Ok(None);
    };
    let active = match js.get_key_value(allocator::lease::BUCKET).await {
        Ok(store) => allocator::lease::read_lease(&store)
            .await
            .ok()
            .map(|lease| lease.is_some_and(|l| holds(&value, &l, unix_ms()))),
        Err(_) => None,
    };
    Ok(Some(PoolPolicy { value, active }))
}

/// Whether `lease` is the policy's allocator's and unexpired at `now_ms`.
fn holds(policy: &PolicyValue, lease: &allocator::lease::LeaseValue, now_ms: u64) -> bool {
    lease.holder == policy.holder && lease.epoch == policy.epoch && lease.expires_at_ms > now_ms
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The line shown above a worker listing while the allocator admits unattested workers; nothing otherwise.
pub fn policy_banner(policy: Option<&PoolPolicy>) -> Option<String> {
    let p = policy.filter(|p| p.value.allow_unattested)?;
    let stopped = if p.active == Some(false) {
        "; it no longer holds the lease"
    } else {
        ""
    };
    Some(format!(
        "!! pool policy: UNATTESTED workers are admitted (development only; allocator {}, epoch {}{stopped})",
        p.value.holder, p.value.epoch
    ))
}

/// The banner (when the policy calls for one), then the table.
pub fn write_listing(
    out: &mut dyn Write,
    policy: Option<&PoolPolicy>,
    workers: &[WorkerView],
    now: Timestamp,
) -> std::io::Result<()> {
    if let Some(banner) = policy_banner(policy) {
        writeln!(out, "{banner}")?;
    }
    write_table(out, workers, now)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_unattested: bool, active: Option<bool>) -> PoolPolicy {
        PoolPolicy {
            value: PolicyValue {
                holder: "allocator-1".into(),
                epoch: 4,
                allow_unattested,
                max_attempts: 3,
                heartbeat_timeout_ms: 10_000,
            },
            active,
        }
    }

    #[test]
    fn the_banner_shows_only_while_unattested_workers_are_admitted() {
        assert_eq!(policy_banner(None), None);
        assert_eq!(policy_banner(Some(&policy(false, Some(true)))), None);
        let banner = policy_banner(Some(&policy(true, Some(true)))).unwrap();
        assert!(banner.contains("UNATTESTED"), "{banner}");
        assert!(banner.contains("development only"), "{banner}");
        assert!(
            banner.ends_with("allocator allocator-1, epoch 4)"),
            "{banner}"
        );
        let stopped = policy_banner(Some(&policy(true, Some(false)))).unwrap();
        assert!(stopped.contains("no longer holds the lease"), "{stopped}");
        assert_eq!(policy_banner(Some(&policy(true, None))).unwrap(), banner);

        let mut out = Vec::new();
        write_listing(
            &mut out,
            Some(&policy(true, Some(true))),
            &[],
            Timestamp::now(),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], banner);
        assert!(lines[1].contains("ADMISSION"), "{text}");
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;
    use allocator::lease::LeaseValue;

    #[test]
    fn only_the_policy_holders_unexpired_lease_counts() {
        let policy = PolicyValue {
            holder: "a".into(),
            epoch: 2,
            allow_unattested: true,
            max_attempts: 3,
            heartbeat_timeout_ms: 10_000,
        };
        let lease = |holder: &str, epoch, expires_at_ms| LeaseValue {
            holder: holder.into(),
            epoch,
            expires_at_ms,
        };
        assert!(holds(&policy, &lease("a", 2, 1_001), 1_000));
        assert!(!holds(&policy, &lease("a", 2, 1_000), 1_000));
        assert!(!holds(&policy, &lease("b", 2, 5_000), 1_000));
        assert!(!holds(&policy, &lease("a", 3, 5_000), 1_000));
    }
}
