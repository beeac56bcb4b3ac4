//! The client library against a real nats-server and Postgres: submissions land on the right TASKS subject
//! with the requested spec, result streams follow one client and resume, and the read-model queries and the
//! task watch return what the projector wrote.

use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, RangeReader, provision_streams};
use client::{
    InvalidRequest, Producer, ProducerConfig, ReadModel, ResultStream, ResultsError, StartAt,
    SubmitError, TaskFilter, TaskRequest, TaskStatus,
};
use events::allocations::{ScoreBreakdown, TaskAllocated};
use events::attestations::{AttestationSubmitted, AttestationVerified, Measurements};
use events::payload::Blob;
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskStarted, Usage};
use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
use events::{
    ClientId, Event, EventRecord, GpuMillis, Nanoton, Partitions, ProducerId, Stream, Subject,
    TaskId, Timestamp, WorkerId,
};
use tests::{NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

async fn stack() -> (NatsServer, Bus) {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    (server, bus)
}

fn producer_id() -> ProducerId {
    ProducerId::new("test").unwrap()
}

fn client(id: &str) -> ClientId {
    ClientId::new(id).unwrap()
}

fn worker(id: &str) -> WorkerId {
    WorkerId::new(id).unwrap()
}

/// Publishes each record in its own frame (flushing after each), returning each frame's stream sequence.
async fn publish_each(bus: &Bus, records: &[EventRecord]) -> Vec<u64> {
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let mut seqs = Vec::new();
    for r in records {
        let receipt = publisher.publish(r).await.unwrap();
        publisher.flush().await.unwrap();
        seqs.push(receipt.await.unwrap().sequence);
    }
    seqs
}

/// Every event stored in `stream`, with its frame's sequence.
async fn read_all(bus: &Bus, stream: Stream) -> Vec<(u64, EventRecord)> {
    bus::read_events(&bus.jetstream, stream, Vec::new())
        .await
        .unwrap()
}

fn request(client_id: &str) -> TaskRequest {
    let mut r = TaskRequest::new(client_id, Nanoton(2_500));
    r.requirements.gpu_count = 2;
    r.requirements.gpu_memory_mib = 40_960;
    r.requirements.model_tag = Some("llama-3-70b".into());
    r.priority = 8;
    r.timeout_ms = 90_000;
    r.input = b"summarise this".to_vec();
    r
}

#[tokio::test]
async fn submit_publishes_the_requested_spec_on_the_task_partition() {
    let (_server, bus) = stack().await;
    let producer = Producer::from_bus(&bus, ProducerConfig::default()).unwrap();
    let req = request("acme");
    let submitted = producer.submit(&req).await.unwrap();
    assert_eq!(
        submitted.subject,
        Subject::keyed(
            Stream::Tasks,
            submitted.task_id.0.as_bytes(),
            Partitions::DEFAULT,
            events::Origin::Client(&client("acme"))
        )
    );

    let mut reader = RangeReader::open(
        &bus.jetstream,
        Stream::Tasks,
        vec![submitted.subject.to_string()],
        submitted.stream_sequence,
        Some(submitted.stream_sequence),
    )
    .await
    .unwrap();
    let frames = reader.next_batch(10).await.unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].subject, submitted.subject.as_str());
    let records = frames[0].decode(&events::CodecConfig::default()).unwrap();
    assert_eq!(records.len(), 1);
    let Event::TaskSubmitted(event) = &records[0].event else {
        panic!("not a TaskSubmitted: {:?}", records[0].event);
    };
    let (client_id, spec) = req.validate().unwrap();
    assert_eq!(event.task_id, submitted.task_id);
    assert_eq!(event.client_id, client_id);
    assert_eq!(event.spec, spec);
    assert_eq!(spec.requirements.gpu_count, 2);
    assert_eq!(spec.input, Blob::Inline(b"summarise this".to_vec()));
    assert_eq!(records[0].envelope.producer.as_str(), "cocoon-client");

    // A bad request is refused before anything is published.
    let mut bad = request("acme");
    bad.priority = 0;
    assert_eq!(
        producer.submit(&bad).await.unwrap_err(),
        SubmitError::Invalid(InvalidRequest::Priority(0))
    );
    assert_eq!(read_all(&bus, Stream::Tasks).await.len(), 1);
}

#[tokio::test]
async fn submit_many_pipelines_and_reports_each_request() {
    let (_server, bus) = stack().await;
    let producer = Producer::from_bus(&bus, ProducerConfig::default()).unwrap();
    let mut requests: Vec<TaskRequest> = (0..500)
        .map(|i| {
            let mut r = request(if i % 2 == 0 { "even" } else { "odd" });
            r.input = format!("task {i}").into_bytes();
            r
        })
        .collect();
    requests[250].requirements.gpu_count = 0;
    let results = producer.submit_many(&requests).await;
    assert_eq!(results.len(), 500);
    assert_eq!(
        results[250],
        Err(SubmitError::Invalid(InvalidRequest::NoGpus))
    );
    let ids: Vec<TaskId> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|s| s.task_id))
        .collect();
    assert_eq!(ids.len(), 499);

    let stored = read_all(&bus, Stream::Tasks).await;
    assert_eq!(stored.len(), 499);
    // Pipelined: many events share a frame.
    let frames: std::collections::BTreeSet<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert!(frames.len() < 499, "{} frames for 499 events", frames.len());
    for (i, result) in results.iter().enumerate() {
        let Ok(s) = result else { continue };
        let (seq, record) = stored
            .iter()
            .find(|(_, r)| matches!(&r.event, Event::TaskSubmitted(e) if e.task_id == s.task_id))
            .unwrap_or_else(|| panic!("task {i} not stored"));
        assert_eq!(*seq, s.stream_sequence);
        let Event::TaskSubmitted(e) = &record.event else {
            unreachable!()
        };
        assert_eq!(e.spec.input, Blob::Inline(format!("task {i}").into_bytes()));
    }
}

fn result_event(client_id: &str, n: u8) -> EventRecord {
    EventRecord::new(
        producer_id(),
        TaskResult {
            task_id: TaskId::new(),
            client_id: client(client_id),
            worker_id: worker("w1"),
            attempt: 1,
            output: Blob::Inline(vec![n; 8]),
            checksum: format!("sha256:{n:064x}"),
            truncated: false,
        },
    )
}

async fn next_result(stream: &mut ResultStream) -> Result<client::ResultItem, ResultsError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no result in time")
        .expect("result stream ended")
}

#[tokio::test]
async fn result_stream_follows_one_client_in_order_and_resumes() {
    let (_server, bus) = stack().await;
    let records = vec![
        result_event("c1", 1),
        result_event("c2", 101),
        result_event("c1", 2),
        result_event("c2", 102),
        result_event("c1", 3),
    ];
    let seqs = publish_each(&bus, &records).await;
    let checksum = |item: &client::ResultItem| item.result.checksum.clone();

    let mut stream = ResultStream::open(&bus.jetstream, &client("c1"), StartAt::Beginning)
        .await
        .unwrap();
    for (i, n) in [(0, 1u8), (2, 2), (4, 3)] {
        let item = next_result(&mut stream).await.unwrap();
        assert_eq!(item.stream_sequence, seqs[i]);
        assert_eq!(item.index, 0);
        assert_eq!(item.result.client_id.as_str(), "c1");
        assert_eq!(checksum(&item), format!("sha256:{n:064x}"));
        assert_eq!(item.result.output, Blob::Inline(vec![n; 8]));
    }

    // Resume after the first result: it is skipped.
    let mut resumed = ResultStream::open(&bus.jetstream, &client("c1"), StartAt::After(seqs[0]))
        .await
        .unwrap();
    assert_eq!(
        next_result(&mut resumed).await.unwrap().stream_sequence,
        seqs[2]
    );
    // From a sequence, inclusive.
    let mut from = ResultStream::open(&bus.jetstream, &client("c1"), StartAt::Sequence(seqs[4]))
        .await
        .unwrap();
    assert_eq!(
        next_result(&mut from).await.unwrap().stream_sequence,
        seqs[4]
    );

    // Only new results, and a frame that does not decode is an error item, after which the stream goes on.
    let mut new = ResultStream::open(&bus.jetstream, &client("c2"), StartAt::New)
        .await
        .unwrap();
    let garbage = bus
        .jetstream
        .publish(
            Subject::results(&client("c2"), &events::WorkerId::new("w1").unwrap()).to_string(),
            "not a frame".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let later = publish_each(&bus, &[result_event("c2", 103)]).await;
    match next_result(&mut new).await {
        Err(ResultsError::Undecodable {
            stream_sequence, ..
        }) => assert_eq!(stream_sequence, garbage),
        other => panic!("expected an undecodable frame, got {other:?}"),
    }
    let item = next_result(&mut new).await.unwrap();
    assert_eq!(item.stream_sequence, later[0]);
    assert_eq!(checksum(&item), format!("sha256:{:064x}", 103));
    // And the stream keeps following: a result stored after it was read arrives too.
    let last = publish_each(&bus, &[result_event("c1", 4), result_event("c2", 104)]).await;
    assert_eq!(
        next_result(&mut new).await.unwrap().stream_sequence,
        last[1]
    );
}

async fn project(server: &NatsServer, db: &TestDb) {
    let mut config = projector::ProjectorConfig::new(server.url(), db.url());
    config.fetch_wait = Duration::from_millis(200);
    tokio::time::timeout(
        Duration::from_secs(60),
        projector::run(config, CancellationToken::new(), true),
    )
    .await
    .expect("projector did not drain in time")
    .unwrap();
}

fn gpu(index: u32, simulated: bool) -> GpuInfo {
    GpuInfo {
        index,
        uuid: format!("GPU-{index}"),
        name: if simulated { "simulated" } else { "H100" }.into(),
        memory_total_mib: 81_920,
        simulated,
    }
}

fn registered(id: &str, gpus: Vec<GpuInfo>, price: u64) -> EventRecord {
    EventRecord::new(
        producer_id(),
        WorkerRegistered {
            worker_id: worker(id),
            gpus,
            price_per_gpu_second: Nanoton(price),
            payout_address: format!("UQ-{id}"),
            region: "eu".into(),
            max_concurrent_tasks: 4,
            public_key: vec![1; 32],
            agent_version: "test".into(),
            model_tags: Vec::new(),
        },
    )
}

fn allocated(task_id: TaskId, client_id: &str, worker_id: &str, req: &TaskRequest) -> EventRecord {
    EventRecord::new(
        producer_id(),
        TaskAllocated {
            task_id,
            client_id: client(client_id),
            worker_id: worker(worker_id),
            attempt: 1,
            allocator_epoch: 1,
            gpu_indices: vec![0, 1],
            score: ScoreBreakdown {
                total: 0.8,
                load: 0.3,
                memory: 0.2,
                history: 0.1,
                latency: 0.1,
                affinity: 0.1,
            },
            spec: req.validate().unwrap().1,
        },
    )
}

fn started(task_id: TaskId, worker_id: &str) -> EventRecord {
    EventRecord::new(
        producer_id(),
        TaskStarted {
            task_id,
            worker_id: worker(worker_id),
            attempt: 1,
            gpu_indices: vec![0, 1],
        },
    )
}

/// TaskCompleted and TaskResult of attempt 1.
fn completed(task_id: TaskId, client_id: &str, worker_id: &str) -> [EventRecord; 2] {
    [
        EventRecord::new(
            producer_id(),
            TaskCompleted {
                task_id,
                worker_id: worker(worker_id),
                attempt: 1,
                usage: Usage {
                    gpu_millis: GpuMillis(4_200),
                    peak_gpu_memory_mib: Some(30_000),
                    wall_ms: 2_100,
                },
            },
        ),
        EventRecord::new(
            producer_id(),
            TaskResult {
                task_id,
                client_id: client(client_id),
                worker_id: worker(worker_id),
                attempt: 1,
                output: Blob::Inline(b"done".to_vec()),
                checksum: "sha256:feed".into(),
                truncated: false,
            },
        ),
    ]
}

#[tokio::test]
async fn read_model_queries_return_what_the_projector_wrote() {
    let (server, bus) = stack().await;
    let db = TestDb::create().await;
    let producer = Producer::from_bus(&bus, ProducerConfig::default()).unwrap();
    let (req_a, req_b) = (request("acme"), request("other"));
    let t1 = producer.submit(&req_a).await.unwrap().task_id;
    let t2 = producer.submit(&req_a).await.unwrap().task_id;
    let t3 = producer.submit(&req_b).await.unwrap().task_id;

    let attest_submitted = EventRecord::new(
        producer_id(),
        AttestationSubmitted {
            worker_id: worker("w-a"),
            quote: vec![7; 64],
            public_key: vec![1; 32],
            nonce: vec![2; 32],
        },
    );
    let verified = EventRecord::caused_by(
        &attest_submitted.envelope,
        producer_id(),
        AttestationVerified {
            worker_id: worker("w-a"),
            quote_hash: "07".repeat(32),
            tcb_status: "UpToDate".into(),
            measurements: Measurements {
                mrtd: "00".repeat(48),
                rtmr0: "01".repeat(48),
                rtmr1: "02".repeat(48),
                rtmr2: "03".repeat(48),
                rtmr3: "04".repeat(48),
            },
            valid_until: Timestamp::now().saturating_add(Duration::from_secs(3600)),
        },
    );
    let heartbeat = EventRecord::new(
        producer_id(),
        WorkerHeartbeat {
            worker_id: worker("w-a"),
            sequence: 1,
            gpus: vec![GpuTelemetry {
                index: 0,
                memory_used_mib: 30_000,
                memory_total_mib: 81_920,
                utilization_pct: 87,
                temperature_c: 64,
                power_mw: 350_000,
                process_count: 1,
            }],
            running_tasks: vec![t2],
            latency_us: Some(300),
        },
    );
    let mut records = vec![
        registered("w-a", vec![gpu(0, false), gpu(1, false)], 1_500),
        registered("w-b", vec![gpu(0, true)], 900),
        attest_submitted,
        verified,
        heartbeat,
        allocated(t1, "acme", "w-a", &req_a),
        started(t1, "w-a"),
        allocated(t2, "acme", "w-b", &req_a),
        started(t2, "w-b"),
    ];
    records.extend(completed(t1, "acme", "w-a"));
    let seqs = publish_each(&bus, &records).await;
    let result_seq = *seqs.last().unwrap();
    project(&server, &db).await;

    let model = ReadModel::connect(db.url()).await.unwrap();
    let v1 = model.task(t1).await.unwrap().expect("t1 projected");
    assert_eq!(v1.status, TaskStatus::Completed);
    assert!(v1.is_final());
    assert_eq!(v1.attempt, 1);
    assert_eq!(v1.worker_id, Some(worker("w-a")));
    assert_eq!(v1.gpu_millis, Some(GpuMillis(4_200)));
    assert_eq!(v1.peak_gpu_memory_mib, Some(30_000));
    assert!(v1.allocated_at.is_some() && v1.started_at.is_some() && v1.finished_at.is_some());
    let sub = v1.submission.as_ref().expect("submission projected");
    assert_eq!(sub.client_id, client("acme"));
    assert_eq!(
        (
            sub.priority,
            sub.gpu_count,
            sub.gpu_memory_mib,
            sub.timeout_ms
        ),
        (8, 2, 40_960, 90_000)
    );
    assert_eq!(sub.model_tag.as_deref(), Some("llama-3-70b"));
    assert_eq!(sub.max_price_per_gpu_second, Nanoton(2_500));
    let result = v1.result.as_ref().expect("result projected");
    assert_eq!(result.checksum, "sha256:feed");
    assert_eq!(result.size_bytes, 4);
    assert_eq!(result.stream_sequence, result_seq);
    assert_eq!(result.worker_id, worker("w-a"));

    let v2 = model.task(t2).await.unwrap().unwrap();
    assert_eq!(
        (v2.status, v2.worker_id.clone()),
        (TaskStatus::Running, Some(worker("w-b")))
    );
    assert!(!v2.is_final() && v2.result.is_none() && v2.failure_reason.is_none());
    let v3 = model.task(t3).await.unwrap().unwrap();
    assert_eq!(
        (v3.status, v3.worker_id.clone()),
        (TaskStatus::Submitted, None)
    );
    assert_eq!(model.task(TaskId::new()).await.unwrap(), None);

    let ids =
        |views: Vec<client::TaskView>| views.into_iter().map(|v| v.task_id).collect::<Vec<_>>();
    let mut newest_first = vec![t1, t2, t3];
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(
        ids(model.tasks(&TaskFilter::default()).await.unwrap()),
        newest_first
    );
    let acme = TaskFilter {
        client: Some(client("acme")),
        ..TaskFilter::default()
    };
    let mut acme_ids = vec![t1, t2];
    acme_ids.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids(model.tasks(&acme).await.unwrap()), acme_ids);
    let running_on_b = TaskFilter {
        status: Some(TaskStatus::Running),
        worker: Some(worker("w-b")),
        ..TaskFilter::default()
    };
    assert_eq!(ids(model.tasks(&running_on_b).await.unwrap()), vec![t2]);
    let completed_on_b = TaskFilter {
        status: Some(TaskStatus::Completed),
        worker: Some(worker("w-b")),
        ..TaskFilter::default()
    };
    assert!(model.tasks(&completed_on_b).await.unwrap().is_empty());
    let one = TaskFilter {
        limit: 1,
        ..TaskFilter::default()
    };
    assert_eq!(ids(model.tasks(&one).await.unwrap()), vec![newest_first[0]]);

    let workers = model.workers().await.unwrap();
    assert_eq!(workers.len(), 2);
    let (a, b) = (&workers[0], &workers[1]);
    assert_eq!(a.worker_id, worker("w-a"));
    assert_eq!(a.status, client::WorkerStatus::Active);
    assert_eq!(a.price_per_gpu_second, Nanoton(1_500));
    assert_eq!(a.region, "eu");
    assert_eq!(a.running_tasks, 1);
    assert!(a.last_heartbeat_at.is_some());
    assert!(a.attested);
    let attestation = a.attestation.as_ref().expect("a verdict");
    assert_eq!(attestation.status, "verified");
    assert_eq!(attestation.tcb_status.as_deref(), Some("UpToDate"));
    assert!(!a.simulated());
    assert_eq!(a.gpus.len(), 2);
    assert_eq!(a.gpus[0].utilization_pct, 87);
    assert_eq!(a.gpus[0].memory_used_mib, 30_000);
    assert_eq!(a.gpus[0].temperature_c, Some(64));
    assert_eq!(a.gpus[1].name, "H100");
    assert_eq!(b.worker_id, worker("w-b"));
    assert!(b.simulated());
    assert!(b.gpus[0].simulated);
    assert!(!b.attested);
    assert_eq!(b.attestation, None);
}

async fn next(
    watch: &mut client::TaskWatch<'_>,
) -> Option<Result<client::TaskView, client::ReadModelError>> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("no change in time")
}

#[tokio::test]
async fn watch_task_yields_each_change_until_final() {
    let (server, bus) = stack().await;
    let db = TestDb::create().await;
    let producer = Producer::from_bus(&bus, ProducerConfig::default()).unwrap();
    let req = request("acme");
    let task = producer.submit(&req).await.unwrap().task_id;
    project(&server, &db).await;

    let model = ReadModel::connect(db.url()).await.unwrap();
    let mut watch = model.watch_task(task).every(Duration::from_millis(20));
    let first = next(&mut watch).await.unwrap().unwrap();
    assert_eq!(first.status, TaskStatus::Submitted);

    let mut records = vec![allocated(task, "acme", "w-a", &req), started(task, "w-a")];
    records.extend(completed(task, "acme", "w-a"));
    publish_each(&bus, &records).await;
    project(&server, &db).await;
    let last = next(&mut watch).await.unwrap().unwrap();
    assert_eq!(last.status, TaskStatus::Completed);
    assert_eq!(
        last.result.map(|r| r.checksum).as_deref(),
        Some("sha256:feed")
    );
    assert!(
        next(&mut watch).await.is_none(),
        "the watch ends after a final state"
    );
}

mod payments {
    //! `ReadModel::payments` over what the projector made of a settler's events.

    use super::*;
    use client::{PaymentSums, PaymentsQuery, SettlementStatus};
    use events::SettlementId;
    use events::payments::{
        FailedTransfer, PaymentAccrued, Payout, PayoutParked, SettlementConfirmed,
        SettlementExpired, SettlementPrepared, SettlementSubmitted,
    };

    fn accrued(worker_id: &str, amount: u64) -> (TaskId, EventRecord) {
        let task_id = TaskId::new();
        let record = EventRecord::new(
            producer_id(),
            PaymentAccrued {
                task_id,
                worker_id: worker(worker_id),
                attempt: 1,
                gpu_millis: GpuMillis(amount),
                price_per_gpu_second: Nanoton(1_000),
                amount: Nanoton(amount),
            },
        );
        (task_id, record)
    }

    fn prepared(
        id: SettlementId,
        seqno: u32,
        payouts: Vec<(&str, Vec<(TaskId, u64)>)>,
    ) -> EventRecord {
        EventRecord::new(
            producer_id(),
            SettlementPrepared {
                settlement_id: id,
                wallet_seqno: seqno,
                valid_until: Timestamp::from_micros(Timestamp::now().as_micros() + 600_000_000),
                payouts: payouts
                    .into_iter()
                    .map(|(w, tasks)| Payout {
                        worker_id: worker(w),
                        destination: format!("UQ-{w}"),
                        amount: Nanoton(tasks.iter().map(|t| t.1).sum()),
                        task_ids: tasks.iter().map(|t| t.0).collect(),
                    })
                    .collect(),
                signed_message: vec![0xb5, 0xee],
                message_hash: format!("{:064x}", id.0.as_u128()),
            },
        )
    }

    fn submitted(id: SettlementId, send_attempt: u32) -> EventRecord {
        EventRecord::new(
            producer_id(),
            SettlementSubmitted {
                settlement_id: id,
                message_hash: format!("{:064x}", id.0.as_u128()),
                send_attempt,
            },
        )
    }

    /// Accruals of alice, bob and carol; carol's parked; settlement 1 pays alice and fails bob's transfer,
    /// settlement 2 carries bob's accruals and expires, settlement 3 carries them again and is sent.
    fn settler_life() -> (Vec<EventRecord>, [SettlementId; 3]) {
        let (a1, a1r) = accrued("alice", 1_200_000_001);
        let (a2, a2r) = accrued("alice", 800_000_000);
        let (b1, b1r) = accrued("bob", 650_000_000);
        let (b2, b2r) = accrued("bob", 350_000_007);
        let (c1, c1r) = accrued("carol", 2_500_000_000);
        let alice = vec![(a1, 1_200_000_001), (a2, 800_000_000)];
        let bob = vec![(b1, 650_000_000), (b2, 350_000_007)];
        let ids = [
            SettlementId::new(),
            SettlementId::new(),
            SettlementId::new(),
        ];
        let mut records = vec![
            a1r,
            a2r,
            b1r,
            b2r,
            c1r,
            EventRecord::new(
                producer_id(),
                PayoutParked {
                    worker_id: worker("carol"),
                    destination: "not-a-ton-address".into(),
                    amount: Nanoton(2_500_000_000),
                    task_ids: vec![c1],
                    reason: "invalid TON address".into(),
                },
            ),
            prepared(ids[0], 1, vec![("alice", alice), ("bob", bob.clone())]),
            submitted(ids[0], 1),
            submitted(ids[0], 2),
            EventRecord::new(
                producer_id(),
                SettlementConfirmed {
                    settlement_id: ids[0],
                    tx_hash: "cd".repeat(32),
                    logical_time: 42,
                    failed_transfers: vec![FailedTransfer {
                        worker_id: worker("bob"),
                        reason: "insufficient balance".into(),
                    }],
                },
            ),
            prepared(ids[1], 2, vec![("bob", bob.clone())]),
            EventRecord::new(
                producer_id(),
                SettlementExpired {
                    settlement_id: ids[1],
                    valid_until: Timestamp::now(),
                },
            ),
            prepared(ids[2], 2, vec![("bob", bob)]),
            submitted(ids[2], 1),
        ];
        // A millisecond apart, so "newest first" is the order above.
        let base = Timestamp::now().as_micros();
        for (i, r) in records.iter_mut().enumerate() {
            r.envelope.occurred_at = Timestamp::from_micros(base + 1_000 * i as i64);
        }
        (records, ids)
    }

    #[tokio::test]
    async fn payments_status_sums_every_accrual_by_state() {
        let (server, bus) = stack().await;
        let db = TestDb::create().await;
        let model = ReadModel::connect(db.url()).await.unwrap();
        project(&server, &db).await; // migrates; nothing to project yet
        let empty = model.payments(&PaymentsQuery::default()).await.unwrap();
        assert!(empty.is_empty(), "{empty:?}");

        let (records, ids) = settler_life();
        publish_each(&bus, &records).await;
        project(&server, &db).await;

        let status = model.payments(&PaymentsQuery::default()).await.unwrap();
        assert!(!status.is_empty());
        let sums = |accruals, accrued, parked, in_flight, paid, failed_transfers| PaymentSums {
            accruals,
            accrued: Nanoton(accrued),
            pending: Nanoton(0),
            parked: Nanoton(parked),
            in_flight: Nanoton(in_flight),
            paid: Nanoton(paid),
            failed_transfers,
        };
        let rows: Vec<(&str, PaymentSums, bool)> = status
            .workers
            .iter()
            .map(|w| (w.worker_id.as_str(), w.sums, w.last_paid_at.is_some()))
            .collect();
        assert_eq!(
            rows,
            vec![
                (
                    "alice",
                    sums(2, 2_000_000_001, 0, 0, 2_000_000_001, 0),
                    true
                ),
                ("bob", sums(2, 1_000_000_007, 0, 1_000_000_007, 0, 1), false),
                (
                    "carol",
                    sums(1, 2_500_000_000, 2_500_000_000, 0, 0, 0),
                    false
                ),
            ]
        );
        assert_eq!(status.totals.workers, 3);
        assert_eq!(
            status.totals.sums,
            sums(
                5,
                5_500_000_008,
                2_500_000_000,
                1_000_000_007,
                2_000_000_001,
                1
            )
        );
        assert_eq!(
            status.totals.settlements,
            vec![
                (SettlementStatus::Prepared, 0),
                (SettlementStatus::Submitted, 1),
                (SettlementStatus::Confirmed, 1),
                (SettlementStatus::Expired, 1),
                (SettlementStatus::Failed, 0),
            ]
        );
        assert_eq!(status.open.len(), 1);
        let open = &status.open[0];
        assert_eq!(
            (
                open.settlement_id,
                open.status,
                open.wallet_seqno,
                open.payouts,
                open.total,
                open.sends
            ),
            (
                ids[2],
                SettlementStatus::Submitted,
                2,
                1,
                Nanoton(1_000_000_007),
                1
            )
        );
        assert!(open.submitted_at.is_some() && open.tx_hash.is_none());
        let recent: Vec<(SettlementId, SettlementStatus, u32, u32)> = status
            .recent
            .iter()
            .map(|s| (s.settlement_id, s.status, s.sends, s.failed_transfers))
            .collect();
        assert_eq!(
            recent,
            vec![
                (ids[1], SettlementStatus::Expired, 0, 0),
                (ids[0], SettlementStatus::Confirmed, 2, 1),
            ]
        );
        assert_eq!(
            status.recent[1].tx_hash.as_deref(),
            Some("cd".repeat(32).as_str())
        );
        assert!(
            status.recent[0]
                .failure_reason
                .as_deref()
                .is_some_and(|r| r.contains("passed unexecuted"))
        );

        // One worker's row, the totals still over everyone; fewer recent settlements.
        let bob = model
            .payments(&PaymentsQuery {
                worker: Some(worker("bob")),
                recent: 1,
            })
            .await
            .unwrap();
        assert_eq!(bob.workers.len(), 1);
        assert_eq!(bob.workers[0].worker_id.as_str(), "bob");
        assert_eq!(bob.totals, status.totals);
        assert_eq!(bob.recent.len(), 1);
        assert_eq!(bob.recent[0].settlement_id, ids[1]);
    }
}
