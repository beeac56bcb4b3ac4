//! The HTTP API end to end: a real nats-server, a fresh Postgres database, the projector in-process, and the
//! API served on 127.0.0.1:0 and called over real HTTP (httpc; a raw socket where httpc cannot go: other
//! `Accept-Encoding`s and event streams). Every endpoint of CONTRACT.md is exercised.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use events::payload::Blob;
use events::payments::{Payout, SettlementPrepared};
use events::{ClientId, Event, EventRecord, Nanoton, ProducerId, SettlementId, TaskId, Timestamp};
use httpc::{ClientConfig, HttpClient, HttpResponse};
use serde_json::{Value, json};
use tests::{NatsServer, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long anything asynchronous may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(30);

// ----- harness -----

struct Env {
    nats: NatsServer,
    db: TestDb,
    bus: Bus,
    publisher: Publisher,
    http: HttpClient,
    addr: String,
    stop: CancellationToken,
    api: JoinHandle<()>,
    projector: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Env {
    /// NATS, a migrated database and the API; the projector only when asked (see [`Env::start_projector`]).
    async fn start(projector: bool) -> Env {
        Env::start_with(projector, |_| {}).await
    }

    async fn start_with(projector: bool, tweak: impl FnOnce(&mut api::ApiConfig)) -> Env {
        let nats = NatsServer::start().await;
        let db = TestDb::create().await;
        schemas::migrate(&mut db.client().await).await.unwrap();
        let bus = Bus::from_client(nats.client().await, Duration::from_secs(5));
        provision_streams(&bus.jetstream, 1).await.unwrap();
        let publisher = Publisher::new(bus.jetstream.clone(), PublisherConfig::default()).unwrap();
        let mut config = api::ApiConfig::new(nats.url(), db.url());
        config.pg_pool_size = 4;
        config.stats_ttl = Duration::ZERO;
        config.sse_keep_alive = Duration::from_millis(300);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let api = tokio::spawn(async move { api::serve(config, listener, s).await.unwrap() });
        let mut env = Env {
            nats,
            db,
            bus,
            publisher,
            http: HttpClient::new(&ClientConfig::new(), false).unwrap(),
            addr,
            stop,
            api,
            projector: None,
        };
        eventually("the API answers /healthz", || async {
            env.http
                .get(&env.url("/healthz"), &[])
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        if projector {
            env.start_projector();
        }
        env
    }

    fn start_projector(&mut self) {
        let mut config = projector::ProjectorConfig::new(self.nats.url(), self.db.url());
        config.fetch_wait = Duration::from_millis(100);
        config.migrate = false;
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { projector::run(config, s, false).await.unwrap() });
        self.projector = Some((stop, handle));
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        self.http.get(&self.url(path), headers).await.unwrap()
    }

    /// GET answering 200, as JSON.
    async fn get_ok(&self, path: &str) -> Value {
        let r = self.get(path, &[]).await;
        assert_eq!(r.status, 200, "GET {path}: {}", text(&r));
        json_of(&r)
    }

    async fn post(&self, path: &str, body: &[u8]) -> HttpResponse {
        self.http
            .post(&self.url(path), &[], "application/json", body)
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.post(path, body.to_string().as_bytes()).await;
        (r.status, json_of(&r))
    }

    /// Submits tasks through the batch endpoint; returns their ids in order and the batch's token.
    async fn submit(&self, requests: Vec<Value>) -> (Vec<String>, String) {
        let (status, body) = self
            .post_json("/api/v1/tasks/batch", &json!({"tasks": requests}))
            .await;
        assert_eq!(status, 202, "{body}");
        let ids = body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_owned())
            .collect();
        (ids, body["consistency_token"].as_str().unwrap().to_owned())
    }

    async fn publish(&self, records: &[EventRecord]) {
        for r in records {
            drop(self.publisher.publish(r).await.unwrap());
        }
        self.publisher.flush().await.unwrap();
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.api)
            .await
            .expect("the API stops on cancel")
            .unwrap();
        if let Some((stop, handle)) = self.projector {
            stop.cancel();
            handle.await.unwrap();
        }
    }
}

fn task(client: &str, priority: u8) -> Value {
    json!({"client_id": client, "max_price_per_gpu_second": 2000, "priority": priority,
           "requirements": {"gpu_count": 1, "gpu_memory_mib": 1024}, "input": "hello"})
}

fn text(r: &HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", r.status, text(r)))
}

fn header(r: &HttpResponse, name: &str) -> Option<String> {
    r.header(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Polls `probe` until it returns `Some`, or fails the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_of(body: &Value) -> (&str, Option<&str>) {
    (
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {body}")),
        body["error"]["field"].as_str(),
    )
}

/// Pages through a list, `limit` at a time; returns every item.
async fn page_all(env: &Env, path: &str, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    let sep = if path.contains('?') { '&' } else { '?' };
    loop {
        let url = match &cursor {
            None => format!("{path}{sep}limit={limit}"),
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
        };
        let page = env.get_ok(&url).await;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit as usize);
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return items,
        }
    }
}

// ----- raw HTTP (other encodings, event streams) -----

struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response head: its length, the status and the headers.
type Head = (usize, u16, Vec<(String, String)>);

/// Parses a response head; `None` until all of it is in `buf`.
fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf).unwrap() {
        httparse::Status::Complete(len) => Some((
            len,
            response.code.unwrap(),
            response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        )),
        httparse::Status::Partial => None,
    }
}

/// Decodes the complete chunks of `raw` from `*pos` into `out`.
fn dechunk(raw: &[u8], pos: &mut usize, out: &mut Vec<u8>) {
    loop {
        let rest = &raw[*pos..];
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return;
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        let start = line_end + 2;
        if rest.len() < start + size + 2 {
            return;
        }
        out.extend_from_slice(&rest[start..start + size]);
        *pos += start + size + 2;
        if size == 0 {
            return;
        }
    }
}

/// One GET over a fresh connection with exactly these headers, read to the end.
async fn raw_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (len, status, headers) = parse_head(&buf).expect("a complete response head");
    let raw = Raw {
        status,
        headers,
        body: Vec::new(),
    };
    let body = if raw
        .header("transfer-encoding")
        .is_some_and(|te| te.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut pos = len;
        dechunk(&buf, &mut pos, &mut out);
        out
    } else {
        buf[len..].to_vec()
    };
    Raw { body, ..raw }
}

/// One block of an event stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SseBlock {
    id: Option<String>,
    event: Option<String>,
    data: String,
    comment: Option<String>,
}

/// A client of an event stream over a raw socket (the stream never ends, so it is read incrementally).
struct SseClient {
    stream: TcpStream,
    raw: Vec<u8>,
    pos: usize,
    body: Vec<u8>,
    status: u16,
    headers: Vec<(String, String)>,
}

impl SseClient {
    async fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (n, v) in headers {
            request.push_str(&format!("{n}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some((len, status, headers)) = parse_head(&raw) {
                return SseClient {
                    stream,
                    raw,
                    pos: len,
                    body: Vec::new(),
                    status,
                    headers,
                };
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("a response head in time")
                .unwrap();
            assert!(n > 0, "closed before the head");
            raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next block (event or comment), within the deadline.
    async fn next(&mut self) -> SseBlock {
        let deadline = Instant::now() + DEADLINE;
        loop {
            dechunk(&self.raw, &mut self.pos, &mut self.body);
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.body.drain(..end + 2).collect();
                let mut out = SseBlock::default();
                for line in String::from_utf8(block).unwrap().lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        out.comment = Some(c.trim().to_owned());
                    } else if let Some((k, v)) = line.split_once(':') {
                        let v = v.strip_prefix(' ').unwrap_or(v).to_owned();
                        match k {
                            "id" => out.id = Some(v),
                            "event" => out.event = Some(v),
                            "data" => out.data.push_str(&v),
                            _ => {}
                        }
                    }
                }
                return out;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .expect("an event in time")
                .unwrap();
            assert!(n > 0, "the event stream closed");
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next `result` event, skipping comments.
    async fn next_result(&mut self) -> (String, Value) {
        loop {
            let block = self.next().await;
            if block.event.as_deref() == Some("result") {
                return (
                    block.id.expect("results carry an id"),
                    serde_json::from_str(&block.data).unwrap(),
                );
            }
            assert!(block.event.is_none(), "unexpected event {block:?}");
        }
    }
}

/// A result event for `client`, as a node agent would publish it.
fn result_record(client: &str, output: &str) -> EventRecord {
    let mut event = events::sample::all_events()
        .into_iter()
        .find(|e| matches!(e, Event::TaskResult(_)))
        .unwrap();
    if let Event::TaskResult(r) = &mut event {
        r.task_id = TaskId::new();
        r.client_id = ClientId::new(client).unwrap();
        r.output = Blob::Inline(output.as_bytes().to_vec());
    }
    EventRecord::new(ProducerId::new("test-agent").unwrap(), event)
}

/// An allocation of a task whose submission the log does not hold: its row has no `submitted_at`.
fn orphan_allocation() -> EventRecord {
    let mut event = events::sample::all_events()
        .into_iter()
        .find(|e| matches!(e, Event::TaskAllocated(_)))
        .unwrap();
    if let Event::TaskAllocated(a) = &mut event {
        a.task_id = TaskId::new();
    }
    EventRecord::new(ProducerId::new("test-allocator").unwrap(), event)
}

// ----- tests -----

#[tokio::test]
async fn a_submit_is_readable_with_its_token_once_the_lagging_projector_catches_up() {
    let mut env = Env::start(false).await;
    let (status, submitted) = env.post_json("/api/v1/tasks", &task("acme", 7)).await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["task_id"].as_str().unwrap().to_owned();
    let token = submitted["consistency_token"].as_str().unwrap().to_owned();
    let sequence = submitted["position"]["sequence"].as_u64().unwrap();
    assert_eq!(submitted["position"]["stream"], "TASKS");
    assert_eq!(token, format!("TASKS:{sequence}"));
    assert_eq!(
        bus::last_sequence(&env.bus.jetstream, events::Stream::Tasks)
            .await
            .unwrap(),
        sequence,
        "answered once the log stored it"
    );

    // No projector yet: the read model does not know the task.
    let r = env.get(&format!("/api/v1/tasks/{id}"), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(error_of(&json_of(&r)).0, "not_found");
    // With the token and a short wait: 504, saying where the projection stands.
    let r = env
        .get(
            &format!("/api/v1/tasks/{id}?consistent_with={token}&wait_ms=200"),
            &[],
        )
        .await;
    assert_eq!(r.status, 504, "{}", text(&r));
    let body = json_of(&r);
    assert_eq!(error_of(&body).0, "not_yet_consistent");
    assert_eq!(body["error"]["checkpoint"]["stream"], "TASKS");
    assert_eq!(body["error"]["checkpoint"]["sequence"], 0);
    let r = env
        .get(
            &format!("/api/v1/tasks?consistent_with={token}&wait_ms=100"),
            &[],
        )
        .await;
    assert_eq!(r.status, 504);

    // The read starts first and waits; the projector starts after it.
    let (http, task_url, list_url) = (
        env.http.clone(),
        env.url(&format!(
            "/api/v1/tasks/{id}?consistent_with={token}&wait_ms=10000"
        )),
        env.url("/api/v1/tasks?client_id=acme&wait_ms=10000"),
    );
    let read = tokio::spawn(async move { http.get(&task_url, &[]).await.unwrap() });
    let http = env.http.clone();
    let header_token = token.clone();
    let list = tokio::spawn(async move {
        http.get(
            &list_url,
            &[("Cocoon-Consistent-With", header_token.as_str())],
        )
        .await
        .unwrap()
    });
    env.start_projector();
    let r = read.await.unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    let view = json_of(&r);
    assert_eq!(view["task_id"], id.as_str());
    assert_eq!(view["status"], "submitted");
    assert_eq!(view["client_id"], "acme");
    assert_eq!(view["priority"], 7);
    assert_eq!(view["gpu_count"], 1);
    assert!(view["submitted_at"].as_str().unwrap().ends_with('Z'));
    let r = list.await.unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(json_of(&r)["items"][0]["task_id"], id.as_str());

    // Tokens are checked: malformed, or of a stream the read's projection does not read.
    for bad in ["TASKS", "TASKS:x", "NOPE:3", "PAYMENTS:1"] {
        let r = env
            .get(&format!("/api/v1/tasks/{id}?consistent_with={bad}"), &[])
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(
            error_of(&json_of(&r)),
            ("invalid_query", Some("consistent_with"))
        );
    }
    let r = env
        .get(&format!("/api/v1/tasks/{id}?wait_ms=20000"), &[])
        .await;
    assert_eq!(error_of(&json_of(&r)), ("invalid_query", Some("wait_ms")));
    // A token of another projection's stream is accepted where that projection serves the read.
    env.get_ok("/api/v1/workers?consistent_with=WORKERS:0")
        .await;
    env.get_ok("/api/v1/settlements?consistent_with=PAYMENTS:0")
        .await;
    env.shutdown().await;
}

#[tokio::test]
async fn submits_are_validated_field_by_field_and_nothing_invalid_is_published() {
    let env = Env::start(false).await;
    let head = || async {
        bus::last_sequence(&env.bus.jetstream, events::Stream::Tasks)
            .await
            .unwrap()
    };

    let r = env.post("/api/v1/tasks", b"{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&json_of(&r)).0, "invalid_json");
    let (status, body) = env
        .post_json("/api/v1/tasks", &json!({"max_price_per_gpu_second": 1}))
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (400, ("invalid_json", Some("client_id")))
    );
    let (status, body) = env
        .post_json(
            "/api/v1/tasks",
            &json!({"client_id": "a", "max_price_per_gpu_second": 1, "priorty": 3}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (400, ("invalid_json", Some("priorty")))
    );
    let (status, body) = env
        .post_json(
            "/api/v1/tasks",
            &json!({"client_id": "a", "max_price_per_gpu_second": 1, "priority": 11}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (422, ("invalid_field", Some("priority")))
    );
    let (status, body) = env
        .post_json(
            "/api/v1/tasks",
            &json!({"client_id": "a", "max_price_per_gpu_second": 1,
                    "requirements": {"gpu_count": 0}}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (422, ("invalid_field", Some("requirements.gpu_count")))
    );
    let (status, body) = env
        .post_json(
            "/api/v1/tasks",
            &json!({"client_id": "not a token", "max_price_per_gpu_second": 1}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (422, ("invalid_field", Some("client_id")))
    );

    // One bad item rejects the whole batch, unpublished.
    let (status, body) = env
        .post_json(
            "/api/v1/tasks/batch",
            &json!({"tasks": [task("a", 5), task("a", 0), task("a", 5)]}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (422, ("invalid_field", Some("tasks[1].priority")))
    );
    let (status, body) = env
        .post_json(
            "/api/v1/tasks/batch",
            &json!({"tasks": [task("a", 5), {"client_id": "a", "max_price_per_gpu_second": 1,
                                              "requirements": {"model_tag": ""}}]}),
        )
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (
            422,
            ("invalid_field", Some("tasks[1].requirements.model_tag"))
        )
    );
    let (status, body) = env
        .post_json("/api/v1/tasks/batch", &json!({"tasks": []}))
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (422, ("invalid_field", Some("tasks")))
    );
    let (status, body) = env
        .post_json("/api/v1/tasks/batch", &json!({"task": []}))
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (400, ("invalid_json", Some("task")))
    );
    let many: Vec<Value> = (0..1001).map(|_| task("a", 5)).collect();
    let (status, body) = env
        .post_json("/api/v1/tasks/batch", &json!({"tasks": many}))
        .await;
    assert_eq!(
        (status, error_of(&body)),
        (413, ("too_large", Some("tasks")))
    );
    // A body over 4 MiB.
    let mut big = b"{\"tasks\": [\"".to_vec();
    big.resize(4 * 1024 * 1024 + 1, b'x');
    let r = env.post("/api/v1/tasks/batch", &big).await;
    assert_eq!(r.status, 413, "{}", text(&r));
    assert_eq!(error_of(&json_of(&r)).0, "too_large");
    assert_eq!(head().await, 0, "nothing was published");

    // Reads refuse malformed ids.
    let r = env.get("/api/v1/tasks/not-a-uuid", &[]).await;
    assert_eq!(error_of(&json_of(&r)), ("invalid_query", Some("task_id")));
    env.shutdown().await;
}

#[tokio::test]
async fn a_batch_answers_positions_in_request_order() {
    let env = Env::start(true).await;
    let requests = vec![task("acme", 9), task("acme", 5), task("other", 1)];
    let (status, body) = env
        .post_json("/api/v1/tasks/batch", &json!({"tasks": requests}))
        .await;
    assert_eq!(status, 202, "{body}");
    let items = body["tasks"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let highest = items
        .iter()
        .map(|t| t["position"]["sequence"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(body["consistency_token"], format!("TASKS:{highest}"));
    let ids: HashSet<&str> = items
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    for (item, priority) in items.iter().zip([9, 5, 1]) {
        assert_eq!(
            item["consistency_token"],
            format!("TASKS:{}", item["position"]["sequence"])
        );
        let id = item["task_id"].as_str().unwrap();
        let view = env
            .get_ok(&format!(
                "/api/v1/tasks/{id}?consistent_with={}",
                body["consistency_token"].as_str().unwrap()
            ))
            .await;
        assert_eq!(view["priority"], priority, "request order kept");
    }
    env.shutdown().await;
}

#[tokio::test]
async fn task_pages_stay_stable_while_tasks_arrive() {
    let env = Env::start(true).await;
    // Two tasks whose allocation is projected without their submission: no `submitted_at`, listed first.
    env.publish(&[orphan_allocation(), orphan_allocation()])
        .await;
    let (originals, token) = env
        .submit((0..23).map(|i| task("pager", 1 + i % 10)).collect())
        .await;
    env.get_ok(&format!("/api/v1/tasks?consistent_with={token}&limit=1"))
        .await;
    let orphans = eventually("the orphan allocations are projected", || async {
        let page = env.get_ok("/api/v1/tasks?limit=500").await;
        let items = page["items"].as_array().unwrap().clone();
        (items.len() == 25).then_some(items)
    })
    .await;
    assert!(orphans[0]["submitted_at"].is_null() && orphans[1]["submitted_at"].is_null());
    assert!(orphans[2]["submitted_at"].is_string());

    // Page 4 at a time, submitting new tasks between pages.
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut added = Vec::new();
    loop {
        let url = match &cursor {
            None => "/api/v1/tasks?limit=4".to_owned(),
            Some(c) => format!("/api/v1/tasks?limit=4&cursor={c}"),
        };
        let page = env.get_ok(&url).await;
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        let Some(c) = page["next_cursor"].as_str() else {
            break;
        };
        cursor = Some(c.to_owned());
        let (ids, token) = env.submit(vec![task("pager", 5), task("late", 5)]).await;
        env.get_ok(&format!("/api/v1/tasks?consistent_with={token}&limit=1"))
            .await;
        added.extend(ids);
    }
    let seen_ids: Vec<&str> = seen
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "no duplicates: {seen_ids:?}");
    for id in &originals {
        assert!(unique.contains(id.as_str()), "original {id} skipped");
    }
    for id in &added {
        assert!(
            !unique.contains(id.as_str()),
            "{id} arrived after the first page, newer than its cursor"
        );
    }
    assert_eq!(seen_ids.len(), 25);
    // The order is total and newest first: NULLs, then (submitted_at, task_id) descending.
    let key = |t: &Value| {
        (
            t["submitted_at"].as_str().map(str::to_owned),
            t["task_id"].as_str().unwrap().to_owned(),
        )
    };
    for pair in seen.windows(2) {
        let (a, b) = (key(&pair[0]), key(&pair[1]));
        match (&a.0, &b.0) {
            (None, None) => assert!(a.1 > b.1),
            (None, Some(_)) => {}
            (Some(_), None) => panic!("a row without submitted_at after one with it"),
            (Some(x), Some(y)) => assert!((x, &a.1) > (y, &b.1), "{a:?} before {b:?}"),
        }
    }
    // Deterministic: two full walks agree, whatever the page size.
    let walk1: Vec<Value> = page_all(&env, "/api/v1/tasks", 3).await;
    let walk2: Vec<Value> = page_all(&env, "/api/v1/tasks", 7).await;
    assert_eq!(walk1, walk2);
    assert_eq!(walk1.len(), 25 + added.len());
    env.shutdown().await;
}

#[tokio::test]
async fn lists_filter_select_fields_and_refuse_bad_parameters() {
    let env = Env::start(true).await;
    env.publish(&events::sample::lifecycle(14, 3)).await;
    // Five more settlements, prepared one after the other, each paying w0.
    let mut settlements = Vec::new();
    for i in 0..5u32 {
        let id = SettlementId::new();
        settlements.push(id);
        env.publish(&[EventRecord::new(
            ProducerId::new("test-settler").unwrap(),
            SettlementPrepared {
                settlement_id: id,
                wallet_seqno: 10 + i,
                valid_until: Timestamp::now().saturating_add(Duration::from_secs(60)),
                payouts: vec![Payout {
                    worker_id: events::WorkerId::new("w0").unwrap(),
                    destination: "UQ-worker-0".into(),
                    amount: Nanoton(1_000 + u64::from(i)),
                    task_ids: vec![TaskId::new()],
                }],
                signed_message: vec![1],
                message_hash: format!("{i:064x}"),
            },
        )])
        .await;
    }
    let (_, token) = env
        .submit(vec![
            task("filters", 9),
            task("filters", 2),
            task("filters", 5),
        ])
        .await;
    let payments_token = format!(
        "PAYMENTS:{}",
        bus::last_sequence(&env.bus.jetstream, events::Stream::Payments)
            .await
            .unwrap()
    );
    let workers_token = format!(
        "WORKERS:{}",
        bus::last_sequence(&env.bus.jetstream, events::Stream::Workers)
            .await
            .unwrap()
    );

    // Tasks: filters combine with AND.
    let page = env
        .get_ok(&format!(
            "/api/v1/tasks?consistent_with={token}&client_id=filters&priority_min=4&fields=task_id,priority"
        ))
        .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        let keys: BTreeSet<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, BTreeSet::from(["priority", "task_id"]));
        assert!(item["priority"].as_i64().unwrap() >= 4);
    }
    let page = env
        .get_ok("/api/v1/tasks?client_id=filters&priority_max=4&status=submitted")
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["priority"], 2);
    let completed = eventually("lifecycle tasks complete", || async {
        let page = env
            .get_ok("/api/v1/tasks?status=completed&worker_id=w1&limit=500")
            .await;
        let items = page["items"].as_array().unwrap().clone();
        (!items.is_empty() && items.iter().all(|t| !t["result"].is_null())).then_some(items)
    })
    .await;
    for t in &completed {
        assert_eq!(t["status"], "completed");
        assert_eq!(t["worker_id"], "w1");
        assert!(t["usage"]["gpu_millis"].as_i64().unwrap() > 0);
        assert_eq!(t["result"]["worker_id"], "w1");
        assert_eq!(t["result"]["size"], 16);
    }
    // A single task's fields, too.
    let id = completed[0]["task_id"].as_str().unwrap();
    let one = env
        .get_ok(&format!("/api/v1/tasks/{id}?fields=status,result"))
        .await;
    assert_eq!(one.as_object().unwrap().len(), 2);

    // Workers: by id, with GPUs and admission.
    let page = env
        .get_ok(&format!(
            "/api/v1/workers?consistent_with={workers_token}&status=active"
        ))
        .await;
    let workers = page["items"].as_array().unwrap();
    let ids: Vec<&str> = workers
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["w0", "w1", "w2"]);
    assert_eq!(workers[1]["price_per_gpu_second"], 1_001);
    assert_eq!(workers[0]["gpus"][0]["memory_total_mib"], 81_920);
    assert_eq!(workers[0]["gpus"][0]["simulated"], true);
    assert!(["attested", "unattested"].contains(&workers[0]["admission"].as_str().unwrap()));
    let walked = page_all(&env, "/api/v1/workers", 1).await;
    assert_eq!(walked.len(), 3);
    assert_eq!(
        env.get_ok("/api/v1/workers?status=draining").await["items"],
        json!([])
    );

    // Settlements: newest first, by status, paged.
    let all = page_all(
        &env,
        &format!("/api/v1/settlements?consistent_with={payments_token}"),
        2,
    )
    .await;
    assert_eq!(all.len(), 6);
    let prepared: Vec<String> = all
        .iter()
        .filter(|s| s["status"] == "prepared")
        .map(|s| s["settlement_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = settlements.iter().rev().map(|s| s.to_string()).collect();
    assert_eq!(prepared, expected, "newest first");
    let confirmed = env.get_ok("/api/v1/settlements?status=confirmed").await;
    assert_eq!(confirmed["items"].as_array().unwrap().len(), 1);
    assert_eq!(confirmed["items"][0]["payouts"], 3);
    assert_eq!(confirmed["items"][0]["failed_transfers"], 0);
    assert!(confirmed["items"][0]["tx_hash"].is_string());

    // Payouts: by (settlement, worker), with filters.
    let payouts = page_all(&env, "/api/v1/payouts", 2).await;
    assert_eq!(payouts.len(), 3 + 5);
    let keys: Vec<(String, String)> = payouts
        .iter()
        .map(|p| {
            (
                p["settlement_id"].as_str().unwrap().to_owned(),
                p["worker_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    let paid = env.get_ok("/api/v1/payouts?status=paid").await;
    assert_eq!(paid["items"].as_array().unwrap().len(), 3);
    assert_eq!(paid["items"][0]["settlement_status"], "confirmed");
    let w0 = env
        .get_ok("/api/v1/payouts?worker_id=w0&status=pending")
        .await;
    assert_eq!(w0["items"].as_array().unwrap().len(), 5);
    let one = env
        .get_ok(&format!("/api/v1/payouts?settlement_id={}", settlements[2]))
        .await;
    assert_eq!(one["items"][0]["amount_nanoton"], 1_002);
    assert_eq!(one["items"][0]["destination_address"], "UQ-worker-0");

    // Bad parameters name themselves.
    for (path, code, field) in [
        ("/api/v1/tasks?limit=0", "invalid_query", "limit"),
        ("/api/v1/tasks?limit=501", "invalid_query", "limit"),
        ("/api/v1/tasks?status=done", "invalid_query", "status"),
        (
            "/api/v1/tasks?fields=task_id,bogus",
            "invalid_query",
            "fields",
        ),
        ("/api/v1/tasks?colour=red", "invalid_query", "colour"),
        (
            "/api/v1/tasks?priority_min=11",
            "invalid_query",
            "priority_min",
        ),
        ("/api/v1/workers?status=asleep", "invalid_query", "status"),
        (
            "/api/v1/payouts?settlement_id=nope",
            "invalid_query",
            "settlement_id",
        ),
        ("/api/v1/settlements?status=paid", "invalid_query", "status"),
    ] {
        let r = env.get(path, &[]).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(error_of(&json_of(&r)), (code, Some(field)), "{path}");
    }
    let r = env.get("/api/v1/tasks?cursor=garbage", &[]).await;
    assert_eq!(
        (r.status, error_of(&json_of(&r)).0),
        (400, "invalid_cursor")
    );
    let workers_cursor = env.get_ok("/api/v1/workers?limit=1").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = env
        .get(&format!("/api/v1/tasks?cursor={workers_cursor}"), &[])
        .await;
    assert_eq!(error_of(&json_of(&r)).0, "invalid_cursor");
    let r = env.get("/api/v1/tasks?fields=bogus", &[]).await;
    assert!(
        json_of(&r)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bogus")
    );
    env.shutdown().await;
}

#[tokio::test]
async fn stats_report_tasks_queue_workers_money_and_projection_lag() {
    let mut env = Env::start(false).await;
    // A first answer before anything happens: the throughput window starts here.
    let empty = env.get_ok("/api/v1/stats").await;
    assert_eq!(empty["tasks"]["total"], 0);
    env.publish(&events::sample::lifecycle(10, 2)).await;
    let (_, token) = env
        .submit(vec![
            task("queue", 8),
            task("queue", 9),
            task("queue", 5),
            task("queue", 2),
        ])
        .await;
    env.bus
        .jetstream
        .publish("tasks.3.operator", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Nothing projected yet: the lag shows.
    let stats = env.get_ok("/api/v1/stats").await;
    let rows = stats["projections"].as_array().unwrap();
    assert_eq!(rows.len(), 8 + 1 + 1 + 8 + 8 + 8);
    let tasks_lag: u64 = rows
        .iter()
        .filter(|r| r["stream"] == "TASKS")
        .map(|r| r["lag_frames"].as_u64().unwrap())
        .sum();
    assert!(tasks_lag > 0, "{stats}");
    let garbage = rows
        .iter()
        .find(|r| r["stream"] == "TASKS" && r["partition"] == 3)
        .unwrap();
    assert_eq!(garbage["checkpoint"], 0);
    assert!(garbage["head"].as_u64().unwrap() > 0);
    assert!(garbage["lag_frames"].as_u64().unwrap() >= 1);

    env.start_projector();
    let after = env
        .get_ok(&format!("/api/v1/stats?consistent_with={token}"))
        .await;
    assert!(after["tasks"]["by_status"]["submitted"].as_i64().unwrap() >= 4);
    let env = env;
    let stats = eventually("every projection catches up", || async {
        let s = env.get_ok("/api/v1/stats").await;
        let caught_up = s["projections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["lag_frames"] == 0 && r["checkpoint"] == r["head"]);
        let done = s["payments"]["settlements"]["confirmed"] == 1
            && s["workers"]["active"] == 2
            && s["tasks"]["by_status"]["completed"] == 9
            && s["throughput"]["completed_last_minute"].as_i64().unwrap() > 0;
        (caught_up && done).then_some(s)
    })
    .await;
    let by_status = &stats["tasks"]["by_status"];
    let total: i64 = by_status
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(stats["tasks"]["total"], total);
    assert_eq!(total, 10 + 4);
    // lifecycle(10, _): every seventh task is cancelled, the rest complete.
    assert_eq!(by_status["completed"], 9);
    assert_eq!(by_status["cancelled"], 1);
    assert_eq!(by_status["submitted"], 4);
    assert_eq!(
        stats["queue"],
        json!({"waiting": 4, "by_band": {"high": 2, "medium": 1, "low": 1}})
    );
    assert_eq!(stats["workers"]["gpus"], 2);
    assert_eq!(stats["dead_letters"], 1);
    let pay = &stats["payments"];
    assert!(pay["paid_nanoton"].as_i64().unwrap() > 0);
    assert_eq!(pay["accrued_nanoton"], pay["paid_nanoton"]);
    assert_eq!(pay["pending_nanoton"], 0);
    assert_eq!(pay["in_flight_nanoton"], 0);
    assert!(
        stats["throughput"]["completed_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(stats["generated_at"].as_str().unwrap().ends_with('Z'));
    env.shutdown().await;
}

#[tokio::test]
async fn results_stream_as_server_sent_events_and_resume_after_the_last_event_id() {
    let env = Env::start(false).await;
    // Three results in one frame, then two in another; someone else's result in between.
    env.publish(&[
        result_record("acme", "one"),
        result_record("acme", "two"),
        result_record("acme", "three"),
    ])
    .await;
    env.publish(&[result_record("other", "not yours")]).await;
    env.publish(&[result_record("acme", "four"), result_record("acme", "five")])
        .await;

    let mut sse = SseClient::connect(&env.addr, "/api/v1/clients/acme/results", &[]).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(sse.next_result().await);
    }
    let outputs: Vec<&str> = got
        .iter()
        .map(|(_, d)| d["output_text"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["one", "two", "three", "four", "five"]);
    let (first_seq, _) = got[0].0.split_once(':').unwrap();
    assert_eq!(got[0].0, format!("{first_seq}:0"));
    assert_eq!(got[2].0, format!("{first_seq}:2"));
    assert_eq!(
        got[0].1["stream_sequence"].as_u64().unwrap().to_string(),
        first_seq
    );
    assert_eq!(got[0].1["output_base64"], "b25l");
    assert_eq!(got[0].1["size"], 3);
    assert_eq!(got[0].1["truncated"], false);
    assert!(
        got[0].1["checksum"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // Quiet: a keep-alive comment comes.
    let block = sse.next().await;
    assert_eq!(block.comment.as_deref(), Some("keep-alive"), "{block:?}");
    // Live results arrive as they are stored.
    env.publish(&[result_record("acme", "six")]).await;
    let (_, live) = sse.next_result().await;
    assert_eq!(live["output_text"], "six");
    drop(sse);

    // Reconnect after the second event: exactly the ones after it, from inside the first frame.
    let mut sse = SseClient::connect(
        &env.addr,
        "/api/v1/clients/acme/results",
        &[("Last-Event-ID", got[1].0.as_str())],
    )
    .await;
    let mut resumed = Vec::new();
    for _ in 0..4 {
        resumed.push(
            sse.next_result().await.1["output_text"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(resumed, ["three", "four", "five", "six"]);
    drop(sse);
    // ?from_seq=N starts at that frame, inclusive.
    let (fourth_seq, _) = got[3].0.split_once(':').unwrap();
    let mut sse = SseClient::connect(
        &env.addr,
        &format!("/api/v1/clients/acme/results?from_seq={fourth_seq}"),
        &[],
    )
    .await;
    assert_eq!(sse.next_result().await.1["output_text"], "four");
    drop(sse);

    for (path, headers, field) in [
        ("/api/v1/clients/bad.client/results", vec![], "client_id"),
        (
            "/api/v1/clients/acme/results",
            vec![("Last-Event-ID", "yesterday")],
            "Last-Event-ID",
        ),
        (
            "/api/v1/clients/acme/results?from_seq=x",
            vec![],
            "from_seq",
        ),
    ] {
        let r = raw_get(&env.addr, path, &headers).await;
        assert_eq!(r.status, 400, "{path}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(error_of(&body), ("invalid_query", Some(field)));
    }
    env.shutdown().await;
}

#[tokio::test]
async fn etags_answer_304_and_cache_control_follows_the_resource() {
    let env = Env::start(true).await;
    let (ids, token) = env.submit(vec![task("etag", 5)]).await;
    let id = &ids[0];
    let path = format!("/api/v1/tasks/{id}?consistent_with={token}");
    let r = env.get(&path, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "cache-control").as_deref(), Some("no-cache"));
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    let etag = header(&r, "etag").expect("an ETag");
    assert_eq!(etag.len(), 18, "{etag}");
    let again = env.get(&path, &[("If-None-Match", etag.as_str())]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(header(&again, "etag").as_deref(), Some(etag.as_str()));
    let other = env
        .get(&path, &[("If-None-Match", "\"0000000000000000\"")])
        .await;
    assert_eq!(other.status, 200);

    for list in [
        "/api/v1/tasks",
        "/api/v1/stats",
        "/api/v1/workers",
        "/api/v1/settlements",
        "/api/v1/payouts",
    ] {
        let r = env.get(list, &[]).await;
        assert_eq!(r.status, 200, "{list}");
        assert_eq!(
            header(&r, "cache-control").as_deref(),
            Some("max-age=1"),
            "{list}"
        );
        assert!(header(&r, "etag").is_some(), "{list}");
    }
    // A changed list has another tag.
    let before = header(&env.get("/api/v1/tasks", &[]).await, "etag").unwrap();
    let r = env
        .get("/api/v1/tasks", &[("If-None-Match", before.as_str())])
        .await;
    assert_eq!(r.status, 304);
    let (_, token) = env.submit(vec![task("etag", 6)]).await;
    let r = env
        .get(
            &format!("/api/v1/tasks?consistent_with={token}"),
            &[("If-None-Match", before.as_str())],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_ne!(header(&r, "etag").unwrap(), before);
    env.shutdown().await;
}

#[tokio::test]
async fn large_answers_are_compressed_with_gzip_or_zstd() {
    let env = Env::start(true).await;
    let (_, token) = env.submit((0..30).map(|_| task("zip", 5)).collect()).await;
    let path = format!("/api/v1/tasks?consistent_with={token}&limit=30");
    let plain = raw_get(&env.addr, &path, &[]).await;
    assert_eq!(plain.status, 200);
    assert!(plain.body.len() > 1024);
    assert_eq!(plain.header("content-encoding"), None);
    let plain_json: Value = serde_json::from_slice(&plain.body).unwrap();
    assert_eq!(plain_json["items"].as_array().unwrap().len(), 30);

    let zstd = raw_get(&env.addr, &path, &[("Accept-Encoding", "zstd")]).await;
    assert_eq!(zstd.status, 200);
    assert_eq!(zstd.header("content-encoding"), Some("zstd"));
    let decoded = zstd::decode_all(zstd.body.as_slice()).unwrap();
    assert_eq!(decoded, plain.body);
    assert_eq!(
        zstd.header("etag"),
        plain.header("etag"),
        "the tag is of the uncompressed body"
    );

    let gzip = raw_get(&env.addr, &path, &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(&gzip.body[..2], &[0x1f, 0x8b], "gzip magic");
    assert_ne!(gzip.body, plain.body);
    assert!(gzip.body.len() < plain.body.len());

    // Small answers stay as they are.
    let small = raw_get(&env.addr, "/healthz", &[("Accept-Encoding", "gzip, zstd")]).await;
    assert_eq!(small.status, 200);
    assert_eq!(small.header("content-encoding"), None);
    env.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let mut env = Env::start(false).await;
    assert_eq!(env.get_ok("/healthz").await, json!({"status": "ok"}));
    assert_eq!(
        env.get_ok("/readyz").await,
        json!({"status": "ready", "nats": "ok", "postgres": "ok"})
    );
    let (_, token) = env.submit(vec![task("metrics", 5)]).await;
    let _ = token;
    let id = TaskId::new();
    let r = env.get(&format!("/api/v1/tasks/{id}"), &[]).await;
    assert_eq!(r.status, 404);
    let r = env.get("/no/such/route", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(error_of(&json_of(&r)).0, "not_found");

    let r = env.get("/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        header(&r, "content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let body = text(&r);
    for needle in [
        "cocoon_api_requests_total{route=\"/healthz\",status=\"200\"}",
        "cocoon_api_requests_total{route=\"/api/v1/tasks/{task_id}\",status=\"404\"}",
        "cocoon_api_requests_total{route=\"/api/v1/tasks/batch\",status=\"202\"}",
        "cocoon_api_requests_total{route=\"unmatched\",status=\"404\"}",
        "cocoon_api_request_seconds_bucket{route=\"/readyz\"",
    ] {
        assert!(body.contains(needle), "no {needle} in\n{body}");
    }
    assert!(!body.contains(&id.to_string()), "an id became a label");

    // NATS down: not ready, and says so.
    env.nats.stop().await;
    let r = env.get("/readyz", &[]).await;
    assert_eq!(r.status, 503, "{}", text(&r));
    let body = json_of(&r);
    assert_eq!(error_of(&body).0, "not_ready");
    assert_eq!(body["nats"], "down");
    assert_eq!(body["postgres"], "ok");
    assert!(body["error"]["message"].as_str().unwrap().contains("nats"));
    assert_eq!(env.get_ok("/healthz").await["status"], "ok");
    env.nats.restart().await;
    eventually("ready again after NATS is back", || async {
        (env.get("/readyz", &[]).await.status == 200).then_some(())
    })
    .await;
    env.shutdown().await;
}

#[tokio::test]
async fn readiness_names_postgres_when_it_is_down() {
    // A database URL nobody listens on: the API starts (the pool is lazy) and says Postgres is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let env = Env::start_with(false, |c| {
        c.database_url = format!("postgres://cocoon@127.0.0.1:{port}/nowhere");
    })
    .await;
    let r = env.get("/readyz", &[]).await;
    assert_eq!(r.status, 503);
    let body = json_of(&r);
    assert_eq!(error_of(&body).0, "not_ready");
    assert_eq!(
        (body["nats"].as_str(), body["postgres"].as_str()),
        (Some("ok"), Some("down"))
    );
    // Reads answer 503 unavailable; submits still work (they need only NATS).
    let r = env.get("/api/v1/tasks", &[]).await;
    assert_eq!((r.status, error_of(&json_of(&r)).0), (503, "unavailable"));
    let (status, _) = env.post_json("/api/v1/tasks", &task("pg-down", 5)).await;
    assert_eq!(status, 202);
    env.shutdown().await;
}

#[tokio::test]
async fn the_operator_page_its_files_and_the_openapi_document_are_served() {
    let env = Env::start(false).await;
    // What the binary compiled in (the files may be edited while the tests run).
    for (path, served, content_type) in [
        ("/", api::ops::INDEX_HTML, "text/html"),
        ("/static/app.js", api::ops::APP_JS, "text/javascript"),
        ("/static/app.css", api::ops::APP_CSS, "text/css"),
        (
            "/api/v1/openapi.json",
            api::ops::OPENAPI_JSON,
            "application/json",
        ),
    ] {
        let r = env.get(path, &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            header(&r, "content-type")
                .unwrap()
                .starts_with(content_type),
            "{path}: {:?}",
            header(&r, "content-type")
        );
        assert!(
            r.body == served.as_bytes(),
            "{path} is not the compiled-in file"
        );
        assert!(!served.is_empty(), "{path}");
    }
    let page = text(&env.get("/", &[]).await);
    for id in ["tasks-total", "workers-table", "updated-at"] {
        assert!(
            page.contains(&format!("id=\"{id}\"")),
            "no #{id} on the page"
        );
    }
    let doc = env.get_ok("/api/v1/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    env.shutdown().await;
}

#[tokio::test]
async fn hot_list_reads_are_served_from_memory_briefly_and_tokens_bypass_them() {
    let env = Env::start_with(true, |c| c.hot_ttl = Duration::from_secs(5)).await;
    let (_, first) = env.submit(vec![task("hot", 5)]).await;
    let seen = env
        .get_ok(&format!(
            "/api/v1/tasks?client_id=hot&consistent_with={first}"
        ))
        .await;
    assert_eq!(seen["items"].as_array().unwrap().len(), 1);
    let plain = env.get_ok("/api/v1/tasks?client_id=hot").await;
    assert_eq!(plain["items"].as_array().unwrap().len(), 1);
    let (_, second) = env.submit(vec![task("hot", 5)]).await;
    // A read that names a position always goes to the database.
    let fresh = env
        .get_ok(&format!(
            "/api/v1/tasks?client_id=hot&consistent_with={second}"
        ))
        .await;
    assert_eq!(fresh["items"].as_array().unwrap().len(), 2);
    // The same URL without a token, within the hot TTL: the answer kept in memory.
    let again = env.get_ok("/api/v1/tasks?client_id=hot").await;
    assert_eq!(again, plain, "served from the hot cache");
    let metrics = text(&env.get("/metrics", &[]).await);
    assert!(
        metrics.contains("cocoon_api_hot_cache_hits_total"),
        "hits are counted"
    );
    // Once the TTL has passed, the list shows both.
    eventually("the hot entry expires", || async {
        let page = env.get_ok("/api/v1/tasks?client_id=hot").await;
        (page["items"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let env = Env::start(false).await;
    let r = env.get("/api/v1/nothing-here", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(error_of(&json_of(&r)).0, "not_found");
    let r = env.post("/api/v1/stats", b"{}").await;
    assert_eq!(r.status, 405, "{}", text(&r));
    assert_eq!(error_of(&json_of(&r)).0, "method_not_allowed");
}

#[tokio::test]
async fn result_streams_are_limited_and_a_closed_one_frees_its_place() {
    let env = Env::start_with(false, |c| c.max_streams = 1).await;
    let first = SseClient::connect(&env.addr, "/api/v1/clients/acme/results", &[]).await;
    assert_eq!(first.status, 200);
    let r = env.get("/api/v1/clients/other/results", &[]).await;
    assert_eq!(r.status, 503, "{}", text(&r));
    assert_eq!(error_of(&json_of(&r)).0, "unavailable");
    drop(first);
    let second = eventually("the closed stream's place is free", || async {
        let c = SseClient::connect(&env.addr, "/api/v1/clients/other/results", &[]).await;
        (c.status == 200).then_some(c)
    })
    .await;
    assert_eq!(second.status, 200);
}

#[tokio::test]
async fn a_crafted_cursor_is_a_400_not_a_query_error() {
    let env = Env::start(false).await;
    // {"list":"settlements","at":-9000000000000000000,"id":"00000000-0000-0000-0000-000000000000"}
    let cursor = "eyJsaXN0Ijoic2V0dGxlbWVudHMiLCJhdCI6LTkwMDAwMDAwMDAwMDAwMDAwMDAsImlkIjoiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIn0";
    let r = env
        .get(&format!("/api/v1/settlements?cursor={cursor}"), &[])
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    assert_eq!(error_of(&json_of(&r)).0, "invalid_cursor");
}

#[tokio::test]
async fn many_waiting_reads_share_their_checkpoint_reads() {
    // No projector: every token read waits its whole wait_ms and answers 504.
    let env = Env::start(false).await;
    let (ids, token) = env.submit(vec![task("waiters", 5)]).await;
    let reads_before = checkpoint_reads(&env).await;
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (
                env.http.clone(),
                env.url(&format!(
                    "/api/v1/tasks/{}?consistent_with={token}&wait_ms=600",
                    ids[0]
                )),
            );
            tokio::spawn(async move { http.get(&url, &[]).await.unwrap().status })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap(), 504);
    }
    let reads = checkpoint_reads(&env).await - reads_before;
    // Alone, 50 waiters polling every 20 ms for 600 ms would read about 1,500 times.
    assert!(
        (1..=500).contains(&reads),
        "{reads} checkpoint reads for 50 waiters"
    );
}

async fn checkpoint_reads(env: &Env) -> u64 {
    text(&env.get("/metrics", &[]).await)
        .lines()
        .find(|l| l.starts_with("cocoon_api_checkpoint_reads_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
