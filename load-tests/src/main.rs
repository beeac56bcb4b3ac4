//! Load drivers and benchmarks against a real nats-server; `load-tests publish` measures publisher throughput.
//!
//! `publish` starts one nats-server (the pinned binary, JetStream, file storage in a temp dir), pre-generates
//! the events, then runs every scenario `--runs` times, interleaved (run 1 of every scenario, then run 2, ...)
//! so that drift of the machine affects all scenarios alike. Each run publishes into a freshly created TASKS
//! stream and is timed from the first publish until every event is acknowledged (`flush` returned Ok, or the
//! last ack future resolved). After the clock stops, the stream is read back (headers only) and the run fails
//! unless the frames in the stream carry exactly the events that were sent: a benchmark that lost events
//! silently would be worthless. The benchmark shares the machine with whatever else runs there: it waits for an
//! idle second before each run, measures the CPU time of every other process during the run, and runs a
//! disturbed run again (`--max-interference`, `--retries`, `--max-wait-s`).
//!
//! Scenarios (comma-separated; `name:K` publishes from K concurrent tasks sharing one publisher):
//! - `frames50-zstd`: the bus `Publisher` with its defaults (frames of 50, linger 5 ms, 64 frames of 50 in
//!   flight, zstd-1 above 1 KiB);
//! - `frames50-raw`: the same without compression (threshold `usize::MAX`), to show what zstd buys;
//! - `single`: the bus `Publisher` with one event per frame and 1024 events in flight;
//! - `raw-single`: no publisher: async-nats JetStream publishes of pre-encoded one-event frames (the same
//!   headers and `Nats-Msg-Id` as `single` puts on the wire), 1024 ack futures in flight; the ceiling of one
//!   event per message;
//! - `raw-frames50-zstd`: no publisher: async-nats publishes of frames of 50 events per subject, encoded and
//!   compressed before the clock starts, 64 ack futures in flight; the ceiling of the server and the transport
//!   for frames, i.e. what the publisher would reach if encoding, compression and its bookkeeping were free.

use load_tests::machine::{cpu_seconds, date_utc, find_server_pid};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::{self, message::PublishMessage};
use bus::{Bus, Publisher, PublisherConfig};
use clap::{Parser, Subcommand};
use events::frame::{HEADER_EVENT_COUNT, encode_event, encode_frame};
use events::{CodecConfig, EventRecord, Partitions, Stream};
use futures_util::StreamExt as _;

#[derive(Debug, Parser)]
#[command(name = "load-tests", about = "Benchmarks against a real nats-server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publisher throughput: frames of 50 (zstd) against one event per message, in the same run.
    Publish(PublishArgs),
}

#[derive(Debug, clap::Args)]
struct PublishArgs {
    /// Events per run.
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// Target encoded size of one TaskSubmitted event, in bytes.
    #[arg(long, default_value_t = 350)]
    event_size: usize,
    /// The inline task input: the sample's repeating pattern, or random bytes (incompressible).
    #[arg(long, value_enum, default_value = "pattern")]
    input: InputKind,
    /// Timed runs per scenario; the table shows their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scenarios, comma-separated: frames50-zstd, frames50-raw, single, raw-single, raw-frames50-zstd;
    /// `name:K` publishes from K concurrent tasks (publisher scenarios only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "frames50-zstd,frames50-zstd:2,frames50-raw,single,raw-single,raw-frames50-zstd"
    )]
    scenarios: Vec<Scenario>,
    /// Frames scenarios: linger in milliseconds (publisher default 5).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Frames scenarios: frames of 50 in flight (publisher default 64, i.e. 3200 events); also the ack
    /// futures in flight for `raw-frames50-zstd`.
    #[arg(long)]
    frames_in_flight: Option<usize>,
    /// Events in flight for `single` and ack futures in flight for `raw-single`.
    #[arg(long, default_value_t = 1024)]
    single_in_flight: usize,
    /// A run during which other processes used more CPU than this share of one core (measured from
    /// /proc/stat) is run again, up to `--retries` times; the table says how many runs were redone.
    #[arg(long, default_value_t = 0.05)]
    max_interference: f64,
    /// How many times a run disturbed by other processes is run again.
    #[arg(long, default_value_t = 3)]
    retries: usize,
    /// Before each run, wait (in total over the whole benchmark, at most this many seconds) until the
    /// machine has been idle for a second: other processes below `--max-interference` of one core.
    #[arg(long, default_value_t = 900)]
    max_wait_s: u64,
    /// Events published (untimed) before the first run, to warm up the server and the connection.
    #[arg(long, default_value_t = 50_000)]
    warmup_events: usize,
    /// Where to write the markdown report (default: load-tests/out/publish-<date>.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InputKind {
    Pattern,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Frames { compress: bool },
    Single,
    RawSingle,
    RawFrames,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Scenario {
    label: String,
    kind: Kind,
    /// Concurrent publishing tasks.
    tasks: usize,
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, tasks) = match s.split_once(':') {
            Some((name, k)) => (
                name,
                k.parse::<usize>()
                    .ok()
                    .filter(|k| *k >= 1)
                    .ok_or_else(|| format!("bad task count in {s:?}"))?,
            ),
            None => (s, 1),
        };
        let kind = match name {
            "frames50-zstd" => Kind::Frames { compress: true },
            "frames50-raw" => Kind::Frames { compress: false },
            "single" => Kind::Single,
            "raw-single" => Kind::RawSingle,
            "raw-frames50-zstd" => Kind::RawFrames,
            _ => {
                return Err(format!(
                    "unknown scenario {name:?}; known: frames50-zstd, frames50-raw, single, raw-single, \
                     raw-frames50-zstd"
                ));
            }
        };
        if matches!(kind, Kind::RawSingle | Kind::RawFrames) && tasks != 1 {
            return Err(format!("{name} publishes from one task"));
        }
        Ok(Scenario {
            label: s.to_owned(),
            kind,
            tasks,
        })
    }
}

/// One timed run, verified.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    elapsed: Duration,
    events: u64,
    frames: u64,
    /// Sum of message payloads (frame bodies, compressed where compressed), as stored.
    payload_bytes: u64,
    /// CPU seconds of this process (the publisher side) during the run.
    client_cpu: f64,
    /// CPU seconds of nats-server during the run.
    server_cpu: f64,
    /// CPU seconds of every other process on the machine during the run (interference).
    other_cpu: f64,
    /// CPU seconds stolen by the hypervisor during the run.
    steal_cpu: f64,
}

impl RunResult {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// Other processes used more than `max_share` of one core during the run. /proc/stat counts in clock
    /// ticks (10 ms): a few ticks of background are not interference.
    fn disturbed(&self, max_share: f64) -> bool {
        self.other_cpu > (max_share * self.elapsed.as_secs_f64()).max(0.03)
    }
}

/// The stream every TaskSubmitted lands in.
const STREAM: Stream = Stream::Tasks;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Command::Publish(args) => runtime.block_on(publish_benchmark(args)),
    }
}

async fn publish_benchmark(args: PublishArgs) -> anyhow::Result<()> {
    ensure!(
        args.events > 0 && args.runs > 0,
        "--events and --runs must be positive"
    );
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let started_at = date_utc();

    let nats = tests::NatsServer::start().await;
    let client = nats.client().await;
    let server_version = client.server_info().version;
    let server_pid = find_server_pid(nats.port());
    let bus = Bus::from_client(client, Duration::from_secs(30));
    let js = bus.jetstream.clone();

    // Pre-generate (untimed). The same records serve every run; each run has a fresh stream, so the
    // duplicate window (keyed on a frame's event ids, `bus::FrameKey`) starts empty.
    let gen_started = Instant::now();
    let (size_arg, uncalibrated) = calibrate_size(args.event_size)?;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let records: Arc<Vec<EventRecord>> = Arc::new(
        (0..args.events)
            .map(|_| {
                let mut record = events::sample::task_submitted_of_size(size_arg);
                if args.input == InputKind::Random {
                    randomize_input(&mut record, &mut rng);
                }
                record
            })
            .collect(),
    );
    let encoded_size = encode_event(&records[0])
        .context("encode a sample event")?
        .len();
    let mean_encoded = records
        .iter()
        .take(1000)
        .map(|r| encode_event(r).map(|e| e.len()))
        .sum::<Result<usize, _>>()?
        / records.len().min(1000);
    let wants = |kind: Kind| args.scenarios.iter().any(|s| s.kind == kind);
    let raw_single = match wants(Kind::RawSingle) {
        true => Some(Arc::new(pre_encode_single(&records)?)),
        false => None,
    };
    let raw_frames = match wants(Kind::RawFrames) {
        true => Some(Arc::new(pre_encode_frames(&records, 50)?)),
        false => None,
    };
    let gen_elapsed = gen_started.elapsed();

    let costs = component_costs(&records)?;
    let machine = Machine::probe();
    let mut header = String::new();
    writeln!(header, "- command: `{command_line}`")?;
    writeln!(header, "- date (UTC): {started_at}")?;
    writeln!(
        header,
        "- machine: {} CPUs ({}), {} memory, kernel {}",
        machine.cpus, machine.cpu_model, machine.memory, machine.kernel
    )?;
    writeln!(
        header,
        "- nats-server {server_version}, JetStream file storage (temp dir), 1 replica, same host (loopback)"
    )?;
    writeln!(
        header,
        "- events: {} per run, TaskSubmitted encoded to {} bytes (asked for {}; mean of the first 1000: {}; \
         `task_submitted_of_size({size_arg})`, since `task_submitted_of_size({})` encodes to {uncalibrated} bytes), \
         {} inline input, 8 partitions (`tasks.0..7`); {} runs per scenario, interleaved; generated in {:.1} s (untimed)",
        args.events,
        encoded_size,
        args.event_size,
        mean_encoded,
        args.event_size,
        match args.input {
            InputKind::Pattern => "patterned (sample)",
            InputKind::Random => "random",
        },
        args.runs,
        gen_elapsed.as_secs_f64()
    )?;
    if encoded_size.abs_diff(args.event_size) > args.event_size / 10 {
        writeln!(
            header,
            "- note: the encoded event is {encoded_size} bytes, more than 10% away from the {} asked for",
            args.event_size
        )?;
    }
    header.push_str(&costs);
    print!("{header}");

    // Warm-up: server, file store, connection buffers, allocator.
    if args.warmup_events > 0 {
        let warm = Scenario::from_str("frames50-zstd").map_err(anyhow::Error::msg)?;
        let n = args.warmup_events.min(records.len());
        let sub = Arc::new(records[..n].to_vec());
        reset_stream(&js).await?;
        let r = run_publisher(&js, &warm, &args, sub).await?;
        let line = format!(
            "- warm-up: {n} events in {:.2} s (untimed for the table)",
            r.elapsed.as_secs_f64()
        );
        println!("{line}");
        writeln!(header, "{line}")?;
    }

    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); args.scenarios.len()];
    let mut redone = vec![0usize; args.scenarios.len()];
    let mut wait_budget = Duration::from_secs(args.max_wait_s);
    let mut run_log = Vec::new();
    for run in 1..=args.runs {
        for (i, scenario) in args.scenarios.iter().enumerate() {
            for attempt in 0..=args.retries {
                wait_for_quiet(&args, &mut wait_budget).await;
                let r = timed_run(
                    &js,
                    scenario,
                    &args,
                    &records,
                    raw_single.as_ref(),
                    raw_frames.as_ref(),
                    server_pid,
                )
                .await
                .with_context(|| format!("run {run} of {}", scenario.label))?;
                let noisy = r.disturbed(args.max_interference);
                let line = format!(
                    "run {run}/{} {:<18} {:>9.0} events/s  {:>8.0} frames/s  {:>6.1} MB/s  {:.2} s  \
                     cpu: client {:.2} s, server {:.2} s, other processes {:.2} s, steal {:.2} s{}",
                    args.runs,
                    scenario.label,
                    r.events_per_s(),
                    r.frames as f64 / r.elapsed.as_secs_f64(),
                    r.payload_bytes as f64 / r.elapsed.as_secs_f64() / 1e6,
                    r.elapsed.as_secs_f64(),
                    r.client_cpu,
                    r.server_cpu,
                    r.other_cpu,
                    r.steal_cpu,
                    match (noisy, attempt < args.retries) {
                        (true, true) => "  -> interference, run again",
                        (true, false) => "  -> interference, kept (no retries left)",
                        _ => "",
                    }
                );
                eprintln!("{line}");
                run_log.push(line);
                if noisy && attempt < args.retries {
                    redone[i] += 1;
                    continue;
                }
                results[i].push(r);
                break;
            }
        }
    }
    reset_stream(&js).await?;

    let mut table = render_table(&args, &results, &redone);
    table.push('\n');
    table.push_str(&render_verdict(&args, &results));
    let ended_at = date_utc();
    let mut report = String::new();
    writeln!(report, "### Publisher throughput\n")?;
    report.push_str(&header);
    writeln!(report, "- finished (UTC): {ended_at}\n")?;
    report.push_str(&table);
    writeln!(
        report,
        "\nEvery run, in order (redone runs included):\n\n```"
    )?;
    for line in &run_log {
        writeln!(report, "{line}")?;
    }
    writeln!(report, "```")?;
    println!();
    print!("{table}");

    let out = match &args.out {
        Some(path) => path.clone(),
        None => tests::workspace_root()
            .join("load-tests/out")
            .join(format!("publish-{}.md", started_at.replace([':', '-'], ""))),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    println!("\nreport written to {}", out.display());
    Ok(())
}

/// Waits until other processes used less than `--max-interference` of one core during one second, or until
/// the waiting budget is spent. The server and this process are idle between runs, so the whole machine's
/// busy time is the others'.
async fn wait_for_quiet(args: &PublishArgs, budget: &mut Duration) {
    let window = Duration::from_secs(1);
    let mut announced = false;
    loop {
        let Some(before) = load_tests::machine::system_cpu_seconds() else {
            return;
        };
        tokio::time::sleep(window).await;
        let Some(after) = load_tests::machine::system_cpu_seconds() else {
            return;
        };
        let busy = (after.0 - before.0) / window.as_secs_f64();
        if busy <= args.max_interference.max(0.03) {
            return;
        }
        if *budget < window {
            if announced {
                eprintln!("  (waiting budget spent; running anyway)");
            }
            return;
        }
        *budget -= window;
        if !announced {
            eprintln!("  (machine busy: {:.0}% of a core; waiting)", busy * 100.0);
            announced = true;
        }
    }
}

/// One run of one scenario on a fresh stream, with the CPU time of everyone during it, verified.
async fn timed_run(
    js: &jetstream::Context,
    scenario: &Scenario,
    args: &PublishArgs,
    records: &Arc<Vec<EventRecord>>,
    raw_single: Option<&Arc<RawSet>>,
    raw_frames: Option<&Arc<RawSet>>,
    server_pid: Option<u32>,
) -> anyhow::Result<RunResult> {
    reset_stream(js).await?;
    let system_before = load_tests::machine::system_cpu_seconds();
    let cpu_before = (self_cpu_seconds(), server_pid.and_then(pid_cpu_seconds));
    let mut r = match scenario.kind {
        Kind::RawSingle => {
            let raw = raw_single.context("pre-encoded single frames")?;
            run_raw(js, raw, args.single_in_flight).await?
        }
        Kind::RawFrames => {
            let raw = raw_frames.context("pre-encoded frames")?;
            run_raw(js, raw, args.frames_in_flight.unwrap_or(64)).await?
        }
        Kind::Frames { .. } | Kind::Single => {
            run_publisher(js, scenario, args, records.clone()).await?
        }
    };
    let cpu_after = (self_cpu_seconds(), server_pid.and_then(pid_cpu_seconds));
    let system_after = load_tests::machine::system_cpu_seconds();
    r.client_cpu = cpu_after.0.unwrap_or(0.0) - cpu_before.0.unwrap_or(0.0);
    r.server_cpu = match (cpu_before.1, cpu_after.1) {
        (Some(b), Some(a)) => a - b,
        _ => f64::NAN,
    };
    if let (Some(before), Some(after)) = (system_before, system_after) {
        let server = if r.server_cpu.is_finite() {
            r.server_cpu
        } else {
            0.0
        };
        r.other_cpu = ((after.0 - before.0) - r.client_cpu - server).max(0.0);
        r.steal_cpu = after.1 - before.1;
    }
    verify(js, &mut r, args.events as u64).await?;
    Ok(r)
}

/// Deletes the TASKS stream (if any) and provisions it again, empty.
async fn reset_stream(js: &jetstream::Context) -> anyhow::Result<()> {
    match js.delete_stream(STREAM.name()).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) => {}
        Err(e) => bail!("delete stream {}: {e}", STREAM.name()),
    }
    bus::provision_streams(js, 1)
        .await
        .context("provision streams")?;
    let info = js.get_stream(STREAM.name()).await?.get_info().await?;
    ensure!(
        info.state.messages == 0,
        "stream not empty after re-creation"
    );
    Ok(())
}

fn publisher_config(scenario: &Scenario, args: &PublishArgs) -> PublisherConfig {
    let defaults = PublisherConfig::default();
    match scenario.kind {
        Kind::Frames { compress } => PublisherConfig {
            linger: args
                .linger_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.linger),
            max_pending_events: args
                .frames_in_flight
                .map(|f| f * defaults.max_events as usize)
                .unwrap_or(defaults.max_pending_events),
            codec: CodecConfig {
                compress_threshold: if compress {
                    defaults.codec.compress_threshold
                } else {
                    usize::MAX
                },
                ..defaults.codec
            },
            ..defaults
        },
        Kind::Single | Kind::RawSingle | Kind::RawFrames => PublisherConfig {
            max_events: 1,
            max_pending_events: args.single_in_flight,
            ..defaults
        },
    }
}

/// Publishes every record through the bus publisher from `scenario.tasks` tasks; the clock runs from the
/// first publish until `flush` returns Ok.
async fn run_publisher(
    js: &jetstream::Context,
    scenario: &Scenario,
    args: &PublishArgs,
    records: Arc<Vec<EventRecord>>,
) -> anyhow::Result<RunResult> {
    let publisher = Publisher::new(js.clone(), publisher_config(scenario, args))?;
    let n = records.len();
    let tasks = scenario.tasks;
    let chunk = n.div_ceil(tasks);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let publisher = publisher.clone();
        let records = records.clone();
        handles.push(tokio::spawn(async move {
            let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
            for record in &records[range] {
                // The receipt may be dropped: a failure is still reported by `flush`.
                let _receipt = publisher.publish(record).await?;
            }
            Ok::<_, bus::PublishError>(())
        }));
    }
    for handle in handles {
        handle.await.context("publishing task panicked")??;
    }
    publisher
        .flush()
        .await
        .context("flush reported failed frames")?;
    let elapsed = started.elapsed();
    Ok(RunResult {
        elapsed,
        events: n as u64,
        frames: 0,
        payload_bytes: 0,
        client_cpu: 0.0,
        server_cpu: 0.0,
        other_cpu: 0.0,
        steal_cpu: 0.0,
    })
}

/// Single-threaded CPU cost of the pieces of the publisher's work, measured in-process before the runs: what
/// a published event costs before it reaches the connection.
fn component_costs(records: &[EventRecord]) -> anyhow::Result<String> {
    let sample = &records[..records.len().min(200_000)];
    let n = sample.len() as f64;
    let per_event_us = |elapsed: Duration| elapsed.as_secs_f64() * 1e6 / n;

    // Encoded elements go to one arena, so that the measurement is not about 200k live allocations; the
    // publisher frees each element right after copying it into its frame, as the first loop does.
    let mut encode_us = f64::INFINITY;
    for _ in 0..2 {
        let started = Instant::now();
        let mut total = 0usize;
        for record in sample {
            total += encode_event(record)?.len();
        }
        encode_us = encode_us.min(per_event_us(started.elapsed()));
        std::hint::black_box(total);
    }
    // What-if for the lead: the same bytes, encoded into reused buffers (no per-event allocation, no
    // realloc growth), appended straight to a frame body as a publisher could do.
    let reuse_us = {
        let mut payload = Vec::with_capacity(1024);
        let mut body = Vec::with_capacity(64 * 1024);
        for record in sample.iter().take(1000) {
            body.clear();
            encode_into(record, &mut payload, &mut body)?;
            ensure!(
                body == encode_event(record)?,
                "the prototype encoder does not produce the bytes of encode_event"
            );
        }
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let started = Instant::now();
            for chunk in sample.chunks(50) {
                body.clear();
                for record in chunk {
                    encode_into(record, &mut payload, &mut body)?;
                }
                std::hint::black_box(&body);
            }
            best = best.min(per_event_us(started.elapsed()));
        }
        best
    };
    let mut arena = Vec::new();
    let mut bounds = Vec::with_capacity(sample.len());
    for record in sample {
        let element = encode_event(record)?;
        bounds.push(arena.len()..arena.len() + element.len());
        arena.extend_from_slice(&element);
    }

    let started = Instant::now();
    let subjects: Vec<events::Subject> = sample
        .iter()
        .map(|r| r.subject(Partitions::DEFAULT))
        .collect();
    let subject_us = per_event_us(started.elapsed());
    drop(subjects);

    let mut out = String::new();
    for (label, threshold) in [
        ("zstd-1", CodecConfig::default().compress_threshold),
        ("no compression", usize::MAX),
    ] {
        let codec = CodecConfig {
            compress_threshold: threshold,
            ..CodecConfig::default()
        };
        let mut sealer = events::frame::FrameSealer::new(codec)?;
        let (mut raw_bytes, mut wire_bytes) = (0usize, 0usize);
        let started = Instant::now();
        for chunk in bounds.chunks(50) {
            let mut builder = events::FrameBuilder::new(codec);
            for range in chunk {
                builder.push_encoded(&arena[range.clone()])?;
            }
            let frame = sealer.seal(builder.finish())?;
            raw_bytes += frame.raw_len;
            wire_bytes += frame.body.len();
        }
        let us = per_event_us(started.elapsed());
        writeln!(
            out,
            "  - frame of 50 + seal ({label}): {us:.2} µs/event ({:.0} µs/frame), {:.1}× smaller on the wire",
            us * 50.0,
            raw_bytes as f64 / wire_bytes as f64
        )?;
    }
    Ok(format!(
        "- CPU cost of the pieces, one thread, no server involved ({} events, best of 2 passes): \
         `encode_event` {encode_us:.2} µs/event (the same bytes encoded into reused buffers, a prototype here: \
         {reuse_us:.2} µs/event), `subject()` {subject_us:.2} µs/event\n{out}",
        sample.len()
    ))
}

/// `events::frame::encode_event`'s element, byte for byte, written into reused buffers: the payload into
/// `payload`, the element appended to `out`. Only TaskSubmitted, which is all this benchmark publishes.
fn encode_into(
    record: &EventRecord,
    payload: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct WireEventOut<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        envelope: &'a events::Envelope,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    }
    let events::Event::TaskSubmitted(task) = &record.event else {
        bail!("the prototype encoder knows TaskSubmitted only");
    };
    payload.clear();
    rmp_serde::encode::write_named(payload, task)?;
    rmp_serde::encode::write_named(
        out,
        &WireEventOut {
            kind: record.event.kind(),
            envelope: &record.envelope,
            data: payload,
        },
    )?;
    Ok(())
}

/// The argument of `task_submitted_of_size` whose event encodes closest to `target` bytes, and the encoded
/// size of `task_submitted_of_size(target)` itself (the sample's estimate of its fixed part is off).
fn calibrate_size(target: usize) -> anyhow::Result<(usize, usize)> {
    let encoded = |arg: usize| -> anyhow::Result<usize> {
        Ok(encode_event(&events::sample::task_submitted_of_size(arg))?.len())
    };
    let uncalibrated = encoded(target)?;
    let mut best = (target, uncalibrated);
    let mut arg = target;
    for _ in 0..16 {
        let len = encoded(arg)?;
        if len.abs_diff(target) < best.1.abs_diff(target) {
            best = (arg, len);
        }
        if len == target {
            break;
        }
        let next = (arg as i64 + target as i64 - len as i64).max(0) as usize;
        if next == arg {
            break;
        }
        arg = next;
    }
    Ok((best.0, uncalibrated))
}

/// Replaces the inline input of a TaskSubmitted by as many pseudo-random bytes (xorshift64).
fn randomize_input(record: &mut EventRecord, state: &mut u64) {
    if let events::Event::TaskSubmitted(task) = &mut record.event
        && let events::payload::Blob::Inline(bytes) = &mut task.spec.input
    {
        for byte in bytes.iter_mut() {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *byte = *state as u8;
        }
    }
}

/// Frames encoded (and sealed) before the clock starts, with the headers and `Nats-Msg-Id` that the
/// publisher would send.
struct RawSet {
    messages: Vec<RawMessage>,
    events: u64,
}

struct RawMessage {
    subject: async_nats::Subject,
    body: bytes::Bytes,
    headers: async_nats::HeaderMap,
}

impl RawMessage {
    fn new(subject: &str, frame: events::EncodedFrame, batch: &[EventRecord]) -> RawMessage {
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in frame.headers.pairs() {
            headers.insert(name, value.as_str());
        }
        let key = bus::FrameKey::of(
            batch[0].envelope.event_id,
            batch[1..].iter().map(|r| r.envelope.event_id),
        );
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            key.message_id().as_str(),
        );
        RawMessage {
            subject: subject.to_owned().into(),
            body: frame.body.into(),
            headers,
        }
    }
}

/// One event per frame (uncompressed: a single event is below the threshold).
fn pre_encode_single(records: &[EventRecord]) -> anyhow::Result<RawSet> {
    let codec = CodecConfig::default();
    let messages = records
        .iter()
        .map(|record| {
            let frame = encode_frame(codec, std::slice::from_ref(record))?;
            let subject = record.subject(Partitions::DEFAULT);
            Ok(RawMessage::new(
                subject.as_str(),
                frame,
                std::slice::from_ref(record),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RawSet {
        messages,
        events: records.len() as u64,
    })
}

/// Frames of `per_frame` events per subject, in publish order, sealed with the default codec (zstd-1 above
/// 1 KiB), as the publisher forms them when its frames fill up by count.
fn pre_encode_frames(records: &[EventRecord], per_frame: usize) -> anyhow::Result<RawSet> {
    let codec = CodecConfig::default();
    let mut open: std::collections::BTreeMap<String, Vec<EventRecord>> = Default::default();
    let mut messages = Vec::new();
    let mut seal = |subject: &str, batch: &[EventRecord]| -> anyhow::Result<()> {
        let frame = encode_frame(codec, batch)?;
        messages.push(RawMessage::new(subject, frame, batch));
        Ok(())
    };
    for record in records {
        let subject = String::from(record.subject(Partitions::DEFAULT));
        let batch = open.entry(subject.clone()).or_default();
        batch.push(record.clone());
        if batch.len() >= per_frame {
            let batch = std::mem::take(batch);
            seal(&subject, &batch)?;
        }
    }
    for (subject, batch) in &open {
        if !batch.is_empty() {
            seal(subject, batch)?;
        }
    }
    Ok(RawSet {
        messages,
        events: records.len() as u64,
    })
}

/// Raw JetStream publishes of pre-encoded frames, `in_flight` ack futures outstanding (oldest awaited
/// first); the clock runs from the first publish until the last ack.
async fn run_raw(
    js: &jetstream::Context,
    raw: &Arc<RawSet>,
    in_flight: usize,
) -> anyhow::Result<RunResult> {
    let js = js.clone();
    let raw = raw.clone();
    let events = raw.events;
    let in_flight = in_flight.max(1);
    // Publish from a runtime worker, as the publisher scenarios do.
    let (elapsed, duplicates) = tokio::spawn(async move {
        let mut acks = VecDeque::with_capacity(in_flight);
        let mut duplicates = 0u64;
        let started = Instant::now();
        for m in &raw.messages {
            if acks.len() >= in_flight {
                let ack: jetstream::context::PublishAckFuture =
                    acks.pop_front().expect("a full window is not empty");
                duplicates += u64::from(ack.await?.duplicate);
            }
            let message = PublishMessage::build()
                .payload(m.body.clone())
                .headers(m.headers.clone());
            acks.push_back(js.send_publish(m.subject.clone(), message).await?);
        }
        while let Some(ack) = acks.pop_front() {
            duplicates += u64::from(ack.await?.duplicate);
        }
        Ok::<_, anyhow::Error>((started.elapsed(), duplicates))
    })
    .await
    .context("raw publishing task panicked")??;
    ensure!(
        duplicates == 0,
        "{duplicates} publishes were acked as duplicates"
    );
    Ok(RunResult {
        elapsed,
        events,
        frames: 0,
        payload_bytes: 0,
        client_cpu: 0.0,
        server_cpu: 0.0,
        other_cpu: 0.0,
        steal_cpu: 0.0,
    })
}

/// Reads the stream back (headers only) and checks that its frames carry exactly `expected` events; fills in
/// the frame count and the payload bytes of the run.
async fn verify(js: &jetstream::Context, run: &mut RunResult, expected: u64) -> anyhow::Result<()> {
    let stream = js.get_stream(STREAM.name()).await?;
    let info = stream.get_info().await?;
    let messages = info.state.messages;
    ensure!(
        info.state.last_sequence == messages,
        "stream holds {messages} messages but its last sequence is {}",
        info.state.last_sequence
    );
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            headers_only: true,
            ..Default::default()
        })
        .await
        .context("create the read-back consumer")?;
    let mut stored = consumer.messages().await?;
    let (mut frames, mut events, mut bytes) = (0u64, 0u64, 0u64);
    while frames < messages {
        let message = tokio::time::timeout(Duration::from_secs(30), stored.next())
            .await
            .context("read-back stalled")?
            .context("read-back ended early")?
            .map_err(|e| anyhow::anyhow!("read-back: {e}"))?;
        let headers = message
            .headers
            .as_ref()
            .context("a frame without headers")?;
        let header = |name: &str| -> anyhow::Result<u64> {
            headers
                .get(name)
                .with_context(|| format!("a frame without {name}"))?
                .as_str()
                .parse()
                .with_context(|| format!("bad {name}"))
        };
        events += header(HEADER_EVENT_COUNT)?;
        bytes += header("Nats-Msg-Size")?;
        frames += 1;
    }
    ensure!(
        events == expected,
        "LOST OR DUPLICATED EVENTS: the stream holds {events} events in {frames} frames, {expected} were published"
    );
    run.frames = frames;
    run.payload_bytes = bytes;
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn render_table(args: &PublishArgs, results: &[Vec<RunResult>], redone: &[usize]) -> String {
    let medians: Vec<f64> = results
        .iter()
        .map(|runs| median(runs.iter().map(RunResult::events_per_s).collect()))
        .collect();
    let baseline = |label: &str| {
        args.scenarios
            .iter()
            .position(|s| s.label == label)
            .map(|i| medians[i])
    };
    let single = baseline("single");
    let raw_single = baseline("raw-single");
    let ratio = |base: Option<f64>, value: f64| match base {
        Some(b) => format!("{:.2}×", value / b),
        None => "—".to_owned(),
    };
    let mut t = String::new();
    t.push_str(
        "| scenario | events/s (median) | min – max | frames/s | events/frame | wire MB/s | wire B/event | \
         CPU µs/event client + server | other processes' CPU (max of kept runs; runs redone) | vs single | \
         vs raw-single |\n",
    );
    t.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (((scenario, runs), med), redone) in
        args.scenarios.iter().zip(results).zip(&medians).zip(redone)
    {
        let per_run = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
        let min = runs
            .iter()
            .map(RunResult::events_per_s)
            .fold(f64::INFINITY, f64::min);
        let max = runs.iter().map(RunResult::events_per_s).fold(0.0, f64::max);
        let frames_per_s = per_run(&|r| r.frames as f64 / r.elapsed.as_secs_f64());
        let events_per_frame = per_run(&|r| r.events as f64 / r.frames as f64);
        let mb_per_s = per_run(&|r| r.payload_bytes as f64 / r.elapsed.as_secs_f64() / 1e6);
        let bytes_per_event = per_run(&|r| r.payload_bytes as f64 / r.events as f64);
        let client_us = per_run(&|r| r.client_cpu * 1e6 / r.events as f64);
        let server_us = per_run(&|r| r.server_cpu * 1e6 / r.events as f64);
        let other = runs.iter().map(|r| r.other_cpu).fold(0.0, f64::max);
        let label = if scenario.tasks > 1 {
            format!("`{}` ({} tasks)", scenario.label, scenario.tasks)
        } else {
            format!("`{}`", scenario.label)
        };
        let _ = writeln!(
            t,
            "| {label} | {} | {} – {} | {} | {:.1} | {:.1} | {:.0} | {:.2} + {:.2} | {:.2} s; {redone} | {} | {} |",
            thousands(*med),
            thousands(min),
            thousands(max),
            thousands(frames_per_s),
            events_per_frame,
            mb_per_s,
            bytes_per_event,
            client_us,
            server_us,
            other,
            ratio(single, *med),
            ratio(raw_single, *med),
        );
    }
    t
}

/// The brief's measured limits of a 2-core box (events/s), for the scenarios that correspond to them.
const BRIEF_LIMITS: [(&str, f64, f64, &str); 3] = [
    (
        "frames50-zstd",
        430_000.0,
        550_000.0,
        "frames of 50 events zstd-1, 64 acks in flight",
    ),
    (
        "single",
        80_000.0,
        110_000.0,
        "one event per message, 1024 acks in flight",
    ),
    (
        "raw-single",
        80_000.0,
        110_000.0,
        "one event per message, 1024 acks in flight",
    ),
];

/// The goal of issue 2: frames of 50 with zstd reach this many events/s on the 2-core box.
const FRAMES_GOAL: f64 = 300_000.0;

/// Goal met or missed, the brief's limits against this run, and the ratio frames / single.
fn render_verdict(args: &PublishArgs, results: &[Vec<RunResult>]) -> String {
    let median_of = |label: &str| {
        args.scenarios
            .iter()
            .position(|s| s.label == label)
            .map(|i| median(results[i].iter().map(RunResult::events_per_s).collect()))
    };
    let mut v = String::new();
    let disturbed: usize = results
        .iter()
        .flatten()
        .filter(|r| r.disturbed(args.max_interference))
        .count();
    if disturbed > 0 {
        let _ = writeln!(
            v,
            "- **warning**: {disturbed} of the runs in the table were disturbed by other processes (see the column \
             \"other processes' CPU\"); their figures are low. Run again on a quiet machine."
        );
    }
    if let Some(frames) = median_of("frames50-zstd") {
        let _ = writeln!(
            v,
            "- goal (frames of 50 with zstd ≥ {} events/s): **{}**, median {} events/s",
            thousands(FRAMES_GOAL),
            if frames >= FRAMES_GOAL {
                "met"
            } else {
                "MISSED"
            },
            thousands(frames)
        );
    }
    for (label, low, high, what) in BRIEF_LIMITS {
        if let Some(m) = median_of(label) {
            let place = if m < low {
                format!("below it ({:.0}% of its low end)", m / low * 100.0)
            } else if m > high {
                format!("above it ({:.0}% of its high end)", m / high * 100.0)
            } else {
                "within it".to_owned()
            };
            let _ = writeln!(
                v,
                "- `{label}`: median {} events/s; the brief measured {}–{} for \"{what}\": {place}",
                thousands(m),
                thousands(low),
                thousands(high)
            );
        }
    }
    if let (Some(frames), Some(single)) = (median_of("frames50-zstd"), median_of("single")) {
        let _ = writeln!(
            v,
            "- frames of 50 with zstd / one event per message, both through the bus publisher: {:.1}×",
            frames / single
        );
    }
    v
}

/// `1234567.8` as `1,234,568`.
fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "—".to_owned();
    }
    let digits = format!("{:.0}", value.round());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What the numbers were measured on.
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory: String,
    kernel: String,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory,
            kernel,
        }
    }
}

fn self_cpu_seconds() -> Option<f64> {
    cpu_seconds("/proc/self/stat")
}

fn pid_cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}
