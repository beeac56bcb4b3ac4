//! `cocoon tasks|results|workers|payments` against a real nats-server and Postgres, run in-process from parsed
//! command lines: submissions from flags and files, the read-model views, and following a client's results.

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
            Command::Payments { command } => {
                cocoon::payments::run(&cli.conn, command, &mut out).await
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

mod payments {
    //! `cocoon payments status` over what the projector made of a settler's events.

    use super::*;
    use events::payments::{
        PaymentAccrued, Payout, PayoutParked, SettlementConfirmed, SettlementExpired,
        SettlementPrepared, SettlementSubmitted,
    };
    use events::{SettlementId, Timestamp};

    async fn project(env: &Env) {
        let mut config = projector::ProjectorConfig::new(env.server.url(), env.db.url());
        config.fetch_wait = Duration::from_millis(200);
        projector::run(config, CancellationToken::new(), true)
            .await
            .unwrap();
    }

    fn accrued(worker: &str, amount: u64) -> (TaskId, EventRecord) {
        let task_id = TaskId::new();
        let record = EventRecord::new(
            producer(),
            PaymentAccrued {
                task_id,
                worker_id: WorkerId::new(worker).unwrap(),
                attempt: 1,
                gpu_millis: GpuMillis(amount),
                price_per_gpu_second: Nanoton(1_000),
                amount: Nanoton(amount),
            },
        );
        (task_id, record)
    }

    fn prepared(id: SettlementId, seqno: u32, worker: &str, task: (TaskId, u64)) -> EventRecord {
        EventRecord::new(
            producer(),
            SettlementPrepared {
                settlement_id: id,
                wallet_seqno: seqno,
                valid_until: Timestamp::from_micros(Timestamp::now().as_micros() + 600_000_000),
                payouts: vec![Payout {
                    worker_id: WorkerId::new(worker).unwrap(),
                    destination: format!("UQ-{worker}"),
                    amount: Nanoton(task.1),
                    task_ids: vec![task.0],
                }],
                signed_message: vec![0xb5, 0xee],
                message_hash: format!("{:064x}", id.0.as_u128()),
            },
        )
    }

    fn submitted(id: SettlementId) -> EventRecord {
        EventRecord::new(
            producer(),
            SettlementSubmitted {
                settlement_id: id,
                message_hash: format!("{:064x}", id.0.as_u128()),
                send_attempt: 1,
            },
        )
    }

    /// The lines of the section that starts with `title`, up to the next blank line.
    fn section<'a>(stdout: &'a str, title: &str) -> Vec<&'a str> {
        stdout
            .lines()
            .skip_while(|l| !l.starts_with(title))
            .skip(1)
            .take_while(|l| !l.is_empty())
            .collect()
    }

    #[tokio::test]
    async fn payments_status_prints_totals_workers_and_settlements() {
        let env = env().await;
        project(&env).await; // migrates; nothing to project yet
        let (result, stdout) = cocoon(&env, &["payments", "status"]).await;
        assert!(matches!(result, Ok(ExitCode::SUCCESS)), "{result:?}");
        assert!(stdout.starts_with("no payments yet"), "{stdout}");

        let (alice, alice_rec) = accrued("alice", 1_234_567_891);
        let (bob, bob_rec) = accrued("bob", 42);
        let (carol, carol_rec) = accrued("carol", 7);
        let ids = [
            SettlementId::new(),
            SettlementId::new(),
            SettlementId::new(),
        ];
        let mut records = vec![
            alice_rec,
            bob_rec,
            carol_rec,
            EventRecord::new(
                producer(),
                PayoutParked {
                    worker_id: WorkerId::new("carol").unwrap(),
                    destination: "nope".into(),
                    amount: Nanoton(7),
                    task_ids: vec![carol],
                    reason: "invalid TON address: nope".into(),
                },
            ),
            prepared(ids[0], 1, "alice", (alice, 1_234_567_891)),
            submitted(ids[0]),
            EventRecord::new(
                producer(),
                SettlementConfirmed {
                    settlement_id: ids[0],
                    tx_hash: "cd".repeat(32),
                    logical_time: 42,
                    failed_transfers: vec![],
                },
            ),
            prepared(ids[1], 2, "bob", (bob, 42)),
            EventRecord::new(
                producer(),
                SettlementExpired {
                    settlement_id: ids[1],
                    valid_until: Timestamp::now(),
                },
            ),
            prepared(ids[2], 2, "bob", (bob, 42)),
            submitted(ids[2]),
        ];
        // A millisecond apart, so "newest first" is the order above.
        let base = Timestamp::now().as_micros();
        for (i, r) in records.iter_mut().enumerate() {
            r.envelope.occurred_at = Timestamp::from_micros(base + 1_000 * i as i64);
        }
        publish_each(&env.bus, &records).await;
        project(&env).await;

        let (result, stdout) = cocoon(&env, &["payments", "status"]).await;
        assert!(matches!(result, Ok(ExitCode::SUCCESS)), "{result:?}");
        assert!(
            stdout.starts_with("TOTALS  3 workers, 3 accruals"),
            "{stdout}"
        );
        let totals = section(&stdout, "TOTALS");
        let total = |label: &str| {
            totals
                .iter()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no {label} in {stdout}"))
                .split_whitespace()
                .rev()
                .nth(1)
                .unwrap()
                .to_string()
        };
        assert_eq!(total("accrued"), "1.234567940");
        assert_eq!(total("pending"), "0.000000000");
        assert_eq!(total("parked"), "0.000000007");
        assert_eq!(total("in flight"), "0.000000042");
        assert_eq!(total("paid"), "1.234567891");
        assert!(
            stdout.contains("0 prepared, 1 submitted, 1 confirmed, 1 expired, 0 failed"),
            "{stdout}"
        );

        let workers = section(&stdout, "WORKER");
        assert_eq!(workers.len(), 3, "{stdout}");
        let cells = |row: &str| -> Vec<String> {
            // Amount cells are "<TON> TON": keep the numbers, drop the unit.
            row.split_whitespace()
                .filter(|c| *c != "TON")
                .map(str::to_string)
                .collect()
        };
        let alice_row = cells(workers[0]);
        assert_eq!(
            alice_row[..8],
            [
                "alice",
                "1",
                "1.234567891",
                "0.000000000",
                "0.000000000",
                "0.000000000",
                "1.234567891",
                "0"
            ],
            "{stdout}"
        );
        assert_ne!(alice_row[8], "-", "alice was paid: {stdout}");
        assert_eq!(
            cells(workers[1]),
            [
                "bob",
                "1",
                "0.000000042",
                "0.000000000",
                "0.000000000",
                "0.000000042",
                "0.000000000",
                "0",
                "-"
            ],
            "{stdout}"
        );
        assert!(workers[2].starts_with("carol"), "{stdout}");
        assert_eq!(cells(workers[2])[4], "0.000000007", "parked: {stdout}");

        let open = section(&stdout, "OPEN SETTLEMENTS");
        assert_eq!(open.len(), 2, "header and one settlement: {stdout}");
        assert!(
            open[1].starts_with(&ids[2].to_string()) && open[1].contains("submitted"),
            "{stdout}"
        );
        let recent = section(&stdout, "RECENT SETTLEMENTS (latest 10)");
        assert_eq!(recent.len(), 3, "header and two settlements: {stdout}");
        assert!(
            recent[1].starts_with(&ids[1].to_string()) && recent[1].contains("passed unexecuted"),
            "{stdout}"
        );
        assert!(
            recent[2].starts_with(&ids[0].to_string())
                && recent[2].contains(&format!("tx {}", "cd".repeat(32))),
            "{stdout}"
        );

        // One worker, one recent settlement.
        let (_, stdout) = cocoon(
            &env,
            &["payments", "status", "--worker", "carol", "--limit", "1"],
        )
        .await;
        let workers = section(&stdout, "WORKER");
        assert_eq!(workers.len(), 1, "{stdout}");
        assert!(workers[0].starts_with("carol"), "{stdout}");
        assert_eq!(
            section(&stdout, "RECENT SETTLEMENTS (latest 1)").len(),
            2,
            "{stdout}"
        );
        let (_, stdout) = cocoon(&env, &["payments", "status", "--worker", "dave"]).await;
        assert!(
            stdout.contains("(no accruals or payouts for worker dave)"),
            "{stdout}"
        );
        let (result, _) = cocoon(&env, &["payments", "status", "--worker", "no spaces"]).await;
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("invalid worker id"),
        );
    }
}
