//! The pool's main job end to end on a real nats-server and Postgres: the allocator, node agents that run a
//! real command (simulated GPUs: this machine has none), the projector and the client library.
//!
//! Attestation verdicts are published by the test, standing in for the attestor (issue 5): the allocator
//! runs with its production policy (attested workers only), and one unattested worker, the cheapest and
//! idlest of all, must never get a task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allocator::{AllocatorConfig, PoolConfig};
use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use client::{Producer, ProducerConfig, ReadModel, ResultStream, StartAt, TaskRequest, TaskStatus};
use events::tasks::RequeueReason;
use events::{ClientId, Event, EventRecord, Nanoton, Stream, TaskId, Timestamp, WorkerId};
use node_agent::{AgentConfig, ExecConfig, ExecExecutor, GpuSource};
use tests::{NatsServer, TestDb};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The task command: upper-cases its input and appends the GPUs it was given; an input starting with
/// "sleep" first sleeps 3 s (a long task).
const COMMAND: &str = r#"input=$(cat); case "$input" in sleep*) sleep 3;; esac; printf '%s gpus=%s' "$input" "$CUDA_VISIBLE_DEVICES" | tr a-z A-Z"#;

struct Pool {
    _server: NatsServer,
    db: TestDb,
    bus: Bus,
    publisher: Publisher,
    stop: CancellationToken,
    services: Vec<JoinHandle<()>>,
}

impl Pool {
    async fn start(allocator: PoolConfig) -> Pool {
        let server = NatsServer::start().await;
        let db = TestDb::create().await;
        // Migrated before anything reads the read models (the projector would migrate too, concurrently).
        schemas::migrate(&mut db.client().await).await.unwrap();
        let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
        provision_streams(&bus.jetstream, 1).await.unwrap();
        let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
        let stop = CancellationToken::new();
        let mut services = Vec::new();
        let config = AllocatorConfig {
            pool: allocator,
            instance: "allocator-e2e".into(),
            lease_ttl: Duration::from_millis(1_500),
            tick: Duration::from_millis(50),
            replicas: 1,
        };
        let (b, s) = (bus.clone(), stop.clone());
        services.push(tokio::spawn(async move {
            allocator::run(b, config, s).await.unwrap();
        }));
        let mut projection = projector::ProjectorConfig::new(server.url(), db.url());
        projection.fetch_wait = Duration::from_millis(100);
        let s = stop.clone();
        services.push(tokio::spawn(async move {
            projector::run(projection, s, false).await.unwrap();
        }));
        Pool {
            _server: server,
            db,
            bus,
            publisher,
            stop,
            services,
        }
    }

    /// Starts a node agent with simulated GPUs and the real `exec` executor; returns its handle (abort it
    /// to kill the worker) and its own stop token.
    fn agent(
        &self,
        name: &str,
        gpus: u32,
        price: u64,
        tags: &[&str],
    ) -> (JoinHandle<()>, CancellationToken) {
        let mut config = AgentConfig::new(WorkerId::new(name).unwrap());
        config.price_per_gpu_second = Nanoton(price);
        config.payout_address = format!("UQ-{name}");
        config.max_concurrent_tasks = 4;
        config.model_tags = tags.iter().map(|t| t.to_string()).collect();
        config.heartbeat_interval = Duration::from_millis(250);
        config.fetch_wait = Duration::from_millis(100);
        config.drain_timeout = Duration::from_secs(5);
        let executor = Arc::new(ExecExecutor::new(ExecConfig::new("sh", ["-c", COMMAND])));
        let gpus = GpuSource::simulated(&config.worker_id, gpus);
        let (bus, publisher) = (self.bus.clone(), self.publisher.clone());
        let stop = self.stop.child_token();
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            node_agent::run(config, bus, publisher, gpus, executor, s)
                .await
                .unwrap();
        });
        (handle, stop)
    }

    /// Stands in for the attestor: a quote submission and its verdict for `name`, valid for an hour.
    async fn attest(&self, name: &str) {
        let until = Timestamp::now().saturating_add(Duration::from_secs(3_600));
        for record in events::sample::stand_in_attestation(&WorkerId::new(name).unwrap(), until) {
            drop(self.publisher.publish(&record).await.unwrap());
        }
        self.publisher.flush().await.unwrap();
    }

    async fn producer(&self) -> Producer {
        Producer::from_bus(&self.bus, ProducerConfig::default()).unwrap()
    }

    async fn read_model(&self) -> ReadModel {
        ReadModel::connect(self.db.url()).await.unwrap()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for s in self.services {
            s.await.unwrap();
        }
    }
}

fn request(client: &str, input: &str) -> TaskRequest {
    let mut r = TaskRequest::new(client, Nanoton(10_000));
    r.input = input.as_bytes().to_vec();
    r.timeout_ms = 60_000;
    r
}

async fn wait_until<T, F: AsyncFnMut() -> Option<T>>(
    what: &str,
    within: Duration,
    mut check: F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(rm: &ReadModel, id: TaskId) -> Option<TaskStatus> {
    rm.task(id).await.unwrap().map(|t| t.status)
}

async fn wait_for_status(rm: &ReadModel, id: TaskId, want: TaskStatus) -> client::TaskView {
    wait_until(
        &format!("task {id} {want:?}"),
        Duration::from_secs(30),
        async || rm.task(id).await.unwrap().filter(|t| t.status == want),
    )
    .await
}

/// Every event of `stream` in log order.
async fn log(bus: &Bus, stream: Stream) -> Vec<EventRecord> {
    bus::read_events(&bus.jetstream, stream, vec![])
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

async fn allocations_of(bus: &Bus, task: TaskId) -> Vec<(u32, String)> {
    log(bus, Stream::Allocations)
        .await
        .into_iter()
        .filter_map(|r| match r.event {
            Event::TaskAllocated(a) if a.task_id == task => {
                Some((a.attempt, a.worker_id.to_string()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_placed_by_score_executed_and_their_results_delivered() {
    let pool = Pool::start(PoolConfig {
        reject_after: Duration::from_millis(500),
        ..PoolConfig::default()
    })
    .await;
    // alpha: 2 GPUs, dear. beta: 1 GPU, cheap, any model. gamma: 1 GPU, serves llama only.
    // delta: the cheapest and idlest, but never attested.
    let workers = [
        ("alpha", 2, 1_000, vec![]),
        ("beta", 1, 500, vec![]),
        ("gamma", 1, 800, vec!["llama"]),
        ("delta", 4, 1, vec![]),
    ];
    let mut agents = Vec::new();
    for (name, gpus, price, tags) in &workers {
        agents.push(pool.agent(name, *gpus, *price, tags));
        if *name != "delta" {
            pool.attest(name).await;
        }
    }
    let rm = pool.read_model().await;
    wait_until(
        "four workers in the read model",
        Duration::from_secs(30),
        async || (rm.workers().await.unwrap().len() == 4).then_some(()),
    )
    .await;
    let producer = pool.producer().await;
    let client = "client-e2e";
    let mut results = ResultStream::open(
        &pool.bus.jetstream,
        &ClientId::new(client).unwrap(),
        StartAt::Beginning,
    )
    .await
    .unwrap();

    // 1. Two GPUs: only alpha has them (delta is not attested).
    let mut two_gpus = request(client, "two gpus");
    two_gpus.requirements.gpu_count = 2;
    let t1 = producer.submit(&two_gpus).await.unwrap().task_id;
    wait_for_status(&rm, t1, TaskStatus::Completed).await;
    // 2. Mistral at most 900: alpha is too dear, gamma serves only llama, so beta.
    let mut mistral = request(client, "mistral");
    mistral.requirements.model_tag = Some("mistral".into());
    mistral.max_price_per_gpu_second = Nanoton(900);
    let t2 = producer.submit(&mistral).await.unwrap().task_id;
    wait_for_status(&rm, t2, TaskStatus::Completed).await;
    // 3. A long task at most 600: only beta is that cheap. It holds 60 GB of beta's GPU while it runs.
    let mut long = request(client, "sleep then finish");
    long.max_price_per_gpu_second = Nanoton(600);
    long.requirements.gpu_memory_mib = 60_000;
    let t3 = producer.submit(&long).await.unwrap().task_id;
    wait_for_status(&rm, t3, TaskStatus::Running).await;
    // 4. Llama at most 900 while beta is busy: beta (any model) and gamma (llama) both fit; gamma scores
    //    higher on load and free memory than busy beta, which only leads on history.
    let mut llama = request(client, "llama");
    llama.requirements.model_tag = Some("llama".into());
    llama.max_price_per_gpu_second = Nanoton(900);
    let t4 = producer.submit(&llama).await.unwrap().task_id;
    // 5. Eight GPUs: no worker has them, so no worker can ever fit it.
    let mut eight = request(client, "eight gpus");
    eight.requirements.gpu_count = 8;
    let t5 = producer.submit(&eight).await.unwrap().task_id;

    for t in [t3, t4] {
        wait_for_status(&rm, t, TaskStatus::Completed).await;
    }
    let rejected = wait_for_status(&rm, t5, TaskStatus::Rejected).await;
    let reason = rejected.failure_reason.unwrap();
    assert!(
        reason.contains("needs 8 GPU(s)")
            && reason.contains("of 4 registered workers 4 have too few GPUs"),
        "{reason}"
    );

    // Placement, from the log.
    let expected = [(t1, "alpha"), (t2, "beta"), (t3, "beta"), (t4, "gamma")];
    for (task, worker) in expected {
        assert_eq!(
            allocations_of(&pool.bus, task).await,
            vec![(1, worker.to_owned())],
            "task {task}"
        );
    }
    let alloc_log = log(&pool.bus, Stream::Allocations).await;
    assert!(
        alloc_log.iter().all(
            |r| !matches!(&r.event, Event::TaskAllocated(a) if a.worker_id.as_str() == "delta")
        ),
        "the unattested worker got a task"
    );
    let Some(Event::TaskAllocated(a4)) = alloc_log
        .iter()
        .map(|r| &r.event)
        .find(|e| matches!(e, Event::TaskAllocated(a) if a.task_id == t4))
    else {
        panic!("no allocation of t4")
    };
    assert!(a4.score.total > 0.0 && a4.allocator_epoch >= 1);

    // Results on the client's stream: the command's real output, with the GPUs it was given.
    let mut outputs: HashMap<TaskId, String> = HashMap::new();
    while outputs.len() < 4 {
        let item = tokio::time::timeout(Duration::from_secs(10), results.next())
            .await
            .expect("a result within 10 s")
            .unwrap()
            .unwrap();
        let events::payload::Blob::Inline(bytes) = &item.result.output else {
            panic!("inline output expected")
        };
        assert_eq!(item.result.checksum, node_agent::checksum(bytes));
        outputs.insert(
            item.result.task_id,
            String::from_utf8(bytes.clone()).unwrap(),
        );
    }
    assert_eq!(outputs[&t1], "TWO GPUS GPUS=0,1");
    assert_eq!(outputs[&t2], "MISTRAL GPUS=0");
    assert_eq!(outputs[&t3], "SLEEP THEN FINISH GPUS=0");
    assert_eq!(outputs[&t4], "LLAMA GPUS=0");

    // Read models: the full history of each task, and the workers with their simulated GPUs.
    for (task, worker) in expected {
        let view = wait_until("the result row", Duration::from_secs(10), async || {
            rm.task(task).await.unwrap().filter(|v| v.result.is_some())
        })
        .await;
        assert_eq!(view.worker_id.as_ref().map(|w| w.as_str()), Some(worker));
        assert!(
            view.allocated_at.is_some() && view.started_at.is_some() && view.finished_at.is_some()
        );
        assert!(view.gpu_millis.unwrap().0 > 0);
        assert_eq!(view.attempt, 1);
    }
    let t3_view = rm.task(t3).await.unwrap().unwrap();
    assert!(
        t3_view.gpu_millis.unwrap().0 >= 3_000,
        "slept 3 s on one GPU: {:?}",
        t3_view.gpu_millis
    );
    let workers_view = rm.workers().await.unwrap();
    assert!(workers_view.iter().all(|w| w.simulated()));
    let attested: Vec<&str> = workers_view
        .iter()
        .filter(|w| w.attested)
        .map(|w| w.worker_id.as_str())
        .collect();
    assert_eq!(attested.len(), 3, "{attested:?}");

    // The allocator published its policy: attested workers only.
    let policy = allocator::lease::read_policy(&pool.bus.jetstream)
        .await
        .unwrap()
        .unwrap();
    assert!(!policy.allow_unattested);

    for (_, stop) in &agents {
        stop.cancel();
    }
    for (handle, _) in agents {
        handle.await.unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_has_its_task_requeued_and_completed_elsewhere() {
    let pool = Pool::start(PoolConfig {
        heartbeat_timeout: Duration::from_millis(1_500),
        ..PoolConfig::default()
    })
    .await;
    let rm = pool.read_model().await;
    let (doomed, _) = pool.agent("doomed", 1, 100, &[]);
    pool.attest("doomed").await;
    wait_until("doomed registered", Duration::from_secs(30), async || {
        (rm.workers().await.unwrap().len() == 1).then_some(())
    })
    .await;
    let producer = pool.producer().await;
    let task = producer
        .submit(&request("client-kill", "sleep on doomed"))
        .await
        .unwrap()
        .task_id;
    let running = wait_for_status(&rm, task, TaskStatus::Running).await;
    assert_eq!(running.worker_id.unwrap().as_str(), "doomed");

    // A second worker joins; the first dies without a word (its process, and the task's, are gone).
    let (survivor, survivor_stop) = pool.agent("survivor", 1, 100, &[]);
    pool.attest("survivor").await;
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());

    let done = wait_for_status(&rm, task, TaskStatus::Completed).await;
    assert_eq!(done.worker_id.unwrap().as_str(), "survivor");
    assert_eq!(done.attempt, 2);
    assert_eq!(
        allocations_of(&pool.bus, task).await,
        vec![(1, "doomed".to_owned()), (2, "survivor".to_owned())]
    );
    let tasks_log = log(&pool.bus, Stream::Tasks).await;
    let requeues: Vec<_> = tasks_log
        .iter()
        .filter_map(|r| match &r.event {
            Event::TaskRequeued(q) if q.task_id == task => Some((q.attempt, q.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(requeues, vec![(1, RequeueReason::WorkerLost)]);
    let workers_log = log(&pool.bus, Stream::Workers).await;
    assert!(
        workers_log
            .iter()
            .any(|r| matches!(&r.event, Event::WorkerLost(l) if l.worker_id.as_str() == "doomed"))
    );
    let mut results = ResultStream::open(
        &pool.bus.jetstream,
        &ClientId::new("client-kill").unwrap(),
        StartAt::Beginning,
    )
    .await
    .unwrap();
    let item = tokio::time::timeout(Duration::from_secs(10), results.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (item.result.worker_id.as_str(), item.result.attempt),
        ("survivor", 2)
    );
    assert_eq!(status_of(&rm, task).await, Some(TaskStatus::Completed));

    survivor_stop.cancel();
    survivor.await.unwrap();
    pool.shutdown().await;
}
