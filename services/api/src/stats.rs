//! `GET /api/v1/stats`: the dashboard's figures in one answer.
//!
//! Everything comes from cheap reads: task counts from the sharded counters (`task_status_totals`), the queue
//! by band from the partial queue index, workers and GPUs from `workers`/`worker_gpus`, money from the
//! accrual counter (`dashboard_stats`), paid payouts and open settlements (`worker_payments` would be exact too,
//! but it joins every accrual: seconds at scale), and the projections' lag from their checkpoints against the
//! stream heads in JetStream. Throughput is the change of the completed and total task counts over the last
//! minute, from samples the API takes every second while it runs (the `tasks` table has no index on
//! completion time, and a count over it would scan it).
//!
//! The answer is computed at most once per `stats_ttl` (its `max-age`): concurrent requests share it.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::RawMessageErrorKind;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use events::subjects::Addressing;
use events::{Stream, Timestamp};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::AppState;
use crate::cache::SHORT;
use crate::consistency::{self, Projection, Scope, checkpoint_subjects};
use crate::error::ApiError;
use crate::params::{Consistency, Params};

/// Task statuses, as `tasks.status` spells them.
const STATUSES: [&str; 9] = [
    "submitted",
    "allocated",
    "running",
    "completed",
    "failed",
    "expired",
    "rejected",
    "cancelled",
    "requeued",
];
const SETTLEMENT_STATUSES: [&str; 5] = ["prepared", "submitted", "confirmed", "expired", "failed"];

/// The window throughput is measured over.
const WINDOW: Duration = Duration::from_secs(60);
/// How often [`sample_throughput`] samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The last stats answer and the task-count samples.
#[derive(Debug, Default)]
pub struct StatsCache {
    answer: Mutex<Option<(Instant, Value)>>,
    samples: std::sync::Mutex<VecDeque<Sample>>,
}

/// Task counts at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at: Instant,
    completed: i64,
    total: i64,
}

/// Throughput over the window: what changed since the oldest sample inside it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Throughput {
    completed_last_minute: i64,
    completed_per_second: f64,
    submitted_last_minute: i64,
}

impl StatsCache {
    /// Records `now` and answers the throughput since the oldest sample at most a minute old.
    fn observe(&self, now: Sample) -> Throughput {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|s| now.at.duration_since(s.at) > WINDOW)
        {
            samples.pop_front();
        }
        let throughput = match samples.front() {
            Some(first) => {
                let completed = (now.completed - first.completed).max(0);
                let secs = now.at.duration_since(first.at).as_secs_f64();
                Throughput {
                    completed_last_minute: completed,
                    // Over at least a second, so a first instant's burst is not read as a huge rate.
                    completed_per_second: completed as f64 / secs.max(1.0),
                    submitted_last_minute: (now.total - first.total).max(0),
                }
            }
            None => Throughput {
                completed_last_minute: 0,
                completed_per_second: 0.0,
                submitted_last_minute: 0,
            },
        };
        if samples
            .back()
            .is_none_or(|last| now.at.duration_since(last.at) >= SAMPLE_EVERY / 2)
        {
            samples.push_back(now);
        }
        throughput
    }
}

/// Samples the task counts every second while the server runs, so the throughput window is full when asked.
pub async fn sample_throughput(state: AppState) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Ok(counts) = task_counts(&state).await {
            state.stats_cache().observe(sample_of(&counts));
        }
    }
}

fn sample_of(counts: &BTreeMap<String, i64>) -> Sample {
    Sample {
        at: Instant::now(),
        completed: counts.get("completed").copied().unwrap_or(0),
        total: counts.values().sum(),
    }
}

async fn task_counts(state: &AppState) -> Result<BTreeMap<String, i64>, ApiError> {
    let client = state.pg().await?;
    let mut counts: BTreeMap<String, i64> = STATUSES.iter().map(|s| ((*s).to_owned(), 0)).collect();
    for r in client
        .query("SELECT status, count FROM task_status_totals", &[])
        .await?
    {
        counts.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(counts)
}

/// `GET /api/v1/stats`.
pub async fn get_stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = query.map_err(|e| {
        ApiError::invalid_query("query", format!("the query string does not parse: {e}"))
    })?;
    let mut params = Params::new(pairs);
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    params.finish()?;
    // With a token: any answer whose snapshot began after the wait ended reflects the position.
    let mut reached: Option<Instant> = None;
    if let Some(token) = consistency.token {
        let projection = Projection::of(token.stream).ok_or_else(|| {
            ApiError::invalid_query("consistent_with", "the stream is not projected")
        })?;
        consistency::wait_for(&state, token, projection, Scope::All, consistency.wait).await?;
        reached = Some(Instant::now());
    }
    let ttl = state.config().stats_ttl;
    let mut cached = state.stats_cache().answer.lock().await;
    if let Some((started, answer)) = cached.as_ref() {
        let usable = match reached {
            Some(reached) => *started >= reached,
            None => started.elapsed() < ttl,
        };
        if usable {
            return Ok(crate::json_response(StatusCode::OK, Some(SHORT), answer));
        }
    }
    let started = Instant::now();
    let answer = compute(&state).await?;
    *cached = Some((started, answer.clone()));
    drop(cached);
    Ok(crate::json_response(StatusCode::OK, Some(SHORT), &answer))
}

async fn compute(state: &AppState) -> Result<Value, ApiError> {
    // One snapshot for every figure, so they agree with each other (a settlement counted as confirmed has its
    // payouts counted as paid).
    let mut conn = state.pg().await?;
    let client = conn
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut counts: BTreeMap<String, i64> = STATUSES.iter().map(|s| ((*s).to_owned(), 0)).collect();
    for r in client
        .query("SELECT status, count FROM task_status_totals", &[])
        .await?
    {
        counts.insert(r.try_get(0)?, r.try_get(1)?);
    }
    let throughput = state.stats_cache().observe(sample_of(&counts));

    let queue = client
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE priority >= 7),
                    count(*) FILTER (WHERE priority BETWEEN 4 AND 6),
                    count(*) FILTER (WHERE priority <= 3)
             FROM tasks WHERE status IN ('submitted', 'requeued')",
            &[],
        )
        .await?;
    let workers = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'active'),
                    count(*) FILTER (WHERE status = 'draining'),
                    coalesce(sum(running_tasks) FILTER (WHERE status IN ('active', 'draining')), 0)::bigint,
                    (SELECT count(*) FROM worker_gpus g JOIN workers l USING (worker_id)
                     WHERE l.status IN ('active', 'draining'))
             FROM workers",
            &[],
        )
        .await?;
    let dead_letters: i64 = client
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    let money = client
        .query_one(
            "SELECT (SELECT nanoton_accrued FROM dashboard_stats),
                    (SELECT coalesce(sum(amount_nanoton), 0)::bigint FROM settlement_payouts WHERE status = 'paid'),
                    (SELECT coalesce(sum(total_nanoton), 0)::bigint FROM settlements
                     WHERE status IN ('prepared', 'submitted'))",
            &[],
        )
        .await?;
    let mut settlements: BTreeMap<String, i64> = SETTLEMENT_STATUSES
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    for r in client
        .query(
            "SELECT status, count(*) FROM settlements GROUP BY status",
            &[],
        )
        .await?
    {
        settlements.insert(r.try_get(0)?, r.try_get(1)?);
    }
    let mut checkpoints = BTreeMap::new();
    for r in client
        .query(
            "SELECT projection, stream, partition, last_sequence FROM projection_checkpoints",
            &[],
        )
        .await?
    {
        let key: (String, String, i32) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        checkpoints.insert(key, u64::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0));
    }
    client.commit().await?;
    drop(conn);
    let projections = projections(state, &checkpoints).await?;

    let accrued: i64 = money.try_get(0)?;
    let paid: i64 = money.try_get(1)?;
    let in_flight: i64 = money.try_get(2)?;
    let total: i64 = counts.values().sum();
    Ok(json!({
        "generated_at": Timestamp::now().to_string(),
        "tasks": {"total": total, "by_status": counts},
        "queue": {
            "waiting": queue.try_get::<_, i64>(0)?,
            "by_band": {
                "high": queue.try_get::<_, i64>(1)?,
                "medium": queue.try_get::<_, i64>(2)?,
                "low": queue.try_get::<_, i64>(3)?,
            },
        },
        "throughput": {
            "completed_last_minute": throughput.completed_last_minute,
            "completed_per_second": throughput.completed_per_second,
            "submitted_last_minute": throughput.submitted_last_minute,
        },
        "workers": {
            "active": workers.try_get::<_, i64>(0)?,
            "draining": workers.try_get::<_, i64>(1)?,
            "gpus": workers.try_get::<_, i64>(3)?,
            "running_tasks": workers.try_get::<_, i64>(2)?,
        },
        "projections": projections,
        "dead_letters": dead_letters,
        "payments": {
            "accrued_nanoton": accrued,
            "pending_nanoton": (accrued - paid - in_flight).max(0),
            "in_flight_nanoton": in_flight,
            "paid_nanoton": paid,
            "settlements": settlements,
        },
    }))
}

/// One row per (projection, stream, partition): checkpoint, the partition's last stored sequence, and the
/// frames stored after the checkpoint.
async fn projections(
    state: &AppState,
    checkpoints: &BTreeMap<(String, String, i32), u64>,
) -> Result<Vec<Value>, ApiError> {
    let js = &state.bus().jetstream;
    let unavailable =
        |e: &dyn std::fmt::Display| ApiError::Unavailable(format!("NATS is unavailable: {e}"));
    let mut rows = Vec::new();
    for projection in Projection::ALL {
        for &stream in projection.streams() {
            let handle = match js.get_stream(stream.name()).await {
                Ok(handle) => handle,
                Err(e) => return Err(unavailable(&e)),
            };
            let info = handle.cached_info().state.clone();
            let parts = checkpoint_subjects(stream, state.config().partitions);
            let lags = join_all(parts.iter().map(|(partition, subject)| {
                let checkpoint = checkpoints
                    .get(&(
                        projection.name().to_owned(),
                        stream.name().to_owned(),
                        i32::from(*partition),
                    ))
                    .copied()
                    .unwrap_or(0);
                let handle = &handle;
                let info = &info;
                async move {
                    let lag = partition_lag(handle, info, stream, subject, checkpoint).await?;
                    Ok::<_, ApiError>(json!({
                        "projection": projection.name(),
                        "stream": stream.name(),
                        "partition": partition,
                        "checkpoint": checkpoint,
                        "head": lag.0,
                        "lag_frames": lag.1,
                    }))
                }
            }))
            .await;
            for lag in lags {
                rows.push(lag?);
            }
        }
    }
    Ok(rows)
}

/// The head of a partition (its last stored sequence, or the checkpoint when nothing is stored) and how many
/// frames are stored after the checkpoint.
async fn partition_lag(
    handle: &async_nats::jetstream::stream::Stream,
    info: &async_nats::jetstream::stream::State,
    stream: Stream,
    subject: &str,
    checkpoint: u64,
) -> Result<(u64, u64), ApiError> {
    let unavailable = |e: String| ApiError::Unavailable(format!("NATS is unavailable: {e}"));
    if stream.addressing() != Addressing::Partitioned {
        // Read whole: every message of the stream is the partition's.
        let head = info.last_sequence.max(checkpoint);
        let after = head.saturating_sub(checkpoint.max(info.first_sequence.saturating_sub(1)));
        return Ok((head, after.min(info.messages)));
    }
    let head = match handle.get_last_raw_message_by_subject(subject).await {
        Ok(m) => m.sequence,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => 0,
        Err(e) => return Err(unavailable(e.to_string())),
    };
    if head <= checkpoint {
        return Ok((head.max(checkpoint), 0));
    }
    // Count what is stored after the checkpoint: a short-lived consumer's pending count, then delete it.
    let consumer = handle
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: checkpoint + 1,
            },
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(5),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let info = consumer.cached_info();
    let pending = info.num_pending;
    let name = info.name.clone();
    if let Err(e) = handle.delete_consumer(&name).await {
        tracing::debug!(error = %e, "a lag-counting consumer was left to expire");
    }
    Ok((head, pending))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_the_change_over_the_window() {
        let cache = StatsCache::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let first = cache.observe(Sample {
            at: at(0),
            completed: 10,
            total: 100,
        });
        assert_eq!(first.completed_last_minute, 0);
        let t = cache.observe(Sample {
            at: at(10),
            completed: 30,
            total: 150,
        });
        assert_eq!(t.completed_last_minute, 20);
        assert_eq!(t.submitted_last_minute, 50);
        assert!((t.completed_per_second - 2.0).abs() < 1e-9);
        // Past the window the oldest samples drop out.
        let t = cache.observe(Sample {
            at: at(65),
            completed: 40,
            total: 150,
        });
        assert_eq!(t.completed_last_minute, 10);
        assert!((t.completed_per_second - 10.0 / 55.0).abs() < 1e-9);
    }
}
