//! Operator actions on projections: status, reset, replay and the verified zero-downtime rebuild.
//!
//! Long actions report [`Progress`] through a callback, so the CLI can print events/s and an ETA.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use bus::RangeReader;
use events::{Partitions, Stream, Timestamp};
use futures_util::StreamExt;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::projection::{ConsumerPlan, Projection, plan};
use crate::verify::{TableSum, differences, fingerprint};
use crate::worker::{Ctx, checkpoint_floor, replay_batch};
use crate::{ProjectorConfig, pool};

/// How far a long action is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
    pub per_second: f64,
    pub eta: Option<Duration>,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}/{} frames, {:.0}/s",
            self.phase, self.done, self.total, self.per_second
        )?;
        if let Some(eta) = self.eta {
            write!(f, ", ETA {:.0}s", eta.as_secs_f64())?;
        }
        Ok(())
    }
}

struct Meter {
    started: Instant,
    phase: &'static str,
}

impl Meter {
    fn new(phase: &'static str) -> Self {
        Self {
            started: Instant::now(),
            phase,
        }
    }

    fn at(&self, done: u64, total: u64) -> Progress {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let per_second = done as f64 / secs;
        let eta = (per_second > 0.0 && total >= done)
            .then(|| Duration::from_secs_f64((total - done) as f64 / per_second));
        Progress {
            phase: self.phase,
            done,
            total,
            per_second,
            eta,
        }
    }
}

/// One row of `projections status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    pub projection: Projection,
    pub stream: Stream,
    pub partition: u16,
    /// Every frame of the partition up to here is applied (it may be past the partition's last frame: it
    /// moves with its consumer's position).
    pub checkpoint: u64,
    /// Last sequence stored on the partition's subjects, or the checkpoint when nothing is stored after it.
    pub head: u64,
    /// Frames and events stored after the checkpoint.
    pub lag_frames: u64,
    pub lag_events: u64,
    /// Age of the oldest frame not yet projected.
    pub lag_seconds: f64,
    pub last_event_at: Option<Timestamp>,
}

/// Per projection and partition: checkpoint, stream head, lag in frames, events and seconds.
pub async fn status(
    js: &jetstream::Context,
    client: &tokio_postgres::Client,
    projections: &[Projection],
    partitions: events::Partitions,
) -> anyhow::Result<(Vec<PartitionStatus>, BTreeMap<String, i64>)> {
    let mut out = Vec::new();
    for p in plan(projections, partitions.count().into(), partitions) {
        for partition in p.partitions.clone() {
            let single = ConsumerPlan {
                partitions: vec![partition],
                ..p.clone()
            };
            let row = client
                .query_opt(
                    "SELECT last_sequence, (extract(epoch FROM last_event_at) * 1000000)::bigint
                     FROM projection_checkpoints WHERE projection = $1 AND stream = $2 AND partition = $3",
                    &[&p.projection.name(), &p.stream.name(), &i32::from(partition)],
                )
                .await?;
            let checkpoint = row
                .as_ref()
                .map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0));
            let last_event_at = row
                .and_then(|r| r.get::<_, Option<i64>>(1))
                .map(Timestamp::from_micros);
            let stream = js
                .get_stream(p.stream.name())
                .await
                .context("stream missing; run `cocoon provision`")?;
            let consumer = stream
                .create_consumer(OrderedConfig {
                    filter_subjects: single.filter_subjects(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: checkpoint + 1,
                    },
                    headers_only: true,
                    ..Default::default()
                })
                .await?;
            let lag_frames = consumer.cached_info().num_pending;
            let mut head = checkpoint;
            let mut lag_events = 0u64;
            let mut lag_seconds = 0.0;
            if lag_frames > 0 {
                // Count events from frame headers; past 10,000 frames, extrapolate from those.
                let mut messages = consumer.messages().await?;
                let mut seen = 0u64;
                while let Some(m) = messages.next().await {
                    let m = m?;
                    let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                    if seen == 0 {
                        let stored = info.published.unix_timestamp_nanos() / 1000;
                        lag_seconds =
                            (Timestamp::now().as_micros() as f64 - stored as f64).max(0.0) / 1e6;
                    }
                    seen += 1;
                    head = head.max(info.stream_sequence);
                    lag_events += m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(events::frame::HEADER_EVENT_COUNT))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    if info.pending == 0 || seen >= 10_000 {
                        if info.pending > 0 {
                            lag_events = lag_events * lag_frames / seen;
                        }
                        break;
                    }
                }
            }
            out.push(PartitionStatus {
                projection: p.projection,
                stream: p.stream,
                partition,
                checkpoint,
                head: if lag_frames > 0 { head } else { checkpoint },
                lag_frames,
                lag_events,
                lag_seconds,
                last_event_at,
            });
        }
    }
    let dead: BTreeMap<String, i64> = client
        .query("SELECT projection, count(*) FROM dead_letters WHERE replayed_at IS NULL GROUP BY projection", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok((out, dead))
}

/// Where a reset moves the checkpoints to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The next frame applied is this sequence.
    Sequence(u64),
    /// The next frame applied is the first stored at or after this time.
    Since(Timestamp),
}

/// Winds the projection's checkpoints back (never forward) so that frames from the given point are applied
/// again, and deletes its durable consumers so they restart there. Rows are kept: re-applying is idempotent.
/// A running projector starts again from there: its fetches fail once its durables are gone, and a batch or
/// a quiet-partition write that finds a checkpoint below what the projector last wrote is not committed.
pub async fn reset(
    js: &jetstream::Context,
    client: &tokio_postgres::Client,
    projection: Projection,
    to: ResetTo,
    durable_prefix: &str,
) -> anyhow::Result<Vec<(Stream, u64)>> {
    let mut out = Vec::new();
    for &stream in projection.streams() {
        let target = match to {
            ResetTo::Sequence(seq) => seq.saturating_sub(1),
            ResetTo::Since(t) => {
                let s = js.get_stream(stream.name()).await?;
                let c = s
                    .create_consumer(OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartTime {
                            start_time: time_of(t)?,
                        },
                        headers_only: true,
                        ..Default::default()
                    })
                    .await?;
                if c.cached_info().num_pending == 0 {
                    continue; // nothing stored since then
                }
                let mut messages = c.messages().await?;
                match messages.next().await {
                    Some(m) => m?
                        .info()
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .stream_sequence
                        .saturating_sub(1),
                    None => continue,
                }
            }
        };
        let target = i64::try_from(target).context("sequence too large")?;
        client
            .execute(
                "UPDATE projection_checkpoints SET last_sequence = least(last_sequence, $3), updated_at = now()
                 WHERE projection = $1 AND stream = $2",
                &[&projection.name(), &stream.name(), &target],
            )
            .await?;
        out.push((stream, u64::try_from(target).unwrap_or(0)));
    }
    delete_consumers(js, projection, durable_prefix).await?;
    Ok(out)
}

fn time_of(t: Timestamp) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.as_micros()) * 1000)
        .context("time out of range")
}

/// Deletes every durable consumer of a projection whose name starts with `prefix`.
pub async fn delete_consumers(
    js: &jetstream::Context,
    projection: Projection,
    prefix: &str,
) -> anyhow::Result<()> {
    let start = format!("{prefix}-{}-", projection.name());
    for &stream in projection.streams() {
        let s = js.get_stream(stream.name()).await?;
        let mut names = s.consumer_names();
        let mut doomed = Vec::new();
        while let Some(name) = names.next().await {
            let name = name?;
            if name.starts_with(&start) {
                doomed.push(name);
            }
        }
        for name in doomed {
            s.delete_consumer(&name).await?;
        }
    }
    Ok(())
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub frames: u64,
    pub events: u64,
    /// Dead letters whose frames now applied (after a fix), marked replayed.
    pub dead_letters_resolved: u64,
}

/// Re-applies the frames of `stream` between `from` and `to` (inclusive) to a projection, regardless of its
/// checkpoint (which does not move). A dead-lettered frame that now applies has its dead letter marked
/// replayed; one that still fails stays a dead letter.
pub async fn replay(
    config: &ProjectorConfig,
    projection: Projection,
    stream: Stream,
    from: u64,
    to: Option<u64>,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<ReplaySummary> {
    if !projection.streams().contains(&stream) {
        bail!(
            "projection {projection} does not read {stream}; it reads {:?}",
            projection.streams()
        );
    }
    let ctx = context(config, 2).await?;
    let plans: Vec<ConsumerPlan> = plan(&[projection], 1, config.partitions)
        .into_iter()
        .filter(|p| p.stream == stream)
        .collect();
    let whole = plans.first().context("no consumer plan")?.clone();
    checkpoint_floor(&ctx, &whole).await?;
    let mut reader = RangeReader::open(&ctx.js, stream, Vec::new(), from, to).await?;
    let total = reader.end().saturating_sub(from.max(1)) + 1;
    let meter = Meter::new("replay");
    let mut summary = ReplaySummary::default();
    let mut last_report = Instant::now();
    loop {
        let batch = reader.next_batch(config.batch_frames).await?;
        if batch.is_empty() {
            break;
        }
        let outcome = replay_batch(&ctx, &whole, &batch).await?;
        summary.frames += batch.len() as u64;
        summary.events += outcome.events as u64;
        summary.dead_letters_resolved += outcome.dead_letters_resolved as u64;
        let done = batch
            .last()
            .map_or(0, |f| f.stream_sequence)
            .saturating_sub(from.max(1))
            + 1;
        if last_report.elapsed() > Duration::from_secs(1) {
            progress(meter.at(done, total));
            last_report = Instant::now();
        }
    }
    progress(meter.at(total, total));
    Ok(summary)
}

async fn context(config: &ProjectorConfig, pool_size: usize) -> anyhow::Result<Ctx> {
    let bus = bus::Bus::connect(&config.bus_config("projector-ops")).await?;
    Ok(Ctx {
        pool: pool(&config.database_url, &config.schema, pool_size)?,
        js: bus.jetstream,
        codec: config.codec,
        batch_frames: config.batch_frames,
        fetch_wait: config.fetch_wait,
        gather: config.gather,
        partition_filter: config.partition_filter,
        durable_prefix: config.durable_prefix.clone(),
    })
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    pub shadow_schema: String,
    /// Where the replaced tables were kept, for rollback.
    pub retired_schema: String,
    pub tables: BTreeMap<String, TableSum>,
    pub elapsed: Duration,
    /// How long the live projector's writes waited on the rebuild: from locking the live checkpoints, through
    /// the last catch-up and the verification, to the swap's commit. Reads were served throughout.
    pub live_paused: Duration,
}

/// Why a rebuild did not swap.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(
        "the shadow build differs from the live tables; nothing was swapped (shadow kept in {schema}): {diffs:?}"
    )]
    Mismatch {
        schema: String,
        diffs: Vec<(String, Option<TableSum>, Option<TableSum>)>,
    },
    #[error(
        "the live projection did not reach the shadow's position within {0:?}; is the projector running? \
         Nothing was swapped and the shadow schema was dropped"
    )]
    LiveBehind(Duration),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Drops the indexes of `tables` in `schema` that no upsert needs (neither primary keys nor unique
/// indexes nor constraint indexes) and returns the statements that create them again.
async fn drop_secondary_indexes(
    client: &impl GenericClient,
    schema: &str,
    tables: &[&str],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let rows = client
        .query(
            "SELECT format('DROP INDEX %I.%I', n.nspname, ic.relname), pg_get_indexdef(i.indexrelid)
             FROM pg_index i
             JOIN pg_class ic ON ic.oid = i.indexrelid
             JOIN pg_class t ON t.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1 AND t.relname = ANY($2)
               AND NOT i.indisprimary AND NOT i.indisunique
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
             ORDER BY 1",
            &[&schema, &tables],
        )
        .await?;
    let mut definitions = Vec::with_capacity(rows.len());
    for row in rows {
        client.batch_execute(row.get(0)).await?;
        definitions.push(row.get(1));
    }
    Ok(definitions)
}

/// Views that read a projection's tables, moved along with them on a swap.
fn dependent_views(projection: Projection) -> &'static [&'static str] {
    match projection {
        Projection::Workers => &["worker_attestation_state"],
        Projection::Payments => &["worker_payments"],
        Projection::Tasks => &[],
    }
}

/// The counter triggers of a projection's tables, re-created on a swap so that they call the live schema's
/// functions (a trigger keeps the function it was created with, which for moved tables is the shadow's).
fn retrigger_sql(projection: Projection, schema: &str) -> String {
    let triggers: &[(&str, &str, &str, &str)] = match projection {
        Projection::Tasks => &[
            (
                "tasks",
                "tasks_count_insert",
                "INSERT",
                "NEW TABLE AS new_rows",
            ),
            (
                "tasks",
                "tasks_count_update",
                "UPDATE",
                "OLD TABLE AS old_rows NEW TABLE AS new_rows",
            ),
        ],
        Projection::Workers => &[
            (
                "workers",
                "workers_count_insert",
                "INSERT",
                "NEW TABLE AS new_rows",
            ),
            (
                "workers",
                "workers_count_update",
                "UPDATE",
                "OLD TABLE AS old_rows NEW TABLE AS new_rows",
            ),
        ],
        Projection::Payments => &[
            (
                "payment_accruals",
                "accruals_sum_insert",
                "INSERT",
                "NEW TABLE AS new_rows",
            ),
            (
                "settlement_payouts",
                "payouts_sum_update",
                "UPDATE",
                "OLD TABLE AS old_rows NEW TABLE AS new_rows",
            ),
        ],
    };
    triggers
        .iter()
        .map(|(table, name, event, tables)| {
            format!(
                "DROP TRIGGER {name} ON {schema}.{table};\n\
                 CREATE TRIGGER {name} AFTER {event} ON {schema}.{table} REFERENCING {tables} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{name}();\n"
            )
        })
        .collect()
}

/// Counters derived from a projection's tables, recomputed from the new tables on a swap.
fn recount_sql(projection: Projection) -> &'static str {
    match projection {
        Projection::Tasks => {
            "DELETE FROM task_status_counts;
             INSERT INTO task_status_counts (status, shard, count)
             SELECT s, 0, (SELECT count(*) FROM tasks WHERE status = s)
             FROM unnest(ARRAY['submitted','allocated','running','completed','failed','cancelled','requeued',
                               'expired','rejected']) s;"
        }
        Projection::Workers => {
            "DELETE FROM dashboard_counters WHERE counter = 'active_workers';
             INSERT INTO dashboard_counters (counter, shard, value)
             SELECT 'active_workers', 0, count(*) FROM workers WHERE status = 'active';"
        }
        Projection::Payments => {
            "DELETE FROM dashboard_counters WHERE counter IN ('nanoton_accrued', 'nanoton_settled');
             INSERT INTO dashboard_counters (counter, shard, value)
             SELECT 'nanoton_accrued', 0, coalesce(sum(amount_nanoton), 0)::bigint FROM payment_accruals;
             INSERT INTO dashboard_counters (counter, shard, value)
             SELECT 'nanoton_settled', 0, coalesce(sum(amount_nanoton), 0)::bigint FROM settlement_payouts
             WHERE status = 'paid';"
        }
    }
}

/// Rebuilds a projection from the log into a shadow schema, catches up with the live projection, verifies
/// row counts and checksums table by table, and swaps the tables in one transaction. The old tables are kept
/// in a retired schema. The live projector pauses only for the final catch-up (the frames it applied since the
/// unlocked one), verification and swap (its batches wait on the checkpoint lock); readers are never blocked longer than the swap's renames.
///
/// A rebuild that fails before the swap leaves nothing behind: its shadow schema is dropped and its durable
/// consumers deleted, except after a failed verification, which keeps the shadow schema for inspection.
pub async fn rebuild(
    config: &ProjectorConfig,
    projection: Projection,
    progress: &mut dyn FnMut(Progress),
) -> Result<RebuildReport, RebuildError> {
    let names = RebuildNames::new(projection, Timestamp::now().as_micros());
    let result = build_verify_swap(config, projection, &names, progress).await;
    if let Err(e) = &result {
        discard_shadow(config, projection, &names, e).await;
    }
    result
}

/// What one rebuild creates, named after its start: the shadow schema, the retired schema the live tables
/// move to, and the prefix of its durable consumers.
#[derive(Clone)]
struct RebuildNames {
    shadow: String,
    retired: String,
    prefix: String,
}

impl RebuildNames {
    fn new(projection: Projection, stamp: i64) -> Self {
        Self {
            shadow: format!("shadow_{}_{stamp}", projection.name()),
            retired: format!("retired_{}_{stamp}", projection.name()),
            prefix: format!("rebuild{stamp}"),
        }
    }
}

/// Removes what a failed rebuild made: its durable consumers, and its shadow schema unless the failure is a
/// mismatch (the shadow shows what differs) or the swap committed after all (its retired schema exists: a
/// commit whose answer was lost). Failures to clean up are logged: the rebuild's own error is what the
/// operator needs.
async fn discard_shadow(
    config: &ProjectorConfig,
    projection: Projection,
    names: &RebuildNames,
    failure: &RebuildError,
) {
    let RebuildNames {
        shadow,
        retired,
        prefix,
    } = names;
    match bus::Bus::connect(&config.bus_config("projector-rebuild")).await {
        Ok(bus) => {
            if let Err(e) = delete_consumers(&bus.jetstream, projection, prefix).await {
                tracing::warn!(%prefix, error = %e, "the failed rebuild's consumers were not deleted");
            }
        }
        Err(e) => {
            tracing::warn!(%prefix, error = %e, "the failed rebuild's consumers were not deleted")
        }
    }
    if matches!(failure, RebuildError::Mismatch { .. }) {
        return;
    }
    let dropped = async {
        let pool = pool(&config.database_url, &config.schema, 1)?;
        let client = pool.get().await?;
        let swapped: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[retired],
            )
            .await?
            .get(0);
        if swapped {
            tracing::warn!(%retired, "the rebuild's swap committed although its answer was lost: the rebuilt tables are live");
            return anyhow::Ok(());
        }
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
            .await?;
        tracing::info!(%shadow, "the failed rebuild's shadow schema was dropped");
        anyhow::Ok(())
    };
    if let Err(e) = dropped.await {
        tracing::warn!(%shadow, error = %e, "the failed rebuild's shadow schema was not dropped");
    }
}

async fn build_verify_swap(
    config: &ProjectorConfig,
    projection: Projection,
    names: &RebuildNames,
    progress: &mut dyn FnMut(Progress),
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let RebuildNames {
        shadow,
        retired,
        prefix,
    } = names.clone();
    let live_schema = config.schema.clone();

    // 1 and 2: build from the log into the shadow schema, until it has read everything stored.
    let mut shadow_config = config.clone();
    shadow_config.schema = shadow.clone();
    shadow_config.projections = vec![projection];
    shadow_config.durable_prefix = prefix.clone();
    // Migrated here, so that the secondary indexes can be dropped before the build: each is created again
    // in one sorted pass once the log is read, instead of being maintained row by row.
    shadow_config.migrate = false;
    // Read before the shadow schema exists, so that a NATS failure leaves nothing behind.
    let heads = stream_heads(config, projection).await?;
    let shadow_pool = pool(&config.database_url, &shadow, 4)?;
    let deferred = {
        let mut client = shadow_pool.get().await.map_err(anyhow::Error::from)?;
        crate::migrate_schema(&mut client, &shadow).await?;
        drop_secondary_indexes(&**client, &shadow, projection.tables())
            .await
            .map_err(anyhow::Error::from)?
    };
    let total: u64 = heads.values().sum();
    let run = tokio::spawn(crate::run(
        shadow_config.clone(),
        CancellationToken::new(),
        true,
    ));
    let meter = Meter::new("rebuild");
    let live_pool = pool(&config.database_url, &live_schema, 4)?;
    while !run.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(client) = shadow_pool.get().await
            && let Ok(done) = checkpoint_total(&client, projection).await
        {
            progress(meter.at(done, total));
        }
    }
    run.await.map_err(anyhow::Error::from)??;
    {
        let client = shadow_pool.get().await.map_err(anyhow::Error::from)?;
        for definition in &deferred {
            client
                .batch_execute(definition)
                .await
                .map_err(anyhow::Error::from)?;
        }
    }

    // 3: bring the shadow exactly to the live checkpoints, locked (pausing the live projector) for the last
    // stretch and the verification.
    let shadow_ctx = Ctx {
        pool: shadow_pool.clone(),
        js: bus::Bus::connect(&config.bus_config("projector-rebuild"))
            .await
            .map_err(anyhow::Error::from)?
            .jetstream,
        codec: config.codec,
        batch_frames: config.batch_frames,
        fetch_wait: config.fetch_wait,
        gather: config.gather,
        partition_filter: config.partition_filter,
        durable_prefix: prefix.clone(),
    };
    let deadline = Instant::now() + config.rebuild_wait_for_live;
    let mut live = live_pool.get().await.map_err(anyhow::Error::from)?;
    loop {
        // First without locks, so that the live projector is paused only for the last few frames: wait until
        // it has applied what the shadow has, then bring the shadow up to where it is.
        let live_cp = checkpoints(&**live, projection, false).await?;
        if !catch_up_shadow(&shadow_ctx, config.partitions, projection, &live_cp).await? {
            if Instant::now() > deadline {
                return Err(RebuildError::LiveBehind(config.rebuild_wait_for_live));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Then with the live checkpoints locked (the live projector waits; reads go on): the same, for the
        // frames applied meanwhile, and the verification of exactly that state.
        let tx = live.transaction().await.map_err(anyhow::Error::from)?;
        let paused = Instant::now();
        let live_cp = checkpoints(&*tx, projection, true).await?;
        if !catch_up_shadow(&shadow_ctx, config.partitions, projection, &live_cp).await? {
            // Only a reset of the live projection moves its checkpoints back: wait for it as above.
            tx.rollback().await.map_err(anyhow::Error::from)?;
            continue;
        }
        let live_sums = fingerprint(&*tx, &live_schema, projection.tables())
            .await
            .map_err(anyhow::Error::from)?;
        let shadow_sums = fingerprint(&*tx, &shadow, projection.tables())
            .await
            .map_err(anyhow::Error::from)?;
        let diffs = differences(&live_sums, &shadow_sums);
        if !diffs.is_empty() {
            tx.rollback().await.map_err(anyhow::Error::from)?;
            delete_consumers(&shadow_ctx.js, projection, &prefix).await?;
            return Err(RebuildError::Mismatch {
                schema: shadow,
                diffs,
            });
        }

        // 4: swap atomically; the old tables stay in the retired schema.
        let mut sql = format!("CREATE SCHEMA {retired};\n");
        for t in projection.tables() {
            sql += &format!(
                "ALTER TABLE {live_schema}.{t} SET SCHEMA {retired};\nALTER TABLE {shadow}.{t} SET SCHEMA {live_schema};\n"
            );
        }
        for v in dependent_views(projection) {
            sql += &format!(
                "ALTER VIEW {live_schema}.{v} SET SCHEMA {retired};\nALTER VIEW {shadow}.{v} SET SCHEMA {live_schema};\n"
            );
        }
        sql += &retrigger_sql(projection, &live_schema);
        sql += &format!(
            "SET LOCAL search_path TO {live_schema};\n{}",
            recount_sql(projection)
        );
        tx.batch_execute(&sql).await.map_err(anyhow::Error::from)?;
        tx.commit().await.map_err(anyhow::Error::from)?;
        let live_paused = paused.elapsed();
        // Swapped: from here on nothing may fail the rebuild (and so discard its schema).
        if let Err(e) = delete_consumers(&shadow_ctx.js, projection, &prefix).await {
            tracing::warn!(%prefix, error = %e, "the rebuild's consumers were not deleted");
        }
        progress(meter.at(total, total));
        return Ok(RebuildReport {
            shadow_schema: shadow,
            retired_schema: retired,
            tables: shadow_sums,
            elapsed: started.elapsed(),
            live_paused,
        });
    }
}

/// Brings the shadow exactly up to the live checkpoints `live_cp`: applies, partition by partition, the frames
/// the live projection has applied and the shadow has not. `false`, with nothing applied, while the shadow
/// holds frames the live projection has not applied yet.
async fn catch_up_shadow(
    shadow: &Ctx,
    partitions: Partitions,
    projection: Projection,
    live_cp: &BTreeMap<(Stream, u16), u64>,
) -> Result<bool, RebuildError> {
    let shadow_cp = {
        let client = shadow.pool.get().await.map_err(anyhow::Error::from)?;
        checkpoints(&**client, projection, false).await?
    };
    if shadow_ahead(&shadow.js, partitions, projection, &shadow_cp, live_cp)
        .await
        .map_err(anyhow::Error::from)?
    {
        return Ok(false);
    }
    for p in plan(&[projection], 1, partitions) {
        let behind: Vec<(u64, u64)> = p
            .partitions
            .iter()
            .map(|&part| {
                let key = (p.stream, part);
                (
                    shadow_cp.get(&key).copied().unwrap_or(0),
                    live_cp.get(&key).copied().unwrap_or(0),
                )
            })
            .filter(|(s, l)| s < l)
            .collect();
        if behind.is_empty() {
            continue;
        }
        let from = behind.iter().map(|b| b.0).min().unwrap_or(0) + 1;
        let to = behind.iter().map(|b| b.1).max().unwrap_or(0);
        let mut reader =
            RangeReader::open(&shadow.js, p.stream, p.filter_subjects(), from, Some(to))
                .await
                .map_err(anyhow::Error::from)?;
        loop {
            let batch = reader
                .next_batch(shadow.batch_frames)
                .await
                .map_err(anyhow::Error::from)?;
            if batch.is_empty() {
                break;
            }
            // Only frames the live projection has applied, partition by partition.
            let wanted: Vec<_> = batch
                .into_iter()
                .filter(|f| {
                    f.stream_sequence
                        <= live_cp
                            .get(&(p.stream, p.partition_of(&f.subject)))
                            .copied()
                            .unwrap_or(0)
                })
                .collect();
            if !wanted.is_empty() {
                crate::worker::apply_batch(shadow, &p, &wanted)
                    .await
                    .map_err(anyhow::Error::from)?;
            }
        }
    }
    // Every frame of each partition up to its live checkpoint is applied now, though a partition's shadow
    // checkpoint only moved to its own last frame: move it to the live one, so that the next catch-up (the
    // locked one) reads from there and not the whole stretch again.
    let (mut streams, mut parts, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    for (&(stream, part), &seq) in live_cp {
        if shadow_cp.get(&(stream, part)).copied().unwrap_or(0) < seq {
            streams.push(stream.name());
            parts.push(i32::from(part));
            seqs.push(i64::try_from(seq).unwrap_or(i64::MAX));
        }
    }
    if !streams.is_empty() {
        let client = shadow.pool.get().await.map_err(anyhow::Error::from)?;
        client
            .execute(
                "UPDATE projection_checkpoints c SET last_sequence = v.seq, updated_at = now()
                 FROM unnest($2::text[], $3::int[], $4::bigint[]) AS v(stream, partition, seq)
                 WHERE c.projection = $1 AND c.stream = v.stream AND c.partition = v.partition
                   AND c.last_sequence < v.seq",
                &[&projection.name(), &streams, &parts, &seqs],
            )
            .await
            .map_err(anyhow::Error::from)?;
    }
    Ok(true)
}

/// Whether the shadow holds frames the live projection has not applied: a partition whose shadow checkpoint
/// is past the live one with frames of it in between. A checkpoint moves to the end of each batch its plan
/// applied, frames of the partition or not, so a shadow checkpoint past the live one with nothing of the
/// partition in between (the live projector had not yet written its quiet partitions' position) is not ahead.
async fn shadow_ahead(
    js: &jetstream::Context,
    partitions: Partitions,
    projection: Projection,
    shadow_cp: &BTreeMap<(Stream, u16), u64>,
    live_cp: &BTreeMap<(Stream, u16), u64>,
) -> Result<bool, bus::ConsumeError> {
    for p in plan(&[projection], 1, partitions) {
        for &part in &p.partitions {
            let key = (p.stream, part);
            let shadow = shadow_cp.get(&key).copied().unwrap_or(0);
            let live = live_cp.get(&key).copied().unwrap_or(0);
            if shadow <= live {
                continue;
            }
            let single = ConsumerPlan {
                partitions: vec![part],
                ..p.clone()
            };
            let mut between = RangeReader::open(
                js,
                p.stream,
                single.filter_subjects(),
                live + 1,
                Some(shadow),
            )
            .await?;
            if !between.next_batch(1).await?.is_empty() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

async fn checkpoints(
    client: &impl tokio_postgres::GenericClient,
    projection: Projection,
    lock: bool,
) -> anyhow::Result<BTreeMap<(Stream, u16), u64>> {
    let sql = format!(
        "SELECT stream, partition, last_sequence FROM projection_checkpoints WHERE projection = $1 ORDER BY stream, partition{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let rows = client.query(&sql, &[&projection.name()]).await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let stream = Stream::parse(r.get::<_, &str>(0))?;
            Some((
                (stream, u16::try_from(r.get::<_, i32>(1)).ok()?),
                u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
            ))
        })
        .collect())
}

async fn checkpoint_total(
    client: &tokio_postgres::Client,
    projection: Projection,
) -> anyhow::Result<u64> {
    // Progress in frames: per stream, the furthest partition checkpoint approximates frames read.
    let row = client
        .query_one(
            "SELECT coalesce(sum(m), 0)::bigint FROM (
                SELECT max(last_sequence) AS m FROM projection_checkpoints WHERE projection = $1 GROUP BY stream) s",
            &[&projection.name()],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

async fn stream_heads(
    config: &ProjectorConfig,
    projection: Projection,
) -> anyhow::Result<BTreeMap<Stream, u64>> {
    let bus = bus::Bus::connect(&config.bus_config("projector-ops")).await?;
    let mut out = BTreeMap::new();
    for &stream in projection.streams() {
        let mut s = bus.jetstream.get_stream(stream.name()).await?;
        out.insert(stream, s.info().await?.state.last_sequence);
    }
    Ok(out)
}
