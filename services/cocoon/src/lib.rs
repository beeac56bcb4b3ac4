//! `cocoon`: the operator command line of Cocoon GPU Pool.
//!
//! - consumes: any stream, read-only, through ephemeral ordered consumers (`events dump|tail|export`,
//!   `results watch`), and the read models (`tasks get|list|watch`, `workers list`, `payments status`);
//! - produces: sample events (`dev demo`), stream definitions (`provision`), frames of an export file,
//!   republished as they were stored (`events import`), and `TaskSubmitted` (`tasks submit`, through `client`);
//! - owns: nothing but the NATS users it writes (`auth init`); it drives `infra/stack.sh` for the embedded stack and the `schemas` migrator, and `dev pool`
//!   runs the projector, an allocator and node agents as child processes for one sample workload;
//! - guarantees: reading the log never moves a durable consumer and never acks anything.

pub mod auth;
pub mod cli;
pub mod demo;
pub mod dev;
pub mod dump;
pub mod export;
pub mod payments;
pub mod pool_demo;
pub mod pool_ton;
pub mod projections;
pub mod results;
pub mod tasks;
pub mod when;
pub mod workers;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;

use cli::{AuthCommand, Cli, Command, DevCommand, EventsCommand};

/// A stop request, passed to long commands (mini-redis style) instead of global signal state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    notify: Arc<Notify>,
    triggered: Arc<std::sync::atomic::AtomicBool>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.triggered
            .store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once `trigger` has been called (at once if it already was).
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

/// Runs one command to completion.
pub async fn run(cli: Cli, shutdown: Shutdown) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev { command } => match command {
            DevCommand::Up => dev::up(&cli.conn).await.map(|()| ExitCode::SUCCESS),
            DevCommand::Down => dev::down().map(|()| ExitCode::SUCCESS),
            DevCommand::Status => dev::status(&cli.conn).await,
            DevCommand::Demo { tasks } => demo::run(&cli.conn, tasks)
                .await
                .map(|()| ExitCode::SUCCESS),
            DevCommand::Pool(args) => pool_demo::run(&cli.conn, &args, shutdown).await,
        },
        Command::Events { command } => {
            let (filter, follow) = match command {
                EventsCommand::Dump(f) => (f, false),
                EventsCommand::Tail(f) => (f, true),
                EventsCommand::Export(args) => {
                    return export::export_command(&cli.conn, &args, shutdown).await;
                }
                EventsCommand::Import(args) => {
                    return export::import_command(&cli.conn, &args, shutdown).await;
                }
                EventsCommand::Replay(args) => return projections::replay(&cli.conn, &args).await,
            };
            let query = dump::Query::from_filter(&filter, follow)?;
            let bus = connect(&cli.conn).await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let summary = dump::dump(&bus.jetstream, &query, &mut out, shutdown).await?;
            drop(out);
            eprintln!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision { replicas } => {
            let bus = connect(&cli.conn).await?;
            let report = bus::provision_streams(&bus.jetstream, replicas).await?;
            for (stream, outcome) in &report.streams {
                println!("{:<14} {outcome:?}", stream.name());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Projections { command } => projections::run(&cli.conn, command).await,
        Command::Tasks { command } => {
            tasks::run(&cli.conn, command, &mut std::io::stdout(), shutdown).await
        }
        Command::Results { command } => {
            results::run(&cli.conn, command, &mut std::io::stdout(), shutdown).await
        }
        Command::Workers { command } => {
            workers::run(&cli.conn, command, &mut std::io::stdout()).await
        }
        Command::Payments { command } => {
            payments::run(&cli.conn, command, &mut std::io::stdout()).await
        }
        Command::Auth {
            command: AuthCommand::Init(args),
        } => {
            let written = auth::init_command(&args)?;
            print!("{written}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let report = dev::migrate(&cli.conn.database_url).await?;
            println!(
                "applied {:?}; {} already applied",
                report.applied, report.already_applied
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Connects to NATS with a clear error when nothing listens.
pub async fn connect(conn: &cli::Connection) -> anyhow::Result<bus::Bus> {
    let credentials = bus::Credentials::load_optional(conn.nats_credentials.as_deref())?;
    bus::Bus::connect(
        &bus::BusConfig::new(&conn.nats_url, "cocoon-cli").with_credentials(credentials),
    )
    .await
    .with_context(|| "is the stack running? start it with `cocoon dev up` or `infra/stack.sh up`")
}
