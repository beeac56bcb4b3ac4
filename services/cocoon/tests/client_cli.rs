//! `cocoon tasks|results|workers` against a real nats-server and Postgres, run in-process from parsed command
//! lines: submissions from flags and files, the read-model views, and following a client's results.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use clap::Parser;
use cocoon::Shutdown;
use cocoon::cli::{Cli, Command};
use events::allocations::{ScoreBreakdown, TaskAllocated};
use events::payload::{Blob, Priority, Requirements, TaskSpec};
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskStarted, Usage};
use events::workers::{GpuInfo, WorkerRegistered};
use events::{
    ClientId, Event, EventRecord, GpuMillis, Nanoton, ProducerId, Stream, TaskId, WorkerId,
};
use tests::{NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

struct Env {
    server: NatsServer,
    db: TestDb,
    bus: Bus,
}

async fn env() -> Env {
    let server = NatsServer::start().await;
    let db = TestDb::create().await;
    let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
    provision_streams(&bus.jetstream, 1).await.unwrap();
    Env { server, db, bus }
}

/// Runs `cocoon <args>` in-process; returns its outcome and what it printed on stdout.
async fn cocoon(env: &Env, args: &[&str]) -> (anyhow::Result<ExitCode>, String) {
    let url = env.server.url();
    let mut argv = vec!["cocoon", "--nats-url", &url, "--database-url", env.db.url()];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut out = Vec::new();
    let shutdown = Shutdown::new();
    let run = async {
        match cli.command {
            Command::Tasks { command } => {
                cocoon::tasks::run(&cli.conn, command, &mut out, shutdown).await
            }
            Command::Results { command } => {
                cocoon::results::run(&cli.conn, command, &mut out, shutdown).await
            }
            Command::Workers { command } => {
                cocoon::workers::run(&cli.conn, command, &mut out).await
            }
            other => panic!("not a client command: {other:?}"),
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("command did not finish in time");
    (result, String::from_utf8(out).unwrap())
}

async fn submitted_events(bus: &Bus) -> Vec<events::tasks::TaskSubmitted> {
    bus::read_events(&bus.jetstream, Stream::Tasks, Vec::new())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            Event::TaskSubmitted(e) => Some(e),
            _ => None,
        })
        .collect()
}

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

fn task_ids(stdout: &str) -> Vec<TaskId> {
    stdout
        .lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("not a task id: {l}")))
        .collect()
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}-{name}", uuid_like()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

fn uuid_like() -> String {
    TaskId::new().to_string()
}

#[tokio::test]
async fn tasks_submit_from_flags_and_from_a_checked_file() {
    let env = env().await;
    let (result, stdout) = cocoon(
        &env,
        &[
            "tasks",
            "submit",
            "--client",
            "acme",
            "--gpus",
            "2",
            "--gpu-memory-mib",
            "40960",
            "--model-tag",
            "llama",
            "--priority",
            "9",
            "--max-price",
            "2500",
            "--timeout-ms",
            "60000",
            "--input",
            "hello",
        ],
    )
    .await;
    assert!(matches!(result, Ok(ExitCode::SUCCESS)), "{result:?}");
    let ids = task_ids(&stdout);
    assert_eq!(ids.len(), 1);
    let stored = submitted_events(&env.bus).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].task_id, ids[0]);
    assert_eq!(stored[0].client_id.as_str(), "acme");
    assert_eq!(stored[0].spec.requirements.gpu_count, 2);
    assert_eq!(stored[0].spec.requirements.gpu_memory_mib, 40_960);
    assert_eq!(stored[0].spec.priority.get(), 9);
    assert_eq!(stored[0].spec.max_price_per_gpu_second, Nanoton(2_500));
    assert_eq!(stored[0].spec.input, Blob::Inline(b"hello".to_vec()));

    // A bad flag value is refused with what is wrong, before anything is published.
    let (result, _) = cocoon(
        &env,
        &[
            "tasks",
            "submit",
            "--client",
            "acme",
            "--max-price",
            "1",
            "--priority",
            "11",
        ],
    )
    .await;
    let message = format!("{:#}", result.unwrap_err());
    assert!(
        message.contains("priority 11 is outside 1..=10"),
        "{message}"
    );
    // Without --file, the client and the price are required.
    assert!(Cli::try_parse_from(["cocoon", "tasks", "submit", "--client", "acme"]).is_err());

    // A file with a bad line: every bad line is named, nothing is submitted.
    let bad = temp_file(
        "bad.jsonl",
        concat!(
            r#"{"client_id":"acme","max_price_per_gpu_second":5}"#,
            "\n",
            r#"{"client_id":"acme","max_price_per_gpu_second":5,"requirements":{"gpu_count":0}}"#,
            "\n\n",
            r#"{"client_id":"bad.client","max_price_per_gpu_second":5}"#,
            "\n",
        ),
    );
    let (result, stdout) =
        cocoon(&env, &["tasks", "submit", "--file", bad.to_str().unwrap()]).await;
    let message = format!("{:#}", result.unwrap_err());
    assert!(
        message.contains("line 2: invalid request: gpu_count must be at least 1"),
        "{message}"
    );
    assert!(
        message.contains("line 4: invalid request: client_id"),
        "{message}"
    );
    assert!(stdout.is_empty());
    assert_eq!(submitted_events(&env.bus).await.len(), 1);

    let good = temp_file(
        "good.jsonl",
        &(0..25)
            .map(|i| {
                format!(
                    r#"{{"client_id":"batch","max_price_per_gpu_second":5,"priority":{},"input":"job {i}"}}"#,
                    1 + i % 10
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let (result, stdout) =
        cocoon(&env, &["tasks", "submit", "--file", good.to_str().unwrap()]).await;
    assert!(matches!(result, Ok(ExitCode::SUCCESS)), "{result:?}");
    let ids = task_ids(&stdout);
    assert_eq!(ids.len(), 25);
    let stored = submitted_events(&env.bus).await;
    assert_eq!(stored.len(), 26);
    for (i, id) in ids.iter().enumerate() {
        let e = stored.iter().find(|e| e.task_id == *id).unwrap();
        assert_eq!(e.spec.input, Blob::Inline(format!("job {i}").into_bytes()));
    }
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(good);
}

fn producer() -> ProducerId {
    ProducerId::new("test").unwrap()
}

fn spec() -> TaskSpec {
    TaskSpec {
        requirements: Requirements {
            gpu_count: 1,
            gpu_memory_mib: 0,
            model_tag: None,
        },
        priority: Priority::new(5).unwrap(),
        max_price_per_gpu_second: Nanoton(10),
        timeout_ms: 1_000,
        input: Blob::Inline(Vec::new()),
    }
}

#[tokio::test]
async fn tasks_and_workers_views_read_the_projection() {
    let env = env().await;
    let (_, stdout) = cocoon(
        &env,
        &["tasks", "submit", "--client", "acme", "--max-price", "10"],
    )
    .await;
    let task = task_ids(&stdout)[0];
    let w = WorkerId::new("gpu-sim-1").unwrap();
    let records = vec![
        EventRecord::new(
            producer(),
            WorkerRegistered {
                worker_id: w.clone(),
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: "GPU-sim-0".into(),
                    name: "simulated".into(),
                    memory_total_mib: 81_920,
                    simulated: true,
                }],
                price_per_gpu_second: Nanoton(7),
                payout_address: "UQ-sim".into(),
                region: "local".into(),
                max_concurrent_tasks: 2,
                public_key: vec![1; 32],
                agent_version: "test".into(),
                model_tags: Vec::new(),
            },
        ),
        EventRecord::new(
            producer(),
            TaskAllocated {
                task_id: task,
                client_id: ClientId::new("acme").unwrap(),
                worker_id: w.clone(),
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
                spec: spec(),
            },
        ),
        EventRecord::new(
            producer(),
            TaskStarted {
                task_id: task,
                worker_id: w.clone(),
                attempt: 1,
                gpu_indices: vec![0],
            },
        ),
        EventRecord::new(
            producer(),
            TaskCompleted {
                task_id: task,
                worker_id: w.clone(),
                attempt: 1,
                usage: Usage {
                    gpu_millis: GpuMillis(1_500),
                    peak_gpu_memory_mib: None,
                    wall_ms: 1_500,
                },
            },
        ),
        EventRecord::new(
            producer(),
            TaskResult {
                task_id: task,
                client_id: ClientId::new("acme").unwrap(),
                worker_id: w.clone(),
                attempt: 1,
                output: Blob::Inline(b"42".to_vec()),
                checksum: "sha256:abcd".into(),
                truncated: false,
            },
        ),
    ];
    publish_each(&env.bus, &records).await;
    let mut config = projector::ProjectorConfig::new(env.server.url(), env.db.url());
    config.fetch_wait = Duration::from_millis(200);
    projector::run(config, CancellationToken::new(), true)
        .await
        .unwrap();

    let id = task.to_string();
    let (result, stdout) = cocoon(&env, &["tasks", "get", &id]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(stdout.contains("completed (final)"), "{stdout}");
    assert!(stdout.contains("gpu-sim-1"), "{stdout}");
    assert!(stdout.contains("sha256:abcd"), "{stdout}");
    assert!(stdout.contains("1.500 GPU-seconds"), "{stdout}");
    let (result, _) = cocoon(&env, &["tasks", "get", &TaskId::new().to_string()]).await;
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("not in the read model")
    );
    let (result, _) = cocoon(&env, &["tasks", "get", "nope"]).await;
    assert!(result.is_err());

    let (_, stdout) = cocoon(&env, &["tasks", "list", "--client", "acme"]).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("TASK"));
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("completed"),
        "{stdout}"
    );
    let (_, stdout) = cocoon(&env, &["tasks", "list", "--status", "running"]).await;
    assert!(stdout.contains("(no tasks)"), "{stdout}");
    let (result, _) = cocoon(&env, &["tasks", "list", "--status", "bogus"]).await;
    assert!(result.unwrap_err().to_string().contains("unknown status"));

    let (result, stdout) = cocoon(&env, &["tasks", "watch", &id]).await;
    assert!(matches!(result, Ok(ExitCode::SUCCESS)), "{result:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("completed") && stdout.contains("[final]"),
        "{stdout}"
    );

    let (result, stdout) = cocoon(&env, &["workers", "list"]).await;
    assert!(result.is_ok(), "{result:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].contains("ADMISSION"), "{stdout}");
    let row = lines[1];
    assert!(row.starts_with("gpu-sim-1"), "{row}");
    assert!(row.contains("unattested"), "{row}");
    assert!(row.contains("1 x simulated 80 GiB [simulated]"), "{row}");

    // Once an allocator has published a policy admitting unattested workers, the listing says so first.
    let store = allocator::lease::bucket(&env.bus.jetstream, 1)
        .await
        .unwrap();
    let policy = allocator::lease::PolicyValue {
        holder: "allocator-x".into(),
        epoch: 7,
        allow_unattested: true,
        max_attempts: 3,
        heartbeat_timeout_ms: 10_000,
    };
    store
        .put(
            allocator::lease::POLICY_KEY,
            serde_json::to_vec(&policy).unwrap().into(),
        )
        .await
        .unwrap();
    let (result, stdout) = cocoon(&env, &["workers", "list"]).await;
    assert!(result.is_ok(), "{result:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].contains(
            "UNATTESTED workers are admitted (development only; allocator allocator-x, epoch 7"
        ),
        "{stdout}"
    );
    assert!(lines[1].contains("ADMISSION"), "{stdout}");
}

#[tokio::test]
async fn results_watch_prints_one_client_from_a_sequence_up_to_a_limit() {
    let env = env().await;
    let result = |client: &str, output: &[u8]| {
        EventRecord::new(
            producer(),
            TaskResult {
                task_id: TaskId::new(),
                client_id: ClientId::new(client).unwrap(),
                worker_id: WorkerId::new("w1").unwrap(),
                attempt: 1,
                output: Blob::Inline(output.to_vec()),
                checksum: "sha256:00".into(),
                truncated: false,
            },
        )
    };
    let seqs = publish_each(
        &env.bus,
        &[
            result("c1", b"first answer"),
            result("c2", b"someone else's"),
            result("c1", &[0, 255, 1]),
        ],
    )
    .await;
    let (outcome, stdout) = cocoon(
        &env,
        &["results", "watch", "--client", "c1", "--limit", "2"],
    )
    .await;
    assert!(matches!(outcome, Ok(ExitCode::SUCCESS)), "{outcome:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("seq={} ", seqs[0])),
        "{stdout}"
    );
    assert!(lines[0].contains("output=\"first answer\""), "{stdout}");
    assert!(
        lines[0].contains("size=12") && lines[0].contains("worker=w1"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("seq={} ", seqs[2])),
        "{stdout}"
    );
    assert!(lines[1].contains("output=<binary>"), "{stdout}");

    let from = seqs[2].to_string();
    let (_, stdout) = cocoon(
        &env,
        &[
            "results",
            "watch",
            "--client",
            "c1",
            "--from-seq",
            &from,
            "--limit",
            "1",
        ],
    )
    .await;
    assert!(stdout.starts_with(&format!("seq={} ", seqs[2])), "{stdout}");
    assert!(
        Cli::try_parse_from([
            "cocoon",
            "results",
            "watch",
            "--client",
            "c1",
            "--new",
            "--from-seq",
            "3"
        ])
        .is_err()
    );
}
