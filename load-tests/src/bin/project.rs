//! `project`: the projector's throughput, from publish to committed read-model rows, against the raw limit of
//! Postgres measured in the same run on the same events; and the time a rebuild of the read models takes.
//!
//! `project e2e` generates `events::sample::lifecycle` events (about 6 per task, every stream) once, untimed,
//! publishes them once into a preparation server (untimed) and reads the stored frames back into memory. Then,
//! for each partition-worker count (`--workers 1,2`), it runs the scenarios, each on a fresh database:
//!
//! - `e2e`: a fresh nats-server; the projector starts, the events are published meanwhile by a `bus::Publisher`
//!   (default config); the clock runs from the first publish until every checkpoint row has reached the last
//!   sequence of its stream partition (polled every 10 ms).
//! - `drain`: the events are already stored (the preparation server); the clock runs from the projector's start
//!   until every checkpoint reached its head. The projector alone: fetch, decode, fold, SQL, commit, ack.
//! - `apply`: no NATS: the stored frames, fetched before the clock starts, are fed in the projector's batches to
//!   `projector::worker::apply_batch`, one task per consumer plan, as the projector runs them: decode, fold, SQL.
//! - `store`: no NATS, no decoding, no folding: the batches are decoded and folded before the clock starts, and
//!   the clock covers only the projector's SQL: lock the checkpoints, `projector::store::write_changes`, advance
//!   the checkpoints, commit (one connection per consumer plan, as the projector).
//! - `raw`: the raw limit, without the projector: the same events (pre-encoded, one row each, carrying the
//!   event's bytes) are COPYed in binary into a temporary staging table, then `INSERT … SELECT DISTINCT ON (key)
//!   … ON CONFLICT DO UPDATE … WHERE newer` into a table with a primary key only, and the batch's checkpoints are
//!   upserted in the same transaction; `--raw-batch` (5000) events a batch, over as many connections as partition
//!   workers, each owning the same partitions as that worker. The key is the aggregate (task, worker or
//!   settlement, i.e. the correlation id) per stream, so a batch folds the events of one aggregate into one row,
//!   as the projector does.
//! - `raw-event`: the same with one row per event (key = event id): the brief's setting (every event a new row).
//! - `raw-unnest`: `raw` with the rows sent as arrays to `INSERT … SELECT … FROM unnest(…)` instead of COPY.
//! - `prefold` (not run by default): a prototype of `apply_batch` that decodes and folds a batch before `BEGIN`.
//!
//! CPU time is taken from `/proc` per process (this one, nats-server, every `postgres`), and `pg_stat_activity`
//! is sampled every 20 ms to show what the backends wait on. Before each run the benchmark waits for a quiet
//! machine; a run disturbed by other processes is redone (`--retries`), and a disturbed run that is kept is
//! marked in the report.
//!
//! Every scenario is verified after the clock stops: the read models must hold exactly the rows the generated
//! events imply (tasks, their statuses, allocations, results, accruals, settlements, workers, the dashboard
//! counters) and no dead letter; the raw table exactly one row per key. A run that lost rows aborts.
//!
//! `project rebuild` publishes the events, lets a live projector catch up, then times
//! `projector::ops::rebuild` of each projection (shadow build, catch-up, verification, swap).

use load_tests::machine::{cpu_seconds, date_utc, find_server_pid};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use bus::{Bus, Publisher, PublisherConfig, RangeReader, ReceivedFrame, provision_streams};
use clap::{Parser, Subcommand, ValueEnum};
use events::subjects::Addressing;
use events::{CodecConfig, Event, EventRecord, Partitions, Stream, Subject, Timestamp};
use projector::fold::{Changes, Positioned};
use projector::{ConsumerPlan, PartitionFilter, Projection, ProjectorConfig, plan};
use tests::{NatsServer, TestDb};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "project",
    about = "Projector benchmarks against a real nats-server and Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Events/s from publish to committed rows with checkpoints, and the raw limit of Postgres, same run.
    E2e(E2eArgs),
    /// Seconds to rebuild each projection from the log (shadow build, verification, swap).
    Rebuild(RebuildArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct Common {
    /// Events to generate (rounded up to whole chunks of lifecycles).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Tasks per `lifecycle` chunk (each chunk ends with one settlement listing its tasks).
    #[arg(long, default_value_t = 1000)]
    chunk_tasks: usize,
    /// Workers per `lifecycle` chunk (they spread accruals and allocations over subjects).
    #[arg(long, default_value_t = 16)]
    chunk_workers: usize,
    /// The projector's frames per fetched batch (frames hold up to 50 events).
    #[arg(long, default_value_t = 200)]
    batch_frames: usize,
    /// The projector's fetch wait, in milliseconds.
    #[arg(long, default_value_t = 20)]
    fetch_wait_ms: u64,
    /// How long the projector's batch that is not full waits for more frames, in milliseconds (default: the
    /// projector's).
    #[arg(long)]
    gather_ms: Option<u64>,
    /// Where the projector's workers pick their partitions out of a shared stream: `client` (whole-stream
    /// consumers, other workers' frames skipped) or `server` (consumers filtered by partition subjects)
    /// (default: the projector's).
    #[arg(long)]
    partition_filter: Option<PartitionFilter>,
    /// The publisher's linger in milliseconds (default: `bus::Publisher`'s). One publisher carries every
    /// origin's events here, over about 190 subjects, so its frames close on linger, not on count.
    #[arg(long)]
    linger_ms: Option<u64>,
    /// The dashboard counters' update triggers: as the migrations leave them (`migrations`), or replaced after
    /// migrating by 0009's versions that join the transition tables (`join`: reproduces the quadratic
    /// batches that 0010 removed) or by the join-free versions of 0010 (`join-free`). For `rebuild` the
    /// replacement is installed as an event trigger, so that the shadow schemas get it too.
    #[arg(long, value_enum, default_value = "migrations")]
    counter_triggers: CounterTriggers,
    /// Diagnostic: drop the read models' secondary indexes after migrating (what the indexes cost).
    #[arg(long)]
    drop_secondary_indexes: bool,
    /// Diagnostic: drop the dashboard counter triggers after migrating (what the counters cost); the
    /// counter check of the verification is skipped.
    #[arg(long)]
    drop_counter_triggers: bool,
    /// Write the report here (default `load-tests/out/project-<command>-<date>.md`).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct E2eArgs {
    #[command(flatten)]
    common: Common,
    /// Partition-worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Scenarios to run, in this order for each worker count.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "e2e,drain,apply,store,raw,raw-event,raw-unnest"
    )]
    scenarios: Vec<Scenario>,
    /// Events per batch of the raw scenarios.
    #[arg(long, default_value_t = 5000)]
    raw_batch: usize,
    /// Runs of every scenario (the table shows the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// A run during which other processes used more than this share of the machine's CPU is disturbed: it
    /// is run again (at most `--retries` times), and the least disturbed attempt is kept and marked.
    #[arg(long, default_value_t = 0.05)]
    disturbed_share: f64,
    #[arg(long, default_value_t = 2)]
    retries: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct RebuildArgs {
    #[command(flatten)]
    common: Common,
    /// Partition workers of the live projector and of the rebuild.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Projections to rebuild, one after another.
    #[arg(long, value_delimiter = ',', default_value = "tasks,workers,payments")]
    projections: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CounterTriggers {
    Migrations,
    Join,
    JoinFree,
}

impl CounterTriggers {
    /// The functions to install, if any.
    fn sql(self) -> Option<&'static str> {
        match self {
            CounterTriggers::Migrations => None,
            CounterTriggers::Join => Some(JOIN_TRIGGERS),
            CounterTriggers::JoinFree => Some(JOIN_FREE_TRIGGERS),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    E2e,
    Drain,
    Apply,
    Store,
    Prefold,
    Raw,
    RawEvent,
    RawUnnest,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::E2e => "e2e",
            Scenario::Drain => "drain",
            Scenario::Apply => "apply",
            Scenario::Store => "store",
            Scenario::Prefold => "prefold",
            Scenario::Raw => "raw",
            Scenario::RawEvent => "raw-event",
            Scenario::RawUnnest => "raw-unnest",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Scenario::E2e => {
                "publish (bus::Publisher) + NATS + projector, from the first publish to every checkpoint at its head"
            }
            Scenario::Drain => {
                "projector alone on stored events: fetch, decode, fold, SQL, commit, ack"
            }
            Scenario::Apply => {
                "projector's apply_batch on pre-fetched frames (no NATS): decode, fold, SQL, commit"
            }
            Scenario::Store => {
                "projector's SQL only (pre-folded changes): lock checkpoints, write_changes, checkpoints, commit"
            }
            Scenario::Prefold => {
                "a prototype of a reordered apply_batch (no NATS): decode and fold each batch into one set of changes *before* BEGIN (no per-frame clone and merge), then lock checkpoints, write_changes, checkpoints, commit"
            }
            Scenario::Raw => {
                "raw limit: binary COPY to staging + INSERT … ON CONFLICT per aggregate + checkpoint, one connection per partition worker"
            }
            Scenario::RawEvent => "raw limit with one row per event (the brief's setting)",
            Scenario::RawUnnest => {
                "`raw` with the rows sent as arrays to one `INSERT … SELECT … FROM unnest(…)` (the projector's way) instead of COPY"
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::E2e(args) => e2e_benchmark(args).await,
            Command::Rebuild(args) => rebuild_benchmark(args).await,
        }
    })
}

// ---------------------------------------------------------------------------------------------------------
// Events and what they must produce.

fn generate(common: &Common) -> Vec<EventRecord> {
    let mut out = Vec::with_capacity(common.events + common.chunk_tasks * 11);
    let mut chunk = 0u64;
    while out.len() < common.events {
        let mut events =
            events::sample::lifecycle(common.chunk_tasks.max(1), common.chunk_workers.max(1));
        // Every `lifecycle` confirms its settlement with the same transaction hash, and `settlements.tx_hash`
        // is unique: give each chunk its own, or the second chunk's PAYMENTS frames are (rightly) dead-lettered.
        for r in &mut events {
            if let Event::SettlementConfirmed(e) = &mut r.event {
                e.tx_hash = format!("{chunk:064x}");
            }
        }
        out.extend(events);
        chunk += 1;
    }
    out
}

/// What the generated events imply for the read models.
#[derive(Debug, Default)]
struct Truth {
    events: usize,
    per_stream: BTreeMap<Stream, usize>,
    kinds: BTreeMap<&'static str, i64>,
    workers: i64,
}

impl Truth {
    fn of(records: &[EventRecord]) -> Truth {
        let mut t = Truth {
            events: records.len(),
            ..Truth::default()
        };
        let mut workers = HashSet::new();
        for r in records {
            *t.per_stream.entry(r.event.stream()).or_default() += 1;
            *t.kinds.entry(r.event.kind()).or_default() += 1;
            if let Event::WorkerRegistered(e) = &r.event {
                workers.insert(e.worker_id.to_string());
            }
        }
        t.workers = i64::try_from(workers.len()).unwrap_or(i64::MAX);
        t
    }

    fn kind(&self, k: &str) -> i64 {
        self.kinds.get(k).copied().unwrap_or(0)
    }

    fn events_of(&self, projections: &[Projection]) -> usize {
        projections
            .iter()
            .flat_map(|p| p.streams())
            .map(|s| self.per_stream.get(s).copied().unwrap_or(0))
            .sum()
    }

    fn describe(&self) -> String {
        let streams: Vec<String> = self
            .per_stream
            .iter()
            .map(|(s, n)| format!("{} {}", s.name(), thousands(*n as f64)))
            .collect();
        format!(
            "{} events: {} tasks ({} completed, {} cancelled), {} allocations, {} results, {} accruals, {} settlements, {} workers; per stream: {}",
            thousands(self.events as f64),
            self.kind("TaskSubmitted"),
            self.kind("TaskCompleted"),
            self.kind("TaskCancelled"),
            self.kind("TaskAllocated"),
            self.kind("TaskResult"),
            self.kind("PaymentAccrued"),
            self.kind("SettlementPrepared"),
            self.workers,
            streams.join(", ")
        )
    }
}

/// Fails unless the read models hold exactly what the events imply.
async fn verify(client: &tokio_postgres::Client, truth: &Truth) -> anyhow::Result<()> {
    let counters: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'tasks_count_update'",
            &[],
        )
        .await?
        .get(0);
    let tasks = truth.kind("TaskSubmitted");
    let checks: [(&str, i64); 11] = [
        ("SELECT count(*) FROM tasks", tasks),
        (
            "SELECT count(*) FROM tasks WHERE status = 'completed'",
            truth.kind("TaskCompleted"),
        ),
        (
            "SELECT count(*) FROM tasks WHERE status = 'cancelled'",
            truth.kind("TaskCancelled"),
        ),
        ("SELECT count(*) FROM tasks WHERE client_id IS NULL", 0),
        (
            "SELECT count(*) FROM allocations",
            truth.kind("TaskAllocated"),
        ),
        (
            "SELECT count(*) FROM task_results",
            truth.kind("TaskResult"),
        ),
        (
            "SELECT count(*) FROM payment_accruals",
            truth.kind("PaymentAccrued"),
        ),
        (
            "SELECT count(*) FROM settlements WHERE status = 'confirmed'",
            truth.kind("SettlementConfirmed"),
        ),
        ("SELECT count(*) FROM workers", truth.workers),
        (
            "SELECT coalesce(sum(count), 0)::bigint FROM task_status_totals",
            tasks,
        ),
        ("SELECT count(*) FROM dead_letters", 0),
    ];
    for (sql, want) in checks {
        if counters == 0 && sql.contains("task_status_totals") {
            continue;
        }
        let got: i64 = client.query_one(sql, &[]).await?.get(0);
        ensure!(
            got == want,
            "verification failed: `{sql}` = {got}, expected {want}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Servers.

struct Nats {
    server: NatsServer,
    bus: Bus,
}

async fn start_nats() -> anyhow::Result<Nats> {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(10));
    provision_streams(&bus.jetstream, 1).await?;
    Ok(Nats { server, bus })
}

/// The counter update triggers as migration 0010 writes them (`--counter-triggers join-free`): no join of the
/// transition tables (every updated row is once in `old_rows` and once in `new_rows`, so subtracting the old
/// side's aggregate from the new side's gives the same deltas).
const JOIN_FREE_TRIGGERS: &str = "
CREATE OR REPLACE FUNCTION tasks_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_status_counts AS c (status, shard, count)
    SELECT status, cocoon_shard(), sum(delta)
    FROM (SELECT status, -1 AS delta FROM old_rows UNION ALL SELECT status, 1 FROM new_rows) d
    GROUP BY status
    HAVING sum(delta) <> 0
    ON CONFLICT (status, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION workers_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'active_workers', cocoon_shard(),
           (SELECT count(*) FROM new_rows WHERE status = 'active')
         - (SELECT count(*) FROM old_rows WHERE status = 'active')
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION payouts_sum_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'nanoton_settled', cocoon_shard(),
           coalesce((SELECT sum(amount_nanoton) FROM new_rows WHERE status = 'paid'), 0)
         - coalesce((SELECT sum(amount_nanoton) FROM old_rows WHERE status = 'paid'), 0)
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;";

/// `--counter-triggers` for `rebuild`: the shadow schemas are migrated by the projector itself, so the
/// replacement is installed as an event trigger that replaces the three functions whenever a migration creates
/// or replaces them, in whatever schema (live or shadow). Benchmark scaffolding.
fn patch_event_trigger(functions: &str) -> String {
    let mut branches = String::new();
    for name in [
        "tasks_count_update",
        "workers_count_update",
        "payouts_sum_update",
    ] {
        let start = functions
            .find(&format!("CREATE OR REPLACE FUNCTION {name}()"))
            .unwrap_or(0);
        let end = functions[start..]
            .find("END $$;")
            .map_or(functions.len(), |e| start + e + "END $$;".len());
        let body = functions[start..end].replace(
            &format!("FUNCTION {name}()"),
            &format!("FUNCTION %I.{name}()"),
        );
        let _ = writeln!(
            branches,
            "IF r.object_identity LIKE '%.{name}()' THEN EXECUTE format($f${body}$f$, r.schema_name); END IF;"
        );
    }
    format!(
        "CREATE FUNCTION bench_patch_counters() RETURNS event_trigger LANGUAGE plpgsql AS $ev$
DECLARE r record;
BEGIN
    IF current_setting('bench.patching', true) = 'on' THEN RETURN; END IF;
    PERFORM set_config('bench.patching', 'on', true);
    FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE FUNCTION' LOOP
        {branches}
    END LOOP;
    PERFORM set_config('bench.patching', 'off', true);
END $ev$;
CREATE EVENT TRIGGER bench_patch_counters ON ddl_command_end WHEN TAG IN ('CREATE FUNCTION')
    EXECUTE FUNCTION bench_patch_counters();"
    )
}

/// Which counter update triggers `schema` has: how many of the three join the transition tables.
async fn joined_counter_functions(
    client: &tokio_postgres::Client,
    schema: &str,
) -> anyhow::Result<i64> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = $1 AND p.proname IN ('tasks_count_update', 'workers_count_update', 'payouts_sum_update')
               AND p.prosrc LIKE '%JOIN new_rows%'",
            &[&schema],
        )
        .await?
        .get(0);
    Ok(n)
}

/// Fails unless `schema`'s counter triggers are what `--counter-triggers` asked for.
async fn check_counter_triggers(
    client: &tokio_postgres::Client,
    schema: &str,
    want: CounterTriggers,
) -> anyhow::Result<()> {
    let joined = joined_counter_functions(client, schema).await?;
    match want {
        CounterTriggers::Migrations => {}
        CounterTriggers::Join => ensure!(joined == 3, "{schema}: {joined} of 3 joined"),
        CounterTriggers::JoinFree => ensure!(joined == 0, "{schema}: {joined} of 3 joined"),
    }
    Ok(())
}

/// The schema the benchmark measured: the last migration applied and the kind of counter triggers.
async fn describe_schema(client: &tokio_postgres::Client, common: &Common) -> String {
    let version: i64 = match client
        .query_one("SELECT max(version)::bigint FROM schema_migrations", &[])
        .await
    {
        Ok(row) => row.get::<_, Option<i64>>(0).unwrap_or(0),
        Err(_) => 0,
    };
    let joined = joined_counter_functions(client, "public")
        .await
        .unwrap_or(-1);
    let mut out = format!(
        "schema: migrations up to {version:04}; counter update triggers: {} (`--counter-triggers {}`)",
        match joined {
            0 => "join-free (as 0010)",
            3 => "**joining the transition tables (as 0009)**",
            _ => "mixed",
        },
        match common.counter_triggers {
            CounterTriggers::Migrations => "migrations",
            CounterTriggers::Join => "join",
            CounterTriggers::JoinFree => "join-free",
        }
    );
    if common.drop_secondary_indexes {
        out += "; diagnostic: secondary indexes **dropped**";
    }
    if common.drop_counter_triggers {
        out += "; diagnostic: counter triggers **dropped**";
    }
    out
}

const DROP_SECONDARY_INDEXES: &str = "
DROP INDEX tasks_queue_idx, tasks_worker_status_idx, tasks_client_submitted_idx, tasks_submitted_at_idx,
    allocations_worker_live_idx, task_results_client_idx, payment_accruals_pending_idx,
    payment_accruals_settlement_idx;";

const DROP_COUNTER_TRIGGERS: &str = "
DROP TRIGGER tasks_count_insert ON tasks;
DROP TRIGGER tasks_count_update ON tasks;
DROP TRIGGER workers_count_insert ON workers;
DROP TRIGGER workers_count_update ON workers;
DROP TRIGGER accruals_sum_insert ON payment_accruals;
DROP TRIGGER payouts_sum_update ON settlement_payouts;";

/// The counter update triggers as migration 0009 wrote them (`--counter-triggers join`). They join the
/// transition tables (`old_rows JOIN new_rows USING (task_id)`). PL/pgSQL plans that query once per session,
/// when the transition tables are as small as they will ever be (the first upsert into a fresh table updates
/// nothing), and keeps the plan: a nested loop, so a statement that updates n rows costs O(n²). Measured on
/// this machine: an UPDATE of 8,000 tasks takes 10.9 s after a session's first upsert updated no row, 0.13 s
/// otherwise.
const JOIN_TRIGGERS: &str = "
CREATE OR REPLACE FUNCTION tasks_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_status_counts AS c (status, shard, count)
    SELECT status, cocoon_shard(), sum(delta)
    FROM (
        SELECT o.status, -1 AS delta FROM old_rows o JOIN new_rows n USING (task_id) WHERE o.status <> n.status
        UNION ALL
        SELECT n.status, 1 FROM old_rows o JOIN new_rows n USING (task_id) WHERE o.status <> n.status
    ) d
    GROUP BY status
    ON CONFLICT (status, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION workers_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'active_workers', cocoon_shard(),
           coalesce(sum((n.status = 'active')::int - (o.status = 'active')::int), 0)
    FROM old_rows o JOIN new_rows n USING (worker_id)
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION payouts_sum_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'nanoton_settled', cocoon_shard(),
           coalesce(sum(CASE WHEN n.status = 'paid' AND o.status <> 'paid' THEN n.amount_nanoton
                             WHEN o.status = 'paid' AND n.status <> 'paid' THEN -o.amount_nanoton
                             ELSE 0 END), 0)
    FROM old_rows o JOIN new_rows n USING (settlement_id, worker_id)
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;";

async fn fresh_db(migrate: bool) -> anyhow::Result<(TestDb, tokio_postgres::Client)> {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    if migrate {
        schemas::migrate(&mut client).await?;
    }
    Ok((db, client))
}

/// A migrated database, with the schema changes the flags ask for.
async fn fresh_read_models(common: &Common) -> anyhow::Result<(TestDb, tokio_postgres::Client)> {
    let (db, client) = fresh_db(true).await?;
    if let Some(sql) = common.counter_triggers.sql() {
        client.batch_execute(sql).await?;
    }
    check_counter_triggers(&client, "public", common.counter_triggers).await?;
    if common.drop_secondary_indexes {
        client.batch_execute(DROP_SECONDARY_INDEXES).await?;
    }
    if common.drop_counter_triggers {
        client.batch_execute(DROP_COUNTER_TRIGGERS).await?;
    }
    Ok((db, client))
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

/// The projector's partition filter, as the benchmark runs it.
fn partition_filter(common: &Common) -> &'static str {
    common.partition_filter.unwrap_or_default().name()
}

/// The projector's gather in milliseconds, as the benchmark runs it.
fn gather_ms(common: &Common) -> u128 {
    common.gather_ms.map_or_else(
        || ProjectorConfig::new("", "").gather.as_millis(),
        u128::from,
    )
}

/// ", linger N ms" when the benchmark's publisher does not linger as `bus::Publisher` does by default.
fn linger_note(common: &Common) -> String {
    common
        .linger_ms
        .map(|ms| format!(", but linger {ms} ms"))
        .unwrap_or_default()
}

/// Publishes `records` with the publisher's defaults (but `linger_ms`) and returns the frames stored.
async fn publish_all(
    js: &jetstream::Context,
    records: &[EventRecord],
    linger_ms: Option<u64>,
) -> anyhow::Result<u64> {
    let mut config = PublisherConfig::default();
    if let Some(ms) = linger_ms {
        config.linger = Duration::from_millis(ms);
    }
    let before = stored_messages(js).await?;
    let publisher = Publisher::new(js.clone(), config)?;
    for r in records {
        drop(publisher.publish(r).await?);
    }
    publisher.flush().await?;
    Ok(stored_messages(js).await? - before)
}

/// Messages stored over every event stream.
async fn stored_messages(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut total = 0;
    for stream in Stream::EVENT_STREAMS {
        total += js
            .get_stream(stream.name())
            .await?
            .info()
            .await?
            .state
            .messages;
    }
    Ok(total)
}

/// (projection, stream, partition) as in `projection_checkpoints`.
type Key = (String, String, i32);

/// The last sequence of every stream partition the projections read.
async fn heads(
    js: &jetstream::Context,
    projections: &[Projection],
    partitions: Partitions,
) -> anyhow::Result<BTreeMap<Key, u64>> {
    let mut out = BTreeMap::new();
    for &projection in projections {
        for &stream in projection.streams() {
            let mut s = js.get_stream(stream.name()).await?;
            let key = |p: i32| (projection.name().to_owned(), stream.name().to_owned(), p);
            match stream.addressing() {
                Addressing::Partitioned => {
                    for p in partitions.iter() {
                        let subject = Subject::partition_filter(stream, p);
                        if let Ok(m) = s.get_last_raw_message_by_subject(&subject).await {
                            out.insert(key(i32::from(p.0)), m.sequence);
                        }
                    }
                }
                _ => {
                    let last = s.info().await?.state.last_sequence;
                    if last > 0 {
                        out.insert(key(0), last);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Polls the checkpoints until each has reached its head.
async fn wait_for_heads(
    client: &tokio_postgres::Client,
    heads: &BTreeMap<Key, u64>,
    run: &tokio::task::JoinHandle<anyhow::Result<()>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = client
            .query(
                "SELECT projection, stream, partition, last_sequence FROM projection_checkpoints",
                &[],
            )
            .await?;
        let at: BTreeMap<Key, u64> = rows
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1), r.get(2)),
                    u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                )
            })
            .collect();
        let behind: Vec<String> = heads
            .iter()
            .filter(|(k, h)| at.get(*k).is_none_or(|c| c < *h))
            .map(|(k, h)| format!("{}/{}/{} at {:?} of {h}", k.0, k.1, k.2, at.get(k)))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if run.is_finished() {
            bail!("the projector stopped before reaching the heads: {behind:?}");
        }
        if Instant::now() > deadline {
            bail!("timed out; behind: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn projector_config(nats_url: &str, db_url: &str, workers: usize, c: &Common) -> ProjectorConfig {
    let mut config = ProjectorConfig::new(nats_url, db_url);
    config.workers = workers;
    config.batch_frames = c.batch_frames;
    config.fetch_wait = Duration::from_millis(c.fetch_wait_ms);
    if let Some(ms) = c.gather_ms {
        config.gather = Duration::from_millis(ms);
    }
    if let Some(filter) = c.partition_filter {
        config.partition_filter = filter;
    }
    config.durable_prefix = format!("bench{workers}");
    config
}

// ---------------------------------------------------------------------------------------------------------
// CPU accounting.

#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    own: f64,
    nats: f64,
    /// Every process by pid, so that processes that exit between two snapshots do not subtract their whole
    /// life from a sum, and the busiest other processes can be named.
    processes: BTreeMap<u32, (String, f64)>,
    busy: f64,
    nats_pid: Option<u32>,
}

impl CpuSnapshot {
    fn now(nats_pid: Option<u32>) -> CpuSnapshot {
        CpuSnapshot {
            own: cpu_seconds("/proc/self/stat").unwrap_or(0.0),
            nats: nats_pid
                .and_then(|p| cpu_seconds(&format!("/proc/{p}/stat")))
                .unwrap_or(0.0),
            processes: all_processes(),
            busy: load_tests::machine::system_busy_seconds().unwrap_or(0.0),
            nats_pid,
        }
    }

    /// CPU used since `self`.
    fn elapsed(&self) -> Cpu {
        let now = CpuSnapshot::now(self.nats_pid);
        Cpu {
            own: now.own - self.own,
            nats: now.nats - self.nats,
            postgres: now
                .processes
                .iter()
                .filter(|(_, (name, _))| name == "postgres")
                .map(|(pid, (_, s))| s - self.processes.get(pid).map_or(0.0, |b| b.1))
                .sum(),
            busy: now.busy - self.busy,
            others: busiest_others(&self.processes, std::process::id(), self.nats_pid),
        }
    }
}

/// CPU seconds used during a run.
#[derive(Debug, Clone, Default)]
struct Cpu {
    /// This process: publisher and projector (or the raw writer).
    own: f64,
    nats: f64,
    postgres: f64,
    /// Busy CPU of the whole machine.
    busy: f64,
    /// The busiest other processes, named.
    others: String,
}

impl Cpu {
    fn other(&self) -> f64 {
        (self.busy - self.own - self.nats - self.postgres).max(0.0)
    }
}

/// CPU seconds of every process, by pid, with its name.
fn all_processes() -> BTreeMap<u32, (String, f64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let cpu = cpu_seconds(&e.path().join("stat").to_string_lossy())?;
            Some((pid, (comm.trim().to_owned(), cpu)))
        })
        .collect()
}

/// The busiest other processes between two snapshots (new processes count from zero; processes that exited
/// in between are missing: short-lived ones such as autovacuum workers show only in the machine's total).
fn busiest_others(before: &BTreeMap<u32, (String, f64)>, own: u32, nats: Option<u32>) -> String {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (name, cpu)) in all_processes() {
        if pid == own || Some(pid) == nats || name == "postgres" {
            continue;
        }
        let d = cpu - before.get(&pid).map_or(0.0, |b| b.1);
        if d > 0.0 {
            *by_name.entry(name).or_default() += d;
        }
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, d)| *d >= 0.05).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(4);
    v.iter()
        .map(|(n, d)| format!("{n} {d:.2} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Samples what the benchmark database's backends are doing every 20 ms (`pg_stat_activity`): a cheap profile
/// of where Postgres time goes. `CPU` is an active backend with no wait event (running or runnable).
struct Sampler {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<(u64, BTreeMap<String, u64>)>>,
}

impl Sampler {
    async fn start(url: &str) -> anyhow::Result<Sampler> {
        let client = connect(url).await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut samples = 0u64;
            while !token.is_cancelled() {
                let rows = client
                    .query(
                        "SELECT CASE WHEN state = 'active' THEN coalesce(wait_event_type || ':' || wait_event, 'CPU')
                                     ELSE state END, count(*)
                         FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()
                           AND state IS NOT NULL AND state <> 'idle'
                         GROUP BY 1",
                        &[],
                    )
                    .await?;
                for r in rows {
                    *counts.entry(r.get::<_, String>(0)).or_default() +=
                        u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
                }
                samples += 1;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {},
                    () = token.cancelled() => {},
                }
            }
            Ok((samples, counts))
        });
        Ok(Sampler { stop, handle })
    }

    /// Average number of backends in each state, busiest first.
    async fn finish(self) -> anyhow::Result<String> {
        self.stop.cancel();
        let (samples, counts) = self.handle.await??;
        let mut v: Vec<(String, f64)> = counts
            .into_iter()
            .map(|(k, n)| (k, n as f64 / samples.max(1) as f64))
            .filter(|(_, avg)| *avg >= 0.01)
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v.iter()
            .map(|(k, avg)| format!("{k} {avg:.2}"))
            .collect::<Vec<_>>()
            .join(", "))
    }
}

/// Waits (at most two minutes) until the machine is quiet: less than 10% of one CPU busy over a second.
async fn wait_quiet() -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = load_tests::machine::system_busy_seconds().unwrap_or(0.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = load_tests::machine::system_busy_seconds().unwrap_or(0.0) - before;
        if busy < 0.10 {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!(
                "warning: the machine did not get quiet in 2 minutes ({busy:.2} CPU busy); going on"
            );
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone)]
struct Measured {
    scenario: Scenario,
    workers: usize,
    events: usize,
    secs: f64,
    cpu: Cpu,
    /// Transactions committed (batches), when known.
    batches: Option<usize>,
    /// Average backends per state (`Sampler`).
    waits: String,
    note: String,
    /// Attempts made (disturbed runs are redone).
    attempts: usize,
}

impl Measured {
    /// Share of the machine's CPU that other processes used during the run.
    fn disturbance(&self) -> f64 {
        let capacity =
            self.secs * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        self.cpu.other() / capacity.max(1e-9)
    }
}

impl Measured {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    fn line(&self) -> String {
        let per = |s: f64| s * 1e6 / self.events.max(1) as f64;
        format!(
            "{:<9} workers={} {:>9} events/s  {:.2} s  cpu µs/event: own {:.1}, nats {:.1}, postgres {:.1}, other processes {:.1} ({:.2} s: {}){}{}",
            self.scenario.name(),
            self.workers,
            thousands(self.rate()),
            self.secs,
            per(self.cpu.own),
            per(self.cpu.nats),
            per(self.cpu.postgres),
            per(self.cpu.other()),
            self.cpu.other(),
            self.cpu.others,
            self.batches
                .map(|b| format!(", {b} transactions"))
                .unwrap_or_default(),
            if self.note.is_empty() {
                String::new()
            } else {
                format!(", {}", self.note)
            },
        ) + &format!("\n          backends (avg): {}", self.waits)
    }
}

fn thousands(value: f64) -> String {
    let v = value.round() as i64;
    let digits = v.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 { format!("-{out}") } else { out }
}

async fn postgres_version(client: &tokio_postgres::Client) -> String {
    let mut out = String::new();
    for setting in [
        "server_version",
        "shared_buffers",
        "synchronous_commit",
        "fsync",
    ] {
        if let Ok(row) = client.query_one(&format!("SHOW {setting}"), &[]).await {
            let _ = write!(out, "{setting}={} ", row.get::<_, String>(0));
        }
    }
    out.trim_end().to_owned()
}

fn write_report(common: &Common, command: &str, report: &str) -> anyhow::Result<PathBuf> {
    let path = common.out.clone().unwrap_or_else(|| {
        let stamp = date_utc().replace([':', '-'], "");
        tests::workspace_root()
            .join("load-tests/out")
            .join(format!("project-{command}-{stamp}.md"))
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------------------
// `e2e`.

async fn e2e_benchmark(args: E2eArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let started = date_utc();
    let t = Instant::now();
    let records = generate(common);
    let truth = Truth::of(&records);
    eprintln!(
        "generated {} in {:.1} s",
        truth.describe(),
        t.elapsed().as_secs_f64()
    );

    // The preparation server: the events stored once, for `drain`, and read back for apply/store/raw.
    let prep = start_nats().await?;
    let t = Instant::now();
    publish_all(&prep.bus.jetstream, &records, common.linger_ms).await?;
    let prep_publish = t.elapsed().as_secs_f64();
    let prep_heads = heads(&prep.bus.jetstream, &Projection::ALL, Partitions::DEFAULT).await?;
    let mut frames: BTreeMap<Stream, Vec<ReceivedFrame>> = BTreeMap::new();
    let mut frame_count = 0usize;
    for projection in Projection::ALL {
        for &stream in projection.streams() {
            let mut reader =
                RangeReader::open(&prep.bus.jetstream, stream, Vec::new(), 1, None).await?;
            let mut all = Vec::new();
            loop {
                let batch = reader.next_batch(1000).await?;
                if batch.is_empty() {
                    break;
                }
                all.extend(batch);
            }
            frame_count += all.len();
            frames.insert(stream, all);
        }
    }
    eprintln!(
        "prepared: published in {prep_publish:.2} s ({} events/s), {frame_count} frames ({:.1} events/frame)",
        thousands(truth.events as f64 / prep_publish),
        truth.events as f64 / frame_count.max(1) as f64
    );
    let stored = records_for_raw_check(&frames)?;
    ensure!(
        stored == truth.events,
        "the stored frames hold {stored} events, expected {}",
        truth.events
    );

    let mut results: Vec<Measured> = Vec::new();
    let mut pg_settings = String::new();
    let mut schema_line = String::new();
    for run in 1..=args.runs.max(1) {
        for &workers in &args.workers {
            for &scenario in &args.scenarios {
                let mut best: Option<Measured> = None;
                for attempt in 1..=args.retries + 1 {
                    wait_quiet().await;
                    let m = match scenario {
                        Scenario::E2e => {
                            let nats = start_nats().await?;
                            run_projector(&nats, &records, None, workers, common, &truth).await?
                        }
                        Scenario::Drain => {
                            run_projector(
                                &prep,
                                &records,
                                Some(&prep_heads),
                                workers,
                                common,
                                &truth,
                            )
                            .await?
                        }
                        Scenario::Apply => {
                            run_apply(&prep, &frames, workers, common, &truth).await?
                        }
                        Scenario::Store => {
                            run_store(&frames, workers, common, &truth, false).await?
                        }
                        Scenario::Prefold => {
                            run_store(&frames, workers, common, &truth, true).await?
                        }
                        Scenario::Raw | Scenario::RawEvent | Scenario::RawUnnest => {
                            run_raw(&frames, workers, args.raw_batch, scenario, &truth).await?
                        }
                    };
                    let disturbed = m.disturbance() > args.disturbed_share;
                    eprintln!(
                        "run {run}/{} attempt {attempt}{}: {}",
                        args.runs,
                        if disturbed { " (disturbed)" } else { "" },
                        m.line()
                    );
                    if best
                        .as_ref()
                        .is_none_or(|b| m.disturbance() < b.disturbance())
                    {
                        best = Some(Measured {
                            attempts: attempt,
                            ..m
                        });
                    }
                    if !disturbed {
                        break;
                    }
                }
                results.extend(best);
            }
        }
        if pg_settings.is_empty() {
            let (_db, client) = fresh_read_models(common).await?;
            pg_settings = postgres_version(&client).await;
            schema_line = describe_schema(&client, common).await;
        }
    }
    drop(records);

    // The report.
    let mut r = String::new();
    let _ = writeln!(r, "### Projector (issue 3): `project e2e`\n");
    let _ = writeln!(
        r,
        "- command: `target/release/project e2e {}`",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(r, "- date (UTC): {started}, finished {}", date_utc());
    let _ = writeln!(r, "- machine: {}", load_tests::machine::description());
    let _ = writeln!(
        r,
        "- nats-server 2.15.1 (tests harness: JetStream file storage in a temp dir, loopback); Postgres: {pg_settings}"
    );
    let _ = writeln!(
        r,
        "- events: `lifecycle({}, {})` chunks: {}",
        common.chunk_tasks,
        common.chunk_workers,
        truth.describe()
    );
    let _ = writeln!(
        r,
        "- stored as {frame_count} frames ({:.1} events/frame; `bus::Publisher` defaults{}, published in {prep_publish:.2} s untimed for the preparation server)",
        truth.events as f64 / frame_count.max(1) as f64,
        linger_note(common)
    );
    let _ = writeln!(
        r,
        "- projector: batch_frames {}, fetch_wait {} ms, gather {} ms, partition filter {}, pool = consumers + 2; raw: {} events a batch; {} run(s) per scenario, median shown",
        common.batch_frames,
        common.fetch_wait_ms,
        gather_ms(common),
        partition_filter(common),
        args.raw_batch,
        args.runs
    );
    let _ = writeln!(r, "- {schema_line}\n");
    let _ = writeln!(
        r,
        "| scenario | partition workers | events/s (median) | min – max | seconds | transactions | CPU µs/event: this process / nats / postgres | other processes' CPU (max of kept runs); runs redone |"
    );
    let _ = writeln!(
        r,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut medians: BTreeMap<(Scenario, usize), f64> = BTreeMap::new();
    for &workers in &args.workers {
        for &scenario in &args.scenarios {
            let runs: Vec<&Measured> = results
                .iter()
                .filter(|m| m.scenario == scenario && m.workers == workers)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let rates: Vec<f64> = runs.iter().map(|m| m.rate()).collect();
            let med = median(rates.clone());
            medians.insert((scenario, workers), med);
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            let n = runs.len() as f64;
            let events = runs[0].events.max(1) as f64;
            let avg = |f: &dyn Fn(&Cpu) -> f64| {
                runs.iter().map(|m| f(&m.cpu)).sum::<f64>() / n * 1e6 / events
            };
            let secs = median(runs.iter().map(|m| m.secs).collect());
            let other = runs.iter().map(|m| m.cpu.other()).fold(0.0, f64::max);
            let redone: usize = runs.iter().map(|m| m.attempts - 1).sum();
            let kept_disturbed = runs
                .iter()
                .filter(|m| m.disturbance() > args.disturbed_share)
                .count();
            let _ = writeln!(
                r,
                "| `{}` | {workers} | {} | {} – {} | {secs:.2} | {} | {:.1} / {:.1} / {:.1} | {other:.2} s; {redone} redone{} |",
                scenario.name(),
                thousands(med),
                thousands(min),
                thousands(max),
                runs[0]
                    .batches
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "–".into()),
                avg(&|c| c.own),
                avg(&|c| c.nats),
                avg(&|c| c.postgres),
                if kept_disturbed > 0 {
                    format!(", **{kept_disturbed} disturbed run(s) kept**")
                } else {
                    String::new()
                }
            );
        }
    }
    let _ = writeln!(r);
    for &scenario in &args.scenarios {
        let _ = writeln!(r, "- `{}`: {}", scenario.name(), scenario.what());
    }
    let _ = writeln!(
        r,
        "\nWhat the database's backends were doing (pg_stat_activity every 20 ms, average backends per state; `CPU` = active, no wait event), first run:\n"
    );
    for &workers in &args.workers {
        for &scenario in &args.scenarios {
            if let Some(m) = results
                .iter()
                .find(|m| m.scenario == scenario && m.workers == workers)
            {
                let _ = writeln!(r, "- `{}` {workers}: {}", scenario.name(), m.waits);
            }
        }
    }
    let _ = writeln!(r);
    let get = |s: Scenario, w: usize| medians.get(&(s, w)).copied();
    if let Some(e2e) = get(Scenario::E2e, 2) {
        let _ = writeln!(
            r,
            "- goal (≥ 50,000 events/s end to end with 2 partitions): **{}**, median {} events/s",
            if e2e >= 50_000.0 { "met" } else { "missed" },
            thousands(e2e)
        );
    }
    for w in [1, 2] {
        if let (Some(e2e), Some(raw)) = (get(Scenario::E2e, w), get(Scenario::Raw, w)) {
            let ratio = e2e / raw;
            let _ = writeln!(
                r,
                "- {w} partition worker(s): e2e / raw = {} / {} = **{ratio:.2}**{}",
                thousands(e2e),
                thousands(raw),
                if w == 2 {
                    format!(
                        " (goal ≥ 0.8: **{}**)",
                        if ratio >= 0.8 { "met" } else { "missed" }
                    )
                } else {
                    String::new()
                }
            );
        }
        for s in [
            Scenario::Drain,
            Scenario::Apply,
            Scenario::Prefold,
            Scenario::Store,
        ] {
            if let (Some(x), Some(raw)) = (get(s, w), get(Scenario::Raw, w)) {
                let _ = writeln!(r, "  - {} / raw = {:.2}", s.name(), x / raw.max(1e-9));
            }
        }
    }
    if let Some(v) = get(Scenario::RawEvent, 1) {
        let _ = writeln!(
            r,
            "- raw-event, 1 connection: {} rows/s; the brief measured 44,000–48,000 (COPY to staging + INSERT … ON CONFLICT, 5000 a batch, 1 connection)",
            thousands(v)
        );
    }
    if let Some(v) = get(Scenario::RawEvent, 2) {
        let _ = writeln!(
            r,
            "- raw-event, 2 connections: {} rows/s; the brief measured 68,000 over 2 connections",
            thousands(v)
        );
    }
    if let Some(v) = get(Scenario::E2e, 2) {
        let _ = writeln!(
            r,
            "- e2e, 2 partitions: {} events/s; the brief measured 68,000–75,000 end to end with the checkpoint in the same transaction",
            thousands(v)
        );
    }
    println!("{r}");
    let path = write_report(common, "e2e", &r)?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// `e2e` (publish while the projector runs, `known_heads` None) or `drain` (events already stored).
async fn run_projector(
    nats: &Nats,
    records: &[EventRecord],
    known_heads: Option<&BTreeMap<Key, u64>>,
    workers: usize,
    common: &Common,
    truth: &Truth,
) -> anyhow::Result<Measured> {
    let (db, client) = fresh_read_models(common).await?;
    let config = projector_config(&nats.server.url(), db.url(), workers, common);
    let nats_pid = find_server_pid(nats.server.port());
    let shutdown = CancellationToken::new();
    let sampler = Sampler::start(db.url()).await?;
    let cpu0 = CpuSnapshot::now(nats_pid);
    let t0 = Instant::now();
    let run = tokio::spawn(projector::run(config, shutdown.clone(), false));
    let mut note = String::new();
    let heads = match known_heads {
        Some(h) => h.clone(),
        None => {
            let frames = publish_all(&nats.bus.jetstream, records, common.linger_ms).await?;
            let published = t0.elapsed().as_secs_f64();
            note = format!(
                "published in {published:.2} s ({} events/s) as {frames} frames ({:.1} events/frame)",
                thousands(records.len() as f64 / published),
                records.len() as f64 / frames.max(1) as f64
            );
            heads(&nats.bus.jetstream, &Projection::ALL, Partitions::DEFAULT).await?
        }
    };
    wait_for_heads(&client, &heads, &run, Duration::from_secs(600)).await?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.elapsed();
    let waits = sampler.finish().await?;
    shutdown.cancel();
    run.await??;
    verify(&client, truth).await?;
    Ok(Measured {
        scenario: if known_heads.is_some() {
            Scenario::Drain
        } else {
            Scenario::E2e
        },
        workers,
        events: truth.events,
        secs,
        cpu,
        batches: None,
        waits,
        note,
        attempts: 1,
    })
}

fn plan_frames<'a>(
    p: &ConsumerPlan,
    frames: &'a BTreeMap<Stream, Vec<ReceivedFrame>>,
) -> Vec<&'a ReceivedFrame> {
    frames
        .get(&p.stream)
        .map(|all| {
            all.iter()
                .filter(|f| match p.stream.addressing() {
                    Addressing::Partitioned => p.partitions.contains(&p.partition_of(&f.subject)),
                    _ => true,
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn run_apply(
    nats: &Nats,
    frames: &BTreeMap<Stream, Vec<ReceivedFrame>>,
    workers: usize,
    common: &Common,
    truth: &Truth,
) -> anyhow::Result<Measured> {
    let (db, client) = fresh_read_models(common).await?;
    let plans = plan(&Projection::ALL, workers, Partitions::DEFAULT);
    let ctx = projector::worker::Ctx {
        pool: projector::pool(db.url(), "public", plans.len() + 2)?,
        js: nats.bus.jetstream.clone(),
        codec: CodecConfig::default(),
        batch_frames: common.batch_frames,
        fetch_wait: Duration::from_millis(common.fetch_wait_ms),
        gather: Duration::ZERO,
        // Each plan is handed its own frames only (`plan_frames`).
        partition_filter: PartitionFilter::Server,
        durable_prefix: "apply".into(),
    };
    let mut work = Vec::new();
    let mut batches = 0;
    for p in plans {
        projector::worker::checkpoint_floor(&ctx, &p).await?;
        let mine: Vec<ReceivedFrame> = plan_frames(&p, frames).into_iter().cloned().collect();
        let chunks: Vec<Vec<ReceivedFrame>> = mine
            .chunks(common.batch_frames.max(1))
            .map(<[ReceivedFrame]>::to_vec)
            .collect();
        batches += chunks.len();
        work.push((p, chunks));
    }
    // Open every connection before the clock starts.
    let mut held = Vec::new();
    for _ in 0..work.len() {
        held.push(ctx.pool.get().await?);
    }
    drop(held);
    let sampler = Sampler::start(db.url()).await?;
    let cpu0 = CpuSnapshot::now(None);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (p, chunks) in work {
        let ctx = ctx.clone();
        set.spawn(async move {
            for chunk in &chunks {
                projector::worker::apply_batch(&ctx, &p, chunk).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.elapsed();
    let waits = sampler.finish().await?;
    verify(&client, truth).await?;
    Ok(Measured {
        scenario: Scenario::Apply,
        workers,
        events: truth.events,
        secs,
        cpu,
        batches: Some(batches),
        waits,
        note: String::new(),
        attempts: 1,
    })
}

/// One batch, decoded and folded as the projector would, with the checkpoints it advances.
struct Folded {
    changes: Changes,
    advanced: BTreeMap<u16, (u64, Timestamp)>,
}

fn fold_batches(
    p: &ConsumerPlan,
    frames: &[&ReceivedFrame],
    batch_frames: usize,
) -> anyhow::Result<Vec<Folded>> {
    let codec = CodecConfig::default();
    let mut out = Vec::new();
    for chunk in frames.chunks(batch_frames.max(1)) {
        let mut changes = Changes::default();
        let mut advanced: BTreeMap<u16, (u64, Timestamp)> = BTreeMap::new();
        for f in chunk {
            let partition = p.partition_of(&f.subject);
            let entry = advanced.entry(partition).or_insert((0, f.stored_at));
            if f.stream_sequence > entry.0 {
                *entry = (f.stream_sequence, f.stored_at);
            }
            let records = f.decode(&codec)?;
            for (index, record) in records.iter().enumerate() {
                changes.add(Positioned {
                    stream: p.stream,
                    seq: f.stream_sequence,
                    index: u32::try_from(index)?,
                    record,
                })?;
            }
        }
        out.push(Folded { changes, advanced });
    }
    Ok(out)
}

/// The projector's checkpoint lock (`worker.rs`).
async fn lock_checkpoints(
    tx: &tokio_postgres::Transaction<'_>,
    p: &ConsumerPlan,
) -> Result<(), tokio_postgres::Error> {
    let partitions: Vec<i32> = p.partitions.iter().map(|&x| i32::from(x)).collect();
    tx.query(
        "SELECT partition, last_sequence FROM projection_checkpoints
         WHERE projection = $1 AND stream = $2 AND partition = ANY($3)
         ORDER BY partition FOR UPDATE",
        &[&p.projection.name(), &p.stream.name(), &partitions],
    )
    .await?;
    Ok(())
}

/// The projector's checkpoint advance (`worker.rs`).
async fn save_checkpoints(
    tx: &tokio_postgres::Transaction<'_>,
    p: &ConsumerPlan,
    advanced: &BTreeMap<u16, (u64, Timestamp)>,
) -> Result<(), tokio_postgres::Error> {
    let partitions: Vec<i32> = advanced.keys().map(|&x| i32::from(x)).collect();
    let seqs: Vec<i64> = advanced
        .values()
        .map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX))
        .collect();
    let at: Vec<i64> = advanced.values().map(|(_, t)| t.as_micros()).collect();
    tx.execute(
        "INSERT INTO projection_checkpoints AS c (projection, stream, partition, last_sequence, last_event_at)
         SELECT $1, $2, p, s, 'epoch'::timestamptz + at * interval '1 microsecond'
         FROM unnest($3::int4[], $4::int8[], $5::int8[]) AS u(p, s, at)
         ON CONFLICT (projection, stream, partition) DO UPDATE SET
            last_sequence = greatest(c.last_sequence, EXCLUDED.last_sequence),
            last_event_at = CASE WHEN EXCLUDED.last_sequence > c.last_sequence THEN EXCLUDED.last_event_at
                                 ELSE c.last_event_at END,
            updated_at = now()",
        &[&p.projection.name(), &p.stream.name(), &partitions, &seqs, &at],
    )
    .await?;
    Ok(())
}

async fn run_store(
    frames: &BTreeMap<Stream, Vec<ReceivedFrame>>,
    workers: usize,
    common: &Common,
    truth: &Truth,
    prefold: bool,
) -> anyhow::Result<Measured> {
    let (db, client) = fresh_read_models(common).await?;
    let mut work = Vec::new();
    let mut batches = 0;
    for p in plan(&Projection::ALL, workers, Partitions::DEFAULT) {
        let mine = plan_frames(&p, frames);
        // `store`: folded now, before the clock; `prefold`: the frames, folded batch by batch on the clock.
        let (folded, raw_frames) = if prefold {
            batches += mine.len().div_ceil(common.batch_frames.max(1));
            (Vec::new(), mine.into_iter().cloned().collect::<Vec<_>>())
        } else {
            let folded = fold_batches(&p, &mine, common.batch_frames)?;
            batches += folded.len();
            (folded, Vec::new())
        };
        let conn = connect(db.url()).await?;
        let partitions: Vec<i32> = p.partitions.iter().map(|&x| i32::from(x)).collect();
        conn.execute(
            "INSERT INTO projection_checkpoints (projection, stream, partition, last_sequence)
             SELECT $1, $2, p, 0 FROM unnest($3::int4[]) p ON CONFLICT DO NOTHING",
            &[&p.projection.name(), &p.stream.name(), &partitions],
        )
        .await?;
        work.push((p, folded, raw_frames, conn));
    }
    let batch_frames = common.batch_frames.max(1);
    let sampler = Sampler::start(db.url()).await?;
    let cpu0 = CpuSnapshot::now(None);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (p, folded, raw_frames, mut conn) in work {
        set.spawn(async move {
            for b in &folded {
                let tx = conn.transaction().await?;
                lock_checkpoints(&tx, &p).await?;
                projector::store::write_changes(&tx, &b.changes).await?;
                save_checkpoints(&tx, &p, &b.advanced).await?;
                tx.commit().await?;
            }
            for chunk in raw_frames.chunks(batch_frames) {
                let refs: Vec<&ReceivedFrame> = chunk.iter().collect();
                for b in fold_batches(&p, &refs, usize::MAX)? {
                    let tx = conn.transaction().await?;
                    lock_checkpoints(&tx, &p).await?;
                    projector::store::write_changes(&tx, &b.changes).await?;
                    save_checkpoints(&tx, &p, &b.advanced).await?;
                    tx.commit().await?;
                }
            }
            // Keep the connection (its backend's CPU time) until the clock stops.
            anyhow::Ok(conn)
        });
    }
    let mut open = Vec::new();
    while let Some(done) = set.join_next().await {
        open.push(done??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.elapsed();
    drop(open);
    let waits = sampler.finish().await?;
    verify(&client, truth).await?;
    Ok(Measured {
        scenario: if prefold {
            Scenario::Prefold
        } else {
            Scenario::Store
        },
        workers,
        events: truth.events,
        secs,
        cpu,
        batches: Some(batches),
        waits,
        note: String::new(),
        attempts: 1,
    })
}

// ---------------------------------------------------------------------------------------------------------
// The raw limit.

/// One staging row: an event keyed by its aggregate (or by itself), carrying its encoded bytes.
struct RawRow {
    key: Uuid,
    stream: i16,
    kind: &'static str,
    position: i64,
    at: i64,
    data: Vec<u8>,
}

struct RawBatch {
    stream: Stream,
    rows: Vec<RawRow>,
    advanced: BTreeMap<u16, u64>,
}

fn stream_index(s: Stream) -> i16 {
    Stream::EVENT_STREAMS
        .iter()
        .position(|x| *x == s)
        .and_then(|i| i16::try_from(i).ok())
        .unwrap_or(-1)
}

/// Decodes every stored frame once (sanity check that the frames hold every event); returns the event count.
fn records_for_raw_check(frames: &BTreeMap<Stream, Vec<ReceivedFrame>>) -> anyhow::Result<usize> {
    let codec = CodecConfig::default();
    let mut n = 0;
    for f in frames.values().flatten() {
        n += f.decode(&codec)?.len();
    }
    Ok(n)
}

fn raw_batches(
    p: &ConsumerPlan,
    frames: &[&ReceivedFrame],
    batch_events: usize,
    per_event: bool,
    keys: &mut BTreeSet<(Uuid, i16)>,
) -> anyhow::Result<Vec<RawBatch>> {
    let codec = CodecConfig::default();
    let mut out = Vec::new();
    let new_batch = || RawBatch {
        stream: p.stream,
        rows: Vec::with_capacity(batch_events + 50),
        advanced: BTreeMap::new(),
    };
    let mut batch = new_batch();
    for f in frames {
        let partition = p.partition_of(&f.subject);
        let seq = batch.advanced.entry(partition).or_insert(0);
        *seq = (*seq).max(f.stream_sequence);
        for (index, record) in f.decode(&codec)?.iter().enumerate() {
            let key = if per_event {
                record.envelope.event_id.0
            } else {
                record.envelope.correlation_id.0
            };
            let stream = stream_index(p.stream);
            keys.insert((key, stream));
            batch.rows.push(RawRow {
                key,
                stream,
                kind: record.event.kind(),
                position: projector::fold::position(f.stream_sequence, u32::try_from(index)?),
                at: record.envelope.occurred_at.as_micros(),
                data: events::frame::encode_event(record)?,
            });
        }
        if batch.rows.len() >= batch_events {
            out.push(std::mem::replace(&mut batch, new_batch()));
        }
    }
    if !batch.rows.is_empty() {
        out.push(batch);
    }
    Ok(out)
}

const RAW_SCHEMA: &str = "
    CREATE TABLE raw_rows (
        key         uuid        NOT NULL,
        stream      smallint    NOT NULL,
        kind        text        NOT NULL,
        position    bigint      NOT NULL,
        occurred_at timestamptz NOT NULL,
        data        bytea       NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (key, stream));
    CREATE TABLE raw_checkpoints (
        stream        text    NOT NULL,
        partition     integer NOT NULL,
        last_sequence bigint  NOT NULL,
        updated_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream, partition));";

const RAW_STAGING: &str =
    "CREATE TEMP TABLE raw_staging (key uuid, stream int2, kind text, position int8,
    occurred_at int8, data bytea) ON COMMIT DELETE ROWS";

const RAW_COPY: &str =
    "COPY raw_staging (key, stream, kind, position, occurred_at, data) FROM STDIN (FORMAT binary)";

const RAW_UPSERT: &str =
    "INSERT INTO raw_rows AS r (key, stream, kind, position, occurred_at, data)
    SELECT DISTINCT ON (key, stream) key, stream, kind, position,
           'epoch'::timestamptz + occurred_at * interval '1 microsecond', data
    FROM raw_staging ORDER BY key, stream, position DESC
    ON CONFLICT (key, stream) DO UPDATE SET kind = EXCLUDED.kind, position = EXCLUDED.position,
        occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data, updated_at = now()
    WHERE EXCLUDED.position > r.position";

const RAW_UPSERT_UNNEST: &str =
    "INSERT INTO raw_rows AS r (key, stream, kind, position, occurred_at, data)
    SELECT DISTINCT ON (key, stream) key, stream, kind, position,
           'epoch'::timestamptz + occurred_at * interval '1 microsecond', data
    FROM unnest($1::uuid[], $2::int2[], $3::text[], $4::int8[], $5::int8[], $6::bytea[])
      AS u(key, stream, kind, position, occurred_at, data)
    ORDER BY key, stream, position DESC
    ON CONFLICT (key, stream) DO UPDATE SET kind = EXCLUDED.kind, position = EXCLUDED.position,
        occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data, updated_at = now()
    WHERE EXCLUDED.position > r.position";

const RAW_CHECKPOINT: &str = "INSERT INTO raw_checkpoints AS c (stream, partition, last_sequence)
    SELECT $1, p, s FROM unnest($2::int4[], $3::int8[]) AS u(p, s)
    ON CONFLICT (stream, partition) DO UPDATE SET
        last_sequence = greatest(c.last_sequence, EXCLUDED.last_sequence), updated_at = now()";

/// Binary COPY of the rows into the connection's staging table.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[RawRow],
) -> Result<(), tokio_postgres::Error> {
    let types = [
        Type::UUID,
        Type::INT2,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::BYTEA,
    ];
    let sink = tx.copy_in(RAW_COPY).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        writer
            .as_mut()
            .write(&[
                &row.key,
                &row.stream,
                &row.kind,
                &row.position,
                &row.at,
                &row.data,
            ])
            .await?;
    }
    writer.as_mut().finish().await?;
    Ok(())
}

async fn run_raw(
    frames: &BTreeMap<Stream, Vec<ReceivedFrame>>,
    workers: usize,
    batch_events: usize,
    scenario: Scenario,
    truth: &Truth,
) -> anyhow::Result<Measured> {
    let per_event = scenario == Scenario::RawEvent;
    let unnest = scenario == Scenario::RawUnnest;
    let (db, client) = fresh_db(false).await?;
    client.batch_execute(RAW_SCHEMA).await?;
    let mut keys = BTreeSet::new();
    // Connection c owns the consumer plans of partition worker c; its batches interleave round-robin.
    let mut per_conn: Vec<Vec<Vec<RawBatch>>> = (0..workers.max(1)).map(|_| Vec::new()).collect();
    let mut expected_checkpoints: BTreeMap<(String, i32), u64> = BTreeMap::new();
    let mut total_events = 0;
    let mut batches = 0;
    for p in plan(&Projection::ALL, workers, Partitions::DEFAULT) {
        let b = raw_batches(
            &p,
            &plan_frames(&p, frames),
            batch_events,
            per_event,
            &mut keys,
        )?;
        for batch in &b {
            total_events += batch.rows.len();
            for (part, seq) in &batch.advanced {
                let e = expected_checkpoints
                    .entry((p.stream.name().to_owned(), i32::from(*part)))
                    .or_insert(0);
                *e = (*e).max(*seq);
            }
        }
        batches += b.len();
        per_conn[p.worker].push(b);
    }
    ensure!(
        total_events == truth.events,
        "raw batches hold {total_events} events, expected {}",
        truth.events
    );
    let mut work = Vec::new();
    for plans in per_conn {
        let mut order = Vec::new();
        let mut iters: Vec<_> = plans.into_iter().map(Vec::into_iter).collect();
        loop {
            let mut any = false;
            for it in &mut iters {
                if let Some(b) = it.next() {
                    order.push(b);
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        let conn = connect(db.url()).await?;
        conn.batch_execute(RAW_STAGING).await?;
        work.push((order, conn));
    }
    let sampler = Sampler::start(db.url()).await?;
    let cpu0 = CpuSnapshot::now(None);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (order, mut conn) in work {
        set.spawn(async move {
            for b in &order {
                let tx = conn.transaction().await?;
                if unnest {
                    let key: Vec<Uuid> = b.rows.iter().map(|r| r.key).collect();
                    let stream: Vec<i16> = b.rows.iter().map(|r| r.stream).collect();
                    let kind: Vec<&str> = b.rows.iter().map(|r| r.kind).collect();
                    let position: Vec<i64> = b.rows.iter().map(|r| r.position).collect();
                    let at: Vec<i64> = b.rows.iter().map(|r| r.at).collect();
                    let data: Vec<&[u8]> = b.rows.iter().map(|r| r.data.as_slice()).collect();
                    tx.execute(
                        RAW_UPSERT_UNNEST,
                        &[&key, &stream, &kind, &position, &at, &data],
                    )
                    .await?;
                } else {
                    copy_rows(&tx, &b.rows).await?;
                    tx.execute(RAW_UPSERT, &[]).await?;
                }
                let parts: Vec<i32> = b.advanced.keys().map(|&x| i32::from(x)).collect();

                let seqs: Vec<i64> = b
                    .advanced
                    .values()
                    .map(|&s| i64::try_from(s).unwrap_or(i64::MAX))
                    .collect();
                tx.execute(RAW_CHECKPOINT, &[&b.stream.name(), &parts, &seqs])
                    .await?;
                tx.commit().await?;
            }
            // Keep the connection (its backend's CPU time) until the clock stops.
            anyhow::Ok(conn)
        });
    }
    let mut open = Vec::new();
    while let Some(done) = set.join_next().await {
        open.push(done??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu0.elapsed();
    drop(open);
    let waits = sampler.finish().await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM raw_rows", &[])
        .await?
        .get(0);
    ensure!(
        rows == i64::try_from(keys.len())?,
        "raw: {rows} rows, expected {}",
        keys.len()
    );
    for ((stream, part), seq) in &expected_checkpoints {
        let got: i64 = client
            .query_one(
                "SELECT last_sequence FROM raw_checkpoints WHERE stream = $1 AND partition = $2",
                &[stream, part],
            )
            .await?
            .get(0);
        ensure!(
            u64::try_from(got)? == *seq,
            "raw checkpoint {stream}/{part}: {got}, expected {seq}"
        );
    }
    Ok(Measured {
        scenario,
        workers,
        events: truth.events,
        secs,
        cpu,
        batches: Some(batches),
        waits,
        note: format!("{} rows upserted", thousands(keys.len() as f64)),
        attempts: 1,
    })
}

// ---------------------------------------------------------------------------------------------------------
// `rebuild`.

async fn rebuild_benchmark(args: RebuildArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let projections: Vec<Projection> = args
        .projections
        .iter()
        .map(|p| Projection::parse(p).with_context(|| format!("unknown projection {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    let started = date_utc();
    let records = generate(common);
    let truth = Truth::of(&records);
    eprintln!("generated {}", truth.describe());
    let nats = start_nats().await?;
    let nats_pid = find_server_pid(nats.server.port());
    let (db, client) = match common.counter_triggers.sql() {
        Some(sql) => {
            let (db, mut client) = fresh_db(false).await?;
            client.batch_execute(&patch_event_trigger(sql)).await?;
            schemas::migrate(&mut client).await?;
            check_counter_triggers(&client, "public", common.counter_triggers).await?;
            (db, client)
        }
        None => fresh_read_models(common).await?,
    };
    let schema_line = describe_schema(&client, common).await;
    let pg_settings = postgres_version(&client).await;
    let t = Instant::now();
    publish_all(&nats.bus.jetstream, &records, common.linger_ms).await?;
    let published = t.elapsed().as_secs_f64();
    drop(records);
    let config = projector_config(&nats.server.url(), db.url(), args.workers, common);
    let t = Instant::now();
    projector::run(config.clone(), CancellationToken::new(), true).await?;
    let live = t.elapsed().as_secs_f64();
    verify(&client, &truth).await?;
    eprintln!(
        "published in {published:.2} s; live projector caught up in {live:.2} s (until idle)"
    );

    let mut rows = Vec::new();
    let t_all = Instant::now();
    let cpu_all = CpuSnapshot::now(nats_pid);
    for &projection in &projections {
        let cpu0 = CpuSnapshot::now(nats_pid);
        let t = Instant::now();
        let mut last = Instant::now();
        let report = projector::ops::rebuild(&config, projection, &mut |p| {
            if last.elapsed() > Duration::from_secs(2) {
                eprintln!("  {projection}: {p}");
                last = Instant::now();
            }
        })
        .await?;
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu0.elapsed();
        check_counter_triggers(&client, &report.shadow_schema, common.counter_triggers).await?;
        let events = truth.events_of(&[projection]);
        let table_rows: i64 = report.tables.values().map(|s| s.rows).sum();
        eprintln!(
            "rebuild {projection}: {events} events in {secs:.2} s ({} events/s), {table_rows} rows",
            thousands(events as f64 / secs)
        );
        let paused = report.live_paused.as_secs_f64();
        rows.push((projection, events, secs, paused, cpu, table_rows));
    }
    let total_secs = t_all.elapsed().as_secs_f64();
    let total_cpu = cpu_all.elapsed();
    // Where the live tables' triggers point after the swaps (their functions are not moved with the tables).
    let trigger_homes: Vec<String> = client
        .query(
            "SELECT c.relname || '.' || t.tgname || ' -> ' || n.nspname || '.' || p.proname
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace cn ON cn.oid = c.relnamespace
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE NOT t.tgisinternal AND cn.nspname = 'public' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // What the verification costs: the rebuild fingerprints the live and the shadow tables once each.
    let mut fingerprint_secs = Vec::new();
    for &projection in &projections {
        let t = Instant::now();
        projector::verify::fingerprint(&client, "public", projection.tables()).await?;
        fingerprint_secs.push((projection, t.elapsed().as_secs_f64()));
    }
    verify(&client, &truth).await?;

    let mut r = String::new();
    let _ = writeln!(r, "### Projector (issue 3): `project rebuild`\n");
    let _ = writeln!(
        r,
        "- command: `target/release/project rebuild {}`",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(r, "- date (UTC): {started}, finished {}", date_utc());
    let _ = writeln!(r, "- machine: {}", load_tests::machine::description());
    let _ = writeln!(
        r,
        "- nats-server 2.15.1 (tests harness, file storage); Postgres: {pg_settings}"
    );
    let _ = writeln!(
        r,
        "- events: `lifecycle({}, {})` chunks: {}",
        common.chunk_tasks,
        common.chunk_workers,
        truth.describe()
    );
    let _ = writeln!(
        r,
        "- published in {published:.2} s{}; the live projector ({} partition workers, batch_frames {}, fetch_wait {} ms, gather {} ms, partition filter {}) caught up from zero in {live:.2} s ({} events/s, until idle); rows verified before and after the rebuilds\n",
        linger_note(common),
        args.workers,
        common.batch_frames,
        common.fetch_wait_ms,
        gather_ms(common),
        partition_filter(common),
        thousands(truth.events as f64 / live)
    );
    let _ = writeln!(
        r,
        "- {schema_line}{}\n",
        if common.counter_triggers == CounterTriggers::Migrations {
            ""
        } else {
            " (installed by an event trigger, in the live and in every shadow schema; checked after each rebuild)"
        }
    );
    let _ = writeln!(
        r,
        "| projection | events in its streams | rebuild seconds | of which the live checkpoints were locked (catch-up, verification, swap) | events/s | rows rebuilt | CPU µs/event: this process / nats / postgres (live backends only) | CPU of exited processes (the rebuild's own Postgres backends, gone when it returns) and others |"
    );
    let _ = writeln!(
        r,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let per = |s: f64, n: usize| s * 1e6 / n.max(1) as f64;
    for (projection, events, secs, paused, cpu, table_rows) in &rows {
        let _ = writeln!(
            r,
            "| `{projection}` | {} | {secs:.2} | {paused:.2} | {} | {} | {:.1} / {:.1} / {:.1} | {:.2} s |",
            thousands(*events as f64),
            thousands(*events as f64 / secs),
            thousands(*table_rows as f64),
            per(cpu.own, *events),
            per(cpu.nats, *events),
            per(cpu.postgres, *events),
            cpu.other()
        );
    }
    let total_events: usize = rows.iter().map(|r| r.1).sum();
    let _ = writeln!(
        r,
        "| all, one after another | {} | {total_secs:.2} | | {} | | {:.1} / {:.1} / {:.1} | {:.2} s |\n",
        thousands(total_events as f64),
        thousands(total_events as f64 / total_secs),
        per(total_cpu.own, total_events),
        per(total_cpu.nats, total_events),
        per(total_cpu.postgres, total_events),
        total_cpu.other()
    );
    let _ = writeln!(
        r,
        "- of which verification: the rebuild fingerprints (count + sum of 64-bit row hashes) the live and the shadow tables; one fingerprint of the rebuilt tables took {} afterwards, so about twice that per rebuild",
        fingerprint_secs
            .iter()
            .map(|(p, s)| format!("{s:.2} s for `{p}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        r,
        "- after the swaps, the live tables' triggers call: {}",
        trigger_homes.join(", ")
    );
    let _ = writeln!(
        r,
        "- goal (a rebuild of 1M events in at most 25 s): **{}**: {} events rebuilt in {total_secs:.2} s",
        if total_events >= 1_000_000 && total_secs <= 25.0 {
            "met"
        } else if total_secs <= 25.0 {
            "met for the events measured (fewer than 1M)"
        } else {
            "missed"
        },
        thousands(total_events as f64)
    );
    println!("{r}");
    let path = write_report(common, "rebuild", &r)?;
    eprintln!("report written to {}", path.display());
    Ok(())
}
