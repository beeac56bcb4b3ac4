//! Allocator decision benchmark: the pure pool (no NATS), with 10,000 workers.
//!
//! - `latency`: one task at a time is submitted and placed; each `allocate` call is timed (p50, p99, max).
//!   Every placed task completes a few decisions later, so the pool stays at a steady load.
//! - `throughput`: a backlog of tasks is placed in batch rounds; decisions per second.
//!
//! Workers differ in GPUs (1, 2, 4 or 8), price, telemetry, latency and model tags; tasks in GPU count,
//! memory, priority, price limit and tag (a third have one), so the index search skips workers that do not
//! fit as it would in a real pool.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use allocator::{Pool, PoolConfig};
use clap::Parser;
use events::attestations::{AttestationVerified, Measurements};
use events::payload::{Blob, Priority, Requirements, TaskSpec};
use events::tasks::{TaskCompleted, TaskSubmitted, Usage};
use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
use events::{
    ClientId, Event, EventRecord, GpuMillis, Nanoton, ProducerId, TaskId, Timestamp, WorkerId,
};

#[derive(Debug, Parser)]
#[command(about = "Allocator decision latency and throughput with many workers (pure, in memory)")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Decisions timed one by one.
    #[arg(long, default_value_t = 100_000)]
    decisions: usize,
    /// Tasks placed in batch rounds for the throughput figure.
    #[arg(long, default_value_t = 200_000)]
    backlog: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const TAGS: [&str; 4] = ["llama-3-70b", "mistral-7b", "sdxl", "whisper"];

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn producer() -> ProducerId {
    ProducerId::new("bench").unwrap()
}

fn record(event: impl Into<Event>, at: Timestamp) -> EventRecord {
    let mut r = EventRecord::new(producer(), event);
    r.envelope.occurred_at = at;
    r
}

fn build_pool(workers: usize, rng: &mut Rng, now: Timestamp) -> Pool {
    let mut pool = Pool::new(
        PoolConfig::default(),
        ProducerId::new("allocator-bench").unwrap(),
    );
    for w in 0..workers {
        let worker_id = WorkerId::new(format!("w{w}")).unwrap();
        let gpus = [1u32, 2, 4, 8][rng.below(4) as usize];
        let memory = [24_576u64, 49_152, 81_920][rng.below(3) as usize];
        let tags = if rng.below(2) == 0 {
            vec![]
        } else {
            vec![TAGS[rng.below(4) as usize].to_owned()]
        };
        pool.apply(&record(
            WorkerRegistered {
                worker_id: worker_id.clone(),
                gpus: (0..gpus)
                    .map(|i| GpuInfo {
                        index: i,
                        uuid: format!("SIM-{w}-{i}"),
                        name: "simulated GPU".into(),
                        memory_total_mib: memory,
                        simulated: true,
                    })
                    .collect(),
                price_per_gpu_second: Nanoton(500 + rng.below(1_500)),
                payout_address: "UQ".into(),
                region: "bench".into(),
                max_concurrent_tasks: 4 * gpus,
                public_key: vec![0; 32],
                agent_version: "bench".into(),
                model_tags: tags,
            },
            now,
        ));
        pool.apply(&record(
            AttestationVerified {
                worker_id: worker_id.clone(),
                quote_hash: String::new(),
                tcb_status: "UpToDate".into(),
                measurements: Measurements {
                    mrtd: String::new(),
                    rtmr0: String::new(),
                    rtmr1: String::new(),
                    rtmr2: String::new(),
                    rtmr3: String::new(),
                },
                valid_until: now.saturating_add(Duration::from_secs(86_400)),
            },
            now,
        ));
        pool.apply(&record(
            WorkerHeartbeat {
                worker_id,
                sequence: 1,
                gpus: (0..gpus)
                    .map(|i| GpuTelemetry {
                        index: i,
                        memory_used_mib: rng.below(memory / 2),
                        memory_total_mib: memory,
                        utilization_pct: rng.below(100) as u8,
                        temperature_c: 50,
                        power_mw: 300_000,
                        process_count: 0,
                    })
                    .collect(),
                running_tasks: vec![],
                latency_us: Some(200 + rng.below(50_000) as u32),
            },
            now,
        ));
    }
    pool
}

fn task(rng: &mut Rng, now: Timestamp) -> (TaskId, EventRecord) {
    let task_id = TaskId::new();
    let tag = (rng.below(3) == 0).then(|| TAGS[rng.below(4) as usize].to_owned());
    let event = TaskSubmitted {
        task_id,
        client_id: ClientId::new("bench").unwrap(),
        spec: TaskSpec {
            requirements: Requirements {
                gpu_count: [1u16, 1, 1, 2, 4][rng.below(5) as usize],
                gpu_memory_mib: [2_048u64, 8_192, 16_384][rng.below(3) as usize],
                model_tag: tag,
            },
            priority: Priority::new(1 + rng.below(10) as u8).unwrap(),
            max_price_per_gpu_second: Nanoton(1_000 + rng.below(2_000)),
            timeout_ms: 600_000,
            input: Blob::Inline(Vec::new()),
        },
    };
    (task_id, record(event, now))
}

fn completion(alloc: &EventRecord, now: Timestamp) -> Option<EventRecord> {
    let Event::TaskAllocated(a) = &alloc.event else {
        return None;
    };
    Some(record(
        TaskCompleted {
            task_id: a.task_id,
            worker_id: a.worker_id.clone(),
            attempt: a.attempt,
            usage: Usage {
                gpu_millis: GpuMillis(1_000),
                peak_gpu_memory_mib: None,
                wall_ms: 1_000,
            },
        },
        now,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = Args::parse();
    println!(
        "allocate: {} workers, {} timed decisions, backlog {}, {} runs; {}",
        args.workers,
        args.decisions,
        args.backlog,
        args.runs,
        load_tests::machine::date_utc()
    );
    for run in 1..=args.runs {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ run as u64);
        let now = Timestamp::now();
        let build = Instant::now();
        let mut pool = build_pool(args.workers, &mut rng, now);
        let build = build.elapsed();

        // Latency: one decision per allocate call; completions keep the load steady.
        let mut times = Vec::with_capacity(args.decisions);
        let mut running: VecDeque<EventRecord> = VecDeque::new();
        let mut unplaced = 0;
        for _ in 0..args.decisions {
            let (_, submitted) = task(&mut rng, now);
            pool.apply(&submitted);
            let start = Instant::now();
            let out = pool.allocate(now, 1);
            times.push(start.elapsed());
            match out.into_iter().next() {
                Some(a) => running.push_back(a),
                None => unplaced += 1,
            }
            if running.len() > args.workers {
                let done = running.pop_front().unwrap();
                if let Some(c) = completion(&done, now) {
                    pool.apply(&c);
                }
            }
        }
        times.sort_unstable();
        let stats = pool.stats();
        println!(
            "run {run}/{} latency: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {} decisions ({} left waiting); \
             pool built in {:.2} s, {} eligible workers at the end",
            args.runs,
            percentile(&times, 0.50).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6,
            times.last().unwrap().as_secs_f64() * 1e6,
            times.len(),
            unplaced,
            build.as_secs_f64(),
            stats.workers_eligible,
        );

        // Throughput: a backlog placed in rounds of the pool's batch size.
        let mut pool = build_pool(args.workers, &mut rng, now);
        for _ in 0..args.backlog {
            let (_, submitted) = task(&mut rng, now);
            pool.apply(&submitted);
        }
        let start = Instant::now();
        let mut decided = 0usize;
        loop {
            let out = pool.allocate(now, 1);
            let placed = out
                .iter()
                .filter(|r| matches!(r.event, Event::TaskAllocated(_)))
                .count();
            decided += placed;
            if placed == 0 {
                break;
            }
        }
        let elapsed = start.elapsed();
        println!(
            "run {run}/{} throughput: {} decisions in {:.3} s = {:.0} decisions/s ({} still waiting: no room)",
            args.runs,
            decided,
            elapsed.as_secs_f64(),
            decided as f64 / elapsed.as_secs_f64(),
            pool.stats().tasks_waiting,
        );
    }
}
