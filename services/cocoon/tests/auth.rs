//! NATS permissions per role, against a real nats-server running the config that `cocoon auth init` writes:
//! a task goes through the pool with every party on its own credentials (producer, allocator, worker,
//! projector, settler; and in a second test the attestor and the API), and what a role must not do is refused
//! by the server (nothing of it reaches a stream or a reader).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_nats::jetstream;
use bus::auth::Role;
use bus::{Bus, Credentials, Publisher, PublisherConfig};
use client::{Producer, ProducerConfig, ResultStream, StartAt, TaskRequest};
use events::{ClientId, EventRecord, Nanoton, ProducerId, Stream, Subject, WorkerId};
use tests::{NatsServer, TempDir};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
/// A refused JetStream request gets no answer: how long to wait for the one that will not come.
const REFUSED_WITHIN: Duration = Duration::from_millis(800);

fn worker(id: &str) -> WorkerId {
    WorkerId::new(id).unwrap()
}

fn client_id(id: &str) -> ClientId {
    ClientId::new(id).unwrap()
}

/// A server with the users of `cocoon auth init` (workers w1, w2; producers c1, c2), and its config dir.
struct Secured {
    server: NatsServer,
    dir: TempDir,
}

impl Secured {
    async fn start() -> Secured {
        let dir = TempDir::new("cocoon-auth");
        cocoon::auth::init(
            dir.path(),
            &[worker("w1"), worker("w2")],
            &[client_id("c1"), client_id("c2")],
        )
        .unwrap();
        let main = dir.path().join("nats.conf");
        std::fs::write(
            &main,
            format!("include \"{}\"\n", cocoon::auth::SERVER_FILE),
        )
        .unwrap();
        let server = NatsServer::start_with_args(&["-c", main.to_str().unwrap()]).await;
        Secured { server, dir }
    }

    /// A started server with the streams provisioned, and the operator's connection.
    async fn start_provisioned() -> (Secured, Bus) {
        let secured = Secured::start().await;
        let (operator, _) = secured.connect(&Role::Operator).await;
        bus::provision_streams(&operator.jetstream, 1)
            .await
            .unwrap();
        (secured, operator)
    }

    fn credentials(&self, role: &Role) -> Credentials {
        Credentials::load(&cocoon::auth::credentials_path(self.dir.path(), role)).unwrap()
    }

    /// Connects as `role`, the way `Bus::connect` does, collecting the server's errors (permission
    /// violations are reported to the client asynchronously).
    async fn connect(&self, role: &Role) -> (Bus, Errors) {
        let c = self.credentials(role);
        let errors = Errors::default();
        let sink = errors.clone();
        let client = async_nats::ConnectOptions::new()
            .user_and_password(c.user.clone(), c.password().to_owned())
            .custom_inbox_prefix(bus::auth::inbox_prefix(&c.user))
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        sink.0.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(self.server.url())
            .await
            .unwrap();
        (Bus::from_client(client, Duration::from_secs(5)), errors)
    }
}

#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl Errors {
    /// Waits until the server has reported a permission violation mentioning `subject`.
    async fn wait_for_violation(&self, subject: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let seen = self.0.lock().unwrap().clone();
            if seen
                .iter()
                .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no permissions violation for {subject}; server errors: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Fails if the server reported anything to these parties' connections.
fn assert_no_violations(parties: &[(&str, &Errors)]) {
    for (who, errors) in parties {
        let seen = errors.0.lock().unwrap().clone();
        assert!(seen.is_empty(), "{who}: {seen:?}");
    }
}

async fn messages(js: &jetstream::Context, stream: Stream) -> u64 {
    js.get_stream(stream.name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// A frame of `record` published raw on `subject` (as a client could, bypassing `Publisher`'s choice).
async fn publish_raw(bus: &Bus, subject: &str, record: &EventRecord) {
    let frame =
        events::encode_frame(events::CodecConfig::default(), std::slice::from_ref(record)).unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in frame.headers.pairs() {
        headers.insert(name, value.as_str());
    }
    bus.client
        .publish_with_headers(subject.to_owned(), headers, frame.body.into())
        .await
        .unwrap();
    bus.client.flush().await.unwrap();
}

fn heartbeat_of(w: &WorkerId) -> EventRecord {
    EventRecord::new(
        ProducerId::new("node-agent-test").unwrap(),
        events::workers::WorkerHeartbeat {
            worker_id: w.clone(),
            sequence: 1,
            gpus: vec![],
            running_tasks: vec![],
            latency_us: None,
        },
    )
}

#[tokio::test]
async fn every_role_works_on_its_own_credentials_and_nothing_more() {
    let (secured, operator) = Secured::start_provisioned().await;

    // A task through the pool, every party on its own credentials: producer c1, the allocator, worker w1.
    let stop = CancellationToken::new();
    let (allocator_bus, allocator_errors) = secured.connect(&Role::Allocator).await;
    let mut allocator_config = allocator::AllocatorConfig {
        instance: "allocator-auth".into(),
        ..Default::default()
    };
    allocator_config.pool.allow_unattested = true;
    let allocator = tokio::spawn(allocator::run(
        allocator_bus,
        allocator_config,
        stop.clone(),
    ));
    let (w1_bus, w1_errors) = secured.connect(&Role::Worker(worker("w1"))).await;
    let w1_publisher =
        Publisher::new(w1_bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let mut agent_config = node_agent::AgentConfig::new(worker("w1"));
    agent_config.price_per_gpu_second = Nanoton(1_000);
    let agent = tokio::spawn(node_agent::run(
        agent_config,
        w1_bus.clone(),
        w1_publisher,
        node_agent::GpuSource::simulated(&worker("w1"), 2),
        Arc::new(node_agent::SimulatedExecutor::new(Duration::from_millis(
            10,
        ))),
        stop.clone(),
    ));
    let (c1_bus, c1_errors) = secured.connect(&Role::Producer(client_id("c1"))).await;
    let mut results = ResultStream::open(&c1_bus.jetstream, &client_id("c1"), StartAt::Beginning)
        .await
        .unwrap();
    let producer = Producer::from_bus(&c1_bus, ProducerConfig::default()).unwrap();
    let submitted = producer
        .submit(&TaskRequest::new("c1", Nanoton(5_000)))
        .await
        .unwrap();
    let item = tokio::time::timeout(DEADLINE, results.next())
        .await
        .expect("the result within the deadline")
        .expect("the result stream goes on")
        .unwrap();
    assert_eq!(item.result.task_id, submitted.task_id);
    assert_eq!(item.result.worker_id, worker("w1"));

    // A worker's credentials cannot publish as another worker: the server refuses, the stream holds nothing.
    let (w2_bus, w2_errors) = secured.connect(&Role::Worker(worker("w2"))).await;
    let before = messages(&operator.jetstream, Stream::Workers).await;
    let forged = heartbeat_of(&worker("w1"));
    let w1_subject = forged.subject(events::Partitions::DEFAULT).to_string();
    publish_raw(&w2_bus, &w1_subject, &forged).await;
    w2_errors.wait_for_violation(&w1_subject).await;
    // And an event claiming w1 on w2's own subject is refused by every consumer (wrong origin).
    let w2_subject = Subject::keyed(
        Stream::Workers,
        b"w1",
        events::Partitions::DEFAULT,
        events::Origin::Worker(&worker("w2")),
    )
    .to_string();
    publish_raw(&w2_bus, &w2_subject, &forged).await;
    // A plain publish is not acknowledged: wait until the stream holds it (it is stored asynchronously).
    let deadline = Instant::now() + DEADLINE;
    while messages(&operator.jetstream, Stream::Workers).await < before + 1 {
        assert!(
            Instant::now() < deadline,
            "the frame on w2's own subject was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = bus::read_events(
        &operator.jetstream,
        Stream::Workers,
        vec![w2_subject.clone()],
    )
    .await;
    assert!(
        matches!(
            stored,
            Err(bus::ReadError::Decode {
                source: events::DecodeError::WrongOrigin(_),
                ..
            })
        ),
        "{stored:?}"
    );
    assert_eq!(
        messages(&operator.jetstream, Stream::Workers).await,
        before + 1,
        "only the frame on w2's own subject was stored"
    );

    // A worker cannot read another worker's allocations: no consumer on them, no direct read, no subscription.
    let w1_allocations = Subject::allocations(&worker("w1")).to_string();
    let stream = w2_bus
        .jetstream
        .get_stream(Stream::Allocations.name())
        .await
        .unwrap();
    for (name, filter) in [
        ("agent-w1", w1_allocations.clone()),
        ("agent-w2", w1_allocations.clone()),
        ("snoop", "allocations.>".to_owned()),
    ] {
        let attempt = tokio::time::timeout(
            REFUSED_WITHIN,
            stream.create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject: filter.clone(),
                ..Default::default()
            }),
        )
        .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "w2 made the consumer {name} on {filter}"
        );
    }
    let direct = tokio::time::timeout(
        REFUSED_WITHIN,
        stream.get_last_raw_message_by_subject(&w1_allocations),
    )
    .await;
    assert!(!matches!(direct, Ok(Ok(_))), "w2 read w1's last allocation");
    let _refused = w2_bus
        .client
        .subscribe(w1_allocations.clone())
        .await
        .unwrap();
    w2_errors.wait_for_violation(&w1_allocations).await;
    // Its own consumer works (what its agent uses).
    let own = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(bus::auth::agent_durable(&worker("w2"))),
            filter_subject: Subject::allocations(&worker("w2")).to_string(),
            ..Default::default()
        })
        .await;
    assert!(own.is_ok(), "{own:?}");

    // A producer cannot publish allocations, nor anything as a worker or as another client.
    let allocations_before = messages(&operator.jetstream, Stream::Allocations).await;
    let tasks_before = messages(&operator.jetstream, Stream::Tasks).await;
    let placement = "allocations.w1";
    publish_raw(&c1_bus, placement, &heartbeat_of(&worker("w1"))).await;
    c1_errors.wait_for_violation(placement).await;
    let as_c2 = Subject::keyed(
        Stream::Tasks,
        b"x",
        events::Partitions::DEFAULT,
        events::Origin::Client(&client_id("c2")),
    )
    .to_string();
    publish_raw(&c1_bus, &as_c2, &heartbeat_of(&worker("w1"))).await;
    c1_errors.wait_for_violation(&as_c2).await;
    assert_eq!(
        messages(&operator.jetstream, Stream::Allocations).await,
        allocations_before
    );
    assert_eq!(
        messages(&operator.jetstream, Stream::Tasks).await,
        tasks_before
    );

    // And a producer reads only its own results.
    let (c2_bus, _) = secured.connect(&Role::Producer(client_id("c2"))).await;
    let theirs = tokio::time::timeout(
        REFUSED_WITHIN * 2,
        ResultStream::open(&c2_bus.jetstream, &client_id("c1"), StartAt::Beginning),
    )
    .await;
    assert!(!matches!(theirs, Ok(Ok(_))), "c2 opened c1's results");

    // The projector projects every stream on its own credentials (and dead-letters the forged frame).
    let db = tests::TestDb::create().await;
    let mut projector_config = projector::ProjectorConfig::new(secured.server.url(), db.url());
    projector_config.nats_credentials = Some(secured.credentials(&Role::Projector));
    tokio::time::timeout(
        DEADLINE,
        projector::run(projector_config, CancellationToken::new(), true),
    )
    .await
    .expect("the projector drains within the deadline")
    .unwrap();
    let rows = db
        .client()
        .await
        .query(
            "SELECT status, worker_id FROM tasks WHERE task_id = $1",
            &[&submitted.task_id.0],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "completed");
    assert_eq!(rows[0].get::<_, Option<String>>(1).as_deref(), Some("w1"));
    let wrong_origin: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE error_kind = 'wrong_origin'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong_origin, 1, "w2's frame claiming w1 is dead-lettered");

    // The settler accrues the completion on its own credentials (and parks the payout: the simulated worker
    // registered no TON address), on the real TVM behind the local toncenter.
    let key = settler::PoolKey::parse(&"5a".repeat(32)).unwrap();
    let ton = tests::TonLocal::start(&key.public_key(), 10 * Nanoton::PER_TON).await;
    let (settler_bus, settler_errors) = secured.connect(&Role::Settler).await;
    let settler_stop = CancellationToken::new();
    let settler_run = tokio::spawn(settler::run(
        settler_bus,
        settler::Toncenter::new(
            ton.url(),
            None,
            httpc::HttpClient::new(&httpc::ClientConfig::new(), false).unwrap(),
        ),
        settler::PoolWallet::new(&key).unwrap(),
        settler::SettlerConfig {
            instance: "settler-auth".into(),
            ..Default::default()
        },
        settler_stop.clone(),
    ));
    let deadline = Instant::now() + DEADLINE;
    let (accrued, parked) = loop {
        let payments = bus::read_events(&operator.jetstream, Stream::Payments, vec![])
            .await
            .unwrap();
        let accrued = payments.iter().any(|(_, r)| {
            matches!(&r.event, events::Event::PaymentAccrued(a) if a.task_id == submitted.task_id)
        });
        let parked = payments.iter().any(|(_, r)| {
            matches!(&r.event, events::Event::PayoutParked(p) if p.worker_id == worker("w1"))
        });
        if (accrued && parked) || Instant::now() > deadline {
            break (accrued, parked);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(accrued && parked, "accrued {accrued}, parked {parked}");
    settler_stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, settler_run).await;

    // The parties that did their own work drew no violation.
    assert_no_violations(&[
        ("allocator", &allocator_errors),
        ("w1", &w1_errors),
        ("settler", &settler_errors),
    ]);
    stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, agent).await;
    let _ = tokio::time::timeout(DEADLINE, allocator).await;
}

/// Intel's sample TDX quote and its collateral, as the attestor's own tests use them.
fn attestor_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../attestor/tests/fixtures")
}

/// 2025-07-01T00:00:00Z: inside the sample quote's collateral window (it expired in 2025).
const SAMPLE_QUOTE_TIME: u64 = 1_751_328_000;
/// Offset of REPORTDATA in a v4 TDX quote: the 48-byte header, then the last 64 bytes of the 584-byte report.
const REPORT_DATA_OFFSET: usize = 48 + 584 - 64;

/// The attestor and the API on their own credentials, with an allocator that places tasks only on attested
/// workers: the attestor reads w1's quote from ATTESTATIONS and its key from WORKERS and publishes its verdict;
/// a task submitted over HTTP (the API publishes it as client c1) runs on w1; the API serves the task back from
/// the read model and its result as Server-Sent Events (reading RESULTS). The sample quote binds no key of
/// ours, so its report data is the attestor's named development exception, as in the attestor's tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attestor_and_the_api_work_on_their_own_credentials() {
    let (secured, operator) = Secured::start_provisioned().await;
    let stop = CancellationToken::new();

    let fixtures = attestor_fixtures();
    let quote = std::fs::read(fixtures.join("tdx_quote")).unwrap();
    let verifier = attestor::Verifier::from_source(
        attestor::Policy::load(&fixtures.join("policy.json")).unwrap(),
        &attestor::CollateralSource::Files(fixtures.join("collateral")),
    )
    .unwrap();
    let (attestor_bus, attestor_errors) = secured.connect(&Role::Attestor).await;
    let attestor_run = tokio::spawn(attestor::run(
        attestor_bus,
        Arc::new(verifier),
        attestor::AttestorConfig {
            verify_at: Some(UNIX_EPOCH + Duration::from_secs(SAMPLE_QUOTE_TIME)),
            dev_accept_report_data: vec![
                quote[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64]
                    .try_into()
                    .unwrap(),
            ],
            // Waited for only while w1's registration has not been read: generous on a busy machine.
            registration_wait: Duration::from_secs(5),
            fetch_wait: Duration::from_millis(100),
            ..Default::default()
        },
        stop.clone(),
    ));
    let (allocator_bus, allocator_errors) = secured.connect(&Role::Allocator).await;
    let allocator_config = allocator::AllocatorConfig {
        instance: "allocator-auth-attested".into(),
        ..Default::default()
    };
    assert!(!allocator_config.pool.allow_unattested);
    let allocator = tokio::spawn(allocator::run(
        allocator_bus,
        allocator_config,
        stop.clone(),
    ));
    let dir = TempDir::new("cocoon-auth-attested");
    let quote_file = dir.path().join("w1.quote");
    std::fs::write(&quote_file, &quote).unwrap();
    let (w1_bus, w1_errors) = secured.connect(&Role::Worker(worker("w1"))).await;
    let w1_publisher =
        Publisher::new(w1_bus.jetstream.clone(), PublisherConfig::default()).unwrap();
    let mut agent_config = node_agent::AgentConfig::new(worker("w1"));
    agent_config.price_per_gpu_second = Nanoton(1_000);
    agent_config.heartbeat_interval = Duration::from_millis(250);
    agent_config.fetch_wait = Duration::from_millis(100);
    agent_config.attestation = Some(node_agent::attest::QuoteSource::File(quote_file));
    let agent = tokio::spawn(node_agent::run(
        agent_config,
        w1_bus,
        w1_publisher,
        node_agent::GpuSource::simulated(&worker("w1"), 1),
        Arc::new(node_agent::SimulatedExecutor::new(Duration::from_millis(
            10,
        ))),
        stop.clone(),
    ));

    // The projector and the API connect by themselves, as their binaries do, each on its own credentials.
    let db = tests::TestDb::create().await;
    let mut projector_config = projector::ProjectorConfig::new(secured.server.url(), db.url());
    projector_config.nats_credentials = Some(secured.credentials(&Role::Projector));
    projector_config.fetch_wait = Duration::from_millis(100);
    let projector_run = tokio::spawn(projector::run(projector_config, stop.clone(), false));
    let mut api_config = api::ApiConfig::new(secured.server.url(), db.url());
    api_config.nats_credentials = Some(secured.credentials(&Role::Api));
    api_config.pg_pool_size = 4;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api_run = tokio::spawn(api::serve(api_config, listener, stop.clone()));
    let http = httpc::HttpClient::new(&httpc::ClientConfig::new(), false).unwrap();
    let url = |path: &str| format!("http://{addr}{path}");

    // The verdict, published by the attestor as itself (on its own origin's subjects).
    let attestor_subjects = format!(
        "{}.*.{}",
        Stream::Attestations.prefix(),
        events::Origin::Attestor(&worker("w1"))
    );
    let deadline = Instant::now() + DEADLINE;
    let verdict = loop {
        let verdicts = bus::read_events(
            &operator.jetstream,
            Stream::Attestations,
            vec![attestor_subjects.clone()],
        )
        .await
        .unwrap();
        if let Some((_, v)) = verdicts.into_iter().next() {
            break v;
        }
        assert!(Instant::now() < deadline, "no verdict for w1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        matches!(&verdict.event, events::Event::AttestationVerified(v) if v.worker_id == worker("w1")),
        "{verdict:?}"
    );

    // A task over HTTP, placed on the attested worker, read back through the API.
    let tasks_url = url("/api/v1/tasks");
    let submitted = eventually_ok(|| {
        http.post(
            &tasks_url,
            &[],
            "application/json",
            br#"{"client_id": "c1", "max_price_per_gpu_second": 5000, "input": "over the api"}"#,
        )
    })
    .await;
    assert_eq!(
        submitted.status,
        202,
        "{}",
        String::from_utf8_lossy(&submitted.body)
    );
    let body: serde_json::Value = serde_json::from_slice(&submitted.body).unwrap();
    let task_id = body["task_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    let task = loop {
        let r = http
            .get(&url(&format!("/api/v1/tasks/{task_id}")), &[])
            .await
            .unwrap();
        if r.status == 200 {
            let task: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            if task["status"] == "completed" {
                break task;
            }
        }
        assert!(
            Instant::now() < deadline,
            "task {task_id} not completed: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(task["worker_id"], "w1", "{task}");
    let stream = sse_until(addr, "/api/v1/clients/c1/results", &task_id).await;
    assert!(stream.contains("event: result"), "{stream}");

    // Those whose connections we hold drew no violation doing their own work.
    assert_no_violations(&[
        ("attestor", &attestor_errors),
        ("allocator", &allocator_errors),
        ("w1", &w1_errors),
    ]);
    stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, agent).await;
    let _ = tokio::time::timeout(DEADLINE, allocator).await;
    let _ = tokio::time::timeout(DEADLINE, attestor_run).await;
    let _ = tokio::time::timeout(DEADLINE, projector_run).await;
    let _ = tokio::time::timeout(DEADLINE, api_run).await;
}

/// Retries `request` until it is answered (the server may still be binding its connections).
async fn eventually_ok<F, Fut>(request: F) -> httpc::HttpResponse
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<httpc::HttpResponse, httpc::HttpError>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match request().await {
            Ok(r) if r.status != 503 => return r,
            other => assert!(Instant::now() < deadline, "no answer: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a Server-Sent Events stream and reads it until it mentions `needle`; returns what was read.
async fn sse_until(addr: std::net::SocketAddr, path: &str, needle: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(DEADLINE, async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the stream ended: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(read.is_ok(), "{needle} not streamed in time: {text}");
    text
}

#[tokio::test]
async fn init_keeps_passwords_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("cocoon-auth-files");
    let first = cocoon::auth::init(dir.path(), &[worker("w1")], &[]).unwrap();
    let w1 = Role::Worker(worker("w1"));
    let before = Credentials::load(&cocoon::auth::credentials_path(dir.path(), &w1)).unwrap();
    // Again with one more worker: w1 keeps its password, w2 is added, and so is every earlier user.
    let second = cocoon::auth::init(dir.path(), &[worker("w2")], &[]).unwrap();
    let after = Credentials::load(&cocoon::auth::credentials_path(dir.path(), &w1)).unwrap();
    assert_eq!(before, after);
    assert_eq!(second.credentials.len(), first.credentials.len() + 1);
    let text = std::fs::read_to_string(&second.server_config).unwrap();
    assert!(text.contains("\"worker-w1\"") && text.contains("\"worker-w2\""));
    for path in
        std::iter::once(&second.server_config).chain(second.credentials.iter().map(|(_, p)| p))
    {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    // A bad id is refused with what was wrong.
    let bad = cocoon::auth::init_command(&cocoon::cli::AuthInitArgs {
        dir: dir.path().to_owned(),
        workers: vec!["no.dots".into()],
        producers: vec![],
    })
    .unwrap_err();
    assert!(format!("{bad:#}").contains("no.dots"), "{bad:#}");
}
