//! The operator page in a real browser: headless Chromium loads `GET /` from the API served in-process over a
//! real nats-server, a fresh Postgres database and the projector, and the page must show live numbers.
//!
//! The page is loaded with `--dump-dom --virtual-time-budget`, which runs its polling for a few (virtual)
//! seconds and prints the DOM it ended with:
//! 1. on an empty pool: every figure is 0 and equals `/api/v1/stats`, and the page polled stats more than once
//!    in one load (counted by a layer around the API's router);
//! 2. after a worker registers, ten tasks are submitted through `POST /api/v1/tasks/batch` and completions,
//!    payments, a settlement and a bad frame are published on the bus: the figures rose to what the test
//!    published, equal `/api/v1/stats` again, and the tables list the worker with its GPUs, the projections
//!    and the settlement;
//! 3. while the API answers 503 the page shows the "API unreachable" banner, and when the first answers fail
//!    and the next succeed it recovers (banner hidden, figures filled);
//! 4. a screenshot of the live page is saved to `target/browser/operator-page.png`.
//!
//! Needs `/usr/bin/chromium` (`infra/chromium.sh install`) and the stack's Postgres (`infra/stack.sh up`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::allocations::{ScoreBreakdown, TaskAllocated};
use events::payload::{Blob, Priority, TaskSpec};
use events::payments::{
    PaymentAccrued, Payout, SettlementConfirmed, SettlementPrepared, SettlementSubmitted,
};
use events::results::TaskResult;
use events::tasks::{TaskCompleted, TaskStarted, Usage};
use events::workers::{GpuInfo, GpuTelemetry, WorkerHeartbeat, WorkerRegistered};
use events::{
    ClientId, EventRecord, GpuMillis, Nanoton, Partition, ProducerId, SettlementId, Stream,
    Subject, TaskId, Timestamp, WorkerId,
};
use serde_json::{Value, json};
use tests::{NatsServer, TempDir, TestDb};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CHROMIUM: &str = "/usr/bin/chromium";
/// A whole Chromium run (start, load, virtual time, dump) at most: it can take seconds to start on a small box.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);
/// Virtual milliseconds the page runs before its DOM is dumped: stats are polled every second, so this covers
/// at least three stats polls and two of the lists.
const VIRTUAL_TIME_MS: u32 = 3_500;
/// How long the read models may take to show what was published.
const CONSISTENT_WITHIN: Duration = Duration::from_secs(60);

const WORKER: &str = "browser-w1";
const CLIENT: &str = "browser-client";
const PRICE: u64 = 1_500;
/// Priorities of the submitted tasks, and what becomes of each (by index).
const PRIORITIES: [u8; 10] = [10, 9, 9, 8, 7, 6, 5, 5, 3, 1];
const COMPLETED: [usize; 4] = [0, 1, 5, 8];
const RUNNING: usize = 2;
// Waiting afterwards: high = #3, #4; medium = #6, #7; low = #9.

/// What the layer around the router counts and how it fails requests on demand, for the browser's requests
/// (the test's own go through untouched).
#[derive(Debug, Default)]
struct Traffic {
    stats: AtomicUsize,
    workers: AtomicUsize,
    settlements: AtomicUsize,
    /// Every `/api/v1/` request of the browser answers 503 while set.
    fail_all: AtomicBool,
    /// The browser's next this many `/api/v1/` requests answer 503.
    fail_next: AtomicUsize,
    /// 503s answered.
    failed: AtomicUsize,
    /// Every stats answer served to the browser, in order: what the page rendered is one of them.
    served_stats: Mutex<Vec<Value>>,
}

impl Traffic {
    /// The stats answer the browser was served with this `generated_at`.
    fn served(&self, generated_at: &str) -> Value {
        let served = self.served_stats.lock().unwrap();
        served
            .iter()
            .rev()
            .find(|s| s["generated_at"] == generated_at)
            .cloned()
            .unwrap_or_else(|| {
                panic!("the page shows stats generated at {generated_at:?}, which no answer to the browser had")
            })
    }
}

async fn track(State(traffic): State<Arc<Traffic>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let from_browser = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|agent| agent.to_str().ok())
        .is_some_and(|agent| agent.contains("Chrome"));
    if from_browser && path.starts_with("/api/v1/") {
        let failing = traffic.fail_all.load(Ordering::SeqCst)
            || traffic
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if failing {
            traffic.failed.fetch_add(1, Ordering::SeqCst);
            let body = json!({"error": {"code": "unavailable", "message": "injected by the browser test"}});
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response();
        }
        let counter = match path.as_str() {
            "/api/v1/stats" => Some(&traffic.stats),
            "/api/v1/workers" => Some(&traffic.workers),
            "/api/v1/settlements" => Some(&traffic.settlements),
            _ => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
    if !(from_browser && path == "/api/v1/stats") {
        return next.run(request).await;
    }
    // Keep a copy of what the page is given (uncompressed, so that it can be read here; a 304 reuses the
    // browser's copy of an answer recorded before).
    request.headers_mut().remove(header::ACCEPT_ENCODING);
    let response = next.run(request).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap();
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    traffic.served_stats.lock().unwrap().push(answer);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// nats-server, a fresh database, the projector and the API, all in this process but the servers.
struct Stack {
    _server: NatsServer,
    _db: TestDb,
    publisher: Publisher,
    js: async_nats::jetstream::Context,
    stop: CancellationToken,
    services: Vec<JoinHandle<()>>,
    sampler: JoinHandle<()>,
    base: String,
    http: httpc::HttpClient,
    traffic: Arc<Traffic>,
}

impl Stack {
    async fn start() -> Stack {
        let server = NatsServer::start().await;
        let db = TestDb::create().await;
        schemas::migrate(&mut db.client().await).await.unwrap();
        let bus = Bus::from_client(server.client().await, Duration::from_secs(5));
        provision_streams(&bus.jetstream, 1).await.unwrap();
        let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
        let stop = CancellationToken::new();
        let mut services = Vec::new();

        let mut projection = projector::ProjectorConfig::new(server.url(), db.url());
        projection.fetch_wait = Duration::from_millis(100);
        let s = stop.clone();
        services.push(tokio::spawn(async move {
            projector::run(projection, s, false).await.unwrap();
        }));

        let traffic = Arc::new(Traffic::default());
        let config = api_config(&server.url(), db.url());
        let state = api::AppState::connect(&config).await.unwrap();
        // What `api::serve_state` runs beside the router: the throughput sampler.
        let sampler = tokio::spawn(api::stats::sample_throughput(state.clone()));
        let app = api::router(state).layer(middleware::from_fn_with_state(traffic.clone(), track));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let s = stop.clone();
        services.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
                .unwrap();
        }));

        let stack = Stack {
            _server: server,
            _db: db,
            publisher,
            js: bus.jetstream.clone(),
            stop,
            services,
            sampler,
            base,
            http: httpc::HttpClient::new(&httpc::ClientConfig::new(), false).unwrap(),
            traffic,
        };
        stack
            .wait_for(
                "the API to be ready",
                Duration::from_secs(30),
                |_| true,
                "/readyz",
            )
            .await;
        stack
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(&self.url(path), &[]).await.unwrap();
        let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, body)
    }

    async fn stats(&self) -> Value {
        let (status, body) = self.get("/api/v1/stats").await;
        assert_eq!(status, 200, "GET /api/v1/stats: {body}");
        body
    }

    /// Polls `path` until it answers 200 with a body that `check` accepts; returns that body.
    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
        path: &str,
    ) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        loop {
            if let Ok(response) = self.http.get(&self.url(path), &[]).await {
                last = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                if response.status == 200 && check(&last) {
                    return last;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last answer of {path}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish(&self, records: &[EventRecord]) {
        for record in records {
            drop(self.publisher.publish(record).await.unwrap());
        }
        self.publisher.flush().await.unwrap();
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.sampler.abort();
        for service in self.services {
            service.await.unwrap();
        }
    }
}

/// The API's configuration for these servers.
fn api_config(nats_url: &str, database_url: &str) -> api::ApiConfig {
    let mut config = api::ApiConfig::new(nats_url, database_url);
    config.pg_pool_size = 4;
    config
}

/// Fails the test, saying what to run, when the browser is not installed.
fn require_chromium() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: run `infra/chromium.sh install` (Debian's chromium package) first"
    );
}

/// A headless Chromium run on a fresh profile; killed if it outlives [`CHROMIUM_TIMEOUT`] (and on drop).
async fn chromium(args: &[String]) -> String {
    require_chromium();
    let profile = TempDir::new("cocoon-browser-profile");
    let child = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .env("HOME", profile.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} took over {CHROMIUM_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "chromium {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The page's DOM after it has run for [`VIRTUAL_TIME_MS`].
async fn load_page(stack: &Stack) -> String {
    let dom = chromium(&[
        format!("--virtual-time-budget={VIRTUAL_TIME_MS}"),
        "--dump-dom".into(),
        stack.url("/"),
    ])
    .await;
    assert!(dom.contains("</html>"), "no page dumped: {dom}");
    dom
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// The opening tag of element `id` and the text up to the next tag.
fn element<'a>(dom: &'a str, id: &str) -> (&'a str, String) {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("the page has no element #{id}"));
    let start = dom[..at].rfind('<').unwrap();
    let open_end = at + dom[at..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find('<').unwrap();
    (
        &dom[start..open_end],
        unescape(&dom[open_end..close]).trim().to_string(),
    )
}

fn text(dom: &str, id: &str) -> String {
    element(dom, id).1
}

fn strip_tags(html: &str) -> String {
    let html = html.replace("</li>", "; ");
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    unescape(out.trim().trim_end_matches(';'))
}

/// The cells' texts of each body row of table `id`.
fn rows(dom: &str, id: &str) -> Vec<Vec<String>> {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("the page has no table #{id}"));
    let table = &dom[at..at + dom[at..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody").expect("a tbody")..];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let cell = &cell[cell.find('>').unwrap() + 1..];
                    strip_tags(&cell[..cell.find("</td>").unwrap_or(cell.len())])
                })
                .collect()
        })
        .collect()
}

/// Nanoton as the page writes TON: all nine decimals.
fn ton(nanoton: u64) -> String {
    format!("{}.{:09}", nanoton / 1_000_000_000, nanoton % 1_000_000_000)
}

fn int(stats: &Value, pointer: &str) -> u64 {
    stats
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("stats have no integer at {pointer}: {stats}"))
}

/// Each figure of the page: its id, the page's text, and what `stats` says, formatted as the page does.
fn figures(dom: &str, stats: &Value) -> Vec<(&'static str, String, String)> {
    let ints = [
        ("tasks-total", "/tasks/total"),
        ("tasks-completed", "/tasks/by_status/completed"),
        ("tasks-running", "/tasks/by_status/running"),
        ("queue-high", "/queue/by_band/high"),
        ("queue-medium", "/queue/by_band/medium"),
        ("queue-low", "/queue/by_band/low"),
        ("workers-active", "/workers/active"),
        ("workers-gpus", "/workers/gpus"),
        ("dead-letters", "/dead_letters"),
    ];
    let mut out: Vec<_> = ints
        .iter()
        .map(|(id, pointer)| (*id, text(dom, id), int(stats, pointer).to_string()))
        .collect();
    out.push((
        "payments-paid",
        text(dom, "payments-paid"),
        ton(int(stats, "/payments/paid_nanoton")),
    ));
    let per_second = stats
        .pointer("/throughput/completed_per_second")
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("stats have no completed_per_second: {stats}"));
    out.push((
        "throughput-per-second",
        text(dom, "throughput-per-second"),
        format!("{per_second:.2}"),
    ));
    out.push((
        "updated-at",
        text(dom, "updated-at"),
        text_str(stats, "/generated_at").to_owned(),
    ));
    out
}

/// Figures that move with time alone: a later answer may differ from the one the page rendered.
const TIME_DEPENDENT: [&str; 2] = ["throughput-per-second", "updated-at"];

/// Asserts that every figure on the page equals the stats answer the page rendered (the one served to the
/// browser whose `generated_at` is in `#updated-at`), and that the figures that do not move with time alone
/// equal `fresh` (a `GET /api/v1/stats` after the page loaded) too. Returns the page's figures by id.
fn assert_page_matches(
    dom: &str,
    traffic: &Traffic,
    fresh: &Value,
    when: &str,
) -> Vec<(&'static str, String)> {
    let rendered = traffic.served(&text(dom, "updated-at"));
    let mut wrong: Vec<_> = figures(dom, &rendered)
        .into_iter()
        .filter(|(_, page, api)| page != api)
        .map(|(id, page, api)| format!("#{id}: page {page:?}, the stats it was served {api:?}"))
        .collect();
    let figures = figures(dom, fresh);
    wrong.extend(
        figures
            .iter()
            .filter(|(id, page, api)| !TIME_DEPENDENT.contains(id) && page != api)
            .map(|(id, page, api)| format!("#{id}: page {page:?}, GET /api/v1/stats {api:?}")),
    );
    assert!(
        wrong.is_empty(),
        "{when}: the page disagrees with the API:\n{}",
        wrong.join("\n")
    );
    figures
        .into_iter()
        .map(|(id, page, _)| (id, page))
        .collect()
}

fn figure<'a>(figures: &'a [(&'static str, String)], id: &str) -> &'a str {
    &figures.iter().find(|(i, _)| *i == id).unwrap().1
}

fn spec(priority: u8) -> TaskSpec {
    let mut spec = events::sample::task_spec(0);
    spec.priority = Priority::new(priority).unwrap();
    spec.requirements.model_tag = None;
    spec
}

/// Where the screenshot goes: `target/browser/` (the target directory is the parent of `CARGO_TARGET_TMPDIR`).
fn screenshot_path() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .to_path_buf();
    target.join("browser").join("operator-page.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_live_pool_state() {
    require_chromium();
    let started = Instant::now();
    let stack = Stack::start().await;

    // 1. An empty pool.
    let polls_before = stack.traffic.stats.load(Ordering::SeqCst);
    let before_dom = load_page(&stack).await;
    let polls = stack.traffic.stats.load(Ordering::SeqCst) - polls_before;
    assert!(
        polls >= 2,
        "the page asked for /api/v1/stats {polls} time(s) in {VIRTUAL_TIME_MS} ms; it must poll every second"
    );
    assert!(stack.traffic.workers.load(Ordering::SeqCst) >= 1);
    assert!(stack.traffic.settlements.load(Ordering::SeqCst) >= 1);
    let before_stats = stack.stats().await;
    let before = assert_page_matches(&before_dom, &stack.traffic, &before_stats, "empty pool");
    for id in ["tasks-total", "tasks-completed", "workers-active"] {
        assert_eq!(figure(&before, id), "0", "#{id} on an empty pool");
    }
    assert_eq!(figure(&before, "payments-paid"), "0.000000000");
    let before_updated = text(&before_dom, "updated-at");
    assert!(
        before_updated.ends_with('Z')
            && before_updated.as_str() <= text_str(&before_stats, "/generated_at"),
        "#updated-at {before_updated:?} is not a generated_at of the stats"
    );
    assert_eq!(
        rows(&before_dom, "workers-table"),
        vec![vec!["no workers registered".to_string()]]
    );
    assert!(element(&before_dom, "api-status").0.contains("hidden"));

    // 2. Work flows: a worker registers (attested, heartbeating), ten tasks are submitted through the API.
    let worker = WorkerId::new(WORKER).unwrap();
    let client = ClientId::new(CLIENT).unwrap();
    let producer = ProducerId::new("browser-test").unwrap();
    let registered = EventRecord::new(
        producer.clone(),
        WorkerRegistered {
            worker_id: worker.clone(),
            gpus: (0..2)
                .map(|index| GpuInfo {
                    index,
                    uuid: format!("GPU-browser-{index}"),
                    name: "Simulated H100 80GB".into(),
                    memory_total_mib: 81_920,
                    simulated: true,
                })
                .collect(),
            price_per_gpu_second: Nanoton(PRICE),
            payout_address: format!("UQ-{WORKER}"),
            region: "local".into(),
            max_concurrent_tasks: 4,
            public_key: vec![7; 32],
            agent_version: "browser-test".into(),
            model_tags: Vec::new(),
        },
    );
    stack.publish(&[registered]).await;
    let until = Timestamp::now().saturating_add(Duration::from_secs(3_600));
    stack
        .publish(&events::sample::stand_in_attestation(&worker, until))
        .await;

    let batch = json!({"tasks": PRIORITIES.iter().enumerate().map(|(i, priority)| json!({
        "client_id": CLIENT,
        "max_price_per_gpu_second": 2_000,
        "priority": priority,
        "timeout_ms": 60_000,
        "requirements": {"gpu_count": 1},
        "input": format!("browser task {i}"),
    })).collect::<Vec<_>>()});
    let response = stack
        .http
        .post(
            &stack.url("/api/v1/tasks/batch"),
            &[],
            "application/json",
            batch.to_string().as_bytes(),
        )
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    assert_eq!(response.status, 202, "POST /api/v1/tasks/batch: {body}");
    let task_ids: Vec<TaskId> = body["tasks"]
        .as_array()
        .expect("the batch answer lists the tasks")
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(task_ids.len(), PRIORITIES.len());

    // The worker runs some: allocated, started, completed with a result and an accrual; one still runs.
    let mut records = Vec::new();
    let mut accrued = Vec::new();
    for (i, &task_id) in task_ids.iter().enumerate() {
        if !COMPLETED.contains(&i) && i != RUNNING {
            continue;
        }
        let allocated = EventRecord::new(
            producer.clone(),
            TaskAllocated {
                task_id,
                client_id: client.clone(),
                worker_id: worker.clone(),
                attempt: 1,
                allocator_epoch: 1,
                gpu_indices: vec![(i % 2) as u32],
                score: ScoreBreakdown {
                    total: 0.9,
                    load: 0.3,
                    memory: 0.3,
                    history: 0.1,
                    latency: 0.1,
                    affinity: 0.1,
                },
                spec: spec(PRIORITIES[i]),
            },
        );
        let started = EventRecord::caused_by(
            &allocated.envelope,
            producer.clone(),
            TaskStarted {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                gpu_indices: vec![(i % 2) as u32],
            },
        );
        records.extend([allocated, started.clone()]);
        if i == RUNNING {
            continue;
        }
        let gpu_millis = GpuMillis(1_000 * (i as u64 + 1) + 234);
        let completed = EventRecord::caused_by(
            &started.envelope,
            producer.clone(),
            TaskCompleted {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                usage: Usage {
                    gpu_millis,
                    peak_gpu_memory_mib: Some(2_048),
                    wall_ms: gpu_millis.0,
                },
            },
        );
        let output = format!("BROWSER TASK {i}").into_bytes();
        let result = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            TaskResult {
                task_id,
                client_id: client.clone(),
                worker_id: worker.clone(),
                attempt: 1,
                checksum: format!("sha256:{:064x}", i),
                output: Blob::Inline(output),
                truncated: false,
            },
        );
        let amount = gpu_millis.cost(Nanoton(PRICE)).unwrap();
        let accrual = EventRecord::caused_by(
            &completed.envelope,
            producer.clone(),
            PaymentAccrued {
                task_id,
                worker_id: worker.clone(),
                attempt: 1,
                gpu_millis,
                price_per_gpu_second: Nanoton(PRICE),
                amount,
            },
        );
        accrued.push((task_id, amount));
        records.extend([completed, result, accrual]);
    }
    records.push(EventRecord::new(
        producer.clone(),
        WorkerHeartbeat {
            worker_id: worker.clone(),
            sequence: 1,
            gpus: (0..2)
                .map(|index| GpuTelemetry {
                    index,
                    memory_used_mib: 10_240 * u64::from(index + 1),
                    memory_total_mib: 81_920,
                    utilization_pct: 40 + 40 * index as u8,
                    temperature_c: 55,
                    power_mw: 300_000,
                    process_count: 1,
                })
                .collect(),
            running_tasks: vec![task_ids[RUNNING]],
            latency_us: Some(800),
        },
    ));
    stack.publish(&records).await;

    // The settler's part: the accruals settled in one confirmed transfer.
    let paid: u64 = accrued.iter().map(|(_, amount)| amount.0).sum();
    let settlement_id = SettlementId::new();
    let prepared = EventRecord::new(
        producer.clone(),
        SettlementPrepared {
            settlement_id,
            wallet_seqno: 1,
            valid_until: Timestamp::now().saturating_add(Duration::from_secs(60)),
            payouts: vec![Payout {
                worker_id: worker.clone(),
                destination: format!("UQ-{WORKER}"),
                amount: Nanoton(paid),
                task_ids: accrued.iter().map(|(task, _)| *task).collect(),
            }],
            signed_message: vec![0xb5, 0xee],
            message_hash: "ab".repeat(32),
        },
    );
    let submitted = EventRecord::caused_by(
        &prepared.envelope,
        producer.clone(),
        SettlementSubmitted {
            settlement_id,
            message_hash: "ab".repeat(32),
            send_attempt: 1,
        },
    );
    let confirmed = EventRecord::caused_by(
        &submitted.envelope,
        producer.clone(),
        SettlementConfirmed {
            settlement_id,
            tx_hash: "cd".repeat(32),
            logical_time: 42,
            failed_transfers: vec![],
        },
    );
    stack.publish(&[prepared, submitted, confirmed]).await;

    // And a frame no projection can decode, which is dead-lettered.
    let subject = Subject::partitioned(Stream::Tasks, Partition(0), events::Origin::Operator);
    stack
        .js
        .publish(
            subject.as_str().to_string(),
            bytes::Bytes::from_static(b"not a frame"),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let expected_high = 2;
    let expected_medium = 2;
    let expected_low = 1;
    let settled = stack
        .wait_for(
            "the stats to show what was published",
            CONSISTENT_WITHIN,
            |s| {
                s.pointer("/tasks/total") == Some(&json!(PRIORITIES.len()))
                    && s.pointer("/tasks/by_status/completed") == Some(&json!(COMPLETED.len()))
                    && s.pointer("/tasks/by_status/running") == Some(&json!(1))
                    && s.pointer("/queue/by_band/high") == Some(&json!(expected_high))
                    && s.pointer("/queue/by_band/medium") == Some(&json!(expected_medium))
                    && s.pointer("/queue/by_band/low") == Some(&json!(expected_low))
                    && s.pointer("/workers/active") == Some(&json!(1))
                    && s.pointer("/payments/paid_nanoton") == Some(&json!(paid))
                    && s.pointer("/dead_letters").and_then(Value::as_u64) >= Some(1)
                    && s["projections"].as_array().is_some_and(|p| {
                        !p.is_empty() && p.iter().all(|r| r["lag_frames"] == json!(0))
                    })
            },
            "/api/v1/stats",
        )
        .await;
    stack
        .wait_for(
            "the worker and the settlement to be listed",
            CONSISTENT_WITHIN,
            |l| l["items"].as_array().is_some_and(|items| items.len() == 1),
            "/api/v1/settlements?limit=10",
        )
        .await;

    let after_dom = load_page(&stack).await;
    let after_stats = stack.stats().await;
    assert_eq!(
        settled.pointer("/tasks"),
        after_stats.pointer("/tasks"),
        "the pool changed while the page loaded"
    );
    let after = assert_page_matches(&after_dom, &stack.traffic, &after_stats, "after the work");
    let expected = [
        ("tasks-total", PRIORITIES.len().to_string()),
        ("tasks-completed", COMPLETED.len().to_string()),
        ("tasks-running", "1".to_string()),
        ("queue-high", expected_high.to_string()),
        ("queue-medium", expected_medium.to_string()),
        ("queue-low", expected_low.to_string()),
        ("workers-active", "1".to_string()),
        ("workers-gpus", "2".to_string()),
        ("payments-paid", ton(paid)),
    ];
    for (id, want) in &expected {
        assert_eq!(figure(&after, id), want, "#{id} after the work");
        assert_ne!(
            figure(&before, id),
            figure(&after, id),
            "#{id} did not change as work flowed"
        );
    }
    assert_ne!(figure(&after, "dead-letters"), "0");
    let per_second: f64 = figure(&after, "throughput-per-second").parse().unwrap();
    assert!(
        per_second > 0.0,
        "throughput is {per_second}/s after {} completions",
        COMPLETED.len()
    );
    let after_updated = text(&after_dom, "updated-at");
    assert!(
        before_updated < after_updated
            && after_updated.as_str() <= text_str(&after_stats, "/generated_at"),
        "#updated-at went from {before_updated:?} to {after_updated:?}"
    );

    let workers = rows(&after_dom, "workers-table");
    assert_eq!(workers.len(), 1, "one row per worker: {workers:?}");
    assert_eq!(workers[0][0], WORKER);
    let gpus = workers[0].last().unwrap();
    assert!(
        gpus.contains("#0 Simulated H100 80GB") && gpus.contains("#1 Simulated H100 80GB"),
        "the worker's row lists its GPUs: {gpus:?}"
    );
    // One row per projection and stream: its partitions, the furthest checkpoint, the head, the lag summed.
    let projections = rows(&after_dom, "projections-table");
    let mut expected_rows: Vec<Vec<String>> = Vec::new();
    for row in after_stats["projections"].as_array().unwrap() {
        let (projection, stream) = (text_str(row, "/projection"), text_str(row, "/stream"));
        let at = match expected_rows
            .iter()
            .position(|r| r[0] == projection && r[1] == stream)
        {
            Some(at) => at,
            None => {
                let fresh = [projection, stream, "0", "0", "0", "0", "0"];
                expected_rows.push(fresh.iter().map(|c| c.to_string()).collect());
                expected_rows.len() - 1
            }
        };
        let r = &mut expected_rows[at];
        let add = |cell: &mut String, f: &dyn Fn(u64) -> u64| {
            *cell = f(cell.parse().unwrap()).to_string();
        };
        add(&mut r[2], &|n| n + 1);
        add(&mut r[3], &|n| n.max(int(row, "/checkpoint")));
        add(&mut r[4], &|n| n.max(int(row, "/head")));
        add(&mut r[5], &|n| n + int(row, "/lag_frames"));
        add(&mut r[6], &|n| n + u64::from(int(row, "/lag_frames") > 0));
    }
    assert!(!expected_rows.is_empty());
    assert_eq!(projections, expected_rows, "the projections table");
    let settlements = rows(&after_dom, "settlements-table");
    assert_eq!(settlements.len(), 1, "{settlements:?}");
    let id = settlement_id.to_string();
    assert!(
        settlements[0][0] == id
            && settlements[0].contains(&"confirmed".to_string())
            && settlements[0].contains(&ton(paid)),
        "the settlement row: {settlements:?}"
    );
    assert!(element(&after_dom, "api-status").0.contains("hidden"));

    // 3. The API fails: the banner says so. Then only the first answers fail: the page recovers.
    stack.traffic.fail_all.store(true, Ordering::SeqCst);
    let down_dom = load_page(&stack).await;
    stack.traffic.fail_all.store(false, Ordering::SeqCst);
    let (banner_tag, banner) = element(&down_dom, "api-status");
    assert!(
        !banner_tag.contains("hidden") && banner.starts_with("API unreachable"),
        "no banner while the API fails: {banner_tag} {banner:?}"
    );
    assert_eq!(text(&down_dom, "tasks-total"), "–");

    let failed_before = stack.traffic.failed.load(Ordering::SeqCst);
    stack.traffic.fail_next.store(3, Ordering::SeqCst);
    let recovered_dom = load_page(&stack).await;
    assert_eq!(
        stack.traffic.failed.load(Ordering::SeqCst) - failed_before,
        3,
        "the page's first requests were failed"
    );
    assert!(
        element(&recovered_dom, "api-status").0.contains("hidden"),
        "the banner stays after the API recovered"
    );
    assert_page_matches(
        &recovered_dom,
        &stack.traffic,
        &stack.stats().await,
        "after recovering",
    );

    // 4. A screenshot of the live page.
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    chromium(&[
        format!("--virtual-time-budget={VIRTUAL_TIME_MS}"),
        format!("--screenshot={}", path.display()),
        "--window-size=1280,900".into(),
        stack.url("/"),
    ])
    .await;
    let png =
        std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} is not a real screenshot ({} bytes)",
        path.display(),
        png.len()
    );
    println!(
        "operator page screenshot: {} ({} bytes); test took {:.1} s",
        path.display(),
        png.len(),
        started.elapsed().as_secs_f64()
    );

    stack.shutdown().await;
}

fn text_str<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer}: {value}"))
}
