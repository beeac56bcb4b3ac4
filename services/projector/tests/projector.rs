//! The projector against real nats-server and Postgres: exactly-once rows, redelivery, poison frames,
//! shuffled interleavings, crashes at random points, and a database that drops connections.

use std::collections::BTreeMap;
use std::time::Duration;

use bus::{
    Bus, ConsumerSpec, FrameConsumer, Publisher, PublisherConfig, ReceivedFrame, provision_streams,
};
use events::{EventRecord, Stream};
use futures_util::StreamExt as _;
use projector::verify::{TableSum, fingerprint};
use projector::{Projection, ProjectorConfig};
use tests::{NatsServer, TestDb};
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

struct Env {
    server: NatsServer,
    db: TestDb,
    bus: Bus,
}

async fn env() -> Env {
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    Env { server, db, bus }
}

async fn publish(bus: &Bus, records: &[EventRecord]) {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    for r in records {
        drop(publisher.publish(r).await.unwrap());
    }
    publisher.flush().await.unwrap();
}

fn config(env: &Env, schema: &str, prefix: &str) -> ProjectorConfig {
    let mut c = ProjectorConfig::new(env.server.url(), env.db.url());
    c.schema = schema.into();
    c.durable_prefix = prefix.into();
    c.batch_frames = 20;
    c.fetch_wait = Duration::from_millis(300);
    c
}

async fn run_until_idle(c: ProjectorConfig) {
    tokio::time::timeout(
        Duration::from_secs(60),
        projector::run(c, CancellationToken::new(), true),
    )
    .await
    .expect("projector did not drain in time")
    .unwrap();
}

async fn sums(
    env: &Env,
    schema: &str,
) -> (BTreeMap<String, TableSum>, Vec<(String, i64)>, Vec<i64>) {
    let client = env.db.client().await;
    let tables = fingerprint(&client, schema, ALL_TABLES).await.unwrap();
    let counts = client
        .query(&format!("SELECT status, count FROM {schema}.task_status_totals WHERE count <> 0 ORDER BY status"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let stats = client
        .query_one(&format!("SELECT active_workers, nanoton_accrued, nanoton_settled FROM {schema}.dashboard_stats"), &[])
        .await
        .unwrap();
    (
        tables,
        counts,
        vec![stats.get(0), stats.get(1), stats.get(2)],
    )
}

#[tokio::test]
async fn projects_every_stream_into_the_read_models() {
    let env = env().await;
    let records = events::sample::lifecycle(30, 3);
    publish(&env.bus, &records).await;
    run_until_idle(config(&env, "public", "p")).await;

    let c = env.db.client().await;
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM tasks").await, 30);
    // Tasks 6, 13, 20, 27 are cancelled; the others complete (every fifth after one failed attempt).
    assert_eq!(
        count("SELECT count(*) FROM tasks WHERE status = 'cancelled'").await,
        4
    );
    assert_eq!(
        count("SELECT count(*) FROM tasks WHERE status = 'completed'").await,
        26
    );
    assert_eq!(
        count("SELECT count(*) FROM tasks WHERE status = 'completed' AND attempt = 2").await,
        6
    );
    assert_eq!(
        count("SELECT count(*) FROM tasks WHERE client_id IS NULL").await,
        0
    );
    assert_eq!(count("SELECT count(*) FROM allocations").await, 36);
    assert_eq!(count("SELECT count(*) FROM task_results").await, 26);
    assert_eq!(
        count("SELECT count(*) FROM workers WHERE status = 'active' AND region = 'local'").await,
        3
    );
    assert_eq!(
        count("SELECT count(*) FROM worker_gpus WHERE gpu_uuid IS NOT NULL AND simulated").await,
        3
    );
    assert_eq!(
        count("SELECT count(*) FROM worker_attestation_state WHERE attested").await,
        3
    );
    assert_eq!(count("SELECT count(*) FROM payment_accruals").await, 26);
    assert_eq!(
        count(
            "SELECT count(*) FROM settlements WHERE status = 'confirmed' AND tx_hash IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM settlement_payouts WHERE status = 'paid'").await,
        3
    );
    let accrued = count("SELECT sum(amount_nanoton)::bigint FROM payment_accruals").await;
    // The one settlement paid every accrual of the three workers.
    assert_eq!(
        count(
            "SELECT count(*) FROM worker_payments
             WHERE paid_nanoton = accrued_nanoton AND accrued_nanoton > 0 AND failed_transfers = 0"
        )
        .await,
        3
    );
    assert_eq!(count("SELECT count(*) FROM settlement_tasks").await, 26);

    // Row values of one scripted task: the fifth (index 4) failed once on w1, was requeued and completed.
    let fifth = records
        .iter()
        .filter_map(|r| match &r.event {
            events::Event::TaskSubmitted(t) => Some(t.task_id.0),
            _ => None,
        })
        .nth(4)
        .unwrap();
    let row = c
        .query_one(
            "SELECT status, attempt, worker_id, gpu_millis, peak_gpu_memory_mib, client_id, priority,
                    failure_reason, allocated_at <= started_at AND started_at <= finished_at
             FROM tasks WHERE task_id = $1",
            &[&fifth],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(row.get::<_, i32>(1), 2);
    assert_eq!(row.get::<_, String>(2), "w1");
    assert_eq!(row.get::<_, i64>(3), 1_004);
    assert_eq!(row.get::<_, i64>(4), 1_024);
    assert_eq!(row.get::<_, String>(5), "client-42");
    assert_eq!(row.get::<_, i16>(6), 5);
    assert_eq!(
        row.get::<_, Option<String>>(7),
        None,
        "the completed attempt has no failure"
    );
    assert!(row.get::<_, bool>(8), "timestamps in lifecycle order");
    let accrual = c
        .query_one(
            "SELECT amount_nanoton, attempt, worker_id FROM payment_accruals WHERE task_id = $1",
            &[&fifth],
        )
        .await
        .unwrap();
    // 1.004 GPU-seconds at 1,001 nanoton per GPU-second, rounded down.
    assert_eq!(accrual.get::<_, i64>(0), 1_004 * 1_001 / 1_000);
    assert_eq!(accrual.get::<_, i32>(1), 2);
    let allocations: Vec<(i32, Option<String>)> = c
        .query(
            "SELECT attempt, revoke_reason FROM allocations WHERE task_id = $1 ORDER BY attempt",
            &[&fifth],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(allocations, vec![(1, None), (2, None)]);
    let worker = c
        .query_one(
            "SELECT price_per_gpu_second_nanoton, payout_address, max_concurrent, running_tasks
             FROM workers WHERE worker_id = 'w1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(worker.get::<_, i64>(0), 1_001);
    assert_eq!(worker.get::<_, String>(1), "UQ-worker-1");
    assert_eq!(worker.get::<_, i32>(2), 4);

    let (_, status_counts, stats) = sums(&env, "public").await;
    assert_eq!(
        status_counts,
        vec![("cancelled".to_string(), 4), ("completed".to_string(), 26)]
    );
    assert_eq!(
        stats,
        vec![3, accrued, accrued],
        "active workers, accrued, settled"
    );
    let checkpoints =
        count("SELECT count(*) FROM projection_checkpoints WHERE last_sequence > 0").await;
    assert!(checkpoints >= 6, "checkpoints advanced: {checkpoints}");
}

#[tokio::test]
async fn redelivering_everything_changes_nothing() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(20, 2)).await;
    // A worker per partition: with 2 workers' events on WORKERS, at least 6 of its 8 plans never see a frame.
    let mut first = config(&env, "public", "p");
    first.workers = 8;
    run_until_idle(first).await;
    let before = sums(&env, "public").await;

    // New consumers start from the database checkpoints: every frame is skipped. They start after the end of
    // their streams, although plans of WORKERS never saw a frame: a quiet plan's checkpoints move with its
    // consumer's position.
    run_until_idle(config(&env, "public", "again")).await;
    assert_eq!(sums(&env, "public").await, before);
    for stream in Stream::EVENT_STREAMS {
        let handle = env.bus.jetstream.get_stream(stream.name()).await.unwrap();
        let end = stream_head(&env.bus, stream).await;
        let mut consumers = handle.consumers();
        let mut seen = 0;
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            if info.name.starts_with("again-") {
                seen += 1;
                assert_eq!(
                    info.config.deliver_policy,
                    async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: end + 1
                    },
                    "{} of {stream} starts after its end",
                    info.name
                );
            }
        }
        assert!(seen > 0, "a consumer of {stream}");
    }

    // With the checkpoints wound back, every frame is applied a second time: still nothing changes.
    env.db
        .client()
        .await
        .execute("UPDATE projection_checkpoints SET last_sequence = 0", &[])
        .await
        .unwrap();
    run_until_idle(config(&env, "public", "third")).await;
    assert_eq!(sums(&env, "public").await, before);
}

#[tokio::test]
async fn a_replay_after_a_fix_applies_dead_lettered_frames_and_resolves_their_dead_letters() {
    let env = env().await;
    let history = events::sample::lifecycle(12, 2);
    publish(&env.bus, &history).await;
    run_until_idle(config(&env, "clean", "clean")).await;
    let clean = sums(&env, "clean").await;

    // A schema that refuses one task's rows, as a too strict migration would: every TASKS and ALLOCATIONS
    // frame that carries an event of that task is dead-lettered, the rest is applied.
    let refused = history
        .iter()
        .find_map(|r| match &r.event {
            events::Event::TaskSubmitted(t) => Some(t.task_id.0),
            _ => None,
        })
        .unwrap();
    let c = env.db.client().await;
    {
        let mut client = env.db.client().await;
        schemas::migrate(&mut client).await.unwrap();
    }
    c.batch_execute(&format!(
        "ALTER TABLE tasks ADD CONSTRAINT refuse_one CHECK (task_id <> '{refused}')"
    ))
    .await
    .unwrap();
    run_until_idle(config(&env, "public", "p")).await;
    let dead: i64 = c
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'rejected_by_database' AND replayed_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        dead >= 2,
        "frames of TASKS and ALLOCATIONS dead-lettered: {dead}"
    );
    assert_ne!(sums(&env, "public").await, clean);

    // The fix, then a replay of the projection's streams: everything applies, and the dead letters are
    // marked replayed (they no longer count in the status).
    c.batch_execute("ALTER TABLE tasks DROP CONSTRAINT refuse_one")
        .await
        .unwrap();
    let mut resolved = 0;
    for &stream in Projection::Tasks.streams() {
        let summary = projector::ops::replay(
            &config(&env, "public", "p"),
            Projection::Tasks,
            stream,
            1,
            None,
            &mut |_| {},
        )
        .await
        .unwrap();
        resolved += summary.dead_letters_resolved;
    }
    assert_eq!(resolved, u64::try_from(dead).unwrap());
    assert_eq!(sums(&env, "public").await, clean);
    let (_, dead_letters) = projector::ops::status(
        &env.bus.jetstream,
        &c,
        &Projection::ALL,
        events::Partitions::DEFAULT,
    )
    .await
    .unwrap();
    assert!(dead_letters.is_empty(), "{dead_letters:?}");
    // A replay again resolves nothing more.
    let again = projector::ops::replay(
        &config(&env, "public", "p"),
        Projection::Tasks,
        Stream::Tasks,
        1,
        None,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.dead_letters_resolved, 0);
}

#[tokio::test]
async fn a_replay_ahead_of_the_projection_loses_nothing() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(20, 2)).await;
    run_until_idle(config(&env, "public", "p")).await;
    let projected = stream_head(&env.bus, Stream::Tasks).await;

    // More history, not yet projected; the operator replays only its second half. New tasks only: a second
    // lifecycle would prepare another settlement with the same wallet seqno, which two partition workers race
    // to insert (one of them is dead-lettered, which one depends on timing).
    let more: Vec<EventRecord> = (0..300)
        .map(|_| events::sample::task_submitted_of_size(200))
        .collect();
    // In flushes of 30, so that each partition has frames in both halves.
    for chunk in more.chunks(30) {
        publish(&env.bus, chunk).await;
    }
    let head = stream_head(&env.bus, Stream::Tasks).await;
    let from = projected + (head - projected) / 2 + 1;
    assert!(
        from > projected + 1 && from <= head,
        "{projected} {from} {head}"
    );
    projector::ops::replay(
        &config(&env, "public", "p"),
        Projection::Tasks,
        Stream::Tasks,
        from,
        None,
        &mut |_| {},
    )
    .await
    .unwrap();
    // The frames between the projection's position and the replayed range are still to be applied.
    run_until_idle(config(&env, "public", "p")).await;

    run_until_idle(config(&env, "clean", "clean")).await;
    assert_eq!(sums(&env, "public").await, sums(&env, "clean").await);
}

async fn stream_head(bus: &Bus, stream: Stream) -> u64 {
    let mut s = bus.jetstream.get_stream(stream.name()).await.unwrap();
    s.info().await.unwrap().state.last_sequence
}

/// Publishes a frame of `record` on `subject`, whatever subject the record would choose; its stream sequence.
async fn publish_frame_on(bus: &Bus, subject: String, record: EventRecord) -> u64 {
    let frame = events::encode_frame(events::CodecConfig::default(), &[record]).unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in frame.headers.pairs() {
        headers.insert(name, value.as_str());
    }
    bus.jetstream
        .publish_with_headers(subject, headers, frame.body.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

#[tokio::test]
async fn a_poison_frame_is_dead_lettered_and_later_frames_are_applied() {
    let env = env().await;
    env.bus
        .jetstream
        .publish("tasks.0.operator", "not a frame".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let records = events::sample::lifecycle(10, 1);
    publish(&env.bus, &records).await;
    // And a well-formed frame whose event cannot be applied (a verdict that names no submission).
    let mut orphan = records
        .iter()
        .find(|r| r.event.kind() == "AttestationVerified")
        .unwrap()
        .clone();
    orphan.envelope.event_id = events::EventId::new();
    orphan.envelope.causation_id = None;
    publish(&env.bus, &[orphan]).await;
    let orphan_seq = bus::last_sequence(&env.bus.jetstream, Stream::Attestations)
        .await
        .unwrap();
    // And a forged completion: a well-formed TaskCompleted of one worker, published on another worker's
    // subject (what a worker's credentials allow it to publish). It must not be applied.
    let mut forged = records
        .iter()
        .find(|r| r.event.kind() == "TaskCompleted")
        .unwrap()
        .clone();
    forged.envelope.event_id = events::EventId::new();
    let events::Event::TaskCompleted(completed) = &mut forged.event else {
        unreachable!()
    };
    completed.usage.gpu_millis = events::GpuMillis(999_999_999);
    let impostor = events::WorkerId::new("impostor").unwrap();
    let forged_subject = events::Subject::keyed(
        Stream::Tasks,
        completed.task_id.0.as_bytes(),
        events::Partitions::DEFAULT,
        events::Origin::Worker(&impostor),
    );
    let forged_seq = publish_frame_on(&env.bus, forged_subject.to_string(), forged).await;
    // And a well-formed submission on a subject that names no partition (9, with 8): no worker's filter
    // selects it, so it must not be dropped silently by consumers that read the stream whole.
    let stray = events::sample::task_submitted_of_size(200);
    let subject = stray.subject(events::Partitions::DEFAULT).to_string();
    let origin = subject.splitn(3, '.').nth(2).unwrap().to_owned();
    let stray_seq = publish_frame_on(&env.bus, format!("tasks.9.{origin}"), stray).await;
    run_until_idle(config(&env, "public", "p")).await;

    let c = env.db.client().await;
    let rows = c
        .query(
            "SELECT stream, stream_sequence, error_kind, reason FROM dead_letters ORDER BY stream, stream_sequence",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got[0],
        (
            "ATTESTATIONS".to_string(),
            i64::try_from(orphan_seq).unwrap(),
            "unappliable_event".to_string()
        )
    );
    assert_eq!(
        got[1..],
        [
            ("TASKS".to_string(), 1, "missing_header".to_string()),
            (
                "TASKS".to_string(),
                i64::try_from(forged_seq).unwrap(),
                "wrong_origin".to_string()
            ),
            (
                "TASKS".to_string(),
                i64::try_from(stray_seq).unwrap(),
                "bad_subject".to_string()
            )
        ]
    );
    let forged_usage: i64 = c
        .query_one(
            "SELECT count(*) FROM tasks WHERE gpu_millis = 999999999",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(forged_usage, 0, "the forged completion was not applied");
    let tasks: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tasks, 10, "frames after the poison one were applied");

    let mut dl = env.bus.jetstream.get_stream("DEAD_LETTERS").await.unwrap();
    assert_eq!(dl.info().await.unwrap().state.messages, 4);
    let mut found = false;
    for seq in 1..=4 {
        let headers = dl.get_raw_message(seq).await.unwrap().headers;
        if headers.get(projector::DL_STREAM).unwrap().as_str() == "ATTESTATIONS" {
            assert_eq!(
                headers.get(projector::DL_KIND).unwrap().as_str(),
                "unappliable_event"
            );
            assert!(
                headers
                    .get(projector::DL_REASON)
                    .unwrap()
                    .as_str()
                    .contains("causation")
            );
            assert_eq!(
                headers.get(projector::DL_SEQUENCE).unwrap().as_str(),
                orphan_seq.to_string()
            );
            found = true;
        }
    }
    assert!(found, "the unappliable frame is in the dead-letter stream");
}

/// Reads every frame of a stream, in order.
async fn all_frames(bus: &Bus, stream: Stream) -> Vec<ReceivedFrame> {
    let consumer = FrameConsumer::bind(
        &bus.jetstream,
        &ConsumerSpec::new(stream, format!("read-{}", stream.prefix())),
    )
    .await
    .unwrap();
    let mut frames = Vec::new();
    loop {
        let batch = consumer
            .fetch(100, Duration::from_millis(200))
            .await
            .unwrap();
        if batch.is_empty() {
            return frames;
        }
        frames.extend(batch.frames.iter().cloned());
        batch.ack().await.unwrap();
    }
}

#[tokio::test]
async fn shuffled_interleavings_of_streams_converge() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(25, 3)).await;
    let plans = projector::plan(&Projection::ALL, 1, events::Partitions::DEFAULT);
    let mut per_stream = Vec::new();
    for plan in &plans {
        per_stream.push((plan.clone(), all_frames(&env.bus, plan.stream).await));
    }
    let mut reference = None;
    // A property over random interleavings (seeded, so a failure replays): streams advance in random order,
    // in random chunk sizes, each stream's own order kept, as independent consumers would.
    for seed in 1..=5u64 {
        let schema = format!("mix{seed}");
        let mut c = config(&env, &schema, "unused");
        c.migrate = false;
        let pool = projector::pool(&c.database_url, &schema, 2).unwrap();
        {
            let mut client = pool.get().await.unwrap();
            client
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            schemas::migrate(&mut client).await.unwrap();
        }
        let ctx = projector::worker::Ctx {
            pool,
            js: env.bus.jetstream.clone(),
            codec: Default::default(),
            batch_frames: 10,
            fetch_wait: Duration::from_millis(100),
            gather: Duration::ZERO,
            partition_filter: projector::PartitionFilter::default(),
            durable_prefix: "unused".into(),
        };
        for (plan, _) in &per_stream {
            projector::worker::checkpoint_floor(&ctx, plan)
                .await
                .unwrap();
        }
        let mut cursors = vec![0usize; per_stream.len()];
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        while cursors
            .iter()
            .zip(&per_stream)
            .any(|(c, (_, f))| *c < f.len())
        {
            let i = (next() % per_stream.len() as u64) as usize;
            let (plan, frames) = &per_stream[i];
            if cursors[i] >= frames.len() {
                continue;
            }
            let take = 1 + (next() % 4) as usize;
            let end = (cursors[i] + take).min(frames.len());
            projector::worker::apply_batch(&ctx, plan, &frames[cursors[i]..end])
                .await
                .unwrap();
            cursors[i] = end;
        }
        let got = sums(&env, &schema).await;
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(&got, r, "interleaving {seed} diverged"),
        }
    }
}

#[tokio::test]
async fn a_projector_killed_at_random_points_gives_the_rows_of_a_clean_run() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(60, 3)).await;
    run_until_idle(config(&env, "public", "clean")).await;
    let clean = sums(&env, "public").await;

    {
        let mut client = env.db.client().await;
        client.batch_execute("CREATE SCHEMA crashy").await.unwrap();
        client
            .batch_execute("SET search_path TO crashy")
            .await
            .unwrap();
        schemas::migrate(&mut client).await.unwrap();
    }
    // Abort the whole projector (every consumer task, mid-transaction or mid-ack) after a random delay,
    // again and again, then let it finish.
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 200);
        let handle = tokio::spawn(projector::run(
            config(&env, "crashy", "crashy"),
            CancellationToken::new(),
            false,
        ));
        let _ = tokio::time::timeout(delay, async {
            while !handle.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        handle.abort();
        let _ = handle.await;
    }
    run_until_idle(config(&env, "crashy", "crashy")).await;
    assert_eq!(sums(&env, "crashy").await, clean);
}

#[tokio::test]
async fn dropped_database_connections_are_retried_without_loss() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(60, 3)).await;
    run_until_idle(config(&env, "public", "clean")).await;
    let clean = sums(&env, "public").await;
    {
        let mut client = env.db.client().await;
        client.batch_execute("CREATE SCHEMA flaky").await.unwrap();
        client
            .batch_execute("SET search_path TO flaky")
            .await
            .unwrap();
        schemas::migrate(&mut client).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let mut c = config(&env, "flaky", "flaky");
    c.batch_frames = 2;
    let run = tokio::spawn(projector::run(c, shutdown.clone(), false));
    let admin = env.db.client().await;
    let target = sums(&env, "public").await.0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut kills = 0;
    loop {
        // Cut every other connection to the database while batches are in flight.
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        kills += killed;
        if fingerprint(&admin, "flaky", ALL_TABLES).await.unwrap() == target {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged after {kills} killed connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // the pace of the fault injection
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert!(kills > 0, "the test must actually have cut connections");
    assert_eq!(sums(&env, "flaky").await, clean);
}

async fn wait_for_tasks(env: &Env, schema: &str, n: i64) {
    let client = env.db.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: i64 = client
            .query_one(&format!("SELECT count(*) FROM {schema}.tasks"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        if got == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{got} of {n} tasks projected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

#[tokio::test]
async fn a_rebuild_verifies_and_swaps_while_the_live_projection_serves_reads() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(40, 3)).await;
    let live_stop = CancellationToken::new();
    let live = tokio::spawn(projector::run(
        config(&env, "public", "projector"),
        live_stop.clone(),
        false,
    ));
    wait_for_tasks(&env, "public", 40).await;
    let indexes_before = index_definitions(&env, "public").await;
    assert!(
        indexes_before.iter().any(|d| d.contains("tasks_queue_idx")),
        "{indexes_before:?}"
    );

    // Readers keep querying the live tables for the whole rebuild.
    let reading = CancellationToken::new();
    let reader = {
        let client = env.db.client().await;
        let reading = reading.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !reading.is_cancelled() {
                match client
                    .query_one("SELECT count(*) FROM tasks WHERE status = 'completed'", &[])
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    // More events arrive while the rebuild runs; the live projection applies them meanwhile.
    let more = events::sample::lifecycle(10, 1);
    let bus = env.bus.clone();
    let publishing = tokio::spawn(async move { publish(&bus, &more).await });

    let mut phases = Vec::new();
    let report = projector::ops::rebuild(
        &config(&env, "public", "projector"),
        Projection::Tasks,
        &mut |p| phases.push(p),
    )
    .await
    .unwrap();
    publishing.await.unwrap();
    reading.cancel();
    let (ok, failed) = reader.await.unwrap();
    assert!(
        ok > 0 && failed == 0,
        "reads during the rebuild: {ok} ok, {failed} failed"
    );
    assert!(!phases.is_empty(), "progress was reported");
    assert_eq!(report.tables["tasks"].rows, 50);
    // The live projector waited only for the locked end of the rebuild, not for the shadow build.
    assert!(
        report.live_paused > Duration::ZERO && report.live_paused < report.elapsed,
        "{report:?}"
    );

    // The live projector goes on writing into the swapped-in tables.
    publish(&env.bus, &events::sample::lifecycle(5, 1)).await;
    wait_for_tasks(&env, "public", 55).await;
    live_stop.cancel();
    live.await.unwrap().unwrap();

    // The result equals a clean build of the whole log, counters included.
    run_until_idle(config(&env, "clean", "clean")).await;
    let (live_tables, live_counts, _) = sums(&env, "public").await;
    let (clean_tables, clean_counts, _) = sums(&env, "clean").await;
    for t in Projection::Tasks.tables() {
        assert_eq!(live_tables[*t], clean_tables[*t], "{t}");
    }
    assert_eq!(live_counts, clean_counts);
    let c = env.db.client().await;
    let retired: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {}.tasks", report.retired_schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(retired >= 40, "the old tables are kept for rollback");
    // The swapped tables' counter triggers call the live schema's functions, not the shadow's.
    let schemas: Vec<String> = c
        .query(
            "SELECT DISTINCT n.nspname::text FROM pg_trigger t
             JOIN pg_class r ON r.oid = t.tgrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE rn.nspname = 'public' AND r.relname = 'tasks' AND NOT t.tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, vec!["public".to_string()]);
    // The swapped-in tables have every index the old ones had (the build drops the secondary indexes and
    // creates them again before the swap).
    assert_eq!(index_definitions(&env, "public").await, indexes_before);
}

/// Every index of the tasks projection's tables in `schema`, as `pg_get_indexdef` writes it, sorted.
async fn index_definitions(env: &Env, schema: &str) -> Vec<String> {
    let tables: Vec<String> = Projection::Tasks
        .tables()
        .iter()
        .map(|t| t.to_string())
        .collect();
    env.db
        .client()
        .await
        .query(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
             JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1 AND t.relname = ANY($2) ORDER BY 1",
            &[&schema, &tables],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_rebuild_that_does_not_verify_swaps_nothing_and_lists_the_differences() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(12, 2)).await;
    run_until_idle(config(&env, "public", "projector")).await;
    // Damage one live row, as a buggy projection would have.
    let c = env.db.client().await;
    c.execute("UPDATE tasks SET gpu_millis = 1 WHERE status = 'completed' AND task_id = (SELECT task_id FROM tasks WHERE status = 'completed' ORDER BY task_id LIMIT 1)", &[])
        .await
        .unwrap();
    let before = sums(&env, "public").await;
    let err = projector::ops::rebuild(
        &config(&env, "public", "projector"),
        Projection::Tasks,
        &mut |_| {},
    )
    .await
    .unwrap_err();
    match err {
        projector::ops::RebuildError::Mismatch { diffs, .. } => {
            assert_eq!(
                diffs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
                vec!["tasks"]
            );
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    assert_eq!(sums(&env, "public").await, before, "nothing swapped");
}

#[tokio::test]
async fn a_rebuild_counts_a_quiet_partition_behind_the_shadow_as_caught_up() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(12, 2)).await;
    run_until_idle(config(&env, "public", "projector")).await;
    let before = sums(&env, "public").await;
    // The live projection stopped before writing its quiet partitions' position (they never saw a frame, so
    // they have no event time): the shadow's checkpoints for them are past the live ones, with nothing of
    // them in between, which must not count as the shadow being ahead.
    let quiet = env
        .db
        .client()
        .await
        .execute(
            "UPDATE projection_checkpoints SET last_sequence = 0
             WHERE projection = 'workers' AND last_event_at IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(quiet > 0, "2 workers leave quiet partitions");
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        projector::ops::rebuild(
            &config(&env, "public", "projector"),
            Projection::Workers,
            &mut |_| {},
        ),
    )
    .await
    .expect("the rebuild does not wait for the stopped live projection")
    .unwrap();
    assert!(report.tables["workers"].rows > 0);
    assert_eq!(sums(&env, "public").await, before);
}

#[tokio::test]
async fn a_rebuild_that_the_live_projection_never_catches_up_with_leaves_nothing_behind() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(12, 2)).await;
    run_until_idle(config(&env, "public", "projector")).await;
    let before = sums(&env, "public").await;
    // More history, which the stopped live projector has not applied: the shadow holds it, the live tables
    // do not.
    publish(&env.bus, &events::sample::lifecycle(4, 1)).await;
    let mut c = config(&env, "public", "projector");
    c.rebuild_wait_for_live = Duration::from_secs(1);
    let err = projector::ops::rebuild(&c, Projection::Tasks, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, projector::ops::RebuildError::LiveBehind(_)),
        "{err}"
    );
    assert_eq!(sums(&env, "public").await, before, "nothing swapped");
    let schemas: Vec<String> = env
        .db
        .client()
        .await
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'shadow%' OR nspname LIKE 'retired%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        schemas.is_empty(),
        "the shadow schema is dropped: {schemas:?}"
    );
    for &stream in Projection::Tasks.streams() {
        let handle = env.bus.jetstream.get_stream(stream.name()).await.unwrap();
        let mut names = handle.consumer_names();
        while let Some(name) = names.next().await {
            let name = name.unwrap();
            assert!(!name.starts_with("rebuild"), "{name} left on {stream}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_the_projector_runs_is_applied_again_and_not_written_over() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(30, 2)).await;
    schemas::migrate(&mut env.db.client().await).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut c = config(&env, "public", "live");
    c.batch_frames = 2;
    let live = tokio::spawn(projector::run(c, shutdown.clone(), false));
    let client = env.db.client().await;
    let caught_up = || async {
        let (rows, _) = projector::ops::status(
            &env.bus.jetstream,
            &client,
            &Projection::ALL,
            events::Partitions::DEFAULT,
        )
        .await
        .unwrap();
        rows.iter().all(|r| r.lag_frames == 0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !caught_up().await {
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
        assert!(!live.is_finished(), "the projector stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Damage a row. Then wind TASKS back to the start while a batch of new tasks is in flight: the batch is
    // fetched, and waits for its checkpoint rows, which the operator's transaction holds while it moves them
    // back. The batch must not write over the reset, nor may the quiet partitions.
    client
        .execute(
            "UPDATE tasks SET gpu_millis = 1, status = 'submitted'
             WHERE task_id = (SELECT task_id FROM tasks WHERE status = 'completed' ORDER BY task_id LIMIT 1)",
            &[],
        )
        .await
        .unwrap();
    let mut operator = env.db.client().await;
    let tx = operator.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM projection_checkpoints WHERE projection = 'tasks' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let tasks: Vec<EventRecord> = (0..50)
        .map(|_| events::sample::task_submitted_of_size(200))
        .collect();
    publish(&env.bus, &tasks).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%projection_checkpoints%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch waits for its checkpoints"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.execute(
        "UPDATE projection_checkpoints SET last_sequence = 0 WHERE projection = 'tasks'",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // The rest of the reset: its durables go (the checkpoints are already where it puts them).
    projector::ops::reset(
        &env.bus.jetstream,
        &client,
        Projection::Tasks,
        projector::ops::ResetTo::Sequence(1),
        "live",
    )
    .await
    .unwrap();
    run_until_idle(config(&env, "clean", "clean")).await;
    let clean = sums(&env, "clean").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = sums(&env, "public").await;
        if now == clean {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the running projector did not apply the reset history again:\n{now:?}\n{clean:?}"
        );
        assert!(!live.is_finished(), "the projector stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    live.await.unwrap().unwrap();
}

#[tokio::test]
async fn status_shows_lag_and_reset_and_replay_apply_frames_again() {
    let env = env().await;
    publish(&env.bus, &events::sample::lifecycle(20, 2)).await;
    run_until_idle(config(&env, "public", "projector")).await;
    let c = env.db.client().await;

    // Lag: frames published after the projector stopped.
    let later = events::sample::lifecycle(4, 1);
    let later_on_tasks = later
        .iter()
        .filter(|r| r.event.stream() == Stream::Tasks)
        .count() as u64;
    publish(&env.bus, &later).await;
    let (rows, dead) = projector::ops::status(
        &env.bus.jetstream,
        &c,
        &Projection::ALL,
        events::Partitions::DEFAULT,
    )
    .await
    .unwrap();
    let tasks_lag: u64 = rows
        .iter()
        .filter(|r| r.stream == Stream::Tasks)
        .map(|r| r.lag_events)
        .sum();
    assert_eq!(tasks_lag, later_on_tasks);
    assert!(
        rows.iter()
            .filter(|r| r.lag_frames > 0)
            .all(|r| r.head > r.checkpoint && r.lag_seconds >= 0.0)
    );
    assert!(dead.is_empty());
    run_until_idle(config(&env, "public", "projector")).await;
    let (rows, _) = projector::ops::status(
        &env.bus.jetstream,
        &c,
        &Projection::ALL,
        events::Partitions::DEFAULT,
    )
    .await
    .unwrap();
    assert!(rows.iter().all(|r| r.lag_frames == 0 && r.lag_events == 0));
    let good = sums(&env, "public").await;

    // Damage a row, then replay the TASKS stream: the joins put it right, checkpoints stay where they were.
    let damage = "UPDATE tasks SET gpu_millis = 1, status = 'submitted'
                  WHERE task_id = (SELECT task_id FROM tasks WHERE status = 'completed' ORDER BY task_id LIMIT 1)";
    c.execute(damage, &[]).await.unwrap();
    assert_ne!(sums(&env, "public").await, good);
    let mut seen = Vec::new();
    let projector::ops::ReplaySummary { frames, events, .. } = projector::ops::replay(
        &config(&env, "public", "projector"),
        Projection::Tasks,
        Stream::Tasks,
        1,
        None,
        &mut |p| seen.push(p),
    )
    .await
    .unwrap();
    assert!(frames > 0 && events > 0);
    assert!(!seen.is_empty(), "replay reports progress");
    assert_eq!(sums(&env, "public").await, good);

    // Same damage, repaired by a reset to the start and a restart of the projector.
    c.execute(damage, &[]).await.unwrap();
    let moved = projector::ops::reset(
        &env.bus.jetstream,
        &c,
        Projection::Tasks,
        projector::ops::ResetTo::Sequence(1),
        "projector",
    )
    .await
    .unwrap();
    assert_eq!(moved.len(), Projection::Tasks.streams().len());
    let floor: i64 = c
        .query_one(
            "SELECT max(last_sequence) FROM projection_checkpoints WHERE projection = 'tasks'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(floor, 0);
    run_until_idle(config(&env, "public", "projector")).await;
    assert_eq!(sums(&env, "public").await, good);

    // A reset by time to the future moves nothing.
    let moved = projector::ops::reset(
        &env.bus.jetstream,
        &c,
        Projection::Tasks,
        projector::ops::ResetTo::Since(events::Timestamp::from_micros(4_102_444_800_000_000)),
        "projector",
    )
    .await
    .unwrap();
    assert!(moved.is_empty());
}
