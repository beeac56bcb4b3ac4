//! The agent against a real nats-server: registration and heartbeats, execution and results, fencing,
//! concurrency, revocation, failures, and the drain on shutdown. Everything is asserted by reading the streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{Bus, Publisher, PublisherConfig, RangeReader, provision_streams};
use events::allocations::{AllocationRevoked, ScoreBreakdown, TaskAllocated};
use events::payload::{Blob, Priority, Requirements, TaskSpec};
use events::{
    ClientId, CodecConfig, Event, EventRecord, Nanoton, ProducerId, Stream, TaskId, WorkerId,
};
use node_agent::{
    AgentConfig, AgentError, AgentReport, ExecConfig, ExecExecutor, Executor, GpuSource,
};
use tests::NatsServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(15);

struct Pool {
    _server: NatsServer,
    bus: Bus,
    publisher: Publisher,
}

async fn pool() -> Pool {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    Pool {
        _server: server,
        bus,
        publisher,
    }
}

struct Running {
    cancel: CancellationToken,
    handle: JoinHandle<Result<AgentReport, AgentError>>,
}

impl Running {
    async fn stop(self) -> AgentReport {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.handle)
            .await
            .expect("agent did not stop in time")
            .unwrap()
            .unwrap()
    }
}

fn config(worker: &str, max_concurrent: u32) -> AgentConfig {
    let mut c = AgentConfig::new(WorkerId::new(worker).unwrap());
    c.region = "eu-test".into();
    c.price_per_gpu_second = Nanoton(1_500);
    c.payout_address = "EQ-test-payout".into();
    c.max_concurrent_tasks = max_concurrent;
    c.model_tags = vec!["llama-3-8b".into()];
    c.heartbeat_interval = Duration::from_millis(100);
    c.fetch_wait = Duration::from_millis(100);
    c
}

/// `sh` reading its script from stdin: the task's input is the script, so one agent runs varied tasks.
fn script_executor() -> Arc<dyn Executor> {
    Arc::new(ExecExecutor::new(ExecConfig::new(
        "sh",
        Vec::<String>::new(),
    )))
}

fn start(pool: &Pool, config: AgentConfig, gpus: u32, executor: Arc<dyn Executor>) -> Running {
    let cancel = CancellationToken::new();
    let gpus = GpuSource::simulated(&config.worker_id, gpus);
    let handle = tokio::spawn(node_agent::run(
        config,
        pool.bus.clone(),
        pool.publisher.clone(),
        gpus,
        executor,
        cancel.clone(),
    ));
    Running { cancel, handle }
}

fn allocation(
    worker: &str,
    task: u128,
    epoch: u64,
    gpus: &[u32],
    input: &str,
    timeout_ms: u64,
) -> TaskAllocated {
    TaskAllocated {
        task_id: TaskId::from_u128(task),
        client_id: ClientId::new("client-1").unwrap(),
        worker_id: WorkerId::new(worker).unwrap(),
        attempt: 1,
        allocator_epoch: epoch,
        gpu_indices: gpus.to_vec(),
        score: ScoreBreakdown {
            total: 1.0,
            load: 0.3,
            memory: 0.3,
            history: 0.2,
            latency: 0.1,
            affinity: 0.1,
        },
        spec: TaskSpec {
            requirements: Requirements {
                gpu_count: gpus.len() as u16,
                gpu_memory_mib: 1024,
                model_tag: None,
            },
            priority: Priority::new(5).unwrap(),
            max_price_per_gpu_second: Nanoton(2_000),
            timeout_ms,
            input: Blob::Inline(input.as_bytes().to_vec()),
        },
    }
}

async fn send(pool: &Pool, event: impl Into<Event>) -> EventRecord {
    let record = EventRecord::new(ProducerId::new("allocator-test").unwrap(), event);
    pool.publisher
        .publish(&record)
        .await
        .unwrap()
        .await
        .unwrap();
    record
}

/// Every event of `stream`, in log order.
async fn read(bus: &Bus, stream: Stream) -> Vec<EventRecord> {
    bus::read_events(&bus.jetstream, stream, Vec::new())
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// Polls `stream` until `done` holds, or fails at the deadline.
async fn until(
    bus: &Bus,
    stream: Stream,
    what: &str,
    done: impl Fn(&[EventRecord]) -> bool,
) -> Vec<EventRecord> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let records = read(bus, stream).await;
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; {stream} holds: {:#?}",
            records.iter().map(|r| &r.event).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn task(n: u128) -> TaskId {
    TaskId::from_u128(n)
}

fn started(records: &[EventRecord], t: TaskId) -> Vec<&EventRecord> {
    records
        .iter()
        .filter(|r| matches!(&r.event, Event::TaskStarted(e) if e.task_id == t))
        .collect()
}

fn completed(records: &[EventRecord], t: TaskId) -> Option<&EventRecord> {
    records
        .iter()
        .find(|r| matches!(&r.event, Event::TaskCompleted(e) if e.task_id == t))
}

fn failed(records: &[EventRecord], t: TaskId) -> Option<&events::tasks::TaskFailed> {
    records.iter().find_map(|r| match &r.event {
        Event::TaskFailed(e) if e.task_id == t => Some(e),
        _ => None,
    })
}

fn kinds(records: &[EventRecord]) -> Vec<&'static str> {
    records.iter().map(|r| r.event.kind()).collect()
}

#[tokio::test]
async fn registers_heartbeats_runs_a_task_and_reports_result_and_usage() {
    let pool = pool().await;
    let executor = Arc::new(ExecExecutor::new(ExecConfig::new(
        "sh",
        ["-c", "tr a-z A-Z"],
    )));
    let agent = start(&pool, config("w1", 2), 2, executor);

    let workers = until(&pool.bus, Stream::Workers, "two heartbeats", |r| {
        r.iter()
            .filter(|r| r.event.kind() == "WorkerHeartbeat")
            .count()
            >= 2
    })
    .await;
    let Event::WorkerRegistered(reg) = &workers[0].event else {
        panic!("first event is not the registration: {:?}", kinds(&workers));
    };
    assert_eq!(reg.worker_id.as_str(), "w1");
    assert_eq!(reg.gpus.len(), 2);
    assert!(
        reg.gpus
            .iter()
            .all(|g| g.simulated && g.name == "simulated GPU")
    );
    assert_eq!(reg.gpus[1].uuid, "SIM-w1-1");
    assert_eq!(reg.price_per_gpu_second, Nanoton(1_500));
    assert_eq!(reg.payout_address, "EQ-test-payout");
    assert_eq!(reg.region, "eu-test");
    assert_eq!(reg.max_concurrent_tasks, 2);
    assert_eq!(reg.model_tags, vec!["llama-3-8b".to_owned()]);
    assert_eq!(reg.public_key.len(), 32);
    let beats: Vec<_> = workers
        .iter()
        .filter_map(|r| match &r.event {
            Event::WorkerHeartbeat(h) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(beats[0].sequence, 1);
    assert_eq!(beats[1].sequence, 2);
    assert!(beats.iter().all(|h| h.latency_us.is_some()), "{beats:?}");
    assert_eq!(beats[0].gpus.len(), 2);
    assert_eq!(beats[0].gpus[0].memory_total_mib, 81_920);

    let alloc = send(&pool, allocation("w1", 1, 1, &[0, 1], "hello gpu", 10_000)).await;
    let tasks = until(&pool.bus, Stream::Tasks, "the completion", |r| {
        completed(r, task(1)).is_some()
    })
    .await;
    let start_record = started(&tasks, task(1));
    assert_eq!(start_record.len(), 1);
    let Event::TaskStarted(s) = &start_record[0].event else {
        unreachable!()
    };
    assert_eq!((s.worker_id.as_str(), s.attempt), ("w1", 1));
    assert_eq!(s.gpu_indices, vec![0, 1]);
    let done = completed(&tasks, task(1)).unwrap();
    let Event::TaskCompleted(c) = &done.event else {
        unreachable!()
    };
    assert_eq!(c.usage.gpu_millis.0, c.usage.wall_ms * 2);
    assert_eq!(
        c.usage.peak_gpu_memory_mib, None,
        "simulated GPUs cannot tell"
    );
    // Correlation chains from the allocation.
    for r in [start_record[0], done] {
        assert_eq!(r.envelope.correlation_id, alloc.envelope.correlation_id);
        assert_eq!(r.envelope.causation_id, Some(alloc.envelope.event_id));
        assert_eq!(r.envelope.producer.as_str(), "w1");
    }

    let results = until(&pool.bus, Stream::Results, "the result", |r| !r.is_empty()).await;
    let Event::TaskResult(result) = &results[0].event else {
        panic!("{:?}", kinds(&results))
    };
    assert_eq!(result.task_id, task(1));
    assert_eq!(result.client_id.as_str(), "client-1");
    assert_eq!(result.output, Blob::Inline(b"HELLO GPU".to_vec()));
    assert_eq!(result.checksum, node_agent::checksum(b"HELLO GPU"));
    assert!(!result.truncated);
    assert_eq!(
        results[0].envelope.causation_id,
        Some(alloc.envelope.event_id)
    );

    let report = agent.stop().await;
    assert_eq!(report.tasks_completed, 1);
    assert!(report.heartbeats >= 2);
    let workers = read(&pool.bus, Stream::Workers).await;
    let k = kinds(&workers);
    let draining = k.iter().position(|k| *k == "WorkerDraining").unwrap();
    assert_eq!(k.last(), Some(&"WorkerDeregistered"), "{k:?}");
    assert!(draining < k.len() - 1);
}

#[tokio::test]
async fn older_epochs_and_duplicates_are_ignored() {
    let pool = pool().await;
    let agent = start(&pool, config("w2", 1), 1, script_executor());
    send(&pool, allocation("w2", 1, 5, &[0], "echo a", 10_000)).await;
    // From a deposed allocator: refused.
    send(&pool, allocation("w2", 2, 4, &[0], "echo b", 10_000)).await;
    // The same attempt again (a redelivery or a retried publish): refused.
    send(&pool, allocation("w2", 1, 5, &[0], "echo a", 10_000)).await;
    // A newer epoch is fine, and marks the end: allocations are handled in order, one slot.
    send(&pool, allocation("w2", 3, 6, &[0], "echo c", 10_000)).await;
    let tasks = until(&pool.bus, Stream::Tasks, "the marker task", |r| {
        completed(r, task(3)).is_some()
    })
    .await;
    assert_eq!(started(&tasks, task(1)).len(), 1);
    assert!(completed(&tasks, task(1)).is_some());
    assert!(started(&tasks, task(2)).is_empty(), "{:?}", kinds(&tasks));
    let report = agent.stop().await;
    assert_eq!(report.allocations_stale, 1);
    assert_eq!(report.allocations_duplicate, 1);
    assert_eq!(report.tasks_completed, 2);
}

#[tokio::test]
async fn max_concurrency_is_honoured_and_heartbeats_list_running_tasks() {
    let pool = pool().await;
    let agent = start(&pool, config("w3", 1), 1, script_executor());
    send(
        &pool,
        allocation("w3", 1, 1, &[0], "sleep 0.3; echo one", 10_000),
    )
    .await;
    send(
        &pool,
        allocation("w3", 2, 1, &[0], "sleep 0.3; echo two", 10_000),
    )
    .await;
    let tasks = until(&pool.bus, Stream::Tasks, "both completions", |r| {
        completed(r, task(1)).is_some() && completed(r, task(2)).is_some()
    })
    .await;
    let first_done = completed(&tasks, task(1)).unwrap().envelope.occurred_at;
    let second_started = started(&tasks, task(2))[0].envelope.occurred_at;
    assert!(
        second_started >= first_done,
        "second started at {second_started} before the first completed at {first_done}"
    );
    let workers = read(&pool.bus, Stream::Workers).await;
    let busy = workers.iter().find_map(|r| match &r.event {
        Event::WorkerHeartbeat(h) if !h.running_tasks.is_empty() => Some(h),
        _ => None,
    });
    let busy = busy.expect("no heartbeat while a task ran");
    assert_eq!(busy.running_tasks.len(), 1);
    assert_eq!(busy.gpus[0].process_count, 1);
    assert!(busy.gpus[0].utilization_pct >= 80);
    agent.stop().await;
}

#[tokio::test]
async fn failures_are_reported_with_retryability() {
    let pool = pool().await;
    let agent = start(&pool, config("w4", 3), 1, script_executor());
    send(
        &pool,
        allocation("w4", 1, 1, &[0], "echo 'out of memory' >&2; exit 7", 10_000),
    )
    .await;
    send(&pool, allocation("w4", 2, 1, &[0], "sleep 30", 200)).await;
    let mut reference = allocation("w4", 3, 1, &[0], "", 10_000);
    reference.spec.input = Blob::Reference {
        uri: "s3://inputs/3".into(),
        size_bytes: 10,
        checksum: "sha256:00".into(),
    };
    send(&pool, reference).await;
    let tasks = until(&pool.bus, Stream::Tasks, "three failures", |r| {
        (1..=3).all(|n| failed(r, task(n)).is_some())
    })
    .await;
    let exit = failed(&tasks, task(1)).unwrap();
    assert!(!exit.retryable);
    assert_eq!(exit.worker_id.as_ref().map(WorkerId::as_str), Some("w4"));
    assert!(exit.reason.contains("exit status: 7"), "{}", exit.reason);
    assert!(exit.reason.contains("out of memory"), "{}", exit.reason);
    let timeout = failed(&tasks, task(2)).unwrap();
    assert!(timeout.retryable);
    assert!(timeout.reason.contains("timed out"), "{}", timeout.reason);
    let reference = failed(&tasks, task(3)).unwrap();
    assert!(!reference.retryable);
    assert_eq!(
        reference.reason,
        node_agent::exec::REFERENCE_INPUT_UNSUPPORTED
    );
    let report = agent.stop().await;
    assert_eq!(report.tasks_failed, 3);
}

/// An output that does not fit in a frame once encoded (here: 1.1 MB that do not compress, with the capture
/// limit raised above the default) cannot be stored as a result: the attempt fails, permanently, instead of
/// completing without its output. An output at the default limit that does not compress still fits.
#[tokio::test]
async fn a_result_too_large_to_store_fails_the_attempt_instead_of_completing_it() {
    let pool = pool().await;
    let mut exec = ExecConfig::new("sh", Vec::<String>::new());
    exec.max_output_bytes = 2 * 1024 * 1024;
    let agent = start(
        &pool,
        config("w-big", 2),
        1,
        Arc::new(ExecExecutor::new(exec)),
    );
    send(
        &pool,
        allocation("w-big", 1, 1, &[0], "head -c 1100000 /dev/urandom", 10_000),
    )
    .await;
    let limit = node_agent::exec::DEFAULT_MAX_OUTPUT_BYTES;
    send(
        &pool,
        allocation(
            "w-big",
            2,
            1,
            &[0],
            &format!("head -c {limit} /dev/urandom"),
            10_000,
        ),
    )
    .await;
    let tasks = until(&pool.bus, Stream::Tasks, "both tasks end", |r| {
        failed(r, task(1)).is_some() && completed(r, task(2)).is_some()
    })
    .await;
    let too_large = failed(&tasks, task(1)).unwrap();
    assert!(!too_large.retryable);
    assert!(
        too_large.reason.contains("result could not be stored"),
        "{}",
        too_large.reason
    );
    assert!(completed(&tasks, task(1)).is_none());
    let results = read(&pool.bus, Stream::Results).await;
    let outputs: Vec<(TaskId, usize)> = results
        .iter()
        .filter_map(|r| match &r.event {
            Event::TaskResult(res) => match &res.output {
                Blob::Inline(bytes) => Some((res.task_id, bytes.len())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(outputs, vec![(task(2), limit)]);
    let report = agent.stop().await;
    assert_eq!((report.tasks_completed, report.tasks_failed), (1, 1));
}

#[tokio::test]
async fn a_revoked_attempt_is_killed_and_reports_nothing() {
    let pool = pool().await;
    let agent = start(&pool, config("w5", 1), 1, script_executor());
    send(&pool, allocation("w5", 1, 2, &[0], "sleep 30", 60_000)).await;
    until(&pool.bus, Stream::Tasks, "the start", |r| {
        !started(r, task(1)).is_empty()
    })
    .await;
    send(
        &pool,
        AllocationRevoked {
            task_id: task(1),
            worker_id: WorkerId::new("w5").unwrap(),
            attempt: 1,
            allocator_epoch: 2,
            reason: "cancelled by client".into(),
        },
    )
    .await;
    // One slot: the next task can only run once the revoked one's process is gone.
    send(&pool, allocation("w5", 2, 2, &[0], "echo next", 10_000)).await;
    let tasks = until(&pool.bus, Stream::Tasks, "the next task", |r| {
        completed(r, task(2)).is_some()
    })
    .await;
    assert!(completed(&tasks, task(1)).is_none());
    assert!(failed(&tasks, task(1)).is_none(), "{:?}", kinds(&tasks));
    let report = agent.stop().await;
    assert_eq!(report.tasks_revoked, 1);
    assert_eq!(report.tasks_completed, 1);
    let results = read(&pool.bus, Stream::Results).await;
    assert_eq!(results.len(), 1);
}

#[tokio::test]
async fn drain_lets_a_running_task_finish() {
    let pool = pool().await;
    let agent = start(&pool, config("w6", 1), 1, script_executor());
    send(
        &pool,
        allocation("w6", 1, 1, &[0], "sleep 0.5; echo done", 10_000),
    )
    .await;
    until(&pool.bus, Stream::Tasks, "the start", |r| {
        !started(r, task(1)).is_empty()
    })
    .await;
    let report = agent.stop().await;
    assert_eq!(report.tasks_completed, 1);
    let tasks = read(&pool.bus, Stream::Tasks).await;
    let done = completed(&tasks, task(1)).expect("the task finished during the drain");
    let workers = read(&pool.bus, Stream::Workers).await;
    let at = |kind: &str| {
        workers
            .iter()
            .find(|r| r.event.kind() == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
            .envelope
            .occurred_at
    };
    assert!(at("WorkerDraining") <= done.envelope.occurred_at);
    assert!(done.envelope.occurred_at <= at("WorkerDeregistered"));
}

#[tokio::test]
async fn drain_timeout_kills_and_fails_what_is_left_as_retryable() {
    let pool = pool().await;
    let mut c = config("w7", 1);
    c.drain_timeout = Duration::from_millis(300);
    let agent = start(&pool, c, 1, script_executor());
    // One frame, so both are queued together; the second waits for the only slot until the drain begins.
    let producer = ProducerId::new("allocator-test").unwrap();
    let first = EventRecord::new(
        producer.clone(),
        allocation("w7", 1, 1, &[0], "sleep 30", 60_000),
    );
    let second = EventRecord::new(
        producer,
        allocation("w7", 2, 1, &[0], "echo queued", 60_000),
    );
    let a = pool.publisher.publish(&first).await.unwrap();
    let b = pool.publisher.publish(&second).await.unwrap();
    assert_eq!(
        a.await.unwrap().sequence,
        b.await.unwrap().sequence,
        "not one frame"
    );
    until(&pool.bus, Stream::Tasks, "the start", |r| {
        !started(r, task(1)).is_empty()
    })
    .await;
    let stopping = Instant::now();
    let report = agent.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(10));
    assert_eq!(report.tasks_drained, 2, "{report:?}");
    let tasks = read(&pool.bus, Stream::Tasks).await;
    for n in [1, 2] {
        let f = failed(&tasks, task(n)).unwrap_or_else(|| panic!("task {n}: {:?}", kinds(&tasks)));
        assert!(f.retryable);
        assert_eq!(f.reason, node_agent::DRAINED_REASON);
    }
    assert!(started(&tasks, task(2)).is_empty());
    let workers = read(&pool.bus, Stream::Workers).await;
    assert_eq!(workers.last().unwrap().event.kind(), "WorkerDeregistered");
}

#[tokio::test]
async fn a_missing_stream_is_a_clear_error() {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let c = config("w8", 1);
    let gpus = GpuSource::simulated(&c.worker_id, 1);
    let err = node_agent::run(
        c,
        bus,
        publisher,
        gpus,
        script_executor(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, AgentError::Consume(bus::ConsumeError::NoStream { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("provision the streams"), "{err}");
}

/// The load-test shape: many simulated agents in one process, one shared publisher.
#[tokio::test]
async fn many_simulated_agents_share_one_publisher() {
    let pool = pool().await;
    let agents: Vec<Running> = (0..20)
        .map(|i| {
            start(
                &pool,
                config(&format!("sim-{i}"), 4),
                8,
                Arc::new(node_agent::SimulatedExecutor::default()),
            )
        })
        .collect();
    for i in 0..20u128 {
        let worker = format!("sim-{i}");
        send(
            &pool,
            allocation(&worker, 100 + i, 1, &[0, 1, 2, 3], "echo", 10_000),
        )
        .await;
    }
    let tasks = until(&pool.bus, Stream::Tasks, "every completion", |r| {
        (100..120).all(|n| completed(r, task(n)).is_some())
    })
    .await;
    for n in 100..120 {
        let Event::TaskCompleted(c) = &completed(&tasks, task(n)).unwrap().event else {
            unreachable!()
        };
        assert_eq!(c.usage.gpu_millis.0, c.usage.wall_ms * 4);
    }
    until(&pool.bus, Stream::Results, "every result", |r| {
        r.len() == 20
    })
    .await;
    for agent in agents {
        let report = agent.stop().await;
        assert_eq!(report.tasks_completed, 1);
    }
    // Events of several agents travel together: some frame on WORKERS holds more than one event.
    let mut reader = RangeReader::open(&pool.bus.jetstream, Stream::Workers, Vec::new(), 1, None)
        .await
        .unwrap();
    let mut largest = 0;
    loop {
        let frames = reader.next_batch(256).await.unwrap();
        if frames.is_empty() {
            break;
        }
        for f in frames {
            largest = largest.max(f.decode(&CodecConfig::default()).unwrap().len());
        }
    }
    assert!(largest > 1, "every frame held one event");
}

#[tokio::test]
async fn the_registration_is_renewed_until_the_drain() {
    let pool = pool().await;
    let mut c = config("renewing", 1);
    c.reregister_interval = Duration::from_millis(300);
    let agent = start(&pool, c, 1, script_executor());
    until(&pool.bus, Stream::Workers, "three registrations", |r| {
        kinds(r)
            .iter()
            .filter(|k| **k == "WorkerRegistered")
            .count()
            >= 3
    })
    .await;
    agent.stop().await;
    let records = read(&pool.bus, Stream::Workers).await;
    let order = kinds(&records);
    let draining = order.iter().position(|k| *k == "WorkerDraining").unwrap();
    assert!(
        !order[draining..].contains(&"WorkerRegistered"),
        "a registration after the drain would undo it: {order:?}"
    );
}

#[tokio::test]
async fn a_rejection_is_answered_by_a_new_submission_soon() {
    let pool = pool().await;
    let dir = tests::TempDir::new("agent-quote");
    let quote = dir.path().join("quote");
    std::fs::write(&quote, b"not a real quote").unwrap();
    let mut c = config("reattesting", 1);
    c.attestation = Some(node_agent::attest::QuoteSource::File(quote));
    c.reattest_interval = Duration::from_secs(3_600);
    c.reattest_retry = Duration::from_millis(200);
    let agent = start(&pool, c, 1, script_executor());
    let submitted = |r: &[EventRecord]| {
        kinds(r)
            .iter()
            .filter(|k| **k == "AttestationSubmitted")
            .count()
    };
    until(
        &pool.bus,
        Stream::Attestations,
        "the first submission",
        |r| submitted(r) == 1,
    )
    .await;
    // Stands in for the attestor's answer.
    send(
        &pool,
        events::attestations::AttestationRejected {
            worker_id: WorkerId::new("reattesting").unwrap(),
            quote_hash: "x".into(),
            reason: "stale submission".into(),
        },
    )
    .await;
    until(
        &pool.bus,
        Stream::Attestations,
        "a second submission long before the hour",
        |r| submitted(r) == 2,
    )
    .await;
    agent.stop().await;
}
