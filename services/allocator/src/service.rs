//! The allocator at run time: followers feed every stream it reads into one loop that owns the [`Pool`]; the
//! lease decides whether this instance allocates.
//!
//! - On start, and on every takeover, the instance reads TASKS, ALLOCATIONS, WORKERS and ATTESTATIONS up to
//!   their heads as they were when it became active before it places anything, so it never places a task
//!   that a previous holder already placed.
//! - Each round (a batch of arrivals, or a tick) places waiting tasks, publishes the decisions and waits for
//!   their acks before the next round. A publish that fails ends the run with an error: the in-memory state
//!   would be ahead of the log, so the process exits and a restart rebuilds from the log.
//! - It stops allocating when its lease lapses, and stops altogether when cancelled (giving the lease up).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bus::{Bus, Follower, Publisher, PublisherConfig};
use events::{CodecConfig, EventRecord, ProducerId, Stream, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::lease::{self, Lease, PolicyValue, Standing};
use crate::pool::{Pool, PoolConfig};

/// The streams the allocator folds into its state.
pub const INPUTS: [Stream; 4] = [
    Stream::Tasks,
    Stream::Allocations,
    Stream::Workers,
    Stream::Attestations,
];

#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    pub pool: PoolConfig,
    /// Names this instance in the lease and as the producer of its events.
    pub instance: String,
    pub lease_ttl: Duration,
    /// How often time-driven decisions (lost workers, timeouts) and a placement round run without arrivals.
    pub tick: Duration,
    pub replicas: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            pool: PoolConfig::default(),
            instance: "allocator-1".to_owned(),
            lease_ttl: Duration::from_secs(3),
            tick: Duration::from_millis(100),
            replicas: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    #[error("instance name {0:?} is not a valid producer id")]
    Instance(String),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error(
        "publishing decisions failed, so the state is ahead of the log; restart to rebuild: {0}"
    )]
    Publish(#[from] bus::PublishError),
    #[error("a follower of {0} stopped")]
    FollowerStopped(&'static str),
    #[error(
        "the lease of epoch {epoch} lapsed before a round's decisions were stored; restart to rebuild from the log"
    )]
    LeaseLapsed { epoch: u64 },
}

/// What a run did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub allocations: u64,
    pub rejections: u64,
    pub requeues: u64,
    pub expiries: u64,
    pub workers_lost: u64,
    /// Epochs this instance held.
    pub epochs: Vec<u64>,
}

struct Arrival {
    stream: Stream,
    sequence: u64,
    /// When the server stored the frame: the allocator's measure of when a worker was last heard from.
    stored_at: Timestamp,
    records: Vec<EventRecord>,
}

/// Runs one allocator instance until `cancel` fires (or a fatal error).
pub async fn run(
    bus: Bus,
    config: AllocatorConfig,
    cancel: CancellationToken,
) -> Result<RunReport, AllocatorError> {
    let producer = ProducerId::new(config.instance.clone())
        .map_err(|_| AllocatorError::Instance(config.instance.clone()))?;
    let publisher = Publisher::new(
        bus.jetstream.clone(),
        PublisherConfig {
            linger: Duration::from_millis(1),
            ..PublisherConfig::default()
        },
    )?;
    let store = lease::bucket(&bus.jetstream, config.replicas).await?;
    let policy_store = store.clone();
    let mut lease = Lease::new(store, config.instance.clone(), config.lease_ttl);

    // Followers: one per input stream, all into one channel.
    let (tx, mut rx) = mpsc::channel::<Result<Arrival, AllocatorError>>(1024);
    // Stops the helpers below however this function ends, dropped mid-run included: a dropped allocator
    // neither follows streams nor renews its lease (nor gives it up: that is only done on an orderly stop).
    let helpers = CancellationToken::new();
    let _stop_helpers = helpers.clone().drop_guard();
    for stream in INPUTS {
        let follower = Follower::open(&bus.jetstream, stream, Vec::new(), 1).await?;
        tokio::spawn(follow(stream, follower, tx.clone(), helpers.clone()));
    }
    drop(tx);

    // The heads at start: the lease is only contended for once they are read, so that the epoch this
    // instance takes is above every epoch in the log.
    let mut startup = HashMap::new();
    for stream in INPUTS {
        startup.insert(stream, bus::last_sequence(&bus.jetstream, stream).await?);
    }
    let (ready_tx, mut ready_rx) = watch::channel(startup.values().all(|head| *head == 0));

    // The lease runs beside the loop and tells it where this instance stands.
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let (standing_tx, standing_rx) = watch::channel(Standing::Standby);
    let renew = lease.renew_interval();
    let lease_cancel = helpers.clone();
    let lease_task = tokio::spawn(async move {
        while !*ready_rx.borrow_and_update() {
            tokio::select! {
                _ = lease_cancel.cancelled() => return lease,
                changed = ready_rx.changed() => if changed.is_err() { return lease },
            }
        }
        let mut interval = tokio::time::interval(renew);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = lease_cancel.cancelled() => break,
                _ = interval.tick() => {}
            }
            let min_epoch = *epoch_rx.borrow();
            match lease.step(min_epoch).await {
                Ok(standing) => {
                    let _ = standing_tx.send(standing);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease step failed");
                    let _ = standing_tx.send(Standing::Standby);
                }
            }
        }
        lease
    });

    let mut pool = Pool::new(config.pool.clone(), producer);
    let mut applied: HashMap<Stream, u64> = HashMap::new();
    let mut report = RunReport::default();
    // Heads the state must reach before this epoch may place anything.
    let mut catch_up: Option<(u64, HashMap<Stream, u64>)> = None;
    let mut ticker = tokio::time::interval(config.tick.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    let mut policy_epoch = 0;

    let result = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            arrival = rx.recv() => {
                let Some(arrival) = arrival else { break Err(AllocatorError::FollowerStopped("input")) };
                let mut arrival = match arrival { Ok(a) => a, Err(e) => break Err(e) };
                let mut failed = None;
                loop {
                    for record in &arrival.records {
                        pool.apply_stored(record, arrival.stored_at);
                    }
                    applied.insert(arrival.stream, arrival.sequence);
                    match rx.try_recv() {
                        Ok(Ok(next)) => arrival = next,
                        Ok(Err(e)) => {
                            failed = Some(e);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Some(e) = failed.take() {
                    break Err(e);
                }
                let _ = epoch_tx.send(pool.epoch_seen());
                if !*ready_tx.borrow() && startup.iter().all(|(s, head)| applied.get(s).copied().unwrap_or(0) >= *head) {
                    tracing::info!("read the log up to its heads at start; taking part in the lease");
                    let _ = ready_tx.send(true);
                }
            }
            _ = ticker.tick() => {}
        }

        let now = Instant::now();
        let Some(epoch) = standing_rx.borrow().active_epoch(now) else {
            catch_up = None;
            continue;
        };
        if pool.epoch_seen() > epoch {
            // A newer holder has allocated: this lease is stale whatever the KV says.
            tracing::warn!(
                epoch,
                newer = pool.epoch_seen(),
                "a newer allocator epoch is in the log; standing by"
            );
            continue;
        }
        if catch_up.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut heads = HashMap::new();
            for stream in INPUTS {
                match bus::last_sequence(&bus.jetstream, stream).await {
                    Ok(seq) => {
                        heads.insert(stream, seq);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading a stream head failed; retrying"),
                }
            }
            if heads.len() < INPUTS.len() {
                // Allocating without knowing every head could repeat a previous holder's decision.
                continue;
            }
            tracing::info!(
                epoch,
                ?heads,
                "active: catching up with the log before allocating"
            );
            catch_up = Some((epoch, heads));
            report.epochs.push(epoch);
        }
        if let Some((_, heads)) = &catch_up
            && !heads
                .iter()
                .all(|(s, head)| applied.get(s).copied().unwrap_or(0) >= *head)
        {
            continue;
        }
        if policy_epoch != epoch {
            let policy = PolicyValue {
                holder: config.instance.clone(),
                epoch,
                allow_unattested: config.pool.allow_unattested,
                max_attempts: config.pool.max_attempts,
                heartbeat_timeout_ms: u64::try_from(config.pool.heartbeat_timeout.as_millis())
                    .unwrap_or(u64::MAX),
            };
            if let Err(e) = publish_policy(&policy_store, &policy).await {
                tracing::warn!(error = %e, "publishing the pool policy failed");
            } else {
                policy_epoch = epoch;
            }
        }

        let stamp = Timestamp::now();
        let mut decided = Vec::new();
        if now.duration_since(last_tick) >= config.tick {
            last_tick = now;
            decided.extend(pool.tick(stamp, epoch));
        }
        decided.extend(pool.allocate(stamp, epoch));
        if decided.is_empty() {
            continue;
        }
        count(&mut report, &decided);
        let started = Instant::now();
        // The decisions are already in the state: if the lease lapsed meanwhile, or the acks do not come
        // while it holds, the state may be ahead of the log, and only a restart (a replay) is safe.
        let until = match *standing_rx.borrow() {
            Standing::Active { epoch: e, until } if e == epoch && Instant::now() < until => until,
            _ => break Err(AllocatorError::LeaseLapsed { epoch }),
        };
        let mut failed = None;
        for record in &decided {
            tracing::debug!(kind = record.event.kind(), event_id = %record.envelope.event_id,
                correlation_id = %record.envelope.correlation_id, epoch, "decided");
            // Dropping the receipt is fine: `flush` reports every failed frame.
            if let Err(e) = publisher.publish(record).await {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e.into());
        }
        match tokio::time::timeout_at(until.into(), publisher.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Err(e.into()),
            Err(_) => break Err(AllocatorError::LeaseLapsed { epoch }),
        }
        metrics::histogram!("allocator_round_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        let stats = pool.stats();
        metrics::gauge!("allocator_tasks_waiting").set(stats.tasks_waiting as f64);
        metrics::gauge!("allocator_workers_eligible").set(stats.workers_eligible as f64);
        metrics::gauge!("allocator_finished_tasks_remembered")
            .set(stats.finished_remembered as f64);
    };

    helpers.cancel();
    if let Err(e @ AllocatorError::LeaseLapsed { .. }) = &result {
        // Fenced out: what is still queued must not be stored now that another instance may hold the lease.
        // The publisher sends nothing more; return at once, neither flushing nor giving up the lease (it is
        // no longer ours). Frames already handed to the connection may still land (while it reconnects, the
        // client holds them); the process exits, and they go with it.
        tracing::error!(error = %e, "fenced out: dropping the decisions not yet sent");
        publisher.abandon();
        lease_task.abort();
        return result.map(|()| report);
    }
    let _ = publisher.flush().await;
    if let Ok(mut lease) = lease_task.await {
        lease.release().await;
    }
    result.map(|()| report)
}

async fn publish_policy(
    store: &async_nats::jetstream::kv::Store,
    policy: &PolicyValue,
) -> Result<(), lease::LeaseError> {
    let bytes = serde_json::to_vec(policy).expect("policy serializes");
    store
        .put(lease::POLICY_KEY, bytes.into())
        .await
        .map(|_| ())
        .map_err(|e| lease::LeaseError::Store(e.to_string()))
}

fn count(report: &mut RunReport, decided: &[EventRecord]) {
    use events::Event as E;
    for record in decided {
        let (field, name) = match &record.event {
            E::TaskAllocated(_) => (&mut report.allocations, "allocated"),
            E::TaskRejected(_) => (&mut report.rejections, "rejected"),
            E::TaskRequeued(_) => (&mut report.requeues, "requeued"),
            E::TaskExpired(_) => (&mut report.expiries, "expired"),
            E::WorkerLost(_) => (&mut report.workers_lost, "worker_lost"),
            _ => continue,
        };
        *field += 1;
        metrics::counter!("allocator_decisions_total", "kind" => name).increment(1);
    }
}

/// Decodes one stream's frames into the loop's channel. A frame that does not decode is logged and skipped:
/// the projector dead-letters it, and the allocator must not stall on it.
async fn follow(
    stream: Stream,
    mut follower: Follower,
    tx: mpsc::Sender<Result<Arrival, AllocatorError>>,
    cancel: CancellationToken,
) {
    let codec = CodecConfig::default();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = follower.next() => next,
        };
        let arrival = match next {
            None => Err(AllocatorError::FollowerStopped(stream.name())),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(frame)) => match frame.decode(&codec) {
                Ok(records) => Ok(Arrival {
                    stream,
                    sequence: frame.stream_sequence,
                    stored_at: frame.stored_at,
                    records,
                }),
                Err(e) => {
                    tracing::warn!(stream = stream.name(), seq = frame.stream_sequence, error = %e, "skipping an undecodable frame");
                    metrics::counter!("allocator_undecodable_frames_total").increment(1);
                    Ok(Arrival {
                        stream,
                        sequence: frame.stream_sequence,
                        stored_at: frame.stored_at,
                        records: Vec::new(),
                    })
                }
            },
        };
        let stop = arrival.is_err();
        if tx.send(arrival).await.is_err() || stop {
            return;
        }
    }
}
