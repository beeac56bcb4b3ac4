//! `projections status|rebuild|reset` and `events replay`: the operator's side of the projector.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use events::{Partitions, Stream, Timestamp};
use projector::ops::{self, Progress, RebuildError, ResetTo};
use projector::{Projection, ProjectorConfig};

use crate::cli::{Connection, ProjectionsCommand, ReplayArgs};
use crate::when::parse_instant;

fn projection(name: &str) -> anyhow::Result<Projection> {
    Projection::parse(name).with_context(|| {
        format!(
            "unknown projection {name:?}; projections are {}",
            Projection::ALL.map(|p| p.name()).join(", ")
        )
    })
}

fn config(conn: &Connection) -> anyhow::Result<ProjectorConfig> {
    let mut config = ProjectorConfig::new(&conn.nats_url, &conn.database_url);
    config.nats_credentials = bus::Credentials::load_optional(conn.nats_credentials.as_deref())?;
    Ok(config)
}

fn print_progress(p: Progress) {
    eprintln!("… {p}");
}

async fn database(conn: &Connection) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&conn.database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "cannot connect to Postgres at {}",
                crate::dev::redact(&conn.database_url)
            )
        })?;
    tokio::spawn(connection);
    Ok(client)
}

pub async fn run(conn: &Connection, command: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ProjectionsCommand::Status => {
            let bus = crate::connect(conn).await?;
            let client = database(conn).await?;
            let (rows, dead) = ops::status(
                &bus.jetstream,
                &client,
                &Projection::ALL,
                Partitions::DEFAULT,
            )
            .await?;
            println!(
                "{:<10} {:<13} {:>4} {:>11} {:>11} {:>9} {:>10} {:>9}",
                "projection",
                "stream",
                "part",
                "checkpoint",
                "head",
                "lag frm",
                "lag events",
                "lag s"
            );
            for r in rows {
                println!(
                    "{:<10} {:<13} {:>4} {:>11} {:>11} {:>9} {:>10} {:>9.1}",
                    r.projection.name(),
                    r.stream.name(),
                    r.partition,
                    r.checkpoint,
                    r.head,
                    r.lag_frames,
                    r.lag_events,
                    r.lag_seconds
                );
            }
            for p in Projection::ALL {
                println!(
                    "dead letters {:<10} {}",
                    p.name(),
                    dead.get(p.name()).copied().unwrap_or(0)
                );
            }
            let counts: Vec<String> = client
                .query(
                    "SELECT status, count FROM task_status_totals WHERE count <> 0 ORDER BY status",
                    &[],
                )
                .await?
                .iter()
                .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect();
            let stats = client
                .query_one(
                    "SELECT active_workers, nanoton_accrued, nanoton_settled FROM dashboard_stats",
                    &[],
                )
                .await?;
            println!(
                "tasks: {}",
                if counts.is_empty() {
                    "none".to_string()
                } else {
                    counts.join(", ")
                }
            );
            println!(
                "workers active: {}; accrued: {}; settled: {}",
                stats.get::<_, i64>(0),
                events::Nanoton(u64::try_from(stats.get::<_, i64>(1)).unwrap_or(0)),
                events::Nanoton(u64::try_from(stats.get::<_, i64>(2)).unwrap_or(0))
            );
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Rebuild {
            name,
            wait_for_live_s,
        } => {
            let projection = projection(&name)?;
            let mut config = config(conn)?;
            if let Some(s) = wait_for_live_s {
                config.rebuild_wait_for_live = Duration::from_secs(s);
            }
            match ops::rebuild(&config, projection, &mut print_progress).await {
                Ok(report) => {
                    println!(
                        "rebuilt {} in {:.1}s; verified and swapped (the live projector's writes waited {:.2}s); previous tables kept in schema {}",
                        projection.name(),
                        report.elapsed.as_secs_f64(),
                        report.live_paused.as_secs_f64(),
                        report.retired_schema
                    );
                    for (table, sum) in &report.tables {
                        println!(
                            "  {table:<20} {:>10} rows  checksum {}",
                            sum.rows, sum.checksum
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(RebuildError::Mismatch { schema, diffs }) => {
                    eprintln!(
                        "verification failed: nothing was swapped; the shadow build is in schema {schema}"
                    );
                    for (table, live, shadow) in diffs {
                        eprintln!("  {table}: live {live:?} vs shadow {shadow:?}");
                    }
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
        ProjectionsCommand::Reset {
            name,
            from_seq,
            since,
        } => {
            let projection = projection(&name)?;
            let to = match (from_seq, since) {
                (Some(seq), _) => ResetTo::Sequence(seq),
                (None, Some(s)) => ResetTo::Since(parse_instant(&s, Timestamp::now())?),
                (None, None) => bail!("give --from-seq or --since"),
            };
            let bus = crate::connect(conn).await?;
            let client = database(conn).await?;
            let moved = ops::reset(&bus.jetstream, &client, projection, to, "projector").await?;
            for (stream, seq) in moved {
                println!(
                    "{} {}: checkpoint at most {seq}",
                    projection.name(),
                    stream.name()
                );
            }
            println!("takes effect when the projector (re)starts");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn replay(conn: &Connection, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let projection = projection(&args.projection)?;
    let stream =
        Stream::parse(&args.stream).with_context(|| format!("unknown stream {:?}", args.stream))?;
    let config = config(conn)?;
    let from = match (&args.since, args.from_seq) {
        (Some(since), _) => {
            let t = parse_instant(since, Timestamp::now())?;
            let bus = crate::connect(conn).await?;
            first_sequence_since(&bus.jetstream, stream, t).await?
        }
        (None, seq) => seq.unwrap_or(1),
    };
    let ops::ReplaySummary {
        frames,
        events,
        dead_letters_resolved,
    } = ops::replay(
        &config,
        projection,
        stream,
        from,
        args.to_seq,
        &mut print_progress,
    )
    .await?;
    println!(
        "replayed {frames} frames ({events} events) of {} through {}; dead letters now applied and marked replayed: {dead_letters_resolved}",
        stream.name(),
        projection.name()
    );
    Ok(ExitCode::SUCCESS)
}

async fn first_sequence_since(
    js: &async_nats::jetstream::Context,
    stream: Stream,
    t: Timestamp,
) -> anyhow::Result<u64> {
    use futures_util::StreamExt;
    let s = js.get_stream(stream.name()).await?;
    let c = s
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartTime {
                start_time: crate::when::to_offset(t)?,
            },
            headers_only: true,
            ..Default::default()
        })
        .await?;
    if c.cached_info().num_pending == 0 {
        bail!("nothing stored in {} since {t}", stream.name());
    }
    let mut m = c.messages().await?;
    let first = m.next().await.context("no message")??;
    Ok(first
        .info()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .stream_sequence)
}
