//! The 3-node JetStream cluster under load: R3 streams, the TASKS stream leader SIGKILLed mid-load, and
//! nothing acknowledged lost or duplicated, in the log or in the read model.
//!
//! The load goes through the real batching publisher with one event per frame, so a frame's `Nats-Msg-Id`
//! is the event's id: a publish that failed during the leader election is retried with the same id, and the
//! server stores it once whether or not the failed attempt had been stored. (With several events per frame a
//! retry may group them differently: the frame gets another key, so the retried event may be stored twice;
//! the new events grouped with it are never dropped, see `bus::FrameKey`.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bus::{Bus, BusConfig, Publisher, PublisherConfig, provision_streams};
use events::{EventId, EventRecord, Partitions, Stream, TaskId};
use projector::{Projection, ProjectorConfig};
use tests::{NatsCluster, TestDb};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The pace of the load: 500 events per second.
const EVENTS_PER_TICK: usize = 5;
const TICK: Duration = Duration::from_millis(10);
/// The leader is killed once this many events are acknowledged (mid-load).
const KILL_AFTER_ACKS: usize = 1_200;
/// The load stops once this many events first sent after the kill have been acknowledged at their first
/// attempt: service went on for new work (about 2 s of it), not only for the retries.
const FIRST_TIME_ACKS_AFTER_KILL: usize = 1_000;
/// How long one publish may wait for its ack before the test retries it: short, so that retries happen
/// during the election rather than after it.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadlines of the polls below; the whole test takes well under a minute.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(40);
const PROJECT_DEADLINE: Duration = Duration::from_secs(30);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// What happened to one submitted event.
#[derive(Debug)]
struct Acked {
    event_id: EventId,
    task_id: TaskId,
    /// When its first attempt was made.
    first_sent: Instant,
    acked: Instant,
    attempts: u32,
    /// The server answered that it had stored this id already (a failed attempt had in fact been stored).
    duplicate: bool,
}

/// Counters the main task polls while the load runs.
#[derive(Debug, Default)]
struct Progress {
    acks: AtomicUsize,
    killed_at: OnceLock<Instant>,
    /// Events first sent after the kill and acknowledged at their first attempt.
    first_time_after_kill: AtomicUsize,
}

impl Progress {
    fn acked(&self, acked: &Acked) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        if acked.attempts == 1
            && self
                .killed_at
                .get()
                .is_some_and(|killed| acked.first_sent > *killed)
        {
            self.first_time_after_kill.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publishes `record` until it is acknowledged, retrying any failure (an ack timeout or "no responders"
/// while the stream has no leader) with the same event id, so the server deduplicates a resend.
async fn publish_until_acked(publisher: Publisher, record: EventRecord, task_id: TaskId) -> Acked {
    let first_sent = Instant::now();
    let deadline = first_sent + PUBLISH_DEADLINE;
    let mut attempts = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        attempts += 1;
        let outcome = match publisher.publish(&record).await {
            Ok(receipt) => receipt.await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(position) => {
                return Acked {
                    event_id: record.envelope.event_id,
                    task_id,
                    first_sent,
                    acked: Instant::now(),
                    attempts,
                    duplicate: position.duplicate,
                };
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "event {} not acknowledged within {PUBLISH_DEADLINE:?} ({attempts} attempts): {e}",
                    record.envelope.event_id
                );
                // A retry backoff, not a wait for a condition: the next attempt is the poll.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// The node that leads `stream`'s Raft group, as the JetStream API reports it, other than `not`.
async fn stream_leader(
    bus: &Bus,
    cluster: &NatsCluster,
    stream: Stream,
    not: Option<usize>,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut handle) = bus.jetstream.get_stream(stream.name()).await
            && let Ok(info) = handle.info().await
            && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            && let Some(index) = cluster.index_of(&leader)
            && Some(index) != not
        {
            return index;
        }
        assert!(Instant::now() < deadline, "{} has no leader", stream.name());
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_tasks_leader_under_load_loses_and_duplicates_nothing() {
    let t0 = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let formed = t0.elapsed();
    let db = TestDb::create().await;

    // The comma-separated URL, as a deployment passes it: the client fails over between the nodes.
    let mut bus_config = BusConfig::new(cluster.url(), "cluster-test");
    bus_config.request_timeout = ACK_TIMEOUT;
    let bus = Bus::connect(&bus_config)
        .await
        .expect("connect to the cluster");
    provision_streams(&bus.jetstream, 3)
        .await
        .expect("provision R3 streams");
    for stream in Stream::ALL {
        let mut handle = bus
            .jetstream
            .get_stream(stream.name())
            .await
            .expect("provisioned");
        let info = handle.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "{} is R3", stream.name());
    }

    // The in-process projector's warnings (fetch failures, rebinds) go to the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let shutdown = CancellationToken::new();
    let mut projector_config = ProjectorConfig::new(cluster.url(), db.url());
    projector_config.projections = vec![Projection::Tasks];
    projector_config.fetch_wait = Duration::from_millis(200);
    let projector = tokio::spawn(projector::run(projector_config, shutdown.clone(), false));

    let publisher = Publisher::new(
        bus.jetstream.clone(),
        PublisherConfig {
            max_events: 1,
            ..PublisherConfig::default()
        },
    )
    .expect("publisher");

    // Steady load on its own task until `stop`; every event is published (and retried) by a task of its own.
    let progress = Arc::new(Progress::default());
    let stop = CancellationToken::new();
    let load = {
        let (publisher, progress, stop) = (publisher.clone(), progress.clone(), stop.clone());
        tokio::spawn(async move {
            let mut pending = tokio::task::JoinSet::new();
            let mut ticker = tokio::time::interval(TICK);
            let mut submitted = 0;
            while !stop.is_cancelled() {
                ticker.tick().await;
                for _ in 0..EVENTS_PER_TICK {
                    let record = events::sample::task_submitted_of_size(350);
                    let events::Event::TaskSubmitted(ref task) = record.event else {
                        unreachable!("the sample is a TaskSubmitted");
                    };
                    let task_id = task.task_id;
                    let (publisher, progress) = (publisher.clone(), progress.clone());
                    pending.spawn(async move {
                        let acked = publish_until_acked(publisher, record, task_id).await;
                        progress.acked(&acked);
                        acked
                    });
                    submitted += 1;
                }
            }
            let mut outcomes = Vec::with_capacity(submitted);
            while let Some(done) = pending.join_next().await {
                outcomes.push(done.expect("a publishing task panicked"));
            }
            (submitted, outcomes)
        })
    };

    // Mid-load: kill the node that leads TASKS.
    let deadline = Instant::now() + PUBLISH_DEADLINE;
    while progress.acks.load(Ordering::Relaxed) < KILL_AFTER_ACKS {
        assert!(
            Instant::now() < deadline,
            "only {} acks before the kill",
            progress.acks.load(Ordering::Relaxed)
        );
        assert!(!load.is_finished(), "the load stopped early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim = stream_leader(&bus, &cluster, Stream::Tasks, None).await;
    let acked_before_kill = progress.acks.load(Ordering::Relaxed);
    cluster.kill(victim).await;
    let killed_at = Instant::now();
    progress.killed_at.set(killed_at).expect("killed once");
    let new_leader = stream_leader(&bus, &cluster, Stream::Tasks, Some(victim)).await;
    let elected_after = killed_at.elapsed();
    assert_ne!(new_leader, victim, "a surviving node leads TASKS");

    // Keep publishing until new events go through at their first attempt again, then stop the load.
    while progress.first_time_after_kill.load(Ordering::Relaxed) < FIRST_TIME_ACKS_AFTER_KILL {
        assert!(
            Instant::now() < deadline,
            "only {} events sent after the kill were acknowledged at their first attempt",
            progress.first_time_after_kill.load(Ordering::Relaxed)
        );
        assert!(!load.is_finished(), "the load stopped early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let (submitted, outcomes) = load.await.expect("the load task");
    let loaded = t0.elapsed();
    assert_eq!(
        outcomes.len(),
        submitted,
        "every submitted event was acknowledged"
    );
    let total = submitted;

    // The publisher recovered: events first sent after the kill were acknowledged too, and the failures
    // during the election were retried (the server reporting any resend of a stored frame as a duplicate).
    let sent_after_kill: Vec<&Acked> = outcomes
        .iter()
        .filter(|a| a.first_sent > killed_at)
        .collect();
    assert!(
        !sent_after_kill.is_empty(),
        "the load went on after the kill"
    );
    let first_ack_after_kill = outcomes
        .iter()
        .filter(|a| a.acked > killed_at)
        .map(|a| a.acked - killed_at)
        .min()
        .expect("acks resumed after the kill");
    let retried = outcomes.iter().filter(|a| a.attempts > 1).count();
    let deduplicated = outcomes.iter().filter(|a| a.duplicate).count();
    let max_attempts = outcomes.iter().map(|a| a.attempts).max().unwrap_or(0);
    assert!(
        retried > 0,
        "killing the leader interrupted no publish: the test did not exercise a failover"
    );

    // Every acknowledged event is in the log exactly once, and nothing else is.
    let mut tasks_stream = bus
        .jetstream
        .get_stream(Stream::Tasks.name())
        .await
        .expect("TASKS");
    let info = tasks_stream.info().await.expect("TASKS info");
    assert_eq!(
        info.state.messages, total as u64,
        "one message per acknowledged event (one event per frame), none twice"
    );
    // Right after a failover a read of the whole stream can time out while the new leader settles: read again
    // until a deadline, then fail with the last error.
    let read_deadline = Instant::now() + Duration::from_secs(60);
    let logged = loop {
        match bus::read_events(&bus.jetstream, Stream::Tasks, vec![]).await {
            Ok(logged) => break logged,
            Err(e) if Instant::now() < read_deadline => {
                eprintln!("reading TASKS back failed ({e}); reading again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("read TASKS back: {e}"),
        }
    };
    let mut seen: HashMap<EventId, usize> = HashMap::new();
    for (_, record) in &logged {
        *seen.entry(record.envelope.event_id).or_default() += 1;
    }
    let acked_ids: BTreeSet<EventId> = outcomes.iter().map(|a| a.event_id).collect();
    assert_eq!(acked_ids.len(), total, "event ids are unique");
    assert_eq!(logged.len(), total, "the read-back holds every event once");
    assert!(seen.values().all(|&n| n == 1), "no event is stored twice");
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        acked_ids,
        "the log holds exactly the acknowledged events"
    );

    // The read model converges to exactly the submitted tasks, with every checkpoint at or past its
    // partition's head (the last frame of that partition in the log) and at most the log's last sequence (a
    // checkpoint moves with its consumer's position, frames of its partition or not).
    let tasks_plan = projector::plan(&[Projection::Tasks], 1, Partitions::DEFAULT)
        .into_iter()
        .find(|p| p.stream == Stream::Tasks)
        .expect("a TASKS consumer plan");
    let mut heads: BTreeMap<i32, i64> = BTreeMap::new();
    for (sequence, record) in &logged {
        let subject = record.subject(Partitions::DEFAULT);
        let partition = i32::from(tasks_plan.partition_of(subject.as_str()));
        let head = heads.entry(partition).or_default();
        *head = (*head).max(i64::try_from(*sequence).expect("sequence fits i64"));
    }
    let log_end = logged.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let log_end = i64::try_from(log_end).expect("sequence fits i64");
    let covered = |checkpoints: &BTreeMap<i32, i64>| {
        heads
            .iter()
            .all(|(p, head)| checkpoints.get(p).is_some_and(|c| c >= head))
            && checkpoints.values().all(|&c| c <= log_end)
    };
    let expected_tasks: BTreeSet<uuid::Uuid> = outcomes.iter().map(|a| a.task_id.0).collect();
    let pg = db.client().await;
    let deadline = Instant::now() + PROJECT_DEADLINE;
    let (rows, checkpoints) = loop {
        let rows: i64 = pg
            .query_one("SELECT count(*) FROM tasks", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        let checkpoints: BTreeMap<i32, i64> = pg
            .query(
                "SELECT partition, last_sequence FROM projection_checkpoints
                 WHERE projection = 'tasks' AND stream = $1 AND last_sequence > 0",
                &[&Stream::Tasks.name()],
            )
            .await
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            .unwrap_or_default();
        if (rows == total as i64 && covered(&checkpoints)) || Instant::now() >= deadline {
            break (rows, checkpoints);
        }
        assert!(!projector.is_finished(), "the projector stopped");
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(rows, total as i64, "one tasks row per submitted task");
    assert!(
        covered(&checkpoints),
        "every checkpoint at or past its partition's head {heads:?} and at most {log_end}: {checkpoints:?}"
    );
    let projected_at = t0.elapsed();
    let in_table: BTreeSet<uuid::Uuid> = pg
        .query("SELECT task_id FROM tasks WHERE status = 'submitted'", &[])
        .await
        .expect("tasks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        in_table, expected_tasks,
        "the tasks table holds exactly the submitted tasks"
    );

    // The killed node comes back on its ports and store and catches up with the log it missed.
    cluster.restart(victim).await;
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    loop {
        let on_node = cluster
            .monitor_json(victim, "/jsz?streams=true")
            .await
            .and_then(|jsz| {
                jsz["account_details"]
                    .as_array()?
                    .iter()
                    .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
                    .find(|s| s["name"] == Stream::Tasks.name())
                    .map(|s| {
                        (
                            s["state"]["messages"].as_u64(),
                            s["state"]["last_seq"].as_u64(),
                        )
                    })
            });
        if on_node == Some((Some(total as u64), Some(info.state.last_sequence))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not catch up within {CATCH_UP_DEADLINE:?}: {on_node:?}, want {total} messages up to {}",
            cluster.node_name(victim),
            info.state.last_sequence
        );
        tokio::time::sleep(POLL).await;
    }
    let caught_up = t0.elapsed();

    shutdown.cancel();
    projector
        .await
        .expect("projector task")
        .expect("the projector stopped cleanly");
    eprintln!(
        "cluster formed in {formed:?}; {total} events; killed {} (TASKS leader) after {acked_before_kill} acks; \
         {} leads after {elapsed:?}; first ack after the kill {first_ack_after_kill:?}; {} events sent after the \
         kill; {retried} events retried (up to {max_attempts} attempts), {deduplicated} resends reported as \
         duplicates; load done at {loaded:?}, read model complete at {projected_at:?}, {} caught up at \
         {caught_up:?}",
        cluster.node_name(victim),
        cluster.node_name(new_leader),
        sent_after_kill.len(),
        cluster.node_name(victim),
        elapsed = elected_after,
    );
}
