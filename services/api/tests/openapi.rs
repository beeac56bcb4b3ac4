//! The OpenAPI document (`services/api/openapi.json`) tested against the implementation: the API served
//! in-process over a real nats-server, a fresh Postgres database and the projector, seeded with a slice of the
//! pool's life (`events::sample::lifecycle`: workers, tasks, results, payouts, a confirmed settlement) and with
//! tasks submitted through the API itself.
//!
//! What it checks:
//! - the document itself: OpenAPI 3.1, every `$ref` resolves, every path parameter is declared, and its paths
//!   are exactly the routes `CONTRACT.md` names (no route missing, none invented);
//! - every call the test makes is matched to its documented operation: the status must be one the operation
//!   documents, a JSON body must validate against the documented schema (a small validator below: `type`,
//!   `required`, `properties`, `additionalProperties`, `items`, `enum`, `anyOf`, `$ref`, bounds, lengths, the
//!   formats `date-time` and `uuid`, and the document's patterns), the content type must be the documented one,
//!   and documented headers (`ETag`, `Cache-Control`) must be present with documented values (the ETag also
//!   equals the first 16 hex digits of the body's SHA-256); SSE `result` events validate against the schema
//!   under the media type's `x-event-data`;
//! - every documented operation answered at least once with something other than 404/405, and every
//!   documented non-error status (200, 202, 304) was produced by at least one call;
//! - the document is served at `/api/v1/openapi.json` and equals the file;
//! - what the server answers but the document lacks: undocumented paths (plausible neighbours of the real
//!   ones) answer 404, and undocumented methods on documented paths answer 404 or 405.
//!
//! Requests go through `httpc` (identity encoding, one connection per request); methods httpc does not speak
//! and the never-ending SSE stream use a raw socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bus::{Bus, Publisher, PublisherConfig, provision_streams};
use httpc::{ClientConfig, HttpClient, HttpResponse};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::{NatsServer, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DOCUMENT: &str = include_str!("../openapi.json");
const CONTRACT: &str = include_str!("../CONTRACT.md");
/// The sample lifecycle's client (`events::sample`).
const SAMPLE_CLIENT: &str = "client-42";
const SAMPLE_TASKS: usize = 30;
const SAMPLE_WORKERS: usize = 4;
const WITHIN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------------------
// A small JSON Schema validator over the document's own schemas.

struct Doc {
    root: Value,
}

/// The resources whose answers `fields` trims: with it, their `required` does not apply.
const TRIMMABLE: [&str; 4] = [
    "#/components/schemas/Task",
    "#/components/schemas/Worker",
    "#/components/schemas/Payout",
    "#/components/schemas/Settlement",
];

impl Doc {
    fn load() -> Doc {
        Doc {
            root: serde_json::from_str(DOCUMENT).expect("openapi.json is JSON"),
        }
    }

    /// Follows `$ref`s (local ones, `#/a/b`) until a value without one.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(target) = v.get("$ref").and_then(Value::as_str) else {
                return v;
            };
            v = self.pointer(target);
        }
        panic!("$ref chain too long at {v}");
    }

    fn pointer(&self, reference: &str) -> &Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
        self.root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("$ref {reference} does not resolve"))
    }

    fn schema(&self, name: &str) -> &Value {
        self.pointer(&format!("#/components/schemas/{name}"))
    }

    /// The operation object of a method on a documented path template.
    fn operation(&self, template: &str, method: &str) -> Option<&Value> {
        self.root["paths"]
            .get(template)?
            .get(method.to_ascii_lowercase())
    }

    /// Every (path template, method) the document lists.
    fn operations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, item) in self.root["paths"].as_object().expect("paths") {
            for method in [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ] {
                if item.get(method).is_some() {
                    out.push((path.clone(), method.to_ascii_uppercase()));
                }
            }
        }
        out
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        self.validate_with(schema, value, at, errors, false);
    }

    /// `trimmed`: the answer was asked for with `fields`, so resources may lack required properties.
    fn validate_with(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        errors: &mut Vec<String>,
        trimmed: bool,
    ) {
        let skip_required = trimmed
            && schema
                .get("$ref")
                .and_then(Value::as_str)
                .is_some_and(|r| TRIMMABLE.contains(&r));
        let schema = self.resolve(schema);
        if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
            let fits = branches.iter().any(|b| {
                let mut e = Vec::new();
                self.validate_with(b, value, at, &mut e, trimmed);
                e.is_empty()
            });
            if !fits {
                errors.push(format!("{at}: {value} matches none of anyOf"));
            }
        }
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                other => panic!("bad type {other}"),
            };
            if !types.iter().any(|t| type_matches(t, value)) {
                errors.push(format!("{at}: {} is not of type {types:?}", short(value)));
                return;
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        match value {
            Value::Object(map) => {
                if let Some(required) = schema.get("required").and_then(Value::as_array)
                    && !skip_required
                {
                    for name in required.iter().filter_map(Value::as_str) {
                        if !map.contains_key(name) {
                            errors.push(format!("{at}: required property {name:?} is missing"));
                        }
                    }
                }
                let properties = schema.get("properties").and_then(Value::as_object);
                for (name, v) in map {
                    match properties.and_then(|p| p.get(name)) {
                        Some(s) => {
                            self.validate_with(s, v, &format!("{at}.{name}"), errors, trimmed)
                        }
                        None => match schema.get("additionalProperties") {
                            Some(Value::Bool(false)) => errors.push(format!(
                                "{at}: property {name:?} is not documented (additionalProperties: false)"
                            )),
                            Some(s @ Value::Object(_)) => self.validate_with(
                                s,
                                v,
                                &format!("{at}.{name}"),
                                errors,
                                trimmed,
                            ),
                            _ => {}
                        },
                    }
                }
            }
            Value::Array(items) => {
                if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                    && (items.len() as u64) < min
                {
                    errors.push(format!("{at}: fewer than {min} items"));
                }
                if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                    && (items.len() as u64) > max
                {
                    errors.push(format!("{at}: more than {max} items"));
                }
                if let Some(item) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.validate_with(item, v, &format!("{at}[{i}]"), errors, trimmed);
                    }
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().expect("finite");
                if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                    && x < min
                {
                    errors.push(format!("{at}: {n} is below the minimum {min}"));
                }
                if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                    && x > max
                {
                    errors.push(format!("{at}: {n} is above the maximum {max}"));
                }
            }
            Value::String(s) => {
                let len = s.chars().count() as u64;
                if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                    && len < min
                {
                    errors.push(format!("{at}: {s:?} is shorter than {min}"));
                }
                if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                    && len > max
                {
                    errors.push(format!("{at}: {s:?} is longer than {max}"));
                }
                if let Some(format) = schema.get("format").and_then(Value::as_str) {
                    let ok = match format {
                        "date-time" => is_rfc3339_micros_utc(s),
                        "uuid" => is_uuid(s),
                        other => panic!("format {other} is not known to the validator"),
                    };
                    if !ok {
                        errors.push(format!("{at}: {s:?} is not a {format}"));
                    }
                }
                if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                    && !matches_pattern(pattern, s)
                {
                    errors.push(format!("{at}: {s:?} does not match {pattern}"));
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }

    fn check(&self, schema: &Value, value: &Value, what: &str) {
        self.check_with(schema, value, what, false);
    }

    fn check_with(&self, schema: &Value, value: &Value, what: &str, trimmed: bool) {
        let mut errors = Vec::new();
        self.validate_with(schema, value, "$", &mut errors, trimmed);
        assert!(
            errors.is_empty(),
            "{what}: the body does not validate against the document:\n  {}\nbody: {}",
            errors.join("\n  "),
            short(value)
        );
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => panic!("type {other} is not known to the validator"),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(600) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// The contract's times: RFC 3339, UTC, microseconds (`2026-11-23T04:00:00.000000Z`).
fn is_rfc3339_micros_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 27
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26)
        && b[26] == b'Z'
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
}

/// The patterns the document uses, each checked by hand (no regex crate). An unknown pattern fails the test,
/// so a pattern added to the document is also added here.
fn matches_pattern(pattern: &str, s: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    let seq_pair = |s: &str, upper_name: bool| {
        s.split_once(':').is_some_and(|(a, b)| {
            let name_ok = if upper_name {
                !a.is_empty() && a.bytes().all(|c| c.is_ascii_uppercase() || c == b'_')
            } else {
                !a.is_empty() && a.bytes().all(|c| c.is_ascii_digit())
            };
            name_ok && !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit())
        })
    };
    match pattern {
        "^[A-Z_]+:[0-9]+$" => seq_pair(s, true),
        "^[0-9]+:[0-9]+$" => seq_pair(s, false),
        "^[A-Za-z0-9_-]+$" => token(s),
        "^\"[0-9a-f]{16}\"$" => {
            s.len() == 18
                && s.starts_with('"')
                && s.ends_with('"')
                && s[1..17]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        "^([0-9a-fA-F]{2})*$" => {
            s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit())
        }
        "^[a-z_]+(,[a-z_]+)*$" => s
            .split(',')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')),
        other => panic!("pattern {other} is not known to the validator"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Checks of the document on its own.

/// Every `$ref` anywhere in the document resolves.
fn check_refs(doc: &Doc, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                doc.pointer(r);
            }
            map.values().for_each(|x| check_refs(doc, x));
        }
        Value::Array(a) => a.iter().for_each(|x| check_refs(doc, x)),
        _ => {}
    }
}

/// `{task_id}` → `{}`, so templates compare whatever their parameters are called.
fn normalize(template: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in template.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push('{');
            }
            '}' => {
                in_param = false;
                out.push('}');
            }
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

/// The routes CONTRACT.md names: every backticked span that is a path (`/api/v1/...`, `/healthz`, `/`),
/// optionally after a method, query strings dropped.
fn contract_routes() -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for (i, span) in CONTRACT.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let span = span
            .strip_prefix("GET ")
            .or_else(|| span.strip_prefix("POST "))
            .unwrap_or(span);
        let path = span.split('?').next().unwrap_or_default();
        if path.starts_with('/') && !path.contains(' ') && !path.contains("...") {
            routes.insert(normalize(path));
        }
    }
    routes
}

fn check_document(doc: &Doc) {
    assert_eq!(doc.root["openapi"], "3.1.0");
    check_refs(doc, &doc.root);
    let documented: BTreeSet<String> = doc.root["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(|p| normalize(p))
        .collect();
    let contract = contract_routes();
    let missing: Vec<_> = contract.difference(&documented).collect();
    let invented: Vec<_> = documented.difference(&contract).collect();
    assert!(
        missing.is_empty() && invented.is_empty(),
        "the document's paths differ from CONTRACT.md's routes: missing from the document {missing:?}, \
         not in the contract {invented:?}"
    );
    for (path, method) in doc.operations() {
        let op = doc.operation(&path, &method).expect("listed");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no response"
        );
        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| doc.resolve(p))
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect();
        let in_template: BTreeSet<String> = path
            .split('{')
            .skip(1)
            .map(|s| s.split('}').next().expect("closed").to_owned())
            .collect();
        assert_eq!(
            declared, in_template,
            "{method} {path}: path parameters declared vs in the template"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// The stack: nats-server, Postgres, the projector and the API in this process.

struct Stack {
    server: NatsServer,
    _db: TestDb,
    publisher: Publisher,
    stop: CancellationToken,
    /// The projector's own, to stop it alone.
    projector_stop: CancellationToken,
    services: Vec<JoinHandle<()>>,
    addr: SocketAddr,
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
        projection.fetch_wait = Duration::from_millis(50);
        let projector_stop = stop.child_token();
        let s = projector_stop.clone();
        services.push(tokio::spawn(async move {
            projector::run(projection, s, false).await.unwrap();
        }));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = api::ApiConfig::new(server.url(), db.url());
        config.listen = addr;
        let s = stop.clone();
        services.push(tokio::spawn(async move {
            api::serve(config, listener, s).await.unwrap();
        }));
        Stack {
            server,
            _db: db,
            publisher,
            stop,
            projector_stop,
            services,
            addr,
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for s in self.services {
            let _ = tokio::time::timeout(Duration::from_secs(20), s).await;
        }
        drop(self.server);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Calls, each matched to its documented operation.

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn error_field(&self) -> Option<String> {
        self.json()["error"]["field"].as_str().map(str::to_owned)
    }
}

impl From<HttpResponse> for Answer {
    fn from(r: HttpResponse) -> Self {
        Answer {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

struct Checker {
    doc: Doc,
    http: HttpClient,
    base: String,
    addr: SocketAddr,
    /// (template, method) → statuses answered.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
    calls: usize,
}

impl Checker {
    fn new(addr: SocketAddr) -> Checker {
        let mut config = ClientConfig::new();
        config.timeout = Duration::from_secs(30);
        config.max_response = 16 << 20;
        Checker {
            doc: Doc::load(),
            http: HttpClient::new(&config, false).unwrap(),
            base: format!("http://{addr}"),
            addr,
            seen: BTreeMap::new(),
            calls: 0,
        }
    }

    async fn get(&mut self, template: &str, target: &str, headers: &[(&str, &str)]) -> Answer {
        let answer: Answer = self
            .http
            .get(&format!("{}{target}", self.base), headers)
            .await
            .unwrap_or_else(|e| panic!("GET {target}: {e}"))
            .into();
        self.record(template, "GET", target, &answer);
        answer
    }

    async fn post(&mut self, template: &str, target: &str, body: &[u8]) -> Answer {
        let answer: Answer = self
            .http
            .post(
                &format!("{}{target}", self.base),
                &[],
                "application/json",
                body,
            )
            .await
            .unwrap_or_else(|e| panic!("POST {target}: {e}"))
            .into();
        self.record(template, "POST", target, &answer);
        answer
    }

    async fn post_json(&mut self, template: &str, target: &str, body: &Value) -> Answer {
        self.post(template, target, body.to_string().as_bytes())
            .await
    }

    /// Checks an answer against the operation's documented response for its status.
    fn record(&mut self, template: &str, method: &str, target: &str, answer: &Answer) {
        self.calls += 1;
        let what = format!("{method} {target} → {}", answer.status);
        let op = self
            .doc
            .operation(template, method)
            .unwrap_or_else(|| panic!("{what}: {method} {template} is not in the document"));
        let status = answer.status.to_string();
        let response = op["responses"].get(&status).unwrap_or_else(|| {
            panic!(
                "{what}: status {status} is not documented for {method} {template} (body: {})",
                String::from_utf8_lossy(&answer.body)
            )
        });
        let response = self.doc.resolve(response);
        self.seen
            .entry((template.to_owned(), method.to_owned()))
            .or_default()
            .insert(answer.status);

        if answer.status == 304 {
            assert!(answer.body.is_empty(), "{what}: a 304 has no body");
        }
        // Documented headers: present, with a documented value.
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let header = self.doc.resolve(header);
                let value = answer
                    .header(name)
                    .unwrap_or_else(|| panic!("{what}: documented header {name} is missing"));
                let mut errors = Vec::new();
                self.doc.validate(
                    &header["schema"],
                    &Value::String(value.clone()),
                    name,
                    &mut errors,
                );
                assert!(errors.is_empty(), "{what}: header {name}: {errors:?}");
                if name == "ETag" && answer.status == 200 {
                    let digest = Sha256::digest(&answer.body);
                    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(
                        value,
                        format!("\"{}\"", &hex[..16]),
                        "{what}: ETag is not the SHA-256 of the body"
                    );
                }
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            return;
        };
        let content_type = answer.header("content-type").unwrap_or_default();
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let documented = content.get(&media).unwrap_or_else(|| {
            panic!(
                "{what}: content type {content_type:?} is not documented ({:?})",
                content.keys().collect::<Vec<_>>()
            )
        });
        if media == "application/json" {
            let schema = &documented["schema"];
            let body = answer.json();
            let trimmed = target.contains("fields=");
            self.doc.check_with(schema, &body, &what, trimmed);
        }
    }

    /// A request through a raw socket, for methods httpc does not send: the status and the whole answer.
    async fn raw_status(&self, method: &str, target: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAccept-Encoding: identity\r\nContent-Type: \
             application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            self.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {target}: no status line in {text:?}"));
        (status, text)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Server-Sent Events over a raw socket.

#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Opens the results stream and reads `want` events (or until `within`); the status, head and events.
async fn read_sse(
    addr: SocketAddr,
    target: &str,
    last_event_id: Option<&str>,
    want: usize,
    within: Duration,
) -> (u16, String, Vec<SseEvent>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nAccept-Encoding: identity\r\n"
    );
    if let Some(id) = last_event_id {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + within;
    let mut raw = Vec::new();
    let mut head: Option<(u16, String, usize, bool)> = None;
    loop {
        if let Some((status, head_text, body_at, chunked)) = &head {
            if *status != 200 {
                // An error answer has a length; read it whole.
                if let Some(len) = content_length(head_text)
                    && raw.len() >= body_at + len
                {
                    return (*status, head_text.clone(), Vec::new());
                }
            } else {
                let body = if *chunked {
                    dechunk(&raw[*body_at..])
                } else {
                    raw[*body_at..].to_vec()
                };
                let events = parse_sse(&String::from_utf8_lossy(&body));
                if events.len() >= want {
                    return (*status, head_text.clone(), events);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 16 * 1024];
        let n = match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("GET {target}: {e}"),
            Err(_) => 0,
        };
        if n == 0 {
            let (status, head_text, body_at, chunked) =
                head.unwrap_or_else(|| panic!("GET {target}: no answer head"));
            let body = if chunked {
                dechunk(&raw[body_at..])
            } else {
                raw[body_at..].to_vec()
            };
            return (
                status,
                head_text,
                parse_sse(&String::from_utf8_lossy(&body)),
            );
        }
        raw.extend_from_slice(&buf[..n]);
        if head.is_none()
            && let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let text = String::from_utf8_lossy(&raw[..end]).into_owned();
            let status = text
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status");
            let chunked = text.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("transfer-encoding:") && l.contains("chunked")
            });
            head = Some((status, text, end + 4, chunked));
        }
    }
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

fn head_header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The complete chunks of a chunked body so far.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        let start = line_end + 2;
        if size == 0 || raw.len() < start + size + 2 {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}

/// Complete events (ended by a blank line); comments are skipped.
fn parse_sse(text: &str) -> Vec<SseEvent> {
    let text = text.replace("\r\n", "\n");
    let mut events = Vec::new();
    let blocks: Vec<&str> = text.split("\n\n").collect();
    // The last block is not ended by a blank line yet.
    for block in &blocks[..blocks.len().saturating_sub(1)] {
        let mut event = SseEvent {
            id: None,
            event: None,
            data: String::new(),
        };
        let mut any = false;
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            any = true;
            match field {
                "id" => event.id = Some(value.to_owned()),
                "event" => event.event = Some(value.to_owned()),
                "data" => {
                    if !event.data.is_empty() {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                }
                _ => {}
            }
        }
        if any {
            events.push(event);
        }
    }
    events
}

// ---------------------------------------------------------------------------------------------------------

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn task_request(client: &str, priority: u8) -> Value {
    json!({
        "client_id": client,
        "max_price_per_gpu_second": 2_000,
        "priority": priority,
        "timeout_ms": 60_000,
        "requirements": {"gpu_count": 1, "gpu_memory_mib": 16_384, "model_tag": "llama-3-8b"},
        "input": "text",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_the_implementation() {
    let doc = Doc::load();
    check_document(&doc);

    let stack = Stack::start().await;
    for record in events::sample::lifecycle(SAMPLE_TASKS, SAMPLE_WORKERS) {
        drop(stack.publisher.publish(&record).await.unwrap());
    }
    stack.publisher.flush().await.unwrap();
    let mut c = Checker::new(stack.addr);

    // Operations: liveness, readiness (503 is documented while it starts), metrics, the page.
    let health = c.get("/healthz", "/healthz", &[]).await;
    assert_eq!(health.status, 200);
    wait_for("readiness", async || {
        (c.get("/readyz", "/readyz", &[]).await.status == 200).then_some(())
    })
    .await;
    for (path, kind) in [
        ("/healthz", "application/json"),
        ("/readyz", "application/json"),
        ("/metrics", "text/plain"),
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/app.css", "text/css"),
    ] {
        let a = c.get(path, path, &[]).await;
        assert_eq!(a.status, 200, "GET {path}");
        assert!(!a.body.is_empty(), "GET {path}: empty");
        assert!(
            a.header("content-type")
                .unwrap_or_default()
                .starts_with(kind),
            "GET {path}: {:?}",
            a.header("content-type")
        );
        // Revalidation: 304 where the document says an unchanged body gives one.
        if c.doc.operation(path, "GET").unwrap()["responses"]
            .get("304")
            .is_some()
        {
            let etag = a.header("etag").expect("ETag");
            let again = c.get(path, path, &[("If-None-Match", &etag)]).await;
            assert_eq!(again.status, 304, "GET {path} with its ETag");
        }
    }

    // (c) The document is served and equals the file.
    let served = c
        .get("/api/v1/openapi.json", "/api/v1/openapi.json", &[])
        .await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.json(),
        doc.root,
        "the served document differs from services/api/openapi.json"
    );
    let etag = served.header("etag").expect("ETag");
    let again = c
        .get(
            "/api/v1/openapi.json",
            "/api/v1/openapi.json",
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(again.status, 304);

    // The seed is projected: every sample task, worker and the settlement.
    wait_for("the sample lifecycle projected", async || {
        let stats = c.get("/api/v1/stats", "/api/v1/stats", &[]).await.json();
        (stats["tasks"]["total"] == json!(SAMPLE_TASKS)
            && stats["payments"]["settlements"]["confirmed"] == json!(1)
            && stats["workers"]["active"] == json!(SAMPLE_WORKERS))
        .then_some(())
    })
    .await;

    // Submissions.
    let one = c
        .post_json("/api/v1/tasks", "/api/v1/tasks", &task_request("acme", 7))
        .await;
    assert_eq!(one.status, 202, "{}", String::from_utf8_lossy(&one.body));
    let one = one.json();
    assert_eq!(one["position"]["stream"], "TASKS");
    let token = one["consistency_token"].as_str().unwrap().to_owned();
    assert_eq!(token, format!("TASKS:{}", one["position"]["sequence"]));
    let task_id = one["task_id"].as_str().unwrap().to_owned();
    let with_hex = json!({"client_id": "acme", "max_price_per_gpu_second": 1, "input_hex": "00ff"});
    assert_eq!(
        c.post_json("/api/v1/tasks", "/api/v1/tasks", &with_hex)
            .await
            .status,
        202
    );
    let minimal = json!({"client_id": "acme", "max_price_per_gpu_second": 1});
    assert_eq!(
        c.post_json("/api/v1/tasks", "/api/v1/tasks", &minimal)
            .await
            .status,
        202
    );

    let not_json = c.post("/api/v1/tasks", "/api/v1/tasks", b"{not json").await;
    assert_eq!(
        (not_json.status, not_json.error_code().as_str()),
        (400, "invalid_json")
    );
    let no_price = c
        .post_json(
            "/api/v1/tasks",
            "/api/v1/tasks",
            &json!({"client_id": "acme"}),
        )
        .await;
    assert_eq!(
        no_price.status, 400,
        "a missing required field is not the expected shape"
    );
    for (field, value, path) in [
        ("priority", json!(11), "priority"),
        ("client_id", json!("has space"), "client_id"),
        ("timeout_ms", json!(0), "timeout_ms"),
    ] {
        let mut body = task_request("acme", 5);
        body[field] = value;
        let a = c.post_json("/api/v1/tasks", "/api/v1/tasks", &body).await;
        assert_eq!((a.status, a.error_code().as_str()), (422, "invalid_field"));
        assert_eq!(a.error_field().as_deref(), Some(path));
    }
    let mut body = task_request("acme", 5);
    body["requirements"]["gpu_count"] = json!(0);
    let a = c.post_json("/api/v1/tasks", "/api/v1/tasks", &body).await;
    assert_eq!(
        (a.status, a.error_field().as_deref()),
        (422, Some("requirements.gpu_count"))
    );

    let batch: Vec<Value> = (1..=3).map(|p| task_request("acme", p)).collect();
    let b = c
        .post_json(
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            &json!({"tasks": batch}),
        )
        .await;
    assert_eq!(b.status, 202, "{}", String::from_utf8_lossy(&b.body));
    let b = b.json();
    let items = b["tasks"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let highest = items
        .iter()
        .map(|t| t["position"]["sequence"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(b["consistency_token"], format!("TASKS:{highest}"));
    let batch_token = b["consistency_token"].as_str().unwrap().to_owned();

    let mut bad: Vec<Value> = (1..=5).map(|p| task_request("acme", p)).collect();
    bad[3]["priority"] = json!(0);
    let a = c
        .post_json(
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            &json!({"tasks": bad}),
        )
        .await;
    assert_eq!(
        (
            a.status,
            a.error_code().as_str(),
            a.error_field().as_deref()
        ),
        (422, "invalid_field", Some("tasks[3].priority"))
    );
    let too_many: Vec<Value> = (0..1_001).map(|_| task_request("acme", 5)).collect();
    let a = c
        .post_json(
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            &json!({"tasks": too_many}),
        )
        .await;
    assert_eq!((a.status, a.error_code().as_str()), (413, "too_large"));
    let mut huge = task_request("acme", 5);
    huge["input"] = json!("x".repeat(4 * 1024 * 1024));
    let a = c.post_json("/api/v1/tasks", "/api/v1/tasks", &huge).await;
    assert_eq!((a.status, a.error_code().as_str()), (413, "too_large"));
    let a = c
        .post("/api/v1/tasks/batch", "/api/v1/tasks/batch", b"[1, 2]")
        .await;
    assert_eq!((a.status, a.error_code().as_str()), (400, "invalid_json"));
    let a = c
        .post_json(
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            &json!({"tasks": []}),
        )
        .await;
    assert!(
        matches!(a.status, 400 | 422),
        "an empty batch: {}",
        a.status
    );

    // One task: consistency through the query and the header, fields, ETag, errors.
    let path = "/api/v1/tasks/{task_id}";
    let t = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}?consistent_with={token}&wait_ms=10000"),
            &[],
        )
        .await;
    assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
    assert_eq!(t.json()["task_id"], task_id.as_str());
    assert_eq!(t.json()["priority"], 7);
    let etag = t.header("etag").unwrap();
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}"),
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(a.status, 304);
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}"),
            &[("Cocoon-Consistent-With", &token)],
        )
        .await;
    assert_eq!(a.status, 200);
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}?fields=task_id,status"),
            &[],
        )
        .await;
    assert_eq!(a.status, 200);
    let keys: BTreeSet<String> = a.json().as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        BTreeSet::from(["task_id".to_owned(), "status".to_owned()])
    );
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}?fields=task_id,nope"),
            &[],
        )
        .await;
    assert_eq!(
        (a.status, a.error_field().as_deref()),
        (400, Some("fields"))
    );
    let unknown = uuid::Uuid::now_v7();
    let a = c.get(path, &format!("/api/v1/tasks/{unknown}"), &[]).await;
    assert_eq!((a.status, a.error_code().as_str()), (404, "not_found"));
    let a = c.get(path, "/api/v1/tasks/not-a-uuid", &[]).await;
    assert!(
        matches!(a.status, 400 | 404),
        "a malformed task id: {}",
        a.status
    );
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{task_id}?consistent_with=garbage"),
            &[],
        )
        .await;
    assert_eq!(
        (
            a.status,
            a.error_code().as_str(),
            a.error_field().as_deref()
        ),
        (400, "invalid_query", Some("consistent_with"))
    );

    // Lists: every documented filter, pagination, fields, ETags, errors.
    let lists = "/api/v1/tasks";
    let first = c
        .get(
            lists,
            &format!("/api/v1/tasks?limit=7&consistent_with={batch_token}"),
            &[],
        )
        .await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let page = first.json();
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    let cursor = page["next_cursor"].as_str().expect("more pages").to_owned();
    let second = c
        .get(
            lists,
            &format!("/api/v1/tasks?limit=7&cursor={cursor}"),
            &[],
        )
        .await;
    assert_eq!(second.status, 200);
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a_ids, b_ids) = (ids(&page), ids(&second.json()));
    assert!(a_ids.iter().all(|id| !b_ids.contains(id)), "pages overlap");
    let etag = first.header("etag").unwrap();
    let a = c
        .get(
            lists,
            &format!("/api/v1/tasks?limit=7&consistent_with={batch_token}"),
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(a.status, 304);
    for query in [
        "status=completed",
        "status=submitted&client_id=acme",
        &format!("client_id={SAMPLE_CLIENT}&worker_id=w0"),
        "priority_min=2&priority_max=7",
        "limit=500",
    ] {
        let a = c.get(lists, &format!("/api/v1/tasks?{query}"), &[]).await;
        assert_eq!(a.status, 200, "tasks?{query}");
        assert!(
            !a.json()["items"].as_array().unwrap().is_empty(),
            "tasks?{query}: empty"
        );
    }
    let a = c.get(lists, "/api/v1/tasks?status=completed", &[]).await;
    assert!(
        a.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "completed")
    );
    let a = c
        .get(lists, "/api/v1/tasks?fields=task_id,status&limit=3", &[])
        .await;
    check_fields(&doc, &a.json(), "Task", &["task_id", "status"]);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("status=bogus", "status"),
        ("priority_min=11", "priority_min"),
        ("fields=nope", "fields"),
        ("wait_ms=10001", "wait_ms"),
        ("consistent_with=TASKS", "consistent_with"),
    ] {
        let a = c.get(lists, &format!("/api/v1/tasks?{query}"), &[]).await;
        assert_eq!(
            (
                a.status,
                a.error_code().as_str(),
                a.error_field().as_deref()
            ),
            (400, "invalid_query", Some(field)),
            "tasks?{query}"
        );
    }
    let a = c.get(lists, "/api/v1/tasks?cursor=garbage", &[]).await;
    assert_eq!((a.status, a.error_code().as_str()), (400, "invalid_cursor"));

    let workers = c
        .get("/api/v1/workers", "/api/v1/workers?limit=2", &[])
        .await;
    assert_eq!(
        workers.status,
        200,
        "{}",
        String::from_utf8_lossy(&workers.body)
    );
    let w = workers.json();
    assert_eq!(w["items"].as_array().unwrap().len(), 2);
    assert_eq!(w["items"][0]["worker_id"], "w0");
    let cursor = w["next_cursor"].as_str().unwrap().to_owned();
    let rest = c
        .get(
            "/api/v1/workers",
            &format!("/api/v1/workers?limit=2&cursor={cursor}"),
            &[],
        )
        .await;
    assert_eq!(rest.json()["items"][0]["worker_id"], "w2");
    let etag = workers.header("etag").unwrap();
    let a = c
        .get(
            "/api/v1/workers",
            "/api/v1/workers?limit=2",
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(a.status, 304);
    let a = c
        .get(
            "/api/v1/workers",
            "/api/v1/workers?status=active&consistent_with=WORKERS:1",
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["items"].as_array().unwrap().len(), SAMPLE_WORKERS);
    let a = c
        .get(
            "/api/v1/workers",
            "/api/v1/workers?fields=worker_id,gpus",
            &[],
        )
        .await;
    check_fields(&doc, &a.json(), "Worker", &["worker_id", "gpus"]);
    let a = c
        .get("/api/v1/workers", "/api/v1/workers?status=busy", &[])
        .await;
    assert_eq!(
        (a.status, a.error_field().as_deref()),
        (400, Some("status"))
    );

    let payouts = c.get("/api/v1/payouts", "/api/v1/payouts", &[]).await;
    assert_eq!(
        payouts.status,
        200,
        "{}",
        String::from_utf8_lossy(&payouts.body)
    );
    let p = payouts.json();
    assert_eq!(p["items"].as_array().unwrap().len(), SAMPLE_WORKERS);
    let settlement_id = p["items"][0]["settlement_id"].as_str().unwrap().to_owned();
    for query in [
        "status=paid".to_owned(),
        "worker_id=w1".to_owned(),
        format!("settlement_id={settlement_id}&limit=1"),
    ] {
        let a = c
            .get("/api/v1/payouts", &format!("/api/v1/payouts?{query}"), &[])
            .await;
        assert_eq!(a.status, 200, "payouts?{query}");
        assert!(
            !a.json()["items"].as_array().unwrap().is_empty(),
            "payouts?{query}"
        );
    }
    let etag = payouts.header("etag").unwrap();
    let a = c
        .get(
            "/api/v1/payouts",
            "/api/v1/payouts",
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(a.status, 304);
    let a = c
        .get("/api/v1/payouts", "/api/v1/payouts?status=parked2", &[])
        .await;
    assert_eq!(a.status, 400);

    let settlements = c
        .get("/api/v1/settlements", "/api/v1/settlements?limit=10", &[])
        .await;
    assert_eq!(
        settlements.status,
        200,
        "{}",
        String::from_utf8_lossy(&settlements.body)
    );
    assert_eq!(settlements.json()["items"].as_array().unwrap().len(), 1);
    assert_eq!(settlements.json()["next_cursor"], Value::Null);
    let a = c
        .get(
            "/api/v1/settlements",
            "/api/v1/settlements?status=confirmed&consistent_with=PAYMENTS:1",
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let etag = settlements.header("etag").unwrap();
    let a = c
        .get(
            "/api/v1/settlements",
            "/api/v1/settlements?limit=10",
            &[("If-None-Match", &etag)],
        )
        .await;
    assert_eq!(a.status, 304);
    let a = c
        .get(
            "/api/v1/settlements",
            "/api/v1/settlements?status=paid",
            &[],
        )
        .await;
    assert_eq!(a.status, 400);

    let stats = c.get("/api/v1/stats", "/api/v1/stats", &[]).await;
    assert_eq!(stats.status, 200);
    let etag = stats.header("etag").unwrap();
    let a = c
        .get(
            "/api/v1/stats",
            "/api/v1/stats",
            &[("If-None-Match", &etag)],
        )
        .await;
    // generated_at moves with every answer, so the stats may have changed: 304 or a new 200.
    assert!(matches!(a.status, 200 | 304));
    if a.status == 200 {
        wait_for("a 304 of the stats", async || {
            let s = c.get("/api/v1/stats", "/api/v1/stats", &[]).await;
            let etag = s.header("etag")?;
            let a = c
                .get(
                    "/api/v1/stats",
                    "/api/v1/stats",
                    &[("If-None-Match", &etag)],
                )
                .await;
            (a.status == 304).then_some(())
        })
        .await;
    }

    // Results over SSE: every sample result, resumable.
    check_sse(&mut c, stack.addr).await;

    // (d) What the server answers that the document lacks: neighbours of the real routes, other methods.
    for target in [
        "/api/v1/task",
        "/api/v1/tasks/x/y",
        "/api/v2/tasks",
        "/api/v1/workers/w0",
        "/api/v1/settlements/x",
        "/api/v1/payouts/x",
        "/api/v1/allocations",
        "/api/v1/results",
        "/api/v1/clients/acme",
        "/api/v1/stats/x",
        "/api/v1",
        "/api",
        "/static/missing.js",
        "/static/index.html",
        "/index.html",
        "/openapi.json",
        "/health",
        "/ready",
    ] {
        let a: Answer = c
            .http
            .get(&format!("{}{target}", c.base), &[])
            .await
            .unwrap()
            .into();
        assert_eq!(
            a.status, 404,
            "GET {target} is not documented but answers {}",
            a.status
        );
    }
    for (path, method) in [
        ("/api/v1/stats", "POST"),
        ("/api/v1/workers", "POST"),
        ("/healthz", "POST"),
        ("/api/v1/openapi.json", "POST"),
    ] {
        let a: Answer = c
            .http
            .post(&format!("{}{path}", c.base), &[], "application/json", b"{}")
            .await
            .unwrap()
            .into();
        assert!(
            matches!(a.status, 404 | 405),
            "{method} {path} is not documented but answers {}",
            a.status
        );
    }
    let documented = doc.operations();
    let mut shown_405 = false;
    for (template, _) in &documented {
        let target = template
            .replace("{task_id}", &task_id)
            .replace("{client_id}", "acme");
        for method in ["PUT", "DELETE", "PATCH"] {
            if documented.iter().any(|(p, m)| p == template && m == method) {
                continue;
            }
            let (status, text) = c.raw_status(method, &target).await;
            if status == 405 && !shown_405 {
                shown_405 = true;
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                println!("{method} {target} answers 405 with the body {body:?}");
            }
            assert!(
                matches!(status, 404 | 405),
                "{method} {target} is not documented but answers {status}"
            );
        }
    }

    // 504: with the projector stopped, a token of a new submission is never reached.
    let mut stack = stack;
    stack.projector_stop.cancel();
    if let Some(projector) = stack.services.first_mut() {
        projector.await.unwrap();
    }
    stack.services.remove(0);
    let late = c
        .post_json("/api/v1/tasks", "/api/v1/tasks", &task_request("acme", 9))
        .await
        .json();
    let late_token = late["consistency_token"].as_str().unwrap().to_owned();
    let late_id = late["task_id"].as_str().unwrap().to_owned();
    let a = c
        .get(
            path,
            &format!("/api/v1/tasks/{late_id}?consistent_with={late_token}&wait_ms=100"),
            &[],
        )
        .await;
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (504, "not_yet_consistent")
    );
    let a = c
        .get(
            lists,
            "/api/v1/tasks?limit=1&wait_ms=50",
            &[("Cocoon-Consistent-With", &late_token)],
        )
        .await;
    assert_eq!(
        (a.status, a.error_code().as_str()),
        (504, "not_yet_consistent")
    );

    // Readiness names what is down: NATS killed, 503 `not_ready`.
    stack.server.kill().await;
    wait_for("readiness to fail without NATS", async || {
        let a = c.get("/readyz", "/readyz", &[]).await;
        (a.status == 503).then(|| assert_eq!(a.error_code(), "not_ready"))
    })
    .await;
    let asked = Instant::now();
    let a = c
        .post_json("/api/v1/tasks", "/api/v1/tasks", &task_request("acme", 5))
        .await;
    assert_eq!((a.status, a.error_code().as_str()), (503, "unavailable"));
    println!(
        "a submission without NATS answered 503 after {:.1} s",
        asked.elapsed().as_secs_f64()
    );
    let a = c
        .get(
            "/api/v1/clients/{client_id}/results",
            "/api/v1/clients/acme/results",
            &[],
        )
        .await;
    assert_eq!((a.status, a.error_code().as_str()), (503, "unavailable"));

    // (a) Coverage: every documented operation answered (not 404/405), every documented success status seen.
    let mut problems = Vec::new();
    let mut unproduced_errors = Vec::new();
    for (path, method) in doc.operations() {
        let seen = c
            .seen
            .get(&(path.clone(), method.clone()))
            .cloned()
            .unwrap_or_default();
        if !seen.iter().any(|s| *s != 404 && *s != 405) {
            problems.push(format!("{method} {path}: never answered (seen {seen:?})"));
        }
        let op = doc.operation(&path, &method).unwrap();
        for status in op["responses"].as_object().unwrap().keys() {
            let code: u16 = status.parse().expect("numeric status");
            if code < 400 && !seen.contains(&code) {
                problems.push(format!(
                    "{method} {path}: documented {code} was never produced"
                ));
            }
            if code >= 400 && !seen.contains(&code) {
                unproduced_errors.push(format!("{method} {path} {code}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "coverage:\n  {}",
        problems.join("\n  ")
    );
    println!(
        "{} calls; documented error statuses this test does not provoke: {}",
        c.calls,
        unproduced_errors.join(", ")
    );

    stack.shutdown().await;
}

/// A list answered with `fields`: each item has exactly those fields, and each validates against the item
/// schema.
fn check_fields(doc: &Doc, page: &Value, item: &str, fields: &[&str]) {
    let mut schema = doc.schema(item).clone();
    schema["required"] = json!(fields);
    let items = page["items"].as_array().expect("items");
    assert!(!items.is_empty(), "{item} page with fields is empty");
    for v in items {
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, fields.iter().copied().collect(), "fields={fields:?}");
    }
    doc.check(
        &json!({"type": "array", "items": schema}),
        page.get("items").unwrap(),
        item,
    );
}

async fn check_sse(c: &mut Checker, addr: SocketAddr) {
    let template = "/api/v1/clients/{client_id}/results";
    let op = c
        .doc
        .operation(template, "GET")
        .expect("documented")
        .clone();
    let response = c.doc.resolve(&op["responses"]["200"]).clone();
    let media = &response["content"]["text/event-stream"];
    let data_schemas = media["x-event-data"]
        .as_object()
        .expect("x-event-data")
        .clone();
    // Completed sample tasks: all but every seventh (cancelled).
    let results = (0..SAMPLE_TASKS).filter(|t| t % 7 != 6).count();
    let target = format!("/api/v1/clients/{SAMPLE_CLIENT}/results");
    let (status, head, events) =
        read_sse(addr, &target, None, results, Duration::from_secs(30)).await;
    assert_eq!(status, 200, "GET {target}: {head}");
    let kind = head_header(&head, "content-type").unwrap_or_default();
    assert!(
        kind.starts_with("text/event-stream"),
        "GET {target}: {kind}"
    );
    c.seen
        .entry((template.to_owned(), "GET".to_owned()))
        .or_default()
        .insert(status);
    assert_eq!(events.len(), results, "GET {target}: events");
    let mut ids = Vec::new();
    for e in &events {
        let name = e.event.as_deref().unwrap_or("message");
        let schema = data_schemas
            .get(name)
            .unwrap_or_else(|| panic!("SSE event {name:?} is not documented"));
        let data: Value = serde_json::from_str(&e.data).expect("SSE data is JSON");
        c.doc.check(schema, &data, &format!("SSE {name}"));
        let id = e.id.clone().expect("every result has an id");
        assert!(matches_pattern("^[0-9]+:[0-9]+$", &id), "SSE id {id:?}");
        let seq: u64 = id.split(':').next().unwrap().parse().unwrap();
        assert_eq!(data["stream_sequence"], seq, "SSE id {id} vs its data");
        ids.push(id);
    }
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "SSE ids repeat");

    // Last-Event-ID: delivery continues right after that event.
    let (status, _, resumed) =
        read_sse(addr, &target, Some(&ids[9]), 1, Duration::from_secs(30)).await;
    assert_eq!(status, 200);
    assert_eq!(resumed.first().and_then(|e| e.id.as_ref()), Some(&ids[10]));
    // from_seq=N: from stream sequence N inclusive.
    let seq = ids[10].split(':').next().unwrap().to_owned();
    let first_of_frame = ids
        .iter()
        .find(|i| i.split(':').next() == Some(&seq))
        .unwrap();
    let (status, _, from) = read_sse(
        addr,
        &format!("{target}?from_seq={seq}"),
        None,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        from.first().and_then(|e| e.id.as_ref()),
        Some(first_of_frame)
    );

    let a = c
        .get(template, "/api/v1/clients/bad.client/results", &[])
        .await;
    assert_eq!(
        (
            a.status,
            a.error_code().as_str(),
            a.error_field().as_deref()
        ),
        (400, "invalid_query", Some("client_id"))
    );
}
