//! `projector`: builds the Postgres read models from the event log, exactly once.
//!
//! - consumes: every event stream (TASKS, ALLOCATIONS, RESULTS, WORKERS, ATTESTATIONS, PAYMENTS), through
//!   one durable pull consumer per (projection, stream, partition set): by default the process's partitions,
//!   which its partition workers share, each applying its own in its own transaction ([`PartitionFilter`]);
//!   several processes can share the partitions ([`instance`]);
//! - produces: dead letters (DEAD_LETTERS stream and `dead_letters` table) for frames it cannot apply;
//! - owns: the read-model tables of its projections, their checkpoints, and the dashboard counters (kept by
//!   triggers on those tables);
//! - guarantees: rows and the checkpoint of each (projection, stream, partition) commit in one transaction,
//!   and only then is the batch acked; a frame at or below its checkpoint changes nothing; on start each
//!   consumer begins after the database checkpoint, not its ack floor; rows converge whatever the
//!   interleaving of streams (see [`fold`]).

pub mod fold;
pub mod instance;
pub mod metrics;
pub mod ops;
pub mod projection;
pub mod store;
pub mod verify;
pub mod worker;

use std::time::Duration;

use anyhow::Context as _;
use events::{CodecConfig, Partitions};
use tokio_util::sync::CancellationToken;

pub use instance::{Instance, InstanceError, instance_plan};
pub use projection::{ConsumerPlan, Projection, plan};

/// Dead-letter headers: where the frame came from and why it could not be applied.
pub const DL_PROJECTION: &str = "Cocoon-DL-Projection";
pub const DL_STREAM: &str = "Cocoon-DL-Stream";
pub const DL_SUBJECT: &str = "Cocoon-DL-Subject";
pub const DL_SEQUENCE: &str = "Cocoon-DL-Sequence";
pub const DL_KIND: &str = "Cocoon-DL-Kind";
pub const DL_REASON: &str = "Cocoon-DL-Reason";

/// The projector's settings.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    pub nats_url: String,
    /// The NATS user to connect as (`bus::auth::Role::Projector`); `None` on a server without users.
    pub nats_credentials: Option<bus::Credentials>,
    pub database_url: String,
    /// Schema the read models live in (a rebuild writes a shadow schema).
    pub schema: String,
    pub projections: Vec<Projection>,
    /// Partition workers: partition p of each stream belongs to worker p mod `workers`.
    pub workers: usize,
    /// This process's share of the partitions when several projector processes run (see [`instance`]).
    pub instance: Instance,
    pub partitions: Partitions,
    /// Frames fetched per batch (each frame holds up to 50 events).
    pub batch_frames: usize,
    /// How long a fetch waits for the first frame.
    pub fetch_wait: Duration,
    /// How long a batch that has frames but is not full waits for more (zero: take what is there). Under a
    /// steady inflow this makes fewer, larger transactions: in the projector benchmark's `e2e`, 10 ms cut
    /// Postgres's and NATS's CPU per event and raised the median from 35,527 to 46,741 events/s.
    pub gather: Duration,
    /// Where a partition worker's frames are picked out of a stream that several workers share.
    pub partition_filter: PartitionFilter,
    /// Prefix of durable consumer names; a rebuild uses its own.
    pub durable_prefix: String,
    pub codec: CodecConfig,
    /// Run the migrations on start.
    pub migrate: bool,
    /// How long a rebuild waits for the live projection to reach the shadow's position (the live projector
    /// must be running, or caught up) before it gives up, swapping nothing.
    pub rebuild_wait_for_live: Duration,
}

/// Where a partition worker's frames are picked out of a partitioned stream that several workers share.
///
/// A consumer filtered by partition subjects costs nats-server, while the consumer lags, a walk over the
/// subjects of a message block for every frame delivered; with a subject per origin (about 190 in the
/// projector benchmark) that was a third of the server's CPU there with 2 workers. Measured in
/// load-tests/RESULTS.md ("Projector").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionFilter {
    /// The process's workers of one (projection, stream) share one unfiltered consumer: each frame is
    /// delivered once, and each worker skips, by subject and without decoding, the frames of partitions it does
    /// not own ([`worker::consumer_groups`]). Several processes each read the stream whole.
    #[default]
    Client,
    /// Each worker's consumer is filtered by the subjects of the partitions it owns.
    Server,
}

/// A partition filter other than `client` or `server`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown partition filter {0:?}: use client or server")]
pub struct UnknownPartitionFilter(pub String);

impl std::str::FromStr for PartitionFilter {
    type Err = UnknownPartitionFilter;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "client" => Ok(PartitionFilter::Client),
            "server" => Ok(PartitionFilter::Server),
            _ => Err(UnknownPartitionFilter(s.to_owned())),
        }
    }
}

impl PartitionFilter {
    pub fn name(self) -> &'static str {
        match self {
            PartitionFilter::Client => "client",
            PartitionFilter::Server => "server",
        }
    }
}

impl ProjectorConfig {
    /// How to reach NATS, as this config's user, under the connection name `name`.
    pub fn bus_config(&self, name: impl Into<String>) -> bus::BusConfig {
        bus::BusConfig::new(&self.nats_url, name).with_credentials(self.nats_credentials.clone())
    }

    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_credentials: None,
            database_url: database_url.into(),
            schema: "public".into(),
            projections: Projection::ALL.to_vec(),
            workers: 2,
            instance: Instance::SOLE,
            partitions: Partitions::DEFAULT,
            batch_frames: 200,
            fetch_wait: Duration::from_millis(500),
            gather: Duration::from_millis(10),
            partition_filter: PartitionFilter::default(),
            durable_prefix: "projector".into(),
            codec: CodecConfig::default(),
            migrate: true,
            rebuild_wait_for_live: Duration::from_secs(120),
        }
    }
}

/// A pool whose connections use `schema` as their search path.
pub fn pool(
    database_url: &str,
    schema: &str,
    size: usize,
) -> anyhow::Result<deadpool_postgres::Pool> {
    let mut pg: tokio_postgres::Config = database_url.parse().context("invalid database URL")?;
    if !schema
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        || schema.is_empty()
    {
        anyhow::bail!("invalid schema name {schema:?}");
    }
    pg.options(format!("-c search_path={schema}"));
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()
        .context("building the pool")
}

/// Creates `schema` if it is not there and brings it to the newest migration; `client`'s search path must be
/// `schema` (see [`pool`]).
pub(crate) async fn migrate_schema(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> anyhow::Result<()> {
    if schema != "public" {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
    }
    schemas::migrate(client).await?;
    Ok(())
}

/// Runs the projector until `shutdown` (or, with `until_idle`, until every consumer has drained its stream).
pub async fn run(
    config: ProjectorConfig,
    shutdown: CancellationToken,
    until_idle: bool,
) -> anyhow::Result<()> {
    let plans = instance_plan(
        &config.projections,
        config.workers,
        config.instance,
        config.partitions,
    );
    if plans.is_empty() {
        anyhow::bail!(
            "instance {} of {} owns no partition of {} partitions; run fewer instances",
            config.instance.index(),
            config.instance.count(),
            config.partitions.count()
        );
    }
    let pool = pool(&config.database_url, &config.schema, plans.len() + 2)?;
    if config.migrate {
        let mut client = pool.get().await.context("connecting to Postgres")?;
        migrate_schema(&mut client, &config.schema).await?;
    }
    // Streams are provisioned by the operator (`cocoon provision`), with the deployment's replica count;
    // a missing stream stops the projector with an error that says so.
    let name = match config.instance.count() {
        1 => "projector".to_owned(),
        _ => format!("projector-{}", config.instance.index()),
    };
    let bus = bus::Bus::connect(&config.bus_config(name)).await?;
    let ctx = worker::Ctx {
        pool,
        js: bus.jetstream.clone(),
        codec: config.codec,
        batch_frames: config.batch_frames,
        fetch_wait: config.fetch_wait,
        gather: config.gather,
        partition_filter: config.partition_filter,
        durable_prefix: config.durable_prefix.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for group in worker::consumer_groups(plans, config.partition_filter) {
        tasks.spawn(worker::run_group(
            ctx.clone(),
            group,
            shutdown.clone(),
            until_idle,
        ));
    }
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(error = %e, "consumer stopped");
            first_error.get_or_insert(e);
            shutdown.cancel();
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
