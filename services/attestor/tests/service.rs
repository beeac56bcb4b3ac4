//! The attestor on a real nats-server with Intel's sample quotes: its checks of the submission, its cache,
//! and end to end with the allocator and node agents: only the attested worker gets tasks.
//!
//! The sample quote's collateral expired in 2025, so the attestor verifies at an injected time inside its
//! window; and the sample binds no key of ours, so its report data is accepted as the named development
//! exception (`dev_accept_report_data`). Everything else is production behaviour.

#[path = "common/stand_in_pccs.rs"]
mod stand_in_pccs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use allocator::{AllocatorConfig, PoolConfig};
use attestor::{AttestorConfig, CollateralSource, PccsClient, PccsConfig, Policy, Verifier};
use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use client::{Producer, ProducerConfig, TaskRequest};
use events::attestations::{AttestationSubmitted, nonce_at};
use events::workers::{GpuInfo, WorkerRegistered};
use events::{Event, EventRecord, Nanoton, ProducerId, Stream, Timestamp, WorkerId};
use node_agent::attest::QuoteSource;
use node_agent::{AgentConfig, GpuSource, SimulatedExecutor};
use tests::{NatsServer, TempDir};
use tokio_util::sync::CancellationToken;

/// 2025-07-01T00:00:00Z: inside the sample quote's collateral window.
const GOOD_TIME: u64 = 1_751_328_000;
/// Offset of REPORTDATA in a v4 TDX quote: the 48-byte header, then the last 64 bytes of the 584-byte report.
const REPORT_DATA_OFFSET: usize = 48 + 584 - 64;
/// Offset of MRTD in a v4 TDX quote.
const MRTD_OFFSET: usize = 48 + 16 + 48 + 48 + 8 + 16;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn good_quote() -> Vec<u8> {
    std::fs::read(fixtures().join("tdx_quote")).unwrap()
}

fn good_report_data() -> [u8; 64] {
    good_quote()[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64]
        .try_into()
        .unwrap()
}

fn verifier() -> Arc<Verifier> {
    let policy = Policy::load(&fixtures().join("policy.json")).unwrap();
    Arc::new(
        Verifier::from_source(
            policy,
            &CollateralSource::Files(fixtures().join("collateral")),
        )
        .unwrap(),
    )
}

fn config() -> AttestorConfig {
    AttestorConfig {
        verify_at: Some(UNIX_EPOCH + Duration::from_secs(GOOD_TIME)),
        dev_accept_report_data: vec![good_report_data()],
        registration_wait: Duration::from_millis(500),
        fetch_wait: Duration::from_millis(100),
        ..AttestorConfig::default()
    }
}

async fn start() -> (NatsServer, Bus, Publisher) {
    let server = NatsServer::start().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    (server, bus, publisher)
}

async fn publish(publisher: &Publisher, event: impl Into<Event>) {
    let record = EventRecord::new(ProducerId::new("test").unwrap(), event);
    publisher.publish(&record).await.unwrap().await.unwrap();
}

async fn register(publisher: &Publisher, worker: &str, key: Vec<u8>) {
    publish(
        publisher,
        WorkerRegistered {
            worker_id: WorkerId::new(worker).unwrap(),
            gpus: vec![GpuInfo {
                index: 0,
                uuid: format!("SIM-{worker}"),
                name: "simulated GPU".into(),
                memory_total_mib: 81_920,
                simulated: true,
            }],
            price_per_gpu_second: Nanoton(1),
            payout_address: "UQ".into(),
            region: "local".into(),
            max_concurrent_tasks: 4,
            public_key: key,
            agent_version: "test".into(),
            model_tags: vec![],
        },
    )
    .await;
}

fn submission(worker: &str, quote: Vec<u8>, key: Vec<u8>, made: Timestamp) -> AttestationSubmitted {
    AttestationSubmitted {
        worker_id: WorkerId::new(worker).unwrap(),
        quote,
        public_key: key,
        nonce: nonce_at(made, [5; 24]),
    }
}

/// The verdicts in the log: (worker, verified, reason).
async fn verdicts(bus: &Bus) -> Vec<(String, bool, String)> {
    bus::read_events(&bus.jetstream, Stream::Attestations, vec![])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            Event::AttestationVerified(v) => Some((v.worker_id.to_string(), true, String::new())),
            Event::AttestationRejected(v) => Some((v.worker_id.to_string(), false, v.reason)),
            _ => None,
        })
        .collect()
}

async fn wait_for_verdicts(bus: &Bus, n: usize) -> Vec<(String, bool, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = verdicts(bus).await;
        if v.len() >= n {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} verdicts: {v:?}",
            v.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_checked_verified_cached_and_answered_in_order() {
    let (_server, bus, publisher) = start().await;
    let cancel = CancellationToken::new();
    let service = tokio::spawn(attestor::run(
        bus.clone(),
        verifier(),
        config(),
        cancel.clone(),
    ));
    let key = vec![1u8; 32];
    register(&publisher, "w-good", key.clone()).await;
    let now = Timestamp::now();
    // Distinct nonce times, in order: a worker's nonces must move forward (millisecond precision).
    let later = |ms: i64| Timestamp::from_micros(now.as_micros() + ms * 1_000);
    let first = submission("w-good", good_quote(), key.clone(), now);
    // 1. The genuine sample: verified (by the development exception for its report data).
    publish(&publisher, first.clone()).await;
    // 2. The same quote again, a fresh nonce: verified from the cache.
    publish(
        &publisher,
        submission("w-good", good_quote(), key.clone(), later(10)),
    )
    .await;
    // Refused without a verdict (a verdict would let anyone knock a worker out by naming it):
    // 3. a stale nonce; 4. submission 1 replayed; 5. another key than the registered one; 6. a worker
    //    that never registered.
    let old = Timestamp::from_micros(now.as_micros() - 3_600 * 1_000_000);
    publish(
        &publisher,
        submission("w-good", good_quote(), key.clone(), old),
    )
    .await;
    publish(&publisher, first).await;
    publish(
        &publisher,
        submission("w-good", good_quote(), vec![2; 32], later(20)),
    )
    .await;
    publish(
        &publisher,
        submission("w-ghost", good_quote(), key.clone(), later(30)),
    )
    .await;
    // 7. A tampered quote (one MRTD byte flipped): its signature fails.
    let mut tampered = good_quote();
    tampered[MRTD_OFFSET] ^= 1;
    publish(
        &publisher,
        submission("w-good", tampered, key.clone(), later(40)),
    )
    .await;

    let got = wait_for_verdicts(&bus, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].1 && got[1].1, "{got:?}");
    assert!(
        got[2].2.to_lowercase().contains("signature"),
        "{}",
        got[2].2
    );

    // The verdict's validity is what the collateral had left at the injected time, capped by the policy's
    // day, counted from now.
    let verified = bus::read_events(&bus.jetstream, Stream::Attestations, vec![])
        .await
        .unwrap()
        .into_iter()
        .find_map(|(_, r)| match r.event {
            Event::AttestationVerified(v) => Some(v),
            _ => None,
        })
        .unwrap();
    let left_s = (verified.valid_until.as_micros() - Timestamp::now().as_micros()) / 1_000_000;
    assert!(
        (86_000..=86_400).contains(&left_s),
        "valid for {left_s} s more"
    );

    cancel.cancel();
    let report = service.await.unwrap().unwrap();
    assert_eq!(
        (
            report.verified,
            report.rejected,
            report.cache_hits,
            report.refused
        ),
        (2, 1, 1, 4),
        "{report:?}"
    );
    assert_eq!(
        verdicts(&bus).await.len(),
        3,
        "no verdict for a refused submission"
    );
}

/// The attestor with collateral from a PCCS (the stand-in in `common/stand_in_pccs.rs`): the first quote
/// of a platform fetches its collateral, later ones reuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collateral_is_fetched_from_the_pccs_once_per_platform() {
    let (_server, bus, publisher) = start().await;
    let pccs = stand_in_pccs::StandInPccs::start().await;
    let policy = Policy::load(&fixtures().join("policy.json")).unwrap();
    let verifier =
        Arc::new(Verifier::from_source(policy, &CollateralSource::Url(pccs.url())).unwrap());
    let config = AttestorConfig {
        pccs: Some(PccsClient::new(&PccsConfig::new(pccs.url())).unwrap()),
        ..config()
    };
    let cancel = CancellationToken::new();
    let service = tokio::spawn(attestor::run(
        bus.clone(),
        verifier.clone(),
        config,
        cancel.clone(),
    ));
    let key = vec![1u8; 32];
    register(&publisher, "w-pccs", key.clone()).await;
    publish(
        &publisher,
        submission("w-pccs", good_quote(), key.clone(), Timestamp::now()),
    )
    .await;
    let got = wait_for_verdicts(&bus, 1).await;
    assert_eq!(got, [("w-pccs".into(), true, String::new())]);
    assert_eq!(pccs.requests().len(), 4, "{:?}", pccs.requests());
    for route in stand_in_pccs::ROUTES {
        assert_eq!(pccs.count(route), 1, "{route}");
    }
    assert_eq!(verifier.collateral_platforms(), 1);

    // A fresh nonce misses the verdict cache (the key binding is checked per nonce) but not the collateral.
    publish(
        &publisher,
        submission("w-pccs", good_quote(), key.clone(), Timestamp::now()),
    )
    .await;
    let got = wait_for_verdicts(&bus, 2).await;
    assert!(got[1].1, "{got:?}");
    assert_eq!(pccs.requests().len(), 4, "{:?}", pccs.requests());

    cancel.cancel();
    let report = service.await.unwrap().unwrap();
    assert_eq!(
        (
            report.verified,
            report.collateral_fetched,
            report.collateral_fetch_failures
        ),
        (2, 1, 0),
        "{report:?}"
    );
}

/// A PCCS that fails does not reject the platform for good: the submission is rejected (`no_collateral`,
/// with the fetch error), that verdict is not cached, and the next submission fetches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_rejects_the_submission_but_not_the_next_one() {
    let (_server, bus, publisher) = start().await;
    let pccs = stand_in_pccs::StandInPccs::start().await;
    pccs.set(stand_in_pccs::TCB, stand_in_pccs::Reply::status(404));
    let policy = Policy::load(&fixtures().join("policy.json")).unwrap();
    let verifier =
        Arc::new(Verifier::from_source(policy, &CollateralSource::Url(pccs.url())).unwrap());
    let config = AttestorConfig {
        pccs: Some(PccsClient::new(&PccsConfig::new(pccs.url())).unwrap()),
        pccs_retry_after: Duration::ZERO,
        ..config()
    };
    let cancel = CancellationToken::new();
    let service = tokio::spawn(attestor::run(bus.clone(), verifier, config, cancel.clone()));
    let key = vec![1u8; 32];
    register(&publisher, "w-pccs", key.clone()).await;
    publish(
        &publisher,
        submission("w-pccs", good_quote(), key.clone(), Timestamp::now()),
    )
    .await;
    let got = wait_for_verdicts(&bus, 1).await;
    assert!(!got[0].1, "{got:?}");
    assert!(
        got[0]
            .2
            .starts_with("no collateral for the quote's platform (FMSPC b0c06f000000): fetching it from the PCCS failed:")
            && got[0].2.contains("HTTP 404"),
        "{}",
        got[0].2
    );
    // A 404 is not transient: asked once.
    assert_eq!(pccs.count(stand_in_pccs::TCB), 1);

    // The PCCS learns the platform; the same quote, resubmitted, is verified.
    let good = stand_in_pccs::replies_for(&stand_in_pccs::sample_collateral_path(), None);
    pccs.set(stand_in_pccs::TCB, good[stand_in_pccs::TCB].clone());
    publish(
        &publisher,
        submission("w-pccs", good_quote(), key.clone(), Timestamp::now()),
    )
    .await;
    let got = wait_for_verdicts(&bus, 2).await;
    assert!(got[1].1, "{got:?}");

    cancel.cancel();
    let report = service.await.unwrap().unwrap();
    assert_eq!(
        (
            report.verified,
            report.rejected,
            report.collateral_fetched,
            report.collateral_fetch_failures
        ),
        (1, 1, 1, 1),
        "{report:?}"
    );
}

/// A worker registers a new key on every start and submits right after; the attestor reads registrations
/// beside submissions, and may see the submission while its WORKERS reader is still behind (here: behind
/// thousands of other registrations, read from the start after a restart). It waits until it has read
/// WORKERS as far as it went when the submission came, instead of refusing the new key as not registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_registered_just_before_the_submission_is_waited_for() {
    let (_server, bus, publisher) = start().await;
    register(&publisher, "w-restarted", vec![1u8; 32]).await;
    let many = Publisher::new(
        bus.jetstream.clone(),
        PublisherConfig {
            max_events: 1,
            ..PublisherConfig::default()
        },
    )
    .unwrap();
    for i in 0..5_000 {
        let record = EventRecord::new(
            ProducerId::new("test").unwrap(),
            WorkerRegistered {
                worker_id: WorkerId::new(format!("w-other-{i}")).unwrap(),
                gpus: vec![],
                price_per_gpu_second: Nanoton(1),
                payout_address: "UQ".into(),
                region: "local".into(),
                max_concurrent_tasks: 1,
                public_key: vec![3; 32],
                agent_version: "test".into(),
                model_tags: vec![],
            },
        );
        drop(many.publish(&record).await.unwrap());
    }
    many.flush().await.unwrap();
    // The worker restarted with a new key, and submits with it.
    let new_key = vec![2u8; 32];
    register(&publisher, "w-restarted", new_key.clone()).await;
    publish(
        &publisher,
        submission("w-restarted", good_quote(), new_key, Timestamp::now()),
    )
    .await;

    let cancel = CancellationToken::new();
    let service = tokio::spawn(attestor::run(
        bus.clone(),
        verifier(),
        AttestorConfig {
            registration_wait: Duration::from_secs(30),
            ..config()
        },
        cancel.clone(),
    ));
    let got = wait_for_verdicts(&bus, 1).await;
    assert_eq!(got, vec![("w-restarted".to_string(), true, String::new())]);
    cancel.cancel();
    let report = service.await.unwrap().unwrap();
    assert_eq!((report.verified, report.refused), (1, 0), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_attested_worker_gets_tasks() {
    let (_server, bus, publisher) = start().await;
    let stop = CancellationToken::new();
    let attestor_task = tokio::spawn(attestor::run(
        bus.clone(),
        verifier(),
        config(),
        stop.clone(),
    ));
    let allocator_task = tokio::spawn(allocator::run(
        bus.clone(),
        AllocatorConfig {
            pool: PoolConfig::default(),
            instance: "allocator-attest".into(),
            lease_ttl: Duration::from_millis(1_500),
            tick: Duration::from_millis(50),
            replicas: 1,
        },
        stop.clone(),
    ));
    let dir = TempDir::new("attest-e2e");
    let genuine = dir.path().join("genuine.quote");
    std::fs::write(&genuine, good_quote()).unwrap();
    let tampered = dir.path().join("tampered.quote");
    let mut bytes = good_quote();
    bytes[MRTD_OFFSET] ^= 1;
    std::fs::write(&tampered, bytes).unwrap();

    // Three workers alike but for their attestation: a genuine quote, a tampered one, none at all.
    let mut agents = Vec::new();
    for (name, quote) in [
        ("genuine", Some(genuine)),
        ("tampered", Some(tampered)),
        ("silent", None),
    ] {
        let mut config = AgentConfig::new(WorkerId::new(name).unwrap());
        config.price_per_gpu_second = Nanoton(1);
        config.max_concurrent_tasks = 4;
        config.heartbeat_interval = Duration::from_millis(250);
        config.fetch_wait = Duration::from_millis(100);
        config.attestation = quote.map(QuoteSource::File);
        let gpus = GpuSource::simulated(&config.worker_id, 1);
        let executor = Arc::new(SimulatedExecutor::new(Duration::from_millis(5)));
        let (b, p, s) = (bus.clone(), publisher.clone(), stop.child_token());
        agents.push(tokio::spawn(async move {
            node_agent::run(config, b, p, gpus, executor, s).await
        }));
    }
    let got = wait_for_verdicts(&bus, 2).await;
    assert!(
        got.contains(&("genuine".into(), true, String::new())),
        "{got:?}"
    );
    assert!(
        got.iter().any(|(w, ok, _)| w == "tampered" && !ok),
        "{got:?}"
    );

    let producer = Producer::from_bus(&bus, ProducerConfig::default()).unwrap();
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut r = TaskRequest::new("client-attest", Nanoton(10));
        r.input = format!("task {i}").into_bytes();
        ids.push(producer.submit(&r).await.unwrap().task_id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let completed = bus::read_events(&bus.jetstream, Stream::Tasks, vec![])
            .await
            .unwrap()
            .into_iter()
            .filter(|(_, r)| matches!(r.event, Event::TaskCompleted(_)))
            .count();
        if completed == ids.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{completed} of {} completed",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let placed: Vec<String> = bus::read_events(&bus.jetstream, Stream::Allocations, vec![])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            Event::TaskAllocated(a) => Some(a.worker_id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(placed.len(), ids.len());
    assert!(placed.iter().all(|w| w == "genuine"), "{placed:?}");

    stop.cancel();
    for agent in agents {
        agent.await.unwrap().unwrap();
    }
    allocator_task.await.unwrap().unwrap();
    attestor_task.await.unwrap().unwrap();
}
