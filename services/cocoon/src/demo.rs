//! `dev demo`: publishes a small, coherent slice of the pool's life so a newcomer sees events flow.
//!
//! The events are what the services will emit (a worker registers and attests, tasks are submitted,
//! allocated, run, completed, paid); here the CLI emits them itself, labelled with producer `cocoon-demo`.

use anyhow::Context as _;
use bus::{Publisher, PublisherConfig};
use events::allocations::{ScoreBreakdown, TaskAllocated};
use events::attestations::{AttestationSubmitted, AttestationVerified, Measurements};
use events::payload::Blob;
use events::payments::PaymentAccrued;
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskStarted, TaskSubmitted, Usage};
use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
use events::{ClientId, EventRecord, GpuMillis, Nanoton, ProducerId, TaskId, Timestamp, WorkerId};

use crate::cli::Connection;

pub async fn run(conn: &Connection, tasks: usize) -> anyhow::Result<()> {
    let bus = crate::connect(conn).await?;
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default())?;
    let producer = ProducerId::new("cocoon-demo")?;
    let worker = WorkerId::new("demo-worker-1")?;
    let client = ClientId::new("demo-client")?;
    let price = Nanoton(1_500);
    let mut records = Vec::new();

    let registered = EventRecord::new(
        producer.clone(),
        WorkerRegistered {
            worker_id: worker.clone(),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-demo-0".into(),
                name: "simulated GPU (demo)".into(),
                memory_total_mib: 81_920,
                simulated: true,
            }],
            price_per_gpu_second: price,
            payout_address: "UQBvW8Z5huBkMJYdnfAEM5JqTNkuWX3diqYENkWsIL0XggGG".into(),
            region: "local".into(),
            max_concurrent_tasks: 4,
            public_key: vec![7; 32],
            agent_version: env!("CARGO_PKG_VERSION").into(),
            model_tags: Vec::new(),
        },
    );
    let quote = AttestationSubmitted {
        worker_id: worker.clone(),
        quote: b"demo quote: not a real TDX quote".to_vec(),
        public_key: vec![7; 32],
        nonce: vec![1; 32],
    };
    let submitted_quote = EventRecord::caused_by(&registered.envelope, producer.clone(), quote);
    let verified = EventRecord::caused_by(
        &submitted_quote.envelope,
        producer.clone(),
        AttestationVerified {
            worker_id: worker.clone(),
            quote_hash: "00".repeat(32),
            tcb_status: "DemoOnly".into(),
            measurements: Measurements {
                mrtd: "00".repeat(48),
                rtmr0: "00".repeat(48),
                rtmr1: "00".repeat(48),
                rtmr2: "00".repeat(48),
                rtmr3: "00".repeat(48),
            },
            valid_until: Timestamp::now().saturating_add(std::time::Duration::from_secs(3600)),
        },
    );
    records.extend([registered, submitted_quote, verified]);

    let mut running = Vec::new();
    for i in 0..tasks {
        let task_id = TaskId::new();
        running.push(task_id);
        let submitted = EventRecord::new(
            producer.clone(),
            TaskSubmitted {
                task_id,
                client_id: client.clone(),
                spec: events::sample::task_spec(32),
            },
        );
        let allocated = EventRecord::caused_by(
            &submitted.envelope,
            producer.clone(),
            TaskAllocated {
                task_id,
                client_id: client.clone(),
                worker_id: worker.clone(),
                attempt: 1,
                allocator_epoch: 1,
                gpu_indices: vec![0],
                score: ScoreBreakdown {
                    total: 1.0,
                    load: 0.3,
                    memory: 0.3,
                    history: 0.2,
                    latency: 0.1,
                    affinity: 0.1,
                },
                spec: events::sample::task_spec(32),
            },
        );
        let started = EventRecord::caused_by(
            &allocated.envelope,
            producer.clone(),
            TaskStarted {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                gpu_indices: vec![0],
            },
        );
        let gpu_millis = GpuMillis(1_000 * (i as u64 + 1));
        let completed = EventRecord::caused_by(
            &started.envelope,
            producer.clone(),
            TaskCompleted {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                usage: Usage {
                    gpu_millis,
                    peak_gpu_memory_mib: None,
                    wall_ms: gpu_millis.0,
                },
            },
        );
        let output = format!("demo output of task {task_id}").into_bytes();
        let result = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            TaskResult {
                task_id,
                client_id: client.clone(),
                worker_id: worker.clone(),
                attempt: 1,
                checksum: "demo:unchecked".into(),
                output: Blob::Inline(output),
                truncated: false,
            },
        );
        let accrued = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            PaymentAccrued {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                gpu_millis,
                price_per_gpu_second: price,
                amount: gpu_millis.cost(price).context("amount overflows")?,
            },
        );
        records.extend([submitted, allocated, started, completed, result, accrued]);
    }
    records.push(EventRecord::new(
        producer.clone(),
        WorkerHeartbeat {
            worker_id: worker.clone(),
            sequence: 1,
            gpus: vec![GpuTelemetry {
                index: 0,
                memory_used_mib: 0,
                memory_total_mib: 81_920,
                utilization_pct: 0,
                temperature_c: 35,
                power_mw: 60_000,
                process_count: 0,
            }],
            running_tasks: vec![],
            latency_us: None,
        },
    ));

    let mut receipts = Vec::new();
    for record in &records {
        receipts.push((record.event.kind(), publisher.publish(record).await?));
    }
    publisher
        .flush()
        .await
        .context("publishing the demo events")?;
    for (kind, receipt) in receipts {
        let position = receipt.await?;
        println!(
            "published {kind:<22} -> {} seq {} #{}",
            position.stream, position.sequence, position.index
        );
    }
    println!(
        "{} events published; read them back with `cocoon events dump`",
        records.len()
    );
    Ok(())
}
