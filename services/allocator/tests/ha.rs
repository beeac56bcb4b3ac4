//! High availability on a real nats-server: two allocator instances, one lease. The active one is killed
//! (its task aborted, so it never gives the lease up) in the middle of a stream of submissions; the standby
//! takes over within seconds and no task is allocated twice.
//!
//! The workers here are their events only (registration, attestation verdict, heartbeats), published by the
//! test: this test is about the allocators; the node agent's side is in `lifecycle.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use allocator::{AllocatorConfig, PoolConfig};
use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::payload::{Blob, Priority, Requirements, TaskSpec};
use events::tasks::TaskSubmitted;
use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
use events::{
    ClientId, Event, EventRecord, Nanoton, ProducerId, Stream, TaskId, Timestamp, WorkerId,
};
use tests::NatsServer;
use tokio_util::sync::CancellationToken;

fn producer() -> ProducerId {
    ProducerId::new("ha-test").unwrap()
}

async fn register_workers(publisher: &Publisher, names: &[&str]) {
    for name in names {
        let worker_id = WorkerId::new(*name).unwrap();
        let registered = WorkerRegistered {
            worker_id: worker_id.clone(),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: format!("SIM-{name}-0"),
                name: "simulated GPU".into(),
                memory_total_mib: 81_920,
                simulated: true,
            }],
            price_per_gpu_second: Nanoton(1_000),
            payout_address: "UQ-test".into(),
            region: "local".into(),
            max_concurrent_tasks: 10_000,
            public_key: vec![1; 32],
            agent_version: "test".into(),
            model_tags: vec![],
        };
        drop(
            publisher
                .publish(&EventRecord::new(producer(), registered))
                .await
                .unwrap(),
        );
        // Stands in for the attestor (issue 5): a verdict valid for an hour.
        let until = Timestamp::now().saturating_add(Duration::from_secs(3_600));
        for record in events::sample::stand_in_attestation(&worker_id, until) {
            drop(publisher.publish(&record).await.unwrap());
        }
    }
    publisher.flush().await.unwrap();
}

fn heartbeats(
    publisher: Publisher,
    names: Vec<String>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sequence = 0;
        loop {
            sequence += 1;
            for name in &names {
                let hb = WorkerHeartbeat {
                    worker_id: WorkerId::new(name.clone()).unwrap(),
                    sequence,
                    gpus: vec![GpuTelemetry {
                        index: 0,
                        memory_used_mib: 0,
                        memory_total_mib: 81_920,
                        utilization_pct: 0,
                        temperature_c: 40,
                        power_mw: 60_000,
                        process_count: 0,
                    }],
                    running_tasks: vec![],
                    latency_us: Some(500),
                };
                drop(
                    publisher
                        .publish(&EventRecord::new(producer(), hb))
                        .await
                        .unwrap(),
                );
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    })
}

fn task(priority: u8) -> TaskSubmitted {
    TaskSubmitted {
        task_id: TaskId::new(),
        client_id: ClientId::new("client-ha").unwrap(),
        spec: TaskSpec {
            requirements: Requirements {
                gpu_count: 1,
                gpu_memory_mib: 1,
                model_tag: None,
            },
            priority: Priority::new(priority).unwrap(),
            max_price_per_gpu_second: Nanoton(10_000),
            timeout_ms: 600_000,
            input: Blob::Inline(b"x".to_vec()),
        },
    }
}

fn config(instance: &str) -> AllocatorConfig {
    AllocatorConfig {
        pool: PoolConfig {
            heartbeat_timeout: Duration::from_secs(5),
            ..PoolConfig::default()
        },
        instance: instance.into(),
        lease_ttl: Duration::from_millis(1_500),
        tick: Duration::from_millis(50),
        replicas: 1,
    }
}

/// Every TaskAllocated in the log, with its time.
async fn allocations(bus: &Bus) -> Vec<(Timestamp, events::allocations::TaskAllocated)> {
    bus::read_events(&bus.jetstream, Stream::Allocations, vec![])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            Event::TaskAllocated(a) => Some((r.envelope.occurred_at, a)),
            _ => None,
        })
        .collect()
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, within: Duration, mut done: F) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_within_seconds_and_no_task_is_allocated_twice() {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let names = ["ha-w1", "ha-w2", "ha-w3"];
    register_workers(&publisher, &names).await;
    let stop = CancellationToken::new();
    let beating = heartbeats(
        publisher.clone(),
        names.iter().map(|s| s.to_string()).collect(),
        stop.clone(),
    );

    // The first instance starts alone, so it is the one that takes the lease.
    let first = tokio::spawn(allocator::run(
        bus.clone(),
        config("alloc-a"),
        CancellationToken::new(),
    ));
    let mut submitted = Vec::new();
    for _ in 0..100 {
        let t = task(5);
        submitted.push(t.task_id);
        drop(
            publisher
                .publish(&EventRecord::new(producer(), t))
                .await
                .unwrap(),
        );
    }
    publisher.flush().await.unwrap();
    wait_for(
        "the first 100 allocations",
        Duration::from_secs(20),
        async || allocations(&bus).await.len() >= 100,
    )
    .await;
    let second_cancel = CancellationToken::new();
    let second = tokio::spawn(allocator::run(
        bus.clone(),
        config("alloc-b"),
        second_cancel.clone(),
    ));

    // Keep submitting while the active instance dies without a word.
    let feeder = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..40 {
                for _ in 0..5 {
                    let t = task(5);
                    ids.push(t.task_id);
                    drop(
                        publisher
                            .publish(&EventRecord::new(producer(), t))
                            .await
                            .unwrap(),
                    );
                }
                publisher.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.abort();
    let killed_at = Timestamp::now();
    assert!(first.await.unwrap_err().is_cancelled());
    submitted.extend(feeder.await.unwrap());

    wait_for(
        "every task allocated",
        Duration::from_secs(30),
        async || allocations(&bus).await.len() >= submitted.len(),
    )
    .await;
    let all = allocations(&bus).await;
    let mut per_task: HashMap<TaskId, Vec<(u32, u64)>> = HashMap::new();
    for (_, a) in &all {
        per_task
            .entry(a.task_id)
            .or_default()
            .push((a.attempt, a.allocator_epoch));
    }
    assert_eq!(per_task.len(), submitted.len(), "every task allocated");
    let twice: Vec<_> = per_task.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "allocated more than once: {twice:?}");

    // Two epochs, the second after the first, and the standby's first allocation came within seconds.
    let mut epochs: Vec<u64> = all.iter().map(|(_, a)| a.allocator_epoch).collect();
    epochs.dedup();
    assert_eq!(epochs.len(), 2, "epochs in log order: {epochs:?}");
    assert!(epochs[1] > epochs[0]);
    let first_of_standby = all
        .iter()
        .filter(|(_, a)| a.allocator_epoch == epochs[1])
        .map(|(at, _)| *at)
        .min()
        .unwrap();
    let takeover_ms = first_of_standby.as_millis() - killed_at.as_millis();
    // Lease TTL 1.5 s, renewals every 0.5 s, then the catch-up with the log.
    assert!(
        takeover_ms < 5_000,
        "the standby placed its first task {takeover_ms} ms after the kill"
    );

    second_cancel.cancel();
    let report = second.await.unwrap().unwrap();
    assert_eq!(report.epochs, vec![epochs[1]]);
    assert!(report.allocations > 0);
    stop.cancel();
    beating.await.unwrap();
}
