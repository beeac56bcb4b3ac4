//! The migrator and the schema's constraints, against a real Postgres: a fresh database per test.

use std::time::{Duration, Instant};

use schemas::{MIGRATION_LOCK_KEY, MIGRATIONS, MigrateError, migrate};
use tests::TestDb;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Every table the migrations create, in name order.
const EXPECTED_TABLES: &[&str] = &[
    "allocations",
    "attestations",
    "dashboard_counters",
    "dead_letters",
    "parked_payouts",
    "payment_accruals",
    "projection_checkpoints",
    "schema_migrations",
    "settlement_payouts",
    "settlement_tasks",
    "settlements",
    "task_results",
    "task_status_counts",
    "tasks",
    "worker_gpus",
    "workers",
];

const EXPECTED_VIEWS: &[&str] = &[
    "dashboard_stats",
    "task_status_totals",
    "worker_attestation_state",
    "worker_payments",
];

fn all_versions() -> Vec<u32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

async fn migrated(db: &TestDb) -> Client {
    let mut client = db.client().await;
    migrate(&mut client).await.expect("migrations apply");
    client
}

async fn names(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .expect("catalog query")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Everything the migrations define, one line per column, index, constraint and view, in
/// a stable order, plus the bookkeeping rows: equal snapshots mean an identical schema.
async fn catalog_snapshot(client: &Client) -> Vec<String> {
    names(
        client,
        "SELECT line FROM (
             SELECT format('column %s.%s %s nullable=%s default=%s generated=%s %s',
                           table_name, column_name, data_type, is_nullable, column_default,
                           is_generated, generation_expression) AS line
             FROM information_schema.columns
             WHERE table_schema = current_schema()
           UNION ALL
             SELECT format('index %s: %s', indexname, indexdef)
             FROM pg_indexes
             WHERE schemaname = current_schema()
           UNION ALL
             SELECT format('constraint %s.%s: %s', conrelid::regclass, conname,
                           pg_get_constraintdef(oid))
             FROM pg_constraint
             WHERE connamespace = current_schema()::regnamespace
           UNION ALL
             SELECT format('view %s: %s', viewname, definition)
             FROM pg_views
             WHERE schemaname = current_schema()
           UNION ALL
             SELECT format('migration %s %s %s %s', version, name, checksum, applied_at)
             FROM schema_migrations
         ) AS catalog
         ORDER BY line",
    )
    .await
}

fn assert_sql_state<T: std::fmt::Debug>(
    result: Result<T, tokio_postgres::Error>,
    expected: &SqlState,
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected {expected:?}, but it succeeded: {value:?}"),
        Err(error) => assert_eq!(error.code(), Some(expected), "{what}: {error:?}"),
    }
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database() {
    let db = TestDb::create().await;
    let mut client = db.client().await;

    let report = migrate(&mut client).await.expect("migrations apply");
    assert_eq!(report.applied, all_versions());
    assert_eq!(report.already_applied, 0);

    let tables = names(
        &client,
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
         ORDER BY 1",
    )
    .await;
    assert_eq!(tables, EXPECTED_TABLES);
    let views = names(
        &client,
        "SELECT viewname::text FROM pg_views WHERE schemaname = current_schema() ORDER BY 1",
    )
    .await;
    assert_eq!(views, EXPECTED_VIEWS);

    // The bookkeeping records each migration with the checksum of the embedded SQL.
    let recorded: Vec<(i32, String, String)> = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("read schema_migrations")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected: Vec<(i32, String, String)> = MIGRATIONS
        .iter()
        .map(|m| (m.version as i32, m.name.to_owned(), m.checksum()))
        .collect();
    assert_eq!(recorded, expected);

    // An empty pool reads as zeros, not as missing rows.
    let stats = client
        .query_one(
            "SELECT active_workers, nanoton_accrued, nanoton_settled FROM dashboard_stats",
            &[],
        )
        .await
        .expect("dashboard_stats");
    assert_eq!(
        (
            stats.get::<_, i64>(0),
            stats.get::<_, i64>(1),
            stats.get::<_, i64>(2)
        ),
        (0, 0, 0)
    );
    let statuses: i64 = client
        .query_one(
            "SELECT count(*) FROM task_status_totals WHERE count = 0",
            &[],
        )
        .await
        .expect("task_status_totals")
        .get(0);
    assert_eq!(statuses, 9);
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    let before = catalog_snapshot(&client).await;
    assert!(
        before
            .iter()
            .any(|line| line.starts_with("index tasks_queue_idx")),
        "the snapshot sees indexes: {before:#?}"
    );

    let report = migrate(&mut client).await.expect("second run succeeds");
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(report.already_applied, MIGRATIONS.len());
    assert_eq!(catalog_snapshot(&client).await, before);
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    client
        .execute(
            "UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 3",
            &[],
        )
        .await
        .expect("tamper");

    match migrate(&mut client).await {
        Err(MigrateError::ChecksumMismatch { version, name }) => {
            assert_eq!((version, name), (3, MIGRATIONS[2].name));
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_binary_is_refused() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    let newer = MIGRATIONS.len() as i32 + 1;
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, 'future', '0')",
            &[&newer],
        )
        .await
        .expect("record a future migration");

    match migrate(&mut client).await {
        Err(MigrateError::UnknownVersion { version }) => assert_eq!(version as i32, newer),
        other => panic!("expected UnknownVersion, got {other:?}"),
    }
}

/// Two services starting at once: both wait on the lock (held here until both are seen
/// waiting, so the race really happens), then both succeed and each migration is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_apply_each_migration_once() {
    let db = TestDb::create().await;
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("take the migration lock");

    let mut first = db.client().await;
    let mut second = db.client().await;
    let first = tokio::spawn(async move { migrate(&mut first).await });
    let second = tokio::spawn(async move { migrate(&mut second).await });

    // Poll (with a deadline) until both migrators are queued on the lock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = holder
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&MIGRATION_LOCK_KEY],
            )
            .await
            .expect("read pg_locks")
            .get(0);
        if waiting == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migrators never queued on the lock ({waiting} waiting)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("release the migration lock");

    let first = first.await.expect("join").expect("first migrator");
    let second = second.await.expect("join").expect("second migrator");
    let mut applied: Vec<u32> = first
        .applied
        .iter()
        .chain(&second.applied)
        .copied()
        .collect();
    applied.sort_unstable();
    assert_eq!(applied, all_versions(), "{first:?} {second:?}");
    assert_eq!(
        first.applied.len() + first.already_applied,
        MIGRATIONS.len()
    );
    assert_eq!(
        second.applied.len() + second.already_applied,
        MIGRATIONS.len()
    );

    let recorded: i64 = holder
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded, MIGRATIONS.len() as i64);
}

/// The SQL names no schema: with `search_path` set, everything lands in its first schema,
/// which is what a shadow rebuild relies on, even when a migrated schema comes after it.
#[tokio::test]
async fn migrations_follow_the_search_path() {
    let db = TestDb::create().await;
    let mut client = migrated(&db).await;
    client
        .batch_execute("CREATE SCHEMA shadow; SET search_path TO shadow, public")
        .await
        .expect("shadow schema");
    let report = migrate(&mut client).await.expect("migrations apply");
    assert_eq!(report.applied, all_versions());

    for schema in ["shadow", "public"] {
        let tables = names(
            &client,
            &format!(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = '{schema}' AND table_type = 'BASE TABLE' ORDER BY 1"
            ),
        )
        .await;
        assert_eq!(tables, EXPECTED_TABLES, "{schema}");
    }
    // The shadow's foreign key and views point at the shadow's own tables.
    let references = names(
        &client,
        "SELECT format('%s -> %s', conrelid::regclass, confrelid::regclass)
         FROM pg_constraint WHERE contype = 'f' AND connamespace = 'shadow'::regnamespace
         UNION ALL
         SELECT DISTINCT format('%s -> %s', v.relname, t.relnamespace::regnamespace)
         FROM pg_depend d
         JOIN pg_rewrite r ON r.oid = d.objid
         JOIN pg_class v ON v.oid = r.ev_class
         JOIN pg_class t ON t.oid = d.refobjid
         WHERE v.relnamespace = 'shadow'::regnamespace AND v.relkind = 'v' AND t.oid <> v.oid
         ORDER BY 1",
    )
    .await;
    assert_eq!(
        references,
        [
            "dashboard_stats -> shadow",
            "settlement_payouts -> settlements",
            "settlement_tasks -> settlements",
            "task_status_totals -> shadow",
            "worker_attestation_state -> shadow",
            "worker_payments -> shadow",
        ]
    );
}

#[tokio::test]
async fn constraints_reject_what_the_model_forbids() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;

    let task = "INSERT INTO tasks (task_id, status, attempt, client_id, priority, gpu_count,
                                   gpu_memory_mib, max_price_nanoton, timeout_ms, submitted_at,
                                   last_event_id)
                VALUES (gen_random_uuid(), $1, 1, 'client-1', $2, 1, 1024, 10, 60000, now(),
                        gen_random_uuid())";
    client
        .execute(task, &[&"submitted", &10i16])
        .await
        .expect("a valid task");
    assert_sql_state(
        client.execute(task, &[&"submitted", &11i16]).await,
        &SqlState::CHECK_VIOLATION,
        "priority 11",
    );
    assert_sql_state(
        client.execute(task, &[&"pending", &5i16]).await,
        &SqlState::CHECK_VIOLATION,
        "unknown status",
    );
    assert_sql_state(
        client
            .execute(
                "INSERT INTO tasks (task_id, status, attempt, client_id, last_event_id)
                 VALUES (gen_random_uuid(), 'allocated', 1, 'client-1', gen_random_uuid())",
                &[],
            )
            .await,
        &SqlState::CHECK_VIOLATION,
        "half a submission",
    );

    let accrual = "INSERT INTO payment_accruals (task_id, worker_id, attempt, amount_nanoton,
                                                 gpu_millis, price_per_gpu_second_nanoton,
                                                 accrued_at, last_event_id)
                   VALUES ($1::text::uuid, 'worker-1', 1, $2, 1000, 5, now(), gen_random_uuid())";
    let task_id = "018f0000-0000-7000-8000-00000000000a";
    client
        .execute(accrual, &[&task_id, &5i64])
        .await
        .expect("a valid accrual");
    assert_sql_state(
        client.execute(accrual, &[&task_id, &5i64]).await,
        &SqlState::UNIQUE_VIOLATION,
        "a second accrual for the same task",
    );
    let other_task = "018f0000-0000-7000-8000-00000000000b";
    assert_sql_state(
        client.execute(accrual, &[&other_task, &-1i64]).await,
        &SqlState::CHECK_VIOLATION,
        "a negative amount",
    );

    let settlement = "INSERT INTO settlements (settlement_id, status, wallet_seqno, valid_until,
                                               message_hash, total_nanoton, payout_count,
                                               prepared_at, last_event_id)
                      VALUES (gen_random_uuid(), 'prepared', 7, now(), 'hash', 100, $1, now(),
                              gen_random_uuid())";
    client
        .execute(settlement, &[&255i32])
        .await
        .expect("a full batch");
    assert_sql_state(
        client.execute(settlement, &[&256i32]).await,
        &SqlState::CHECK_VIOLATION,
        "more transfers than a v5r1 message carries",
    );
    assert_sql_state(
        client
            .execute(
                "INSERT INTO settlement_payouts (settlement_id, worker_id, destination_address,
                                                 amount_nanoton, status)
                 VALUES (gen_random_uuid(), 'worker-1', 'UQ...', 5, 'pending')",
                &[],
            )
            .await,
        &SqlState::FOREIGN_KEY_VIOLATION,
        "a payout without its settlement",
    );
}

/// The upsert projectors use: state moves forward by (attempt, status_rank) only, and the
/// generated rank is visible through EXCLUDED. A late submission fills in its columns
/// without moving the status back.
#[tokio::test]
async fn task_state_only_moves_forward() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    let upsert = "INSERT INTO tasks AS t (task_id, status, attempt, client_id, priority, gpu_count,
                                          gpu_memory_mib, max_price_nanoton, timeout_ms,
                                          submitted_at, last_event_id)
                  SELECT '018f0000-0000-7000-8000-000000000001', $1, $2, c, p, g, m, x, o, s,
                         gen_random_uuid()
                  FROM (SELECT CASE WHEN $3 THEN 'client-1' END AS c,
                               CASE WHEN $3 THEN 5::smallint END AS p,
                               CASE WHEN $3 THEN 1 END AS g,
                               CASE WHEN $3 THEN 1024::bigint END AS m,
                               CASE WHEN $3 THEN 10::bigint END AS x,
                               CASE WHEN $3 THEN 60000::bigint END AS o,
                               CASE WHEN $3 THEN now() END AS s) AS submission
                  ON CONFLICT (task_id) DO UPDATE SET
                      client_id = coalesce(EXCLUDED.client_id, t.client_id),
                      priority = coalesce(EXCLUDED.priority, t.priority),
                      gpu_count = coalesce(EXCLUDED.gpu_count, t.gpu_count),
                      gpu_memory_mib = coalesce(EXCLUDED.gpu_memory_mib, t.gpu_memory_mib),
                      max_price_nanoton = coalesce(EXCLUDED.max_price_nanoton, t.max_price_nanoton),
                      timeout_ms = coalesce(EXCLUDED.timeout_ms, t.timeout_ms),
                      submitted_at = coalesce(EXCLUDED.submitted_at, t.submitted_at),
                      status = CASE WHEN (EXCLUDED.attempt, EXCLUDED.status_rank)
                                         > (t.attempt, t.status_rank)
                                    THEN EXCLUDED.status ELSE t.status END,
                      attempt = greatest(EXCLUDED.attempt, t.attempt)";
    let state = || async {
        let row = client
            .query_one(
                "SELECT status, status_rank, attempt, client_id FROM tasks",
                &[],
            )
            .await
            .expect("read task");
        (
            row.get::<_, String>(0),
            row.get::<_, i16>(1),
            row.get::<_, i32>(2),
            row.get::<_, Option<String>>(3),
        )
    };

    // The allocation is projected before the submission it answers.
    client
        .execute(upsert, &[&"allocated", &1i32, &false])
        .await
        .expect("allocation first");
    assert_eq!(state().await, ("allocated".into(), 1, 1, None));

    client
        .execute(upsert, &[&"submitted", &1i32, &true])
        .await
        .expect("late submission");
    assert_eq!(
        state().await,
        ("allocated".into(), 1, 1, Some("client-1".into()))
    );

    client
        .execute(upsert, &[&"failed", &1i32, &false])
        .await
        .expect("failure");
    client
        .execute(upsert, &[&"running", &1i32, &false])
        .await
        .expect("late start");
    assert_eq!(
        state().await,
        ("failed".into(), 3, 1, Some("client-1".into()))
    );

    // A requeue opens the next attempt, so it wins over the failure of the previous one.
    client
        .execute(upsert, &[&"requeued", &2i32, &false])
        .await
        .expect("requeue");
    assert_eq!(
        state().await,
        ("requeued".into(), 0, 2, Some("client-1".into()))
    );
}

/// The allocator's queue query reads the partial queue index in order, without a sort.
#[tokio::test]
async fn the_queue_query_uses_the_queue_index() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    // An empty table would be scanned whatever the indexes: take the cheap paths away so
    // the plan shows whether the index can serve the query at all.
    client
        .batch_execute(
            "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off",
        )
        .await
        .expect("planner settings");
    let plan = names(
        &client,
        "EXPLAIN SELECT task_id FROM tasks
         WHERE status IN ('submitted', 'requeued')
         ORDER BY priority DESC, submitted_at
         LIMIT 100",
    )
    .await
    .join("\n");
    assert!(plan.contains("Index Scan using tasks_queue_idx"), "{plan}");
    assert!(!plan.contains("Sort"), "{plan}");
}

/// `worker_payments` puts each accrual in exactly one state, by precedence: paid, in flight, parked (unless a
/// settlement prepared after the park carries it), pending. Amounts are powers of two, so every sum names the
/// accruals in it.
#[tokio::test]
async fn worker_payments_classify_each_accrual_once() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    client
        .batch_execute(
            "CREATE FUNCTION pg_temp.t(n int) RETURNS uuid LANGUAGE sql AS
                 $$ SELECT lpad(to_hex(n), 32, '0')::uuid $$;
             CREATE FUNCTION pg_temp.at(secs int) RETURNS timestamptz LANGUAGE sql AS
                 $$ SELECT '2026-01-01T00:00:00Z'::timestamptz + secs * interval '1 second' $$;

             -- t1 pending (never settled)        t2 paid              t3 pending (its transfer failed)
             -- t4 in flight                      t5 pending (expired) t6 parked
             -- t7 parked (expired settlement prepared before the park)
             -- t8 pending (a settlement prepared after the park carried it, then expired)
             -- t9 in flight (a settlement prepared after the park carries it)
             -- t10 paid, though an open settlement also lists it (paid wins)
             INSERT INTO payment_accruals (task_id, worker_id, attempt, amount_nanoton, gpu_millis,
                                           price_per_gpu_second_nanoton, accrued_at, last_event_id)
             SELECT pg_temp.t(n), 'w', 1, 1::bigint << (n - 1), 1, 1, pg_temp.at(0), gen_random_uuid()
             FROM generate_series(1, 10) n;

             INSERT INTO settlements (settlement_id, status, wallet_seqno, valid_until, message_hash,
                                      tx_hash, total_nanoton, payout_count, prepared_at, confirmed_at,
                                      last_event_id)
             VALUES (pg_temp.t(101), 'confirmed', 1, pg_temp.at(60), 'm1', 'tx1', 1, 2, pg_temp.at(10), pg_temp.at(20), gen_random_uuid()),
                    (pg_temp.t(102), 'confirmed', 2, pg_temp.at(60), 'm2', 'tx2', 1, 1, pg_temp.at(10), pg_temp.at(30), gen_random_uuid()),
                    (pg_temp.t(103), 'submitted', 3, pg_temp.at(60), 'm3', NULL,  1, 1, pg_temp.at(10), NULL, gen_random_uuid()),
                    (pg_temp.t(104), 'expired',   3, pg_temp.at(60), 'm4', NULL,  1, 1, pg_temp.at(-100), NULL, gen_random_uuid()),
                    (pg_temp.t(105), 'expired',   4, pg_temp.at(60), 'm5', NULL,  1, 1, pg_temp.at(100), NULL, gen_random_uuid()),
                    (pg_temp.t(106), 'prepared',  5, pg_temp.at(60), 'm6', NULL,  1, 1, pg_temp.at(100), NULL, gen_random_uuid());

             INSERT INTO settlement_payouts (settlement_id, worker_id, destination_address, amount_nanoton, status)
             VALUES (pg_temp.t(101), 'w', 'UQ-w', 1, 'paid'),
                    (pg_temp.t(101), 'ghost', 'UQ-ghost', 1, 'paid'),
                    (pg_temp.t(102), 'w', 'UQ-w', 1, 'failed'),
                    (pg_temp.t(103), 'w', 'UQ-w', 1, 'pending'),
                    (pg_temp.t(104), 'w', 'UQ-w', 1, 'pending'),
                    (pg_temp.t(105), 'w', 'UQ-w', 1, 'pending'),
                    (pg_temp.t(106), 'w', 'UQ-w', 1, 'pending');

             INSERT INTO settlement_tasks (settlement_id, task_id, worker_id)
             VALUES (pg_temp.t(101), pg_temp.t(2), 'w'), (pg_temp.t(101), pg_temp.t(10), 'w'),
                    (pg_temp.t(102), pg_temp.t(3), 'w'),
                    (pg_temp.t(103), pg_temp.t(4), 'w'), (pg_temp.t(103), pg_temp.t(10), 'w'),
                    (pg_temp.t(104), pg_temp.t(5), 'w'), (pg_temp.t(104), pg_temp.t(7), 'w'),
                    (pg_temp.t(105), pg_temp.t(8), 'w'),
                    (pg_temp.t(106), pg_temp.t(9), 'w');

             INSERT INTO parked_payouts (task_id, worker_id, destination, reason, parked_at, last_event_id)
             SELECT pg_temp.t(n), 'w', 'bad', 'invalid address', pg_temp.at(0), gen_random_uuid()
             FROM generate_series(6, 9) n;",
        )
        .await
        .expect("payment rows");
    let rows: Vec<(String, Vec<i64>, Option<f64>)> = client
        .query(
            "SELECT worker_id,
                    ARRAY[accruals, accrued_nanoton, pending_nanoton, parked_nanoton, in_flight_nanoton,
                          paid_nanoton, failed_transfers],
                    extract(epoch FROM last_paid_at - '2026-01-01T00:00:00Z'::timestamptz)::float8
             FROM worker_payments ORDER BY worker_id",
            &[],
        )
        .await
        .expect("worker_payments")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let pending = 1 + 4 + 16 + 128;
    let parked = 32 + 64;
    let in_flight = 8 + 256;
    let paid = 2 + 512;
    assert_eq!(
        rows,
        vec![
            ("ghost".to_string(), vec![0, 0, 0, 0, 0, 0, 0], Some(20.0)),
            (
                "w".to_string(),
                vec![10, 1023, pending, parked, in_flight, paid, 1],
                Some(20.0)
            ),
        ]
    );
}

#[tokio::test]
async fn the_reader_role_reads_every_table_and_writes_none() {
    let db = TestDb::create().await;
    let client = migrated(&db).await;
    client
        .batch_execute("SET ROLE cocoon_reader")
        .await
        .unwrap();
    for table in EXPECTED_TABLES.iter().chain(EXPECTED_VIEWS) {
        client
            .query(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("cocoon_reader cannot read {table}: {e}"));
    }
    assert_sql_state(
        client
            .execute(
                "INSERT INTO dead_letters (projection, stream, subject, stream_sequence, reason, error_kind, payload) \
                 VALUES ('p', 'TASKS', 'tasks.0.operator', 1, 'r', 'k', '\\x00')",
                &[],
            )
            .await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "insert as cocoon_reader",
    );
    assert_sql_state(
        client.execute("DELETE FROM tasks", &[]).await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "delete as cocoon_reader",
    );
    assert_sql_state(
        client
            .execute("UPDATE projection_checkpoints SET last_sequence = 0", &[])
            .await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "update as cocoon_reader",
    );
    // A table the owner creates later (a rebuild's shadow tables) is readable by default.
    client
        .batch_execute("RESET ROLE; CREATE TABLE later (x int)")
        .await
        .unwrap();
    client
        .batch_execute("SET ROLE cocoon_reader")
        .await
        .unwrap();
    client.query("SELECT x FROM later", &[]).await.unwrap();
}
