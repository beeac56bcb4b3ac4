//! One consumer task per group of plans ([`consumer_groups`]): fetch frames; each plan applies its own in
//! one transaction with its checkpoints, all plans at once; once every plan has committed, ack.
//!
//! Errors are classified once, here: a frame that cannot be decoded or applied is permanent (dead-lettered,
//! the projection goes on); a database or NATS failure is transient (the same batch is retried with
//! backoff, nothing is skipped or acked).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use bus::{ConsumerSpec, FrameConsumer, ReceivedFrame};
use events::{CodecConfig, Timestamp};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::fold::{Changes, Positioned};
use crate::metrics as m;
use crate::projection::ConsumerPlan;
use crate::store::write_changes;

/// What one consumer needs.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub pool: deadpool_postgres::Pool,
    pub js: jetstream::Context,
    pub codec: CodecConfig,
    pub batch_frames: usize,
    pub fetch_wait: Duration,
    /// How long a batch that is not full waits for more frames.
    pub gather: Duration,
    pub partition_filter: crate::PartitionFilter,
    pub durable_prefix: String,
}

/// Why a batch did not commit; always retried.
#[derive(Debug, thiserror::Error)]
pub enum Transient {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("dead-letter publish: {0}")]
    DeadLetter(String),
    /// A checkpoint is below what this process last read or wrote for it: an operator wound it back.
    #[error(
        "checkpoint of partition {partition} moved back to {at}, below {known}: wound back by an operator"
    )]
    Rewound { partition: u16, at: u64, known: u64 },
}

/// What a committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub frames: usize,
    /// Frames at or below their partition's checkpoint: applied before.
    pub skipped: usize,
    pub dead_lettered: usize,
    pub events: usize,
    /// Dead letters of frames that a replay has now applied, marked replayed.
    pub dead_letters_resolved: usize,
}

struct DeadLetter<'a> {
    frame: &'a ReceivedFrame,
    kind: &'static str,
    reason: String,
}

/// A data or integrity error: the rows are wrong, not the connection, so retrying the same batch cannot help.
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("22") || code.starts_with("23")
    })
}

/// Splits a process's plans into the groups that share one durable consumer. With
/// [`crate::PartitionFilter::Client`], the plans of one (projection, stream) share a consumer that reads the
/// stream whole: each frame is delivered once, and each plan applies its own partitions, in its own
/// transaction, concurrently with the others. With [`crate::PartitionFilter::Server`], each plan has a consumer
/// filtered to its partitions.
pub fn consumer_groups(
    plans: Vec<ConsumerPlan>,
    filter: crate::PartitionFilter,
) -> Vec<Vec<ConsumerPlan>> {
    let mut groups: Vec<Vec<ConsumerPlan>> = Vec::new();
    for plan in plans {
        let shared = match filter {
            crate::PartitionFilter::Server => None,
            crate::PartitionFilter::Client => groups.iter_mut().find(|g| {
                g.first()
                    .is_some_and(|f| f.projection == plan.projection && f.stream == plan.stream)
            }),
        };
        match shared {
            Some(group) => group.push(plan),
            None => groups.push(vec![plan]),
        }
    }
    groups
}

/// Starts the group's consumer after the lowest database checkpoint of its plans and runs until `shutdown`,
/// or until the stream is drained when `until_idle` (catch-up mode for rebuilds and tests). Each fetched batch
/// is applied by every plan of the group at once (each skips the frames of partitions it does not own), and
/// acked once all of them have committed.
pub async fn run_group(
    ctx: Ctx,
    plans: Vec<ConsumerPlan>,
    shutdown: CancellationToken,
    until_idle: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(!plans.is_empty(), "a consumer group without plans");
    // The other plans' own durables (left by a run with the server filter) would only hold state: remove them.
    for plan in &plans[1..] {
        let durable = plan.durable(&ctx.durable_prefix);
        match bus::remove_durable(&ctx.js, plan.stream, &durable).await {
            Ok(true) => {
                tracing::info!(%durable, "unused durable removed: its plan shares a consumer")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(%durable, error = %e, "unused durable not removed"),
        }
    }
    let (mut consumer, mut positions) = bind_after_checkpoint(&ctx, &plans).await?;
    // Each plan's transaction holds about as many frames as with a consumer of its own; the server refuses a
    // pull for more than the durable's max_ack_pending.
    let max_ack_pending = ConsumerSpec::new(plans[0].stream, "").max_ack_pending;
    let batch_frames = (ctx.batch_frames * plans.len())
        .min(usize::try_from(max_ack_pending).unwrap_or(usize::MAX));
    // The consumer's pending frames cover every plan of the group; lag gauges are per (projection, stream).
    let group_share = match ctx.partition_filter {
        crate::PartitionFilter::Client => {
            plans.iter().map(ConsumerPlan::share).sum::<f64>().min(1.0)
        }
        crate::PartitionFilter::Server => 1.0,
    };
    let mut backoff = Duration::from_millis(100);
    let mut idle_since: Option<Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            advance_quiet_on_stop(&ctx, &plans, &mut positions).await;
            return Ok(());
        }
        // A pull the server never answers (in a cluster, the durable's leader was lost) counts as a failure.
        let fetch = tokio::time::timeout(
            ctx.fetch_wait + ctx.gather + FETCH_TIMEOUT,
            consumer.fetch_gathering(batch_frames, ctx.fetch_wait, ctx.gather),
        );
        let batch = tokio::select! {
            batch = fetch => batch.unwrap_or_else(|_| Err(bus::ConsumeError::Fetch {
                durable: consumer.durable().to_owned(),
                reason: format!("no answer within {FETCH_TIMEOUT:?} past the fetch's wait"),
            })),
            () = shutdown.cancelled() => {
                advance_quiet_on_stop(&ctx, &plans, &mut positions).await;
                return Ok(());
            }
        };
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(durable = consumer.durable(), error = %e, "fetch failed; starting again after the database checkpoint");
                // The frames of a failed fetch (nats-server restarting, a connection lost) may be lost on the
                // way while the server counts them delivered; the next fetch would go on after them, and its
                // ack (AckAll) would cover them. So start again after the database checkpoint, as on start.
                match rebind(&ctx, &plans, &shutdown, &mut backoff).await? {
                    Some(fresh) => (consumer, positions) = fresh,
                    None => return Ok(()),
                }
                continue;
            }
        };
        if batch.is_empty() {
            // Caught up: bring the plans that had nothing in the last batches to where the group is.
            advance_quiet(&ctx, &plans, &mut positions, Duration::ZERO).await;
            if until_idle {
                return Ok(());
            }
            // Fetches that come back empty while the server holds frames for the durable mean it is not being
            // served (in a cluster, its leader was lost): start again after the checkpoint, as after a failure.
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= STALL_CHECK {
                idle_since = None;
                let stalled = match consumer.pending().await {
                    Ok(0) => None,
                    Ok(n) => Some(format!("{n} frames wait for it")),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = stalled {
                    tracing::warn!(durable = consumer.durable(), %why, "fetches come back empty; starting again after the database checkpoint");
                    match rebind(&ctx, &plans, &shutdown, &mut backoff).await? {
                        Some(fresh) => (consumer, positions) = fresh,
                        None => return Ok(()),
                    }
                }
            }
            continue;
        }
        idle_since = None;
        // Apply until every plan has committed: a plan whose transaction failed transiently retries the very
        // same frames; the plans that committed are done with this batch. Each plan runs as its own task, so
        // that decoding and folding use more than one core. A plan that keeps failing holds back the whole
        // group (nothing is acked until every plan has committed).
        let frames = Arc::new(std::mem::take(&mut batch.frames));
        // Every frame of the stream up to `through` has now been delivered to the group (a consumer delivers in
        // order from after the lowest checkpoint, and each batch is committed before the next is fetched), so
        // once this batch has committed, every plan has applied all of its partitions' frames up to it.
        let through = frames.iter().map(|f| f.stream_sequence).max().unwrap_or(0);
        let mut uncommitted: Vec<usize> = Vec::new();
        let mut rewound = false;
        for (i, plan) in plans.iter().enumerate() {
            if has_own_frames(plan, &frames) {
                uncommitted.push(i);
            } else {
                positions[i].through = positions[i].through.max(through);
            }
        }
        loop {
            let started = Instant::now();
            let tasks: Vec<_> = uncommitted
                .iter()
                .map(|&i| {
                    let (ctx, plan, frames) = (ctx.clone(), plans[i].clone(), frames.clone());
                    let written = positions[i].written;
                    tokio::spawn(async move {
                        apply_frames(&ctx, &plan, &frames, Mode::Live { through, written }).await
                    })
                })
                .collect();
            let mut failed = Vec::new();
            for (&i, task) in uncommitted.iter().zip(tasks) {
                let plan = &plans[i];
                match task.await {
                    Ok(Ok(outcome)) => {
                        m::record_batch(
                            plan,
                            &outcome,
                            started.elapsed(),
                            frames.last(),
                            group_share,
                        );
                        // Its transaction moved every partition of the plan to `through`.
                        positions[i] = PlanPosition {
                            through,
                            written: through,
                            at: Some(Instant::now()),
                        };
                    }
                    Ok(Err(e @ Transient::Rewound { .. })) => {
                        tracing::warn!(durable = consumer.durable(), projection = %plan.projection, error = %e, "starting again after the database checkpoint");
                        rewound = true;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(durable = consumer.durable(), projection = %plan.projection, error = %e, "batch not committed; retrying");
                        m::record_retry(plan);
                        failed.push(i);
                    }
                    Err(e) => {
                        anyhow::bail!("applying a batch of {} failed: {e}", consumer.durable())
                    }
                }
            }
            if rewound {
                break;
            }
            if failed.is_empty() {
                backoff = Duration::from_millis(100);
                break;
            }
            uncommitted = failed;
            if shutdown.is_cancelled() {
                // Not committed by every plan, not acked: it will be delivered again, and the plans that
                // committed skip it by their checkpoints. (A plan with no frame in it has applied every
                // frame of its partitions up to its end all the same.)
                advance_quiet_on_stop(&ctx, &plans, &mut positions).await;
                return Ok(());
            }
            sleep_or_cancel(&shutdown, backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        if rewound {
            // Someone moved checkpoints back (`projections reset` while this runs): what this process knows of
            // its positions is stale. Nothing of the batch is acked; start again from the database.
            match rebind(&ctx, &plans, &shutdown, &mut backoff).await? {
                Some(fresh) => (consumer, positions) = fresh,
                None => return Ok(()),
            }
            continue;
        }
        // Committed: now, and only now, ack (AckAll covers the whole batch). A lost ack means a redelivery,
        // which the checkpoint turns into a no-op.
        if let Err(e) = batch.ack().await {
            tracing::warn!(error = %e, "ack failed after commit; the batch will be redelivered and skipped");
        }
        advance_quiet(&ctx, &plans, &mut positions, QUIET_ADVANCE_EVERY).await;
    }
}

/// How often, at most, a plan whose partitions had no frame in the group's recent batches has its checkpoints
/// moved up to the group's position (and whenever the group is caught up).
const QUIET_ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// A plan's position in its group. Its checkpoints may go to `through` although its partitions had no frames:
/// every frame of the stream up to `through` has been applied by the plan that owns it. Without this, a partition that never sees a frame
/// (a keyed stream with few keys) keeps its checkpoint at 0, and the group, which starts after its lowest
/// checkpoint, would read the whole stream again on every start.
#[derive(Debug, Default, Clone, Copy)]
struct PlanPosition {
    /// The group's position, as far as this plan knows it.
    through: u64,
    /// What every partition of the plan is at least at in the database, as this process read or wrote it
    /// since its consumer was bound. Only an operator's reset moves a checkpoint below it; then this process
    /// starts again from the database instead of writing over the reset.
    written: u64,
    at: Option<Instant>,
}

/// Writes the quiet plans' positions that are due (older than `every`). A failure only delays it.
async fn advance_quiet(
    ctx: &Ctx,
    plans: &[ConsumerPlan],
    positions: &mut [PlanPosition],
    every: Duration,
) {
    for (plan, q) in plans.iter().zip(positions.iter_mut()) {
        if q.through <= q.written || q.at.is_some_and(|at| at.elapsed() < every) {
            continue;
        }
        match advance_checkpoints(ctx, plan, q.through, q.written).await {
            Ok(()) => {
                q.written = q.through;
                q.at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(projection = %plan.projection, stream = %plan.stream, error = %e, "quiet checkpoints not advanced; trying again later")
            }
        }
    }
}

/// On a clean stop, writes the quiet plans' positions, so that the next start reads nothing again; bounded,
/// so that a database that does not answer cannot hold the stop up.
async fn advance_quiet_on_stop(ctx: &Ctx, plans: &[ConsumerPlan], positions: &mut [PlanPosition]) {
    let written = tokio::time::timeout(
        QUIET_ADVANCE_ON_STOP,
        advance_quiet(ctx, plans, positions, Duration::ZERO),
    );
    if written.await.is_err() {
        tracing::warn!("quiet checkpoints not written on stop within {QUIET_ADVANCE_ON_STOP:?}");
    }
}

/// How long a clean stop may spend writing the quiet plans' positions.
const QUIET_ADVANCE_ON_STOP: Duration = Duration::from_secs(2);

/// Moves every checkpoint of `plan` that is below `through` up to it, without touching the time of the
/// partition's last event: nothing of the partition lies between. A checkpoint below `written` was moved
/// back by an operator's reset and stays where the reset put it (the next batch starts the group again).
async fn advance_checkpoints(
    ctx: &Ctx,
    plan: &ConsumerPlan,
    through: u64,
    written: u64,
) -> Result<(), Transient> {
    let partitions: Vec<i32> = plan.partitions.iter().map(|&p| i32::from(p)).collect();
    ctx.pool
        .get()
        .await?
        .execute(
            "UPDATE projection_checkpoints SET last_sequence = $4, updated_at = now()
             WHERE projection = $1 AND stream = $2 AND partition = ANY($3)
               AND last_sequence < $4 AND last_sequence >= $5",
            &[
                &plan.projection.name(),
                &plan.stream.name(),
                &partitions,
                &i64::try_from(through).unwrap_or(i64::MAX),
                &i64::try_from(written).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    Ok(())
}

/// Whether the batch holds a frame of a partition the plan owns.
fn has_own_frames(plan: &ConsumerPlan, frames: &[ReceivedFrame]) -> bool {
    frames
        .iter()
        .any(|f| plan.owns(plan.partition_of(&f.subject)))
}

async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {},
        () = shutdown.cancelled() => {},
    }
}

/// The plan's durable consumer, created afresh to start right after the database checkpoint (never from its
/// ack floor).
/// How long a fetch may go unanswered past its own wait before it counts as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long fetches may come back empty before the durable is asked whether frames wait for it.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// Binds again after the database checkpoint, retrying with `backoff`; `None` when shut down first.
async fn rebind(
    ctx: &Ctx,
    plans: &[ConsumerPlan],
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<Option<(FrameConsumer, Vec<PlanPosition>)>> {
    loop {
        sleep_or_cancel(shutdown, *backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        match bind_after_checkpoint(ctx, plans).await {
            Ok(fresh) => return Ok(Some(fresh)),
            Err(e) => {
                tracing::warn!(durable = %group_durable(ctx, plans), error = %e, "consumer not recreated; retrying")
            }
        }
    }
}

/// A group's durable is its first plan's: every plan belongs to one group of one process.
fn group_durable(ctx: &Ctx, plans: &[ConsumerPlan]) -> String {
    plans
        .first()
        .map(|p| p.durable(&ctx.durable_prefix))
        .unwrap_or_default()
}

/// The group's consumer, started after the lowest checkpoint of its plans, and each plan's position as read.
async fn bind_after_checkpoint(
    ctx: &Ctx,
    plans: &[ConsumerPlan],
) -> anyhow::Result<(FrameConsumer, Vec<PlanPosition>)> {
    let mut positions = Vec::with_capacity(plans.len());
    for plan in plans {
        let floor = checkpoint_floor(ctx, plan).await?;
        positions.push(PlanPosition {
            through: floor,
            written: floor,
            at: None,
        });
    }
    let start = positions.iter().map(|p| p.written).min().unwrap_or(0);
    let filters = match (ctx.partition_filter, plans) {
        (crate::PartitionFilter::Server, [plan]) => plan.filter_subjects(),
        // The whole stream: apply_frames skips the partitions the plan does not own.
        _ => Vec::new(),
    };
    let first = plans.first().context("a consumer group without plans")?;
    let spec = ConsumerSpec::new(first.stream, group_durable(ctx, plans))
        .filter_subjects(filters)
        .start_after(start);
    let consumer = FrameConsumer::recreate(&ctx.js, &spec).await?;
    tracing::info!(
        durable = consumer.durable(),
        start_after = start,
        "consumer started"
    );
    Ok((consumer, positions))
}

/// The lowest checkpoint among the plan's partitions: the consumer starts right after it, and frames of
/// partitions that are further ahead are skipped by their own checkpoint.
pub async fn checkpoint_floor(ctx: &Ctx, plan: &ConsumerPlan) -> anyhow::Result<u64> {
    let client = ctx.pool.get().await?;
    let partitions: Vec<i32> = plan.partitions.iter().map(|&p| i32::from(p)).collect();
    // Rows exist from the start so that batches can lock them.
    client
        .execute(
            "INSERT INTO projection_checkpoints (projection, stream, partition, last_sequence)
             SELECT $1, $2, p, 0 FROM unnest($3::int4[]) p
             ON CONFLICT DO NOTHING",
            &[&plan.projection.name(), &plan.stream.name(), &partitions],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT coalesce(min(last_sequence), 0) FROM projection_checkpoints
             WHERE projection = $1 AND stream = $2 AND partition = ANY($3)",
            &[&plan.projection.name(), &plan.stream.name(), &partitions],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Applies a batch of frames exactly once: rows, dead letters and checkpoints in one transaction.
pub async fn apply_batch(
    ctx: &Ctx,
    plan: &ConsumerPlan,
    frames: &[ReceivedFrame],
) -> Result<Outcome, Transient> {
    apply_frames(ctx, plan, frames, Mode::Selected).await
}

/// Applies frames even at or below the checkpoint (an operator's replay). Safe because every write is an
/// idempotent join. The checkpoints do not move: a replayed range may lie ahead of the projection, and
/// moving a partition's checkpoint to its end would make the projection skip the frames before the range,
/// never applied. The projection applies the replayed frames again when it gets there, to the same rows.
pub async fn replay_batch(
    ctx: &Ctx,
    plan: &ConsumerPlan,
    frames: &[ReceivedFrame],
) -> Result<Outcome, Transient> {
    apply_frames(ctx, plan, frames, Mode::Replay).await
}

/// What a batch of frames is, and so how it moves the checkpoints.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The next frames of the group's consumer: every frame of the stream up to `through` is in this batch or
    /// was applied before, so every partition of the plan moves to at least `through`. Every checkpoint of
    /// the plan must be at `written` or past it, or it was wound back under this process ([`Transient::Rewound`]).
    Live { through: u64, written: u64 },
    /// Frames picked by the caller (a rebuild's catch-up): each partition moves to its last frame here.
    Selected,
    /// An operator's replay: applied whatever the checkpoints, which do not move.
    Replay,
}

async fn apply_frames(
    ctx: &Ctx,
    plan: &ConsumerPlan,
    frames: &[ReceivedFrame],
    mode: Mode,
) -> Result<Outcome, Transient> {
    let force = matches!(mode, Mode::Replay);
    if !has_own_frames(plan, frames) {
        // Nothing of ours: no transaction; the caller's ack moves the consumer past them.
        return Ok(Outcome::default());
    }
    let mut client = ctx.pool.get().await?;
    let tx = client.transaction().await?;
    let checkpoints = lock_checkpoints(&tx, plan).await?;
    if let Mode::Live { written, .. } = mode
        && let Some((&partition, &at)) = checkpoints.iter().find(|&(_, &at)| at < written)
    {
        return Err(Transient::Rewound {
            partition,
            at,
            known: written,
        });
    }

    let mut outcome = Outcome::default();
    let mut dead = Vec::new();
    let mut advanced: BTreeMap<u16, (u64, Timestamp)> = BTreeMap::new();
    // The batch's changes, and each applied frame's index and event count. A frame's changes are folded on
    // their own first (a frame that fails to fold is dead-lettered whole) and then moved into the batch's.
    let mut all = Changes::default();
    let mut per_frame: Vec<(usize, usize)> = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let partition = plan.partition_of(&frame.subject);
        if !plan.owns(partition) {
            continue;
        }
        if !force && frame.stream_sequence <= checkpoints.get(&partition).copied().unwrap_or(0) {
            outcome.skipped += 1;
            continue;
        }
        let entry = advanced.entry(partition).or_insert((0, frame.stored_at));
        if frame.stream_sequence > entry.0 {
            *entry = (frame.stream_sequence, frame.stored_at);
        }
        outcome.frames += 1;
        if let Some(reason) = plan.subject_error(&frame.subject) {
            dead.push(DeadLetter {
                frame,
                kind: "bad_subject",
                reason,
            });
            continue;
        }
        match frame_changes(plan, frame, &ctx.codec) {
            Ok((changes, events)) => {
                all.merge(changes);
                per_frame.push((i, events));
            }
            Err((kind, reason)) => dead.push(DeadLetter {
                frame,
                kind,
                reason,
            }),
        }
    }

    let tx = match write_changes(&tx, &all).await {
        Ok(()) => {
            outcome.events = per_frame.iter().map(|f| f.1).sum();
            tx
        }
        Err(e) if is_permanent(&e) => {
            // Some frame holds rows the database refuses. Find it: apply frame by frame, each under a
            // savepoint, and dead-letter the ones that fail. Rare, so row-at-a-time cost is fine here.
            tracing::warn!(error = %e, "batch refused by the database; isolating the bad frame");
            tx.rollback().await?;
            let mut tx = client.transaction().await?;
            lock_checkpoints(&tx, plan).await?;
            outcome.events = 0;
            for &(i, events) in &per_frame {
                // Decoded again: keeping every frame's changes for this rare path cost a copy of each.
                let changes = match frame_changes(plan, &frames[i], &ctx.codec) {
                    Ok((changes, _)) => changes,
                    Err((kind, reason)) => {
                        dead.push(DeadLetter {
                            frame: &frames[i],
                            kind,
                            reason,
                        });
                        continue;
                    }
                };
                let sp = tx.savepoint("frame").await?;
                match write_changes(&sp, &changes).await {
                    Ok(()) => {
                        sp.commit().await?;
                        outcome.events += events;
                    }
                    Err(e) if is_permanent(&e) => {
                        sp.rollback().await?;
                        dead.push(DeadLetter {
                            frame: &frames[i],
                            kind: "rejected_by_database",
                            reason: format!("{e}"),
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            tx
        }
        Err(e) => return Err(e.into()),
    };

    for letter in &dead {
        record_dead_letter(ctx, &tx, plan, letter).await?;
    }
    outcome.dead_lettered = dead.len();
    match mode {
        Mode::Live { through, .. } => save_checkpoints(&tx, plan, &advanced, Some(through)).await?,
        Mode::Selected => save_checkpoints(&tx, plan, &advanced, None).await?,
        Mode::Replay => {
            let failed: Vec<u64> = dead.iter().map(|d| d.frame.stream_sequence).collect();
            let applied: Vec<i64> = per_frame
                .iter()
                .map(|&(i, _)| frames[i].stream_sequence)
                .filter(|seq| !failed.contains(seq))
                .map(|seq| i64::try_from(seq).unwrap_or(i64::MAX))
                .collect();
            outcome.dead_letters_resolved = resolve_dead_letters(&tx, plan, &applied).await?;
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Marks the dead letters of frames that have now been applied (by an operator's replay, after a fix) as
/// replayed: they no longer count as the projection's dead letters.
async fn resolve_dead_letters(
    tx: &Transaction<'_>,
    plan: &ConsumerPlan,
    applied: &[i64],
) -> Result<usize, tokio_postgres::Error> {
    if applied.is_empty() {
        return Ok(0);
    }
    let n = tx
        .execute(
            "UPDATE dead_letters SET replayed_at = now()
             WHERE projection = $1 AND stream = $2 AND stream_sequence = ANY($3) AND replayed_at IS NULL",
            &[&plan.projection.name(), &plan.stream.name(), &applied],
        )
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// Decodes a frame and folds its events; `Err((kind, reason))` when it must be dead-lettered.
fn frame_changes(
    plan: &ConsumerPlan,
    frame: &ReceivedFrame,
    codec: &CodecConfig,
) -> Result<(Changes, usize), (&'static str, String)> {
    let records = frame.decode(codec).map_err(|e| (e.kind(), e.to_string()))?;
    let mut changes = Changes::default();
    for (index, record) in records.iter().enumerate() {
        if record.event.stream() != plan.stream {
            return Err((
                "wrong_stream",
                format!(
                    "event {} belongs to {}, found on {}",
                    record.event.kind(),
                    record.event.stream(),
                    frame.subject
                ),
            ));
        }
        changes
            .add(Positioned {
                stream: plan.stream,
                seq: frame.stream_sequence,
                index: u32::try_from(index).unwrap_or(u32::MAX),
                record,
            })
            .map_err(|e| {
                (
                    "unappliable_event",
                    format!("event {index} ({}): {e}", record.event.kind()),
                )
            })?;
    }
    Ok((changes, records.len()))
}

async fn lock_checkpoints(
    tx: &Transaction<'_>,
    plan: &ConsumerPlan,
) -> Result<BTreeMap<u16, u64>, tokio_postgres::Error> {
    let partitions: Vec<i32> = plan.partitions.iter().map(|&p| i32::from(p)).collect();
    let rows = tx
        .query(
            "SELECT partition, last_sequence FROM projection_checkpoints
             WHERE projection = $1 AND stream = $2 AND partition = ANY($3)
             ORDER BY partition FOR UPDATE",
            &[&plan.projection.name(), &plan.stream.name(), &partitions],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                u16::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            )
        })
        .collect())
}

/// Moves each partition with frames applied here to its last one (with that frame's time), and with
/// `through`, every partition of the plan to at least `through` (keeping the time of its last event).
async fn save_checkpoints(
    tx: &Transaction<'_>,
    plan: &ConsumerPlan,
    applied: &BTreeMap<u16, (u64, Timestamp)>,
    through: Option<u64>,
) -> Result<(), tokio_postgres::Error> {
    let mut moves: BTreeMap<u16, (u64, Option<Timestamp>)> = applied
        .iter()
        .map(|(&p, &(seq, at))| (p, (seq, Some(at))))
        .collect();
    if let Some(through) = through {
        for &p in &plan.partitions {
            let entry = moves.entry(p).or_insert((through, None));
            entry.0 = entry.0.max(through);
        }
    }
    if moves.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = moves.keys().map(|&p| i32::from(p)).collect();
    let seqs: Vec<i64> = moves
        .values()
        .map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX))
        .collect();
    let at: Vec<Option<i64>> = moves
        .values()
        .map(|(_, t)| t.map(|t| t.as_micros()))
        .collect();
    tx.execute(
        "INSERT INTO projection_checkpoints AS c (projection, stream, partition, last_sequence, last_event_at)
         SELECT $1, $2, p, s, 'epoch'::timestamptz + at * interval '1 microsecond'
         FROM unnest($3::int4[], $4::int8[], $5::int8[]) AS u(p, s, at)
         ON CONFLICT (projection, stream, partition) DO UPDATE SET
            last_sequence = greatest(c.last_sequence, EXCLUDED.last_sequence),
            last_event_at = CASE WHEN EXCLUDED.last_sequence > c.last_sequence
                                      AND EXCLUDED.last_event_at IS NOT NULL
                                 THEN EXCLUDED.last_event_at ELSE c.last_event_at END,
            updated_at = now()",
        &[&plan.projection.name(), &plan.stream.name(), &partitions, &seqs, &at],
    )
    .await?;
    Ok(())
}

/// Header values are single lines of bounded length.
fn header_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if v.len() > 1000 {
        let mut cut = 1000;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    v
}

/// Publishes the frame to the dead-letter stream (deduplicated by its origin) and records it in the table,
/// inside the batch's transaction: if either fails, nothing commits and the batch is retried.
async fn record_dead_letter(
    ctx: &Ctx,
    tx: &Transaction<'_>,
    plan: &ConsumerPlan,
    letter: &DeadLetter<'_>,
) -> Result<(), Transient> {
    let frame = letter.frame;
    tracing::warn!(
        projection = plan.projection.name(),
        stream = plan.stream.name(),
        seq = frame.stream_sequence,
        kind = letter.kind,
        reason = %letter.reason,
        "dead-lettering frame"
    );
    let mut headers = async_nats::HeaderMap::new();
    let mut original = serde_json::Map::new();
    if let Some(h) = &frame.headers {
        for (name, values) in h.iter() {
            let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            original.insert(name.to_string(), serde_json::json!(values));
            let name: &str = name.as_ref();
            if name != "Nats-Msg-Id" {
                for v in values {
                    headers.append(name, v.as_str());
                }
            }
        }
    }
    headers.insert(crate::DL_PROJECTION, plan.projection.name());
    headers.insert(crate::DL_STREAM, plan.stream.name());
    headers.insert(crate::DL_SUBJECT, header_value(&frame.subject).as_str());
    headers.insert(
        crate::DL_SEQUENCE,
        frame.stream_sequence.to_string().as_str(),
    );
    headers.insert(crate::DL_KIND, letter.kind);
    headers.insert(crate::DL_REASON, header_value(&letter.reason).as_str());
    let msg_id = format!(
        "dl-{}-{}-{}",
        plan.projection.name(),
        plan.stream.prefix(),
        frame.stream_sequence
    );
    let publish = jetstream::message::PublishMessage::build()
        .payload(frame.body.clone())
        .headers(headers)
        .message_id(msg_id);
    let subject = events::Subject::dead_letters(plan.stream).to_string();
    ctx.js
        .send_publish(subject, publish)
        .await
        .map_err(|e| Transient::DeadLetter(e.to_string()))?
        .await
        .map_err(|e| Transient::DeadLetter(e.to_string()))?;
    tx.execute(
        "INSERT INTO dead_letters (projection, stream, subject, stream_sequence, reason, error_kind, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (projection, stream, stream_sequence) DO NOTHING",
        &[
            &plan.projection.name(),
            &plan.stream.name(),
            &frame.subject,
            &i64::try_from(frame.stream_sequence).unwrap_or(i64::MAX),
            &letter.reason,
            &letter.kind,
            &frame.body.as_ref(),
            &serde_json::Value::Object(original),
        ],
    )
    .await?;
    m::record_dead_letter(plan);
    Ok(())
}

#[cfg(test)]
mod tests {
    use events::{Partitions, Stream};

    use super::*;
    use crate::{PartitionFilter, Projection, plan};

    #[test]
    fn client_filtering_shares_one_consumer_per_projection_and_stream() {
        let plans = plan(&Projection::ALL, 2, Partitions::DEFAULT);
        let groups = consumer_groups(plans.clone(), PartitionFilter::Client);
        let streams: usize = Projection::ALL.iter().map(|p| p.streams().len()).sum();
        assert_eq!(groups.len(), streams, "{groups:?}");
        for group in &groups {
            let first = &group[0];
            assert!(
                group
                    .iter()
                    .all(|p| p.projection == first.projection && p.stream == first.stream)
            );
        }
        let tasks = groups
            .iter()
            .find(|g| g[0].projection == Projection::Tasks && g[0].stream == Stream::Tasks)
            .expect("a TASKS group");
        assert_eq!(tasks.len(), 2, "both workers' plans read one consumer");
        // Every plan is in exactly one group.
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), plans.len());

        let alone = consumer_groups(plans.clone(), PartitionFilter::Server);
        assert_eq!(alone.len(), plans.len());
        assert!(alone.iter().all(|g| g.len() == 1));
    }

    #[test]
    fn partition_filters_parse_by_name() {
        for filter in [PartitionFilter::Client, PartitionFilter::Server] {
            assert_eq!(filter.name().parse(), Ok(filter));
        }
        let unknown = "both".parse::<PartitionFilter>().unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown partition filter \"both\": use client or server"
        );
    }
}
