//! Two projector instances sharing the partitions (`--instance 0|1 --instances 2`), against real nats-server
//! and Postgres: together they project a history exactly once, each partition owned by one of them; while
//! one is down its partitions stay at their checkpoints and the other's go on; once it is back, all converge.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::subjects::Addressing;
use events::{EventRecord, Partitions, Stream};
use futures_util::StreamExt as _;
use projector::verify::fingerprint;
use projector::{Instance, PartitionFilter, Projection, ProjectorConfig, instance_plan};
use tests::{NatsServer, TestDb};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ALL_TABLES: &[&str] = &[
    "tasks",
    "allocations",
    "task_results",
    "workers",
    "worker_gpus",
    "attestations",
    "payment_accruals",
    "settlements",
    "settlement_payouts",
    "settlement_tasks",
    "parked_payouts",
];
const INSTANCES: usize = 2;
const PREFIX: &str = "shared";
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// (projection, stream name, partition) → last sequence.
type Checkpoints = BTreeMap<(String, String, i32), i64>;
/// Durable name → (stream name, filter subjects).
type Consumers = BTreeMap<String, (String, BTreeSet<String>)>;

fn config(
    server: &NatsServer,
    db: &TestDb,
    instance: Instance,
    filter: PartitionFilter,
) -> ProjectorConfig {
    let mut c = ProjectorConfig::new(server.url(), db.url());
    c.durable_prefix = PREFIX.into();
    c.instance = instance;
    c.partition_filter = filter;
    c.workers = 1;
    c.batch_frames = 20;
    c.fetch_wait = Duration::from_millis(200);
    c
}

fn instance(index: usize) -> Instance {
    Instance::new(index, INSTANCES).expect("a valid instance")
}

fn spawn(config: ProjectorConfig) -> (JoinHandle<anyhow::Result<()>>, CancellationToken) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(projector::run(config, shutdown.clone(), false));
    (handle, shutdown)
}

async fn publish(bus: &Bus, records: &[EventRecord]) {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in records {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
}

/// The checkpoint partition of `record` in its stream, as the projector computes it.
fn partition_of(record: &EventRecord) -> i32 {
    let subject = record.subject(Partitions::DEFAULT);
    let stream = subject
        .stream()
        .expect("an event's subject names its stream");
    let plan = projector::plan(&Projection::ALL, 1, Partitions::DEFAULT)
        .into_iter()
        .find(|p| p.stream == stream)
        .expect("a plan for every event stream");
    i32::from(plan.partition_of(subject.as_str()))
}

/// Where the checkpoints must be once the log is projected. A checkpoint is at or past its partition's last
/// frame in the log (`last_frame`, 0 when the partition has none) and never past its stream's last sequence
/// (`stream_last`): a plan moves all its partitions to the end of each batch it has applied, frames of them
/// or not. Keyed streams have partitions 0..8; whole streams one, 0. Derived from the streams, not from the
/// instances' plans, so that a partition no instance owns shows as a checkpoint missing.
struct Heads {
    last_frame: Checkpoints,
    stream_last: BTreeMap<String, i64>,
}

impl Heads {
    /// Whether every checkpoint selected by `which` is where it must be.
    fn reached_by(
        &self,
        got: &Checkpoints,
        which: impl Fn(&(String, String, i32)) -> bool,
    ) -> bool {
        self.last_frame
            .iter()
            .filter(|(k, _)| which(k))
            .all(|(k, &last)| {
                got.get(k)
                    .is_some_and(|&at| at >= last && at <= self.stream_last[&k.1])
            })
    }
}

async fn heads(bus: &Bus) -> Heads {
    let mut last: BTreeMap<(Stream, i32), i64> = BTreeMap::new();
    let mut stream_last = BTreeMap::new();
    for stream in Stream::EVENT_STREAMS {
        let mut handle = bus.jetstream.get_stream(stream.name()).await.unwrap();
        let end = handle.info().await.unwrap().state.last_sequence;
        stream_last.insert(stream.name().to_owned(), i64::try_from(end).unwrap());
        for (sequence, record) in bus::read_events(&bus.jetstream, stream, vec![])
            .await
            .unwrap()
        {
            let head = last.entry((stream, partition_of(&record))).or_default();
            *head = (*head).max(i64::try_from(sequence).unwrap());
        }
    }
    let mut out = Checkpoints::new();
    for projection in Projection::ALL {
        for &stream in projection.streams() {
            let partitions: Vec<i32> = match stream.addressing() {
                Addressing::Partitioned => (0..i32::from(Partitions::DEFAULT.count())).collect(),
                _ => vec![0],
            };
            for p in partitions {
                let head = last.get(&(stream, p)).copied().unwrap_or(0);
                out.insert(
                    (projection.name().to_owned(), stream.name().to_owned(), p),
                    head,
                );
            }
        }
    }
    Heads {
        last_frame: out,
        stream_last,
    }
}

async fn checkpoints(db: &TestDb) -> Checkpoints {
    db.client()
        .await
        .query(
            "SELECT projection, stream, partition, last_sequence FROM public.projection_checkpoints",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls until the checkpoints selected by `which` are where `want` says; returns all checkpoints then.
async fn wait_checkpoints(
    db: &TestDb,
    want: &Heads,
    which: impl Fn(&(String, String, i32)) -> bool,
    running: &[&JoinHandle<anyhow::Result<()>>],
) -> Checkpoints {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = checkpoints(db).await;
        let pick = |c: &Checkpoints| -> Checkpoints {
            c.iter()
                .filter(|(k, _)| which(k))
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        };
        if want.reached_by(&got, &which) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "checkpoints not reached within {DEADLINE:?}:\n got {:?}\nwant at or past {:?}",
            pick(&got),
            pick(&want.last_frame)
        );
        assert!(
            running.iter().all(|h| !h.is_finished()),
            "an instance stopped"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The durable consumers on the server with this test's prefix: name → (stream, filter subjects).
async fn server_consumers(bus: &Bus) -> Consumers {
    let mut out = BTreeMap::new();
    for stream in Stream::EVENT_STREAMS {
        let handle = bus.jetstream.get_stream(stream.name()).await.unwrap();
        let mut consumers = handle.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            let Some(name) = info.config.durable_name.clone() else {
                continue;
            };
            if name.starts_with(PREFIX) {
                let filters: BTreeSet<String> = info
                    .config
                    .filter_subjects
                    .iter()
                    .cloned()
                    .chain(
                        std::iter::once(info.config.filter_subject.clone())
                            .filter(|f| !f.is_empty()),
                    )
                    .collect();
                out.insert(name, (stream.name().to_owned(), filters));
            }
        }
    }
    out
}

/// What the instances' plans say the server should hold, and which instance each durable belongs to.
/// With `PartitionFilter::Client` every consumer reads its stream whole: no filter subjects.
fn planned_consumers(filter: PartitionFilter) -> (Consumers, BTreeMap<String, usize>) {
    let mut consumers = BTreeMap::new();
    let mut owner = BTreeMap::new();
    for index in 0..INSTANCES {
        for plan in instance_plan(&Projection::ALL, 1, instance(index), Partitions::DEFAULT) {
            let name = plan.durable(PREFIX);
            consumers.insert(
                name.clone(),
                (
                    plan.stream.name().to_owned(),
                    match filter {
                        PartitionFilter::Server => plan.filter_subjects().into_iter().collect(),
                        PartitionFilter::Client => BTreeSet::new(),
                    },
                ),
            );
            assert!(
                owner.insert(name, index).is_none(),
                "durable names differ per instance"
            );
        }
    }
    (consumers, owner)
}

/// Projects the whole log into `schema` with one process and compares every table with the public ones.
async fn assert_equals_a_single_process_projection(server: &NatsServer, db: &TestDb, schema: &str) {
    let mut solo = ProjectorConfig::new(server.url(), db.url());
    solo.schema = schema.into();
    solo.durable_prefix = schema.into();
    solo.fetch_wait = Duration::from_millis(200);
    tokio::time::timeout(
        DEADLINE,
        projector::run(solo, CancellationToken::new(), true),
    )
    .await
    .expect("the single process drained in time")
    .unwrap();
    let client = db.client().await;
    let shared = fingerprint(&client, "public", ALL_TABLES).await.unwrap();
    let single = fingerprint(&client, schema, ALL_TABLES).await.unwrap();
    assert!(
        shared.values().any(|t| t.rows > 0),
        "something was projected"
    );
    assert_eq!(
        shared, single,
        "two instances project what one process does"
    );
}

async fn task_ids(db: &TestDb) -> BTreeSet<uuid::Uuid> {
    db.client()
        .await
        .query("SELECT task_id FROM public.tasks", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn submitted_tasks(records: &[EventRecord]) -> Vec<(uuid::Uuid, i32)> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            events::Event::TaskSubmitted(t) => Some((t.task_id.0, partition_of(r))),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_a_stopped_one_holds_back_only_its_own() {
    share_the_partitions(PartitionFilter::Client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_by_server_side_filters() {
    share_the_partitions(PartitionFilter::Server).await;
}

/// Two instances project one log at once, one is killed and comes back; with `filter` deciding whether
/// their consumers are filtered by partition subjects or read the streams whole and skip the other's frames.
async fn share_the_partitions(filter: PartitionFilter) {
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();

    // A history across every stream, projected by two instances running at once.
    let history = events::sample::lifecycle(40, 3);
    publish(&bus, &history).await;
    let (first, first_stop) = spawn(config(&server, &db, instance(0), filter));
    let (second, second_stop) = spawn(config(&server, &db, instance(1), filter));
    let want = heads(&bus).await;
    let got = wait_checkpoints(&db, &want, |_| true, &[&first, &second]).await;
    assert!(
        got.keys().eq(want.last_frame.keys()),
        "a checkpoint for every partition, none extra: {got:?}"
    );

    // No partition is owned by both: the consumers on the server are exactly the planned ones, and no two
    // of a stream take the same subjects (with client-side filtering none takes any: each reads its stream
    // whole); keyed partition p belongs to instance p mod 2.
    let (planned, owner) = planned_consumers(filter);
    assert_eq!(server_consumers(&bus).await, planned);
    for stream in Stream::EVENT_STREAMS {
        let mut taken = BTreeSet::new();
        for (name, (s, filters)) in &planned {
            if s == stream.name() {
                for f in filters {
                    assert!(taken.insert(f.clone()), "{f} taken twice ({name})");
                }
            }
        }
    }
    for index in 0..INSTANCES {
        for plan in instance_plan(&Projection::ALL, 1, instance(index), Partitions::DEFAULT) {
            assert_eq!(owner[&plan.durable(PREFIX)], index);
            if plan.stream == Stream::Tasks {
                assert!(
                    plan.partitions
                        .iter()
                        .all(|p| usize::from(*p) % INSTANCES == index)
                );
            }
        }
    }
    let expected: BTreeSet<uuid::Uuid> = submitted_tasks(&history)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        task_ids(&db).await,
        expected,
        "the tasks table holds each task once"
    );
    assert_equals_a_single_process_projection(&server, &db, "solo").await;

    // Kill the second instance (abort: no clean stop, nothing in flight is committed or acked), then go on
    // submitting. The first instance's partitions advance; the second's stay at their checkpoints.
    second.abort();
    assert!(second.await.unwrap_err().is_cancelled());
    let before = checkpoints(&db).await;
    let more: Vec<EventRecord> = (0..200)
        .map(|_| events::sample::task_submitted_of_size(200))
        .collect();
    publish(&bus, &more).await;
    let want = heads(&bus).await;
    let tasks_of = |index: usize| {
        move |k: &(String, String, i32)| {
            k.1 == Stream::Tasks.name() && usize::try_from(k.2).unwrap() % INSTANCES == index
        }
    };
    let got = wait_checkpoints(&db, &want, tasks_of(0), &[&first]).await;
    let held: Vec<_> = got.iter().filter(|(k, _)| tasks_of(1)(k)).collect();
    assert!(!held.is_empty());
    for (key, sequence) in &held {
        assert_eq!(
            Some(*sequence),
            before.get(*key),
            "{key:?} stays at its checkpoint while its instance is down"
        );
        assert!(
            *sequence < &want.last_frame[*key],
            "{key:?} has frames waiting"
        );
    }
    let new_tasks = submitted_tasks(&more);
    let projected = task_ids(&db).await;
    for (task, partition) in &new_tasks {
        let owned_by_first = usize::try_from(*partition).unwrap() % INSTANCES == 0;
        assert_eq!(
            projected.contains(task),
            owned_by_first,
            "task {task} in partition {partition}"
        );
    }
    assert!(
        new_tasks.iter().any(|(_, p)| p % 2 == 1),
        "some new tasks wait for the stopped instance"
    );

    // Back again under the same durable names: it resumes from its checkpoints and everything converges.
    drop(second_stop);
    let (second, second_stop) = spawn(config(&server, &db, instance(1), filter));
    let got = wait_checkpoints(&db, &want, |_| true, &[&first, &second]).await;
    assert!(got.keys().eq(want.last_frame.keys()), "{got:?}");
    assert_eq!(
        server_consumers(&bus).await,
        planned,
        "the same consumers, no new names"
    );
    let all: BTreeSet<uuid::Uuid> = expected
        .iter()
        .copied()
        .chain(new_tasks.iter().map(|(t, _)| *t))
        .collect();
    assert_eq!(task_ids(&db).await, all);
    assert_equals_a_single_process_projection(&server, &db, "solo").await;

    first_stop.cancel();
    second_stop.cancel();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
}

/// What one process with `workers` partition workers leaves on the server under `filter`.
fn planned_for_one_process(workers: usize, filter: PartitionFilter) -> Consumers {
    let plans = projector::plan(&Projection::ALL, workers, Partitions::DEFAULT);
    projector::worker::consumer_groups(plans, filter)
        .into_iter()
        .map(|group| {
            let first = &group[0];
            let filters = match filter {
                PartitionFilter::Server => first.filter_subjects().into_iter().collect(),
                PartitionFilter::Client => BTreeSet::new(),
            };
            (
                first.durable(PREFIX),
                (first.stream.name().to_owned(), filters),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_a_process_share_one_consumer_per_stream_and_switching_filters_leaves_no_stale_durable()
 {
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let config = |filter: PartitionFilter| {
        let mut c = ProjectorConfig::new(server.url(), db.url());
        c.durable_prefix = PREFIX.into();
        c.workers = 2;
        c.partition_filter = filter;
        c.fetch_wait = Duration::from_millis(200);
        c
    };
    let drain = |c: ProjectorConfig| async move {
        tokio::time::timeout(DEADLINE, projector::run(c, CancellationToken::new(), true))
            .await
            .expect("drained in time")
            .unwrap();
    };

    let history = events::sample::lifecycle(30, 3);
    let (first, rest) = history.split_at(history.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    publish(&bus, first).await;
    drain(config(PartitionFilter::Server)).await;
    let server_side = planned_for_one_process(2, PartitionFilter::Server);
    assert_eq!(server_consumers(&bus).await, server_side);
    assert!(server_side.len() > Projection::ALL.len(), "{server_side:?}");

    // The rest under the client filter: one unfiltered durable per (projection, stream), the others removed,
    // and every checkpoint at its head.
    publish(&bus, second).await;
    drain(config(PartitionFilter::Client)).await;
    let client_side = planned_for_one_process(2, PartitionFilter::Client);
    assert_eq!(server_consumers(&bus).await, client_side);
    assert!(client_side.len() < server_side.len());
    // A shared consumer reads its stream whole: once caught up, every partition of the stream is at its end,
    // frames or not, so that the next start reads nothing again.
    let want = heads(&bus).await;
    let got = checkpoints(&db).await;
    assert!(want.reached_by(&got, |_| true), "{got:?}");
    for (key, at) in &got {
        assert_eq!(*at, want.stream_last[&key.1], "{key:?} at its stream's end");
    }

    // And back to the server filter: each plan's durable again, filtered, started after its checkpoints.
    publish(&bus, third).await;
    drain(config(PartitionFilter::Server)).await;
    assert_eq!(server_consumers(&bus).await, server_side);
    let want = heads(&bus).await;
    assert!(want.reached_by(&checkpoints(&db).await, |_| true));
    let expected: BTreeSet<uuid::Uuid> = submitted_tasks(&history)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(task_ids(&db).await, expected);
    assert_equals_a_single_process_projection(&server, &db, "solo").await;
}

/// A plan of a shared consumer whose transaction keeps failing (a transient error, injected by a trigger on
/// its checkpoint rows) retries alone: the other plan of the group commits its part of the batch, nothing is
/// acked while one plan has not committed, and once the failure clears, everything converges to the rows of
/// a process that never failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plan_of_a_shared_consumer_retries_alone_and_nothing_is_acked_until_it_commits() {
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let history = events::sample::lifecycle(40, 3);
    publish(&bus, &history).await;

    let plans: Vec<_> = projector::plan(&[Projection::Tasks], 2, Partitions::DEFAULT)
        .into_iter()
        .filter(|p| p.stream == Stream::Tasks)
        .collect();
    let [healthy, failing] = &plans[..] else {
        panic!("two plans of TASKS: {plans:?}")
    };
    let on = |plan: &projector::ConsumerPlan| {
        let partitions: BTreeSet<i32> = plan.partitions.iter().map(|&p| i32::from(p)).collect();
        move |k: &(String, String, i32)| {
            k.0 == "tasks" && k.1 == Stream::Tasks.name() && partitions.contains(&k.2)
        }
    };
    let (of_healthy, of_failing) = (on(healthy), on(failing));
    let want = heads(&bus).await;
    assert!(
        want.last_frame.iter().any(|(k, &h)| of_failing(k) && h > 0),
        "the failing plan has frames to apply"
    );

    {
        let mut client = db.client().await;
        schemas::migrate(&mut client).await.unwrap();
        let failing_partitions: Vec<String> =
            failing.partitions.iter().map(u16::to_string).collect();
        client
            .batch_execute(&format!(
                "CREATE SEQUENCE injected_failures;
                 CREATE FUNCTION fail_plan() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.projection = 'tasks' AND NEW.stream = '{stream}'
                        AND NEW.partition IN ({partitions}) THEN
                         PERFORM nextval('injected_failures');
                         RAISE EXCEPTION 'injected failure' USING ERRCODE = '40001';
                     END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER fail_plan BEFORE UPDATE ON projection_checkpoints
                     FOR EACH ROW EXECUTE FUNCTION fail_plan();",
                stream = Stream::Tasks.name(),
                partitions = failing_partitions.join(", "),
            ))
            .await
            .unwrap();
    }
    let mut c = ProjectorConfig::new(server.url(), db.url());
    c.durable_prefix = PREFIX.into();
    c.workers = 2;
    c.partition_filter = PartitionFilter::Client;
    c.batch_frames = 5;
    c.fetch_wait = Duration::from_millis(200);
    let (handle, shutdown) = spawn(c);

    // The failing plan has failed and retried; the healthy one has committed its part of the batch.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let failures: i64 = db
            .client()
            .await
            .query_one("SELECT last_value FROM injected_failures", &[])
            .await
            .unwrap()
            .get(0);
        let got = checkpoints(&db).await;
        if failures >= 2 && got.iter().any(|(k, &s)| of_healthy(k) && s > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retry and commit within {DEADLINE:?}: {failures} failures, {got:?}"
        );
        assert!(!handle.is_finished(), "the projector stopped");
        tokio::time::sleep(POLL).await;
    }
    let got = checkpoints(&db).await;
    assert!(
        got.iter()
            .filter(|(k, _)| of_failing(k))
            .all(|(_, &s)| s == 0),
        "the failing plan committed nothing: {got:?}"
    );
    let durable = healthy.durable(PREFIX);
    let mut consumer = bus
        .jetstream
        .get_stream(Stream::Tasks.name())
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&durable)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap().clone();
    assert_eq!(
        info.ack_floor.stream_sequence, 0,
        "nothing acked while a plan has not committed: {info:?}"
    );
    assert!(info.num_ack_pending > 0, "{info:?}");

    // Meanwhile a pull request the projector did not make takes the next frame, as one given up on during a
    // reconnect would: the server counts it delivered, the projector never sees it. The next batch's ack
    // (AckAll) would cover it unseen; the projector notices the gap in the deliveries and starts again after
    // its checkpoints instead.
    server
        .steal_next_delivery(Stream::Tasks.name(), &durable)
        .await;

    // The failure clears: the failing plan commits the same batch, the group moves on, all converge.
    db.client()
        .await
        .batch_execute("DROP TRIGGER fail_plan ON projection_checkpoints")
        .await
        .unwrap();
    wait_checkpoints(&db, &want, |_| true, &[&handle]).await;
    let after = consumer.info().await.unwrap().clone();
    assert!(
        after.created > info.created,
        "the durable was created again after the gap: {after:?}"
    );
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_equals_a_single_process_projection(&server, &db, "solo").await;
}
