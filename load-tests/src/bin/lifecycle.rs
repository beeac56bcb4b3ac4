//! Full task lifecycle with simulated workers, on a real nats-server started for the run: producer →
//! TASKS → allocator → ALLOCATIONS → node agents (simulated GPUs and the simulated executor, labelled as
//! such) → TaskStarted/TaskCompleted on TASKS and TaskResult on RESULTS.
//!
//! - `throughput`: a backlog of tasks is submitted as fast as the producer goes; tasks/s from the first
//!   submission to the last TaskCompleted.
//! - `latency`: tasks submitted at a fixed rate; submit-to-allocated latency (the TaskAllocated's time minus
//!   the TaskSubmitted's, both stamped on this host) p50/p99/max.
//!
//! Everything runs in this one process (allocator, agents, producer, observers) beside nats-server, on
//! the same cores: the figure is for the whole pool on this machine. The projector is not part of it
//! (its throughput is the projector benchmark's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{AllocatorConfig, PoolConfig};
use bus::{Bus, Follower, Publisher, PublisherConfig, provision_streams};
use clap::Parser;
use client::{Producer, ProducerConfig, TaskRequest};
use events::{CodecConfig, Event, Nanoton, Stream, TaskId, Timestamp, WorkerId};
use node_agent::{AgentConfig, GpuSource, SimulatedExecutor};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    about = "Task lifecycle throughput and submit-to-allocated latency with simulated workers"
)]
struct Args {
    /// Simulated workers (node agents in this process).
    #[arg(long, default_value_t = 16)]
    workers: u32,
    /// Simulated GPUs per worker.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// Concurrent tasks per worker.
    #[arg(long, default_value_t = 64)]
    max_concurrent: u32,
    /// How long the simulated executor takes per task.
    #[arg(long, default_value_t = 0)]
    task_ms: u64,
    /// Tasks in the throughput backlog.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Submission rate of the latency scenario (tasks/s); the goal is stated at 1,000, half of 2,000.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds the latency scenario submits for.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

struct Observer {
    /// Submission time of each task the latency scenario sent.
    allocated: tokio::sync::mpsc::UnboundedReceiver<(TaskId, Timestamp)>,
    completed: tokio::sync::mpsc::UnboundedReceiver<TaskId>,
}

/// Follows ALLOCATIONS and TASKS from their current heads and reports allocations and completions.
async fn observe(bus: &Bus, stop: CancellationToken) -> anyhow::Result<Observer> {
    let (alloc_tx, allocated) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, completed) = tokio::sync::mpsc::unbounded_channel();
    for stream in [Stream::Allocations, Stream::Tasks] {
        let from = bus::last_sequence(&bus.jetstream, stream).await? + 1;
        let mut follower = Follower::open(&bus.jetstream, stream, vec![], from).await?;
        let (alloc_tx, done_tx, stop) = (alloc_tx.clone(), done_tx.clone(), stop.clone());
        tokio::spawn(async move {
            let codec = CodecConfig::default();
            loop {
                let frame = tokio::select! {
                    _ = stop.cancelled() => return,
                    f = follower.next() => f,
                };
                let Some(Ok(frame)) = frame else { return };
                let Ok(records) = frame.decode(&codec) else {
                    continue;
                };
                for r in records {
                    match r.event {
                        Event::TaskAllocated(a) => {
                            let _ = alloc_tx.send((a.task_id, r.envelope.occurred_at));
                        }
                        Event::TaskCompleted(c) => {
                            let _ = done_tx.send(c.task_id);
                        }
                        _ => {}
                    }
                }
            }
        });
    }
    Ok(Observer {
        allocated,
        completed,
    })
}

fn request(i: usize) -> TaskRequest {
    let mut r = TaskRequest::new("bench-client", Nanoton(10_000));
    r.priority = 1 + (i % 10) as u8;
    r.requirements.gpu_memory_mib = 1_024;
    r.input = format!("task {i}").into_bytes();
    r.timeout_ms = 60_000;
    r
}

async fn attest(publisher: &Publisher, worker: &WorkerId) -> anyhow::Result<()> {
    // Stands in for the attestor (issue 5), so the allocator runs with its production policy.
    let until = Timestamp::now().saturating_add(Duration::from_secs(86_400));
    for record in events::sample::stand_in_attestation(worker, until) {
        drop(publisher.publish(&record).await?);
    }
    Ok(())
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "lifecycle: {} simulated workers × {} simulated GPUs, max {} concurrent each, simulated executor {} ms; \
         {} runs; {}",
        args.workers,
        args.gpus,
        args.max_concurrent,
        args.task_ms,
        args.runs,
        load_tests::machine::date_utc()
    );
    for run in 1..=args.runs {
        let server = tests::NatsServer::start().await;
        let bus = Bus::from_client(server.client().await, Duration::from_secs(10));
        provision_streams(&bus.jetstream, 1).await?;
        let stop = CancellationToken::new();
        let agents_publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default())?;

        let mut agents = Vec::new();
        for w in 0..args.workers {
            let worker = WorkerId::new(format!("sim-{w}"))?;
            attest(&agents_publisher, &worker).await?;
            let mut config = AgentConfig::new(worker.clone());
            config.max_concurrent_tasks = args.max_concurrent;
            config.price_per_gpu_second = Nanoton(1_000);
            config.payout_address = format!("UQ-sim-{w}");
            config.fetch_batch = 256;
            config.fetch_wait = Duration::from_millis(200);
            let gpus = GpuSource::simulated(&worker, args.gpus);
            let executor = Arc::new(SimulatedExecutor::new(Duration::from_millis(args.task_ms)));
            let (b, p, s) = (bus.clone(), agents_publisher.clone(), stop.clone());
            agents.push(tokio::spawn(async move {
                node_agent::run(config, b, p, gpus, executor, s).await
            }));
        }
        agents_publisher.flush().await?;
        let allocator_config = AllocatorConfig {
            pool: PoolConfig::default(),
            instance: "allocator-bench".into(),
            ..AllocatorConfig::default()
        };
        let allocator = tokio::spawn(allocator::run(bus.clone(), allocator_config, stop.clone()));
        let producer = Producer::from_bus(&bus, ProducerConfig::default())?;

        // Warm-up: one task through the whole path, so the lease is held and every worker is known.
        let mut observer = observe(&bus, stop.clone()).await?;
        producer.submit(&request(0)).await?;
        tokio::time::timeout(Duration::from_secs(30), observer.completed.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("observer stopped"))?;
        while observer.allocated.try_recv().is_ok() {}

        // Throughput: a backlog.
        let requests: Vec<TaskRequest> = (0..args.tasks).map(request).collect();
        let start = Instant::now();
        let submitted = producer.submit_many(requests.iter()).await;
        let failed = submitted.iter().filter(|s| s.is_err()).count();
        anyhow::ensure!(failed == 0, "{failed} submissions failed");
        let submit_secs = start.elapsed().as_secs_f64();
        let mut done = 0;
        while done < args.tasks {
            tokio::time::timeout(Duration::from_secs(60), observer.completed.recv())
                .await
                .map_err(|_| anyhow::anyhow!("stalled at {done} of {} completions", args.tasks))?
                .ok_or_else(|| anyhow::anyhow!("observer stopped"))?;
            done += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "run {run}/{} throughput: {} tasks submitted in {submit_secs:.2} s, all completed in {elapsed:.2} s = \
             {:.0} tasks/s",
            args.runs,
            args.tasks,
            args.tasks as f64 / elapsed
        );
        while observer.allocated.try_recv().is_ok() {}

        // Latency: a fixed rate, in 10 ms slices.
        let total = (args.rate * args.seconds) as usize;
        let per_slice = (args.rate as f64 / 100.0).max(1.0);
        let mut sent_at: HashMap<TaskId, Timestamp> = HashMap::with_capacity(total);
        let start = Instant::now();
        let mut sent = 0usize;
        let mut slice = 0u64;
        while sent < total {
            slice += 1;
            let due = ((slice as f64 * per_slice) as usize).min(total);
            let batch: Vec<TaskRequest> = (sent..due).map(request).collect();
            // Measured from before the submission starts: the latency includes the producer's publish.
            let before = Timestamp::now();
            for s in producer.submit_many(batch.iter()).await {
                sent_at.insert(s?.task_id, before);
            }
            sent = due;
            let next = start + Duration::from_millis(10 * slice);
            tokio::time::sleep_until(next.into()).await;
        }
        let offered = sent as f64 / start.elapsed().as_secs_f64();
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            let (task, at) =
                tokio::time::timeout(Duration::from_secs(60), observer.allocated.recv())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("stalled at {} of {total} allocations", latencies.len())
                    })?
                    .ok_or_else(|| anyhow::anyhow!("observer stopped"))?;
            if let Some(sent) = sent_at.get(&task) {
                latencies.push(at.as_micros() - sent.as_micros());
            }
        }
        latencies.sort_unstable();
        println!(
            "run {run}/{} latency at {offered:.0} tasks/s offered: submit-to-allocated p50 {:.2} ms, p99 {:.2} ms, \
             max {:.2} ms over {} tasks",
            args.runs,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            latencies.len(),
        );

        stop.cancel();
        let report = allocator.await??;
        for a in agents {
            a.await??;
        }
        println!(
            "run {run}/{} allocator: {} allocations, {} requeues, epochs {:?}",
            args.runs, report.allocations, report.requeues, report.epochs
        );
    }
    Ok(())
}
