//! Deterministic sample events, one of every type: the golden fixtures, tests and benchmarks use them.

use crate::allocations::*;
use crate::attestations::*;
use crate::envelope::Envelope;
use crate::event::{Event, EventRecord};
use crate::ids::*;
use crate::money::{GpuMillis, Nanoton};
use crate::payload::{Blob, Priority, Requirements, TaskSpec};
use crate::payments::*;
use crate::results::*;
use crate::tasks::*;
use crate::time::Timestamp;
use crate::workers::*;

const T0: i64 = 1_795_383_637_000_000; // 2026-11-22T21:40:37Z

/// How long the verdicts of [`lifecycle`] stay valid after [`T0`]: a century, so that read models that
/// compare validity with the wall clock (`worker_attestation_state.attested`) see them valid whenever a test
/// runs. (A day after T0 made such a test fail from 2026-11-23T21:40:37Z on.)
const LIFECYCLE_ATTESTATION_VALIDITY: i64 = 100 * 365 * 86_400_000_000;

fn worker() -> WorkerId {
    WorkerId::new("worker-7").expect("valid sample id")
}

fn client() -> ClientId {
    ClientId::new("client-42").expect("valid sample id")
}

const TASK: TaskId = TaskId::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
const SETTLEMENT: SettlementId = SettlementId::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);

/// A task spec with an inline input of `input_len` bytes.
pub fn task_spec(input_len: usize) -> TaskSpec {
    TaskSpec {
        requirements: Requirements {
            gpu_count: 1,
            gpu_memory_mib: 16_384,
            model_tag: Some("llama-3-8b".to_owned()),
        },
        priority: Priority::new(5).expect("valid sample priority"),
        max_price_per_gpu_second: Nanoton(2_000),
        timeout_ms: 60_000,
        input: Blob::Inline((0..input_len).map(|i| (i % 251) as u8).collect()),
    }
}

/// One sample of every event type, in registry order.
pub fn all_events() -> Vec<Event> {
    let gpu = GpuTelemetry {
        index: 0,
        memory_used_mib: 10_240,
        memory_total_mib: 81_559,
        utilization_pct: 87,
        temperature_c: 61,
        power_mw: 412_000,
        process_count: 1,
    };
    vec![
        TaskSubmitted {
            task_id: TASK,
            client_id: client(),
            spec: task_spec(64),
        }
        .into(),
        TaskStarted {
            task_id: TASK,
            worker_id: worker(),
            attempt: 1,
            gpu_indices: vec![0],
        }
        .into(),
        TaskProgress {
            task_id: TASK,
            worker_id: worker(),
            attempt: 1,
            percent: 40,
            message: Some("epoch 2/5".to_owned()),
        }
        .into(),
        TaskCompleted {
            task_id: TASK,
            worker_id: worker(),
            attempt: 1,
            usage: Usage {
                gpu_millis: GpuMillis(12_345),
                peak_gpu_memory_mib: Some(9_000),
                wall_ms: 12_400,
            },
        }
        .into(),
        TaskFailed {
            task_id: TASK,
            worker_id: Some(worker()),
            attempt: 1,
            reason: "exit status 1".to_owned(),
            retryable: true,
        }
        .into(),
        TaskCancelled {
            task_id: TASK,
            reason: "client request".to_owned(),
        }
        .into(),
        TaskRequeued {
            task_id: TASK,
            attempt: 1,
            previous_worker: Some(worker()),
            reason: RequeueReason::WorkerLost,
        }
        .into(),
        TaskExpired {
            task_id: TASK,
            attempts: 3,
            deadline: Timestamp(T0 + 60_000_000),
        }
        .into(),
        TaskRejected {
            task_id: TASK,
            reason: "no worker has 8 GPUs".to_owned(),
        }
        .into(),
        TaskAllocated {
            task_id: TASK,
            client_id: client(),
            worker_id: worker(),
            attempt: 1,
            allocator_epoch: 3,
            gpu_indices: vec![0],
            score: ScoreBreakdown {
                total: 0.8125,
                load: 0.25,
                memory: 0.25,
                history: 0.1875,
                latency: 0.0625,
                affinity: 0.0625,
            },
            spec: task_spec(64),
        }
        .into(),
        AllocationRevoked {
            task_id: TASK,
            worker_id: worker(),
            attempt: 1,
            allocator_epoch: 3,
            reason: "worker lost".to_owned(),
        }
        .into(),
        WorkerRegistered {
            worker_id: worker(),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "GPU-5e4a1c2b-0000-0000-0000-000000000000".to_owned(),
                name: "NVIDIA H100 80GB HBM3".to_owned(),
                memory_total_mib: 81_559,
                simulated: false,
            }],
            price_per_gpu_second: Nanoton(1_500),
            payout_address: "UQBvW8Z5huBkMJYdnfAEM5JqTNkuWX3diqYENkWsIL0XggGG".to_owned(),
            region: "eu-central".to_owned(),
            max_concurrent_tasks: 4,
            public_key: vec![7; 32],
            agent_version: "0.1.0".to_owned(),
            model_tags: vec!["llama-3-70b".to_owned()],
        }
        .into(),
        WorkerHeartbeat {
            worker_id: worker(),
            sequence: 17,
            gpus: vec![gpu],
            running_tasks: vec![TASK],
            latency_us: Some(850),
        }
        .into(),
        WorkerDraining {
            worker_id: worker(),
            reason: "maintenance".to_owned(),
        }
        .into(),
        WorkerDeregistered {
            worker_id: worker(),
            reason: "shutdown".to_owned(),
        }
        .into(),
        WorkerLost {
            worker_id: worker(),
            last_heartbeat_at: Timestamp(T0),
        }
        .into(),
        AttestationSubmitted {
            worker_id: worker(),
            quote: vec![4, 0, 2, 0, 0x81, 0, 0, 0],
            public_key: vec![7; 32],
            nonce: vec![1; 32],
        }
        .into(),
        AttestationVerified {
            worker_id: worker(),
            quote_hash: "ab".repeat(32),
            tcb_status: "UpToDate".to_owned(),
            measurements: Measurements {
                mrtd: "00".repeat(48),
                rtmr0: "01".repeat(48),
                rtmr1: "02".repeat(48),
                rtmr2: "03".repeat(48),
                rtmr3: "04".repeat(48),
            },
            valid_until: Timestamp(T0 + 86_400_000_000),
        }
        .into(),
        AttestationRejected {
            worker_id: worker(),
            quote_hash: "cd".repeat(32),
            reason: "debug TD refused".to_owned(),
        }
        .into(),
        PaymentAccrued {
            task_id: TASK,
            worker_id: worker(),
            attempt: 1,
            gpu_millis: GpuMillis(12_345),
            price_per_gpu_second: Nanoton(1_500),
            amount: Nanoton(18_517),
        }
        .into(),
        SettlementPrepared {
            settlement_id: SETTLEMENT,
            wallet_seqno: 12,
            valid_until: Timestamp(T0 + 60_000_000),
            payouts: vec![Payout {
                worker_id: worker(),
                destination: "UQBvW8Z5huBkMJYdnfAEM5JqTNkuWX3diqYENkWsIL0XggGG".to_owned(),
                amount: Nanoton(18_517),
                task_ids: vec![TASK],
            }],
            signed_message: vec![0xb5, 0xee, 0x9c, 0x72, 1, 2, 3],
            message_hash: "ef".repeat(32),
        }
        .into(),
        SettlementSubmitted {
            settlement_id: SETTLEMENT,
            message_hash: "ef".repeat(32),
            send_attempt: 1,
        }
        .into(),
        SettlementConfirmed {
            settlement_id: SETTLEMENT,
            tx_hash: "12".repeat(32),
            logical_time: 47_000_000_000_001,
            failed_transfers: vec![],
        }
        .into(),
        SettlementExpired {
            settlement_id: SETTLEMENT,
            valid_until: Timestamp(T0 + 60_000_000),
        }
        .into(),
        SettlementFailed {
            settlement_id: SETTLEMENT,
            reason: "wallet not deployed".to_owned(),
        }
        .into(),
        PayoutParked {
            worker_id: worker(),
            destination: "not-a-ton-address".to_owned(),
            amount: Nanoton(18_517),
            task_ids: vec![TASK],
            reason: "invalid TON address: not-a-ton-address".to_owned(),
        }
        .into(),
        TaskResult {
            task_id: TASK,
            client_id: client(),
            worker_id: worker(),
            attempt: 1,
            output: Blob::Inline(b"hello from the GPU".to_vec()),
            checksum: "sha256:".to_owned() + &"9a".repeat(32),
            truncated: false,
        }
        .into(),
    ]
}

/// Sample records with fixed envelopes (event ids derived from the position).
pub fn all_records() -> Vec<EventRecord> {
    all_events()
        .into_iter()
        .enumerate()
        .map(|(i, event)| EventRecord {
            envelope: Envelope {
                event_id: EventId::from_u128(0x0193_0000_0000_7000_9000_0000_0000_0000 + i as u128),
                occurred_at: Timestamp(T0 + i as i64),
                producer: ProducerId::new("sample").expect("valid sample id"),
                correlation_id: CorrelationId::from_u128(0x0193_0000_0000_7000_a000_0000_0000_0000),
                causation_id: (i > 0)
                    .then(|| EventId::from_u128(0x0193_0000_0000_7000_9000_0000_0000_0000)),
                schema_version: event.version(),
            },
            event,
        })
        .collect()
}

/// A TaskSubmitted that encodes (as a frame element) to `size` bytes, or as close as the fixed part allows;
/// 350 bytes matches the brief's benchmark.
pub fn task_submitted_of_size(size: usize) -> EventRecord {
    let make = |input_len: usize| {
        EventRecord::new(
            ProducerId::new("load").expect("valid sample id"),
            TaskSubmitted {
                task_id: TaskId::new(),
                client_id: client(),
                spec: task_spec(input_len),
            },
        )
    };
    let encoded = |n: usize| crate::frame::encode_event(&make(n)).map_or(usize::MAX, |b| b.len());
    // Length prefixes grow with the input, so step down from the estimate to the largest input that fits.
    let mut input_len = size.saturating_sub(encoded(0));
    while input_len > 0 && encoded(input_len) > size {
        input_len -= 1;
    }
    make(input_len)
}

/// A coherent slice of the pool's life across every stream, for projection tests and benchmarks:
/// `workers` workers register, attest and heartbeat; `tasks` tasks are submitted, allocated, started and
/// completed (every fifth fails once and is requeued, every seventh is cancelled instead); completed tasks
/// accrue, produce a result, and each worker's accruals are settled and confirmed.
pub fn lifecycle(tasks: usize, workers: usize) -> Vec<EventRecord> {
    use crate::payload::Blob;
    let workers = workers.max(1);
    let producer = ProducerId::new("scenario").expect("valid id");
    let mut out = Vec::new();
    let worker_ids: Vec<WorkerId> = (0..workers)
        .map(|w| WorkerId::new(format!("w{w}")).expect("valid id"))
        .collect();
    for (w, worker_id) in worker_ids.iter().enumerate() {
        let registered = EventRecord::new(
            producer.clone(),
            WorkerRegistered {
                worker_id: worker_id.clone(),
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: format!("GPU-{w}"),
                    name: "simulated".into(),
                    memory_total_mib: 81_920,
                    simulated: true,
                }],
                price_per_gpu_second: Nanoton(1_000 + w as u64),
                payout_address: format!("UQ-worker-{w}"),
                region: "local".into(),
                max_concurrent_tasks: 4,
                public_key: vec![w as u8; 32],
                agent_version: "test".into(),
                model_tags: Vec::new(),
            },
        );
        let submitted = EventRecord::caused_by(
            &registered.envelope,
            producer.clone(),
            AttestationSubmitted {
                worker_id: worker_id.clone(),
                quote: vec![w as u8; 64],
                public_key: vec![w as u8; 32],
                nonce: vec![1; 32],
            },
        );
        let verified = EventRecord::caused_by(
            &submitted.envelope,
            producer.clone(),
            AttestationVerified {
                worker_id: worker_id.clone(),
                quote_hash: format!("{w:064x}"),
                tcb_status: "UpToDate".into(),
                measurements: Measurements {
                    mrtd: "00".repeat(48),
                    rtmr0: "01".repeat(48),
                    rtmr1: "02".repeat(48),
                    rtmr2: "03".repeat(48),
                    rtmr3: "04".repeat(48),
                },
                valid_until: Timestamp(T0 + LIFECYCLE_ATTESTATION_VALIDITY),
            },
        );
        out.extend([registered, submitted, verified]);
    }
    let client = client();
    let mut earned: Vec<(Nanoton, Vec<TaskId>)> = vec![(Nanoton(0), Vec::new()); workers];
    for t in 0..tasks {
        let task_id = TaskId::new();
        let w = t % workers;
        let worker_id = &worker_ids[w];
        let submitted = EventRecord::new(
            producer.clone(),
            TaskSubmitted {
                task_id,
                client_id: client.clone(),
                spec: task_spec(32),
            },
        );
        let mut attempt = 1;
        let allocate = |attempt: u32, cause: &EventRecord| {
            EventRecord::caused_by(
                &cause.envelope,
                producer.clone(),
                TaskAllocated {
                    task_id,
                    client_id: client.clone(),
                    worker_id: worker_id.clone(),
                    attempt,
                    allocator_epoch: 1,
                    gpu_indices: vec![0],
                    score: ScoreBreakdown {
                        total: 0.9,
                        load: 0.3,
                        memory: 0.3,
                        history: 0.1,
                        latency: 0.1,
                        affinity: 0.1,
                    },
                    spec: task_spec(32),
                },
            )
        };
        let first = allocate(attempt, &submitted);
        out.push(submitted);
        if t % 7 == 6 {
            out.push(first.clone());
            out.push(EventRecord::caused_by(
                &first.envelope,
                producer.clone(),
                TaskCancelled {
                    task_id,
                    reason: "client request".into(),
                },
            ));
            continue;
        }
        let mut alloc = first;
        if t % 5 == 4 {
            let started = EventRecord::caused_by(
                &alloc.envelope,
                producer.clone(),
                TaskStarted {
                    task_id,
                    worker_id: worker_id.clone(),
                    attempt,
                    gpu_indices: vec![0],
                },
            );
            let failed = EventRecord::caused_by(
                &started.envelope,
                producer.clone(),
                TaskFailed {
                    task_id,
                    worker_id: Some(worker_id.clone()),
                    attempt,
                    reason: "exit status 1".into(),
                    retryable: true,
                },
            );
            let requeued = EventRecord::caused_by(
                &failed.envelope,
                producer.clone(),
                TaskRequeued {
                    task_id,
                    attempt,
                    previous_worker: Some(worker_id.clone()),
                    reason: RequeueReason::RetryableFailure,
                },
            );
            attempt += 1;
            let second = allocate(attempt, &requeued);
            out.extend([alloc, started, failed, requeued]);
            alloc = second;
        }
        let started = EventRecord::caused_by(
            &alloc.envelope,
            producer.clone(),
            TaskStarted {
                task_id,
                worker_id: worker_id.clone(),
                attempt,
                gpu_indices: vec![0],
            },
        );
        let gpu_millis = GpuMillis(1_000 + t as u64);
        let price = Nanoton(1_000 + w as u64);
        let completed = EventRecord::caused_by(
            &started.envelope,
            producer.clone(),
            TaskCompleted {
                task_id,
                worker_id: worker_id.clone(),
                attempt,
                usage: Usage {
                    gpu_millis,
                    peak_gpu_memory_mib: Some(1_024),
                    wall_ms: 1_000,
                },
            },
        );
        let result = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            TaskResult {
                task_id,
                client_id: client.clone(),
                worker_id: worker_id.clone(),
                attempt,
                output: Blob::Inline(vec![t as u8; 16]),
                checksum: format!("sha256:{t:064x}"),
                truncated: false,
            },
        );
        let amount = gpu_millis.cost(price).expect("small numbers");
        let accrued = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            PaymentAccrued {
                task_id,
                worker_id: worker_id.clone(),
                attempt,
                gpu_millis,
                price_per_gpu_second: price,
                amount,
            },
        );
        earned[w].0 = Nanoton(earned[w].0.0 + amount.0);
        earned[w].1.push(task_id);
        out.extend([alloc, started, completed, result, accrued]);
    }
    let payouts: Vec<Payout> = earned
        .iter()
        .enumerate()
        .filter(|(_, (amount, _))| amount.0 > 0)
        .map(|(w, (amount, tasks))| Payout {
            worker_id: worker_ids[w].clone(),
            destination: format!("UQ-worker-{w}"),
            amount: *amount,
            task_ids: tasks.clone(),
        })
        .collect();
    if !payouts.is_empty() {
        let settlement_id = SettlementId::new();
        let prepared = EventRecord::new(
            producer.clone(),
            SettlementPrepared {
                settlement_id,
                wallet_seqno: 1,
                valid_until: Timestamp(T0 + 60_000_000),
                payouts: payouts.into_iter().take(255).collect(),
                signed_message: vec![0xb5, 0xee],
                message_hash: "ab".repeat(32),
            },
        );
        let sent = EventRecord::caused_by(
            &prepared.envelope,
            producer.clone(),
            SettlementSubmitted {
                settlement_id,
                message_hash: "ab".repeat(32),
                send_attempt: 1,
            },
        );
        let confirmed = EventRecord::caused_by(
            &sent.envelope,
            producer.clone(),
            SettlementConfirmed {
                settlement_id,
                tx_hash: "cd".repeat(32),
                logical_time: 42,
                failed_transfers: vec![],
            },
        );
        out.extend([prepared, sent, confirmed]);
    }
    out
}

/// What the attestor would publish for a worker whose quote verified: the submission and its verdict, valid
/// until `valid_until`. A stand-in for tests and benchmarks that need attested workers without verifying a
/// quote; the quote, key and nonce are placeholders, not a TDX quote.
pub fn stand_in_attestation(worker: &WorkerId, valid_until: Timestamp) -> [EventRecord; 2] {
    let producer = ProducerId::new("attestor-standin").expect("valid id");
    let submitted = EventRecord::new(
        producer.clone(),
        AttestationSubmitted {
            worker_id: worker.clone(),
            quote: b"stand-in quote".to_vec(),
            public_key: vec![0; 32],
            nonce: vec![0; 32],
        },
    );
    let verdict = EventRecord::caused_by(
        &submitted.envelope,
        producer,
        AttestationVerified {
            worker_id: worker.clone(),
            quote_hash: "stand-in".into(),
            tcb_status: "UpToDate".into(),
            measurements: Measurements {
                mrtd: String::new(),
                rtmr0: String::new(),
                rtmr1: String::new(),
                rtmr2: String::new(),
                rtmr3: String::new(),
            },
            valid_until,
        },
    );
    [submitted, verdict]
}
