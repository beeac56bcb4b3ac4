//! The payments read model against real nats-server and Postgres: a settler's life (accruals, a park, a
//! settlement with a failed transfer, one that expires, one that pays the rest) seen through `worker_payments`
//! step by step, whatever order the accrual and settlement partitions are projected in, and unchanged by
//! redelivery, replay and a rebuild.

use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::payments::{
    FailedTransfer, PaymentAccrued, Payout, PayoutParked, SettlementConfirmed, SettlementExpired,
    SettlementPrepared, SettlementSubmitted,
};
use events::{
    Event, EventRecord, GpuMillis, Nanoton, ProducerId, SettlementId, TaskId, Timestamp, WorkerId,
};
use projector::verify::fingerprint;
use projector::{Projection, ProjectorConfig};
use tests::{NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

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

fn config(env: &Env, prefix: &str) -> ProjectorConfig {
    let mut c = ProjectorConfig::new(env.server.url(), env.db.url());
    c.projections = vec![Projection::Payments];
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

/// One `worker_payments` row; `paid_at` says whether `last_paid_at` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    worker: String,
    accruals: i64,
    accrued: i64,
    pending: i64,
    parked: i64,
    in_flight: i64,
    paid: i64,
    failed_transfers: i64,
    paid_at: bool,
}

impl Row {
    fn new(worker: &str) -> Row {
        Row {
            worker: worker.to_string(),
            accruals: 0,
            accrued: 0,
            pending: 0,
            parked: 0,
            in_flight: 0,
            paid: 0,
            failed_transfers: 0,
            paid_at: false,
        }
    }
}

async fn worker_payments(db: &TestDb, schema: &str) -> Vec<Row> {
    let client = db.client().await;
    let rows = client
        .query(
            &format!(
                "SELECT worker_id, accruals, accrued_nanoton, pending_nanoton, parked_nanoton, in_flight_nanoton,
                        paid_nanoton, failed_transfers, last_paid_at IS NOT NULL
                 FROM {schema}.worker_payments ORDER BY worker_id"
            ),
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let row = Row {
                worker: r.get(0),
                accruals: r.get(1),
                accrued: r.get(2),
                pending: r.get(3),
                parked: r.get(4),
                in_flight: r.get(5),
                paid: r.get(6),
                failed_transfers: r.get(7),
                paid_at: r.get(8),
            };
            assert_eq!(
                row.accrued,
                row.pending + row.parked + row.in_flight + row.paid,
                "accrued = pending + parked + in flight + paid: {row:?}"
            );
            row
        })
        .collect()
}

/// Polls the view until it shows `expected`, or fails with the last rows seen.
async fn wait_for_rows(db: &TestDb, expected: &[Row], what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = worker_payments(db, "public").await;
        if got == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            assert_eq!(got, expected, "{what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

fn producer() -> ProducerId {
    ProducerId::new("settler-test").unwrap()
}

fn worker(id: &str) -> WorkerId {
    WorkerId::new(id).unwrap()
}

fn accrued(worker_id: &str, amount: u64) -> (TaskId, EventRecord) {
    let task_id = TaskId::new();
    let record = EventRecord::new(
        producer(),
        PaymentAccrued {
            task_id,
            worker_id: worker(worker_id),
            attempt: 1,
            // At 1,000 nanoton per GPU-second a GPU-millisecond costs one nanoton.
            gpu_millis: GpuMillis(amount),
            price_per_gpu_second: Nanoton(1_000),
            amount: Nanoton(amount),
        },
    );
    (task_id, record)
}

fn payout(worker_id: &str, tasks: &[(TaskId, u64)]) -> Payout {
    Payout {
        worker_id: worker(worker_id),
        destination: format!("UQ-{worker_id}"),
        amount: Nanoton(tasks.iter().map(|t| t.1).sum()),
        task_ids: tasks.iter().map(|t| t.0).collect(),
    }
}

fn prepared(id: SettlementId, seqno: u32, payouts: Vec<Payout>) -> EventRecord {
    EventRecord::new(
        producer(),
        SettlementPrepared {
            settlement_id: id,
            wallet_seqno: seqno,
            valid_until: Timestamp::from_micros(Timestamp::now().as_micros() + 60_000_000),
            payouts,
            signed_message: vec![0xb5, 0xee, seqno as u8],
            message_hash: format!("{:064x}", id.0.as_u128()),
        },
    )
}

fn submitted(id: SettlementId, send_attempt: u32) -> EventRecord {
    EventRecord::new(
        producer(),
        SettlementSubmitted {
            settlement_id: id,
            message_hash: format!("{:064x}", id.0.as_u128()),
            send_attempt,
        },
    )
}

fn confirmed(id: SettlementId, failed: &[&str]) -> EventRecord {
    EventRecord::new(
        producer(),
        SettlementConfirmed {
            settlement_id: id,
            // One transaction confirms one settlement: the hash is unique per settlement.
            tx_hash: format!("{:064x}", id.0.as_u128() ^ 1),
            logical_time: 1_000,
            failed_transfers: failed
                .iter()
                .map(|w| FailedTransfer {
                    worker_id: worker(w),
                    reason: "insufficient balance: transfer dropped".into(),
                })
                .collect(),
        },
    )
}

fn expired(id: SettlementId) -> EventRecord {
    EventRecord::new(
        producer(),
        SettlementExpired {
            settlement_id: id,
            valid_until: Timestamp::now(),
        },
    )
}

/// The scenario, step by step, each step with the rows the view must show once it is projected.
fn scenario() -> Vec<(&'static str, Vec<EventRecord>, Vec<Row>)> {
    let (a1, a1_rec) = accrued("alice", 1_200_000_001);
    let (a2, a2_rec) = accrued("alice", 800_000_000);
    let (b1, b1_rec) = accrued("bob", 650_000_000);
    let (b2, b2_rec) = accrued("bob", 350_000_007);
    let (c1, c1_rec) = accrued("carol", 2_500_000_000);
    let (_, a3_rec) = accrued("alice", 99);
    let alice = [(a1, 1_200_000_001), (a2, 800_000_000)];
    let bob = [(b1, 650_000_000), (b2, 350_000_007)];
    let parked = EventRecord::new(
        producer(),
        PayoutParked {
            worker_id: worker("carol"),
            destination: "not-a-ton-address".into(),
            amount: Nanoton(2_500_000_000),
            task_ids: vec![c1],
            reason: "invalid TON address: not-a-ton-address".into(),
        },
    );
    let (s1, s2, s3) = (
        SettlementId::new(),
        SettlementId::new(),
        SettlementId::new(),
    );

    let mut alice_row = Row::new("alice");
    alice_row.accruals = 2;
    alice_row.accrued = 2_000_000_001;
    let mut bob_row = Row::new("bob");
    bob_row.accruals = 2;
    bob_row.accrued = 1_000_000_007;
    let mut carol_row = Row::new("carol");
    carol_row.accruals = 1;
    carol_row.accrued = 2_500_000_000;
    let mut steps = Vec::new();

    let (mut a, mut b, mut c) = (alice_row.clone(), bob_row.clone(), carol_row.clone());
    a.pending = a.accrued;
    b.pending = b.accrued;
    c.pending = c.accrued;
    steps.push((
        "accruals for three workers are pending",
        vec![a1_rec, a2_rec, b1_rec, b2_rec, c1_rec],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    c.pending = 0;
    c.parked = c.accrued;
    steps.push((
        "carol's accrual is parked",
        vec![parked],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    (a.pending, a.in_flight) = (0, a.accrued);
    (b.pending, b.in_flight) = (0, b.accrued);
    steps.push((
        "settlement 1 carries alice and bob",
        vec![
            prepared(s1, 1, vec![payout("alice", &alice), payout("bob", &bob)]),
            submitted(s1, 1),
            submitted(s1, 2),
        ],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    (a.in_flight, a.paid, a.paid_at) = (0, a.accrued, true);
    (b.in_flight, b.pending, b.failed_transfers) = (0, b.accrued, 1);
    steps.push((
        "settlement 1 confirmed, bob's transfer failed",
        vec![confirmed(s1, &["bob"])],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    (b.pending, b.in_flight) = (0, b.accrued);
    steps.push((
        "settlement 2 carries bob's accruals again",
        vec![prepared(s2, 2, vec![payout("bob", &bob)]), submitted(s2, 1)],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    (b.in_flight, b.pending) = (0, b.accrued);
    steps.push((
        "settlement 2 expired unexecuted",
        vec![expired(s2)],
        vec![a.clone(), b.clone(), c.clone()],
    ));

    (b.pending, b.paid, b.paid_at) = (0, b.accrued, true);
    (a.accruals, a.accrued, a.pending) = (3, a.accrued + 99, 99);
    steps.push((
        "settlement 3 pays bob; a small accrual of alice's waits",
        vec![
            prepared(s3, 2, vec![payout("bob", &bob)]),
            submitted(s3, 1),
            confirmed(s3, &[]),
            a3_rec,
        ],
        vec![a, b, c],
    ));
    steps
}

#[tokio::test]
async fn worker_payments_follow_a_settlers_life_step_by_step() {
    let env = env().await;
    // Migrated before the projector starts, so the first poll finds the view.
    schemas::migrate(&mut env.db.client().await).await.unwrap();
    let stop = CancellationToken::new();
    let live = tokio::spawn(projector::run(config(&env, "live"), stop.clone(), false));
    for (what, records, rows) in scenario() {
        publish(&env.bus, &records).await;
        wait_for_rows(&env.db, &rows, what).await;
    }
    stop.cancel();
    live.await.unwrap().unwrap();

    let c = env.db.client().await;
    let settlements: Vec<(i64, String, i32, bool)> = c
        .query(
            "SELECT wallet_seqno, status, sends, submitted_at <= coalesce(confirmed_at, submitted_at)
             FROM settlements ORDER BY wallet_seqno, status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        settlements,
        vec![
            (1, "confirmed".to_string(), 2, true),
            (2, "confirmed".to_string(), 1, true),
            (2, "expired".to_string(), 1, true),
        ]
    );
    let carried: Vec<(i64, String)> = c
        .query(
            "SELECT count(*), string_agg(DISTINCT worker_id, ',') FROM settlement_tasks GROUP BY settlement_id
             ORDER BY count(*) DESC, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        carried,
        vec![
            (4, "alice,bob".to_string()),
            (2, "bob".to_string()),
            (2, "bob".to_string())
        ]
    );
    let park = c
        .query_one(
            "SELECT worker_id, destination, reason FROM parked_payouts",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(park.get::<_, String>(0), "carol");
    assert_eq!(park.get::<_, String>(1), "not-a-ton-address");
    assert!(park.get::<_, String>(2).contains("invalid TON address"));
}

/// The final rows of [`scenario`].
fn final_rows() -> Vec<Row> {
    scenario().pop().unwrap().2
}

#[tokio::test]
async fn worker_payments_do_not_depend_on_which_partition_is_projected_first() {
    let steps: Vec<EventRecord> = scenario().into_iter().flat_map(|s| s.1).collect();
    let is_settlement =
        |r: &EventRecord| !matches!(r.event, Event::PaymentAccrued(_) | Event::PayoutParked(_));
    // Settlements stored (and so projected) before any accrual or park they refer to, then the other way round.
    let settlements_first: Vec<EventRecord> = steps
        .iter()
        .filter(|r| is_settlement(r))
        .chain(steps.iter().filter(|r| !is_settlement(r)))
        .cloned()
        .collect();
    let accruals_first: Vec<EventRecord> = steps
        .iter()
        .filter(|r| !is_settlement(r))
        .chain(steps.iter().filter(|r| is_settlement(r)))
        .cloned()
        .collect();
    let mut fingerprints = Vec::new();
    for (order, records) in [
        ("settlements first", settlements_first),
        ("accruals first", accruals_first),
    ] {
        let env = env().await;
        publish(&env.bus, &records).await;
        run_until_idle(config(&env, "p")).await;
        assert_eq!(
            worker_payments(&env.db, "public").await,
            final_rows(),
            "{order}"
        );
        let client = env.db.client().await;
        let sums = fingerprint(&client, "public", &["settlement_tasks", "parked_payouts"])
            .await
            .unwrap();
        fingerprints.push(sums.values().map(|s| s.rows).collect::<Vec<_>>());
    }
    assert_eq!(fingerprints[0], vec![1, 8], "parked rows, settlement tasks");
    assert_eq!(fingerprints[0], fingerprints[1]);
}

#[tokio::test]
async fn redelivery_replay_and_rebuild_change_no_payment_row() {
    let env = env().await;
    let records: Vec<EventRecord> = scenario().into_iter().flat_map(|s| s.1).collect();
    publish(&env.bus, &records).await;
    run_until_idle(config(&env, "p")).await;
    let client = env.db.client().await;
    let tables = Projection::Payments.tables();
    let before = fingerprint(&client, "public", tables).await.unwrap();
    assert_eq!(worker_payments(&env.db, "public").await, final_rows());

    // New consumers start from the database checkpoints: every frame is skipped.
    run_until_idle(config(&env, "again")).await;
    assert_eq!(
        fingerprint(&client, "public", tables).await.unwrap(),
        before
    );

    // With the checkpoints wound back, every frame is applied a second time: still nothing changes.
    client
        .execute("UPDATE projection_checkpoints SET last_sequence = 0", &[])
        .await
        .unwrap();
    run_until_idle(config(&env, "third")).await;
    assert_eq!(
        fingerprint(&client, "public", tables).await.unwrap(),
        before
    );
    assert_eq!(worker_payments(&env.db, "public").await, final_rows());

    // A rebuild verifies the new tables and moves the view along with them.
    let report = projector::ops::rebuild(&config(&env, "p"), Projection::Payments, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.tables["settlement_tasks"].rows, 8);
    assert_eq!(report.tables["parked_payouts"].rows, 1);
    assert_eq!(worker_payments(&env.db, "public").await, final_rows());
    let view_reads: Vec<String> = client
        .query(
            "SELECT DISTINCT t.relnamespace::regnamespace::text
             FROM pg_depend d
             JOIN pg_rewrite r ON r.oid = d.objid
             JOIN pg_class v ON v.oid = r.ev_class
             JOIN pg_class t ON t.oid = d.refobjid
             WHERE v.relname = 'worker_payments' AND v.relnamespace = 'public'::regnamespace AND t.oid <> v.oid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(view_reads, vec!["public".to_string()]);
}
