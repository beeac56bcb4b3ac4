//! The command line, as clap types. Defaults point at the embedded stack of `infra/stack.sh`.

use clap::{Args, Parser, Subcommand};

/// Operate a Cocoon GPU Pool: the dev stack, the event log, tasks, results and workers.
#[derive(Debug, Parser)]
#[command(name = "cocoon", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the pool's servers are.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// NATS server URL.
    #[arg(
        long,
        env = "COCOON_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// Postgres URL of the read models.
    #[arg(
        long,
        env = "COCOON_DATABASE_URL",
        default_value = "postgres://cocoon@127.0.0.1:55432/cocoon",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// NATS credentials file (`user = ...`, `password = ...`, from `cocoon auth init`); an operator's for the
    /// operator commands. Without it the connection is unauthenticated (the development server).
    #[arg(long, env = "COCOON_NATS_CREDENTIALS", global = true)]
    pub nats_credentials: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The embedded development stack (nats-server and Postgres on loopback).
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Read the event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Create or update the JetStream streams (idempotent).
    Provision {
        /// Copies of each stream: 1, or 3 on a cluster.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Apply the read-model migrations (idempotent).
    Migrate,
    /// Inspect, reset and rebuild the read-model projections (tasks, workers, payments).
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Submit tasks and read their state (as a producer).
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Follow a client's results (as a consumer).
    Results {
        #[command(subcommand)]
        command: ResultsCommand,
    },
    /// The pool's workers, from the read model.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Accruals and settlements, from the read model.
    Payments {
        #[command(subcommand)]
        command: PaymentsCommand,
    },
    /// NATS users and permissions per role.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Write the server's users and permissions (`<dir>/auth.conf`, to `include` from the nats-server config)
    /// and one credentials file per user (`<dir>/creds/<user>.creds`), both readable by their owner only.
    /// Run again with more workers or producers to add them; existing passwords are kept. Reload the server
    /// afterwards (`nats-server --signal reload`).
    Init(AuthInitArgs),
}

/// `auth init`: where, and which workers and producers besides the services and the operator.
#[derive(Debug, Clone, Args)]
pub struct AuthInitArgs {
    /// Directory to write into (created when missing).
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// A worker id to make a user for (repeat the flag).
    #[arg(long = "worker", value_name = "ID")]
    pub workers: Vec<String>,
    /// A producer's client id to make a user for (repeat the flag).
    #[arg(long = "producer", value_name = "CLIENT_ID")]
    pub producers: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PaymentsCommand {
    /// Totals (accrued, pending, parked, in flight, paid), per-worker amounts, open settlements and the latest
    /// closed ones.
    Status(PaymentsStatusArgs),
}

/// `payments status`: which worker, how many recent settlements.
#[derive(Debug, Clone, Args)]
pub struct PaymentsStatusArgs {
    /// Only this worker's row (totals still cover every worker).
    #[arg(long = "worker", value_name = "ID")]
    pub worker_id: Option<String>,
    /// How many closed (confirmed, expired, failed) settlements to show, newest first.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
}

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// Submit one task from flags, or many from a JSON Lines file; prints each new task id.
    Submit(SubmitArgs),
    /// One task's state from the read model.
    Get {
        /// The task id (a UUID).
        task_id: String,
    },
    /// Tasks from the read model, newest first, as a table.
    List(ListArgs),
    /// Print a task's state each time it changes, until it is final (or Ctrl-C).
    Watch {
        /// The task id (a UUID).
        task_id: String,
    },
}

/// `tasks submit`: one task from flags, or `--file` for many.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Client id: results go to `results.<client>`.
    #[arg(long = "client", value_name = "ID", required_unless_present = "file")]
    pub client_id: Option<String>,
    /// GPUs the task needs on one worker.
    #[arg(long, default_value_t = client::request::DEFAULT_GPU_COUNT)]
    pub gpus: u16,
    /// GPU memory needed on each GPU, in MiB (0: any).
    #[arg(long, default_value_t = client::request::DEFAULT_GPU_MEMORY_MIB)]
    pub gpu_memory_mib: u64,
    /// Model or affinity tag.
    #[arg(long)]
    pub model_tag: Option<String>,
    /// 1 (lowest) to 10 (highest).
    #[arg(long, default_value_t = client::request::DEFAULT_PRIORITY)]
    pub priority: u8,
    /// The most the client pays per GPU-second, in nanoton (no default: money is never guessed).
    #[arg(long, value_name = "NANOTON", required_unless_present = "file")]
    pub max_price: Option<u64>,
    /// Wall-clock limit of one attempt, in milliseconds.
    #[arg(long, default_value_t = client::request::DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// The task's input, as text.
    #[arg(long, conflicts_with = "input_file")]
    pub input: Option<String>,
    /// The task's input, the bytes of this file.
    #[arg(long, value_name = "PATH")]
    pub input_file: Option<std::path::PathBuf>,
    /// Submit every request of this JSON Lines file (`-`: stdin), one object per line; the whole file is
    /// checked first, and nothing is submitted if a line is bad.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["client_id", "gpus", "gpu_memory_mib", "model_tag", "priority", "max_price",
            "timeout_ms", "input", "input_file"]
    )]
    pub file: Option<std::path::PathBuf>,
    /// Then follow the task(s) until final; exits non-zero unless every task completed.
    #[arg(long)]
    pub wait: bool,
}

/// `tasks list`: which tasks.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only tasks in this state (submitted, allocated, running, completed, failed, cancelled, requeued, expired,
    /// rejected).
    #[arg(long)]
    pub status: Option<String>,
    /// Only this client's tasks.
    #[arg(long = "client", value_name = "ID")]
    pub client_id: Option<String>,
    /// Only tasks whose current attempt is on this worker.
    #[arg(long = "worker", value_name = "ID")]
    pub worker_id: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Debug, Subcommand)]
pub enum ResultsCommand {
    /// Print a client's results as they are stored (stream seq, task, attempt, worker, checksum, size, output
    /// preview), and keep following until Ctrl-C or --limit.
    Watch(ResultsWatchArgs),
}

/// `results watch`: whose results, from where.
#[derive(Debug, Clone, Args)]
pub struct ResultsWatchArgs {
    /// The client whose results to follow (`results.<client>`).
    #[arg(long = "client", value_name = "ID")]
    pub client_id: String,
    /// Start at this stream sequence (inclusive); default: every result the stream holds.
    #[arg(long, conflicts_with = "new")]
    pub from_seq: Option<u64>,
    /// Only results stored from now on.
    #[arg(long)]
    pub new: bool,
    /// Stop after this many results.
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Every worker the read model knows: status, admission (attested or not), price, load, GPUs (simulated ones
    /// marked), last heartbeat.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Per projection and partition: checkpoint, stream head, lag in frames, events and seconds; dead letters.
    Status,
    /// Rebuild a projection from the log into a shadow schema, verify it against the live tables, swap.
    Rebuild {
        /// tasks, workers or payments.
        name: String,
        /// How long to wait, once the shadow is built, for the live projection to reach its position (the
        /// projector must be running, or caught up); past it nothing is swapped and the shadow is dropped
        /// (default: the projector's, 120 s).
        #[arg(long)]
        wait_for_live_s: Option<u64>,
    },
    /// Wind a projection's checkpoints back so that frames from a point are applied again (a running projector
    /// starts again from there).
    Reset {
        /// tasks, workers or payments.
        name: String,
        /// Apply again from this stream sequence (in every stream of the projection).
        #[arg(long, conflicts_with = "since", required_unless_present = "since")]
        from_seq: Option<u64>,
        /// Apply again from the first frame stored at or after this time (RFC 3339 or an age like 15m).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Install what is missing, start the stack, provision the streams, migrate the database.
    Up,
    /// Stop the stack (data is kept under .cocoon/).
    Down,
    /// Whether the stack is running, and what the streams hold.
    Status,
    /// Publish a small sample of the pool's life (a worker, its attestation, tasks through to payment).
    Demo {
        /// How many tasks to run through the lifecycle.
        #[arg(long, default_value_t = 3)]
        tasks: usize,
    },
    /// Run the pool for real: start the projector, an allocator (admitting UNATTESTED workers: development
    /// only) and node agents (on the NVIDIA GPUs, or simulated GPUs without one), submit a sample workload,
    /// show it allocated, executed and completed with its results, then stop the services.
    Pool(PoolArgs),
}

/// `dev pool`: how long to wait and which GPUs to use.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Give up (and exit non-zero) when the workload is not final after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Use simulated GPUs even when an NVIDIA GPU is present.
    #[arg(long)]
    pub simulate: bool,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print events already in the log as JSON lines, then exit.
    Dump(Filter),
    /// Follow the log: print new events as JSON lines until interrupted.
    Tail(Filter),
    /// Write frames of the log to a compressed file (zstd, MessagePack records), to move or inspect offline.
    Export(ExportArgs),
    /// Publish the frames of an export file, as they were stored, into (empty) streams.
    Import(ImportArgs),
    /// Apply a range of a stream again through a projection, regardless of its checkpoint (idempotent).
    Replay(ReplayArgs),
}

/// A range of one stream to re-apply through one projection.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// tasks, workers or payments.
    #[arg(long)]
    pub projection: String,
    /// The stream to read (one the projection reads).
    #[arg(long)]
    pub stream: String,
    /// First stream sequence (inclusive); default the start of the stream.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last stream sequence (inclusive); default the end of the stream.
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Start at the first frame stored at or after this time (RFC 3339 or an age like 15m).
    #[arg(long, conflicts_with = "from_seq")]
    pub since: Option<String>,
}

/// `events export`: the file and which frames.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// File to write; `-` writes to stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: std::path::PathBuf,
    /// Which frames (--type and --limit are refused: export moves whole frames).
    #[command(flatten)]
    pub filter: Filter,
}

/// `events import`: the file and where it may go.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Export file to read (a file, not stdin: it is checked whole before anything is published).
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: std::path::PathBuf,
    /// Import only these streams of the file (tasks, allocations, ...); repeatable. Default: all of them.
    #[arg(long = "stream", short = 's', value_name = "STREAM")]
    pub streams: Vec<String>,
    /// Import into streams that already hold messages (frames they hold are dropped as duplicates only
    /// within the duplicate window).
    #[arg(long)]
    pub allow_non_empty: bool,
}

/// Which events to print. Filters combine with AND.
#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// Streams to read (tasks, allocations, workers, attestations, payments, results, deadletters); repeatable.
    /// Default: every event stream, or the streams of the given subjects.
    #[arg(long = "stream", short = 's', value_name = "STREAM")]
    pub streams: Vec<String>,
    /// Subjects to read, wildcards allowed (e.g. `tasks.3`, `allocations.*`); repeatable.
    #[arg(long = "subject", value_name = "SUBJECT")]
    pub subjects: Vec<String>,
    /// First stream sequence to print (inclusive).
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last stream sequence to print (inclusive).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Only frames stored at or after this time: RFC 3339 (`2026-11-22T21:00:00Z`) or an age (`90s`, `15m`, `2h`, `1d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only frames stored at or before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only events of these types (e.g. TaskSubmitted); repeatable.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Stop after printing this many events.
    #[arg(long)]
    pub limit: Option<usize>,
}
