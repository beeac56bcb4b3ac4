//! What a producer asks for: [`TaskRequest`], its validation into the wire's `TaskSpec`, and JSON Lines files of
//! many requests.
//!
//! A request is plain data that may be wrong (it comes from flags, files, other programs); [`TaskRequest::validate`]
//! turns it into the typed values of the wire contract or says exactly what is wrong, so nothing invalid is ever
//! published. Defaults (see the `DEFAULT_*` constants) apply to omitted JSON fields; the price has none, because
//! money is never guessed.

use std::io::BufRead;

use serde::Deserialize;

use events::payload::{Blob, Priority, Requirements, TaskSpec};
use events::{ClientId, IdError, Nanoton};

/// Priority of a request that names none: the middle of 1..=10.
pub const DEFAULT_PRIORITY: u8 = 5;
/// GPUs of a request that names none.
pub const DEFAULT_GPU_COUNT: u16 = 1;
/// GPU memory per GPU of a request that names none: 0, any GPU will do.
pub const DEFAULT_GPU_MEMORY_MIB: u64 = 0;
/// Wall-clock limit of one attempt when none is named: 5 minutes.
pub const DEFAULT_TIMEOUT_MS: u64 = 5 * 60 * 1000;
/// The longest attempt a request may ask for: 7 days. Longer is almost certainly a unit mistake.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Largest inline input. A `TaskSubmitted` travels in one frame, and a frame may be at most 1 MiB on the wire
/// (`events::CodecConfig::default().max_frame_bytes`, also nats-server's default `max_payload`); 16 KiB are left for
/// the envelope, the rest of the spec and the frame's headers, so even incompressible input fits.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024 - 16 * 1024;
/// Longest model tag: it is an affinity key, not a document.
pub const MAX_MODEL_TAG_BYTES: usize = 128;

/// What a task needs from a worker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskRequirements {
    /// GPUs on one worker, at least 1.
    pub gpu_count: u16,
    /// GPU memory needed on each GPU, in MiB; 0 means any.
    pub gpu_memory_mib: u64,
    /// Model or affinity tag (workers that recently ran it score higher).
    pub model_tag: Option<String>,
}

impl Default for TaskRequirements {
    fn default() -> Self {
        Self {
            gpu_count: DEFAULT_GPU_COUNT,
            gpu_memory_mib: DEFAULT_GPU_MEMORY_MIB,
            model_tag: None,
        }
    }
}

/// A task to submit, before validation.
///
/// In JSON (one object per line of a `.jsonl` file):
///
/// ```json
/// {"client_id": "acme", "requirements": {"gpu_count": 1, "gpu_memory_mib": 16384, "model_tag": "llama-3-8b"},
///  "priority": 7, "max_price_per_gpu_second": 2000, "timeout_ms": 60000, "input": "summarise: ..."}
/// ```
///
/// `client_id` and `max_price_per_gpu_second` (nanoton) are required; `requirements` (and each of its fields),
/// `priority` and `timeout_ms` take the `DEFAULT_*` values; the input is `input` (UTF-8 text) or `input_hex`
/// (bytes as hex), or empty when neither is given. Unknown fields are refused, so a typo is not silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RequestJson")]
pub struct TaskRequest {
    /// The client, also the last token of its result subject `results.<client>`.
    pub client_id: String,
    pub requirements: TaskRequirements,
    /// 1 (lowest) to 10 (highest).
    pub priority: u8,
    /// The most the client pays per GPU-second.
    pub max_price_per_gpu_second: Nanoton,
    /// Wall-clock limit of one attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Carried inline in the event.
    pub input: Vec<u8>,
}

/// Why a request cannot be submitted. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("client_id: {0}")]
    ClientId(#[from] IdError),
    #[error("priority {0} is outside 1..=10")]
    Priority(u8),
    #[error("gpu_count must be at least 1")]
    NoGpus,
    #[error("timeout_ms must be greater than 0")]
    ZeroTimeout,
    #[error("timeout_ms {0} is longer than the maximum of {MAX_TIMEOUT_MS} (7 days)")]
    TimeoutTooLong(u64),
    #[error("input is {size} bytes, more than the {max} bytes a frame can carry")]
    InputTooLarge { size: usize, max: usize },
    #[error("model_tag: {0}")]
    ModelTag(&'static str),
    /// The read model stores these as signed 64-bit integers.
    #[error("{field} {value} is larger than {max}")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
}

impl InvalidRequest {
    /// The JSON path of the field at fault, as a request file or the HTTP API spells it
    /// (`requirements.gpu_count`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            InvalidRequest::ClientId(_) => "client_id",
            InvalidRequest::Priority(_) => "priority",
            InvalidRequest::NoGpus => "requirements.gpu_count",
            InvalidRequest::ZeroTimeout | InvalidRequest::TimeoutTooLong(_) => "timeout_ms",
            InvalidRequest::InputTooLarge { .. } => "input",
            InvalidRequest::ModelTag(_) => "requirements.model_tag",
            InvalidRequest::TooLarge {
                field: "gpu_memory_mib",
                ..
            } => "requirements.gpu_memory_mib",
            InvalidRequest::TooLarge { field, .. } => field,
        }
    }
}

impl TaskRequest {
    /// A request with the default requirements, priority and timeout, and no input.
    pub fn new(client_id: impl Into<String>, max_price_per_gpu_second: Nanoton) -> Self {
        Self {
            client_id: client_id.into(),
            requirements: TaskRequirements::default(),
            priority: DEFAULT_PRIORITY,
            max_price_per_gpu_second,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            input: Vec::new(),
        }
    }

    /// Checks every field and returns the typed client id and task spec, or the first thing that is wrong.
    pub fn validate(&self) -> Result<(ClientId, TaskSpec), InvalidRequest> {
        let client_id = ClientId::new(self.client_id.as_str())?;
        let priority = Priority::new(self.priority).map_err(|e| InvalidRequest::Priority(e.0))?;
        let r = &self.requirements;
        if r.gpu_count == 0 {
            return Err(InvalidRequest::NoGpus);
        }
        let bigint = i64::MAX as u64;
        let check_bigint = |field: &'static str, value: u64| {
            if value > bigint {
                Err(InvalidRequest::TooLarge {
                    field,
                    value,
                    max: bigint,
                })
            } else {
                Ok(())
            }
        };
        check_bigint("gpu_memory_mib", r.gpu_memory_mib)?;
        check_bigint("max_price_per_gpu_second", self.max_price_per_gpu_second.0)?;
        if let Some(tag) = &r.model_tag {
            if tag.is_empty() {
                return Err(InvalidRequest::ModelTag(
                    "must not be empty (omit it instead)",
                ));
            }
            if tag.len() > MAX_MODEL_TAG_BYTES {
                return Err(InvalidRequest::ModelTag("longer than 128 bytes"));
            }
            if tag.chars().any(char::is_control) {
                return Err(InvalidRequest::ModelTag("contains control characters"));
            }
        }
        if self.timeout_ms == 0 {
            return Err(InvalidRequest::ZeroTimeout);
        }
        if self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(InvalidRequest::TimeoutTooLong(self.timeout_ms));
        }
        if self.input.len() > MAX_INPUT_BYTES {
            return Err(InvalidRequest::InputTooLarge {
                size: self.input.len(),
                max: MAX_INPUT_BYTES,
            });
        }
        let spec = TaskSpec {
            requirements: Requirements {
                gpu_count: r.gpu_count,
                gpu_memory_mib: r.gpu_memory_mib,
                model_tag: r.model_tag.clone(),
            },
            priority,
            max_price_per_gpu_second: self.max_price_per_gpu_second,
            timeout_ms: self.timeout_ms,
            input: Blob::Inline(self.input.clone()),
        };
        Ok((client_id, spec))
    }

    /// Parses one request from JSON (see the type's documentation for the fields).
    pub fn from_json(text: &str) -> Result<TaskRequest, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The JSON form: the input as text or hex.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestJson {
    client_id: String,
    #[serde(default)]
    requirements: TaskRequirements,
    #[serde(default = "default_priority")]
    priority: u8,
    max_price_per_gpu_second: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    input_hex: Option<String>,
}

fn default_priority() -> u8 {
    DEFAULT_PRIORITY
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl TryFrom<RequestJson> for TaskRequest {
    type Error = String;

    fn try_from(j: RequestJson) -> Result<Self, Self::Error> {
        let input = match (j.input, j.input_hex) {
            (Some(_), Some(_)) => return Err("give either input or input_hex, not both".into()),
            (Some(text), None) => text.into_bytes(),
            (None, Some(hex)) => decode_hex(&hex)?,
            (None, None) => Vec::new(),
        };
        Ok(TaskRequest {
            client_id: j.client_id,
            requirements: j.requirements,
            priority: j.priority,
            max_price_per_gpu_second: Nanoton(j.max_price_per_gpu_second),
            timeout_ms: j.timeout_ms,
            input,
        })
    }
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return Err(format!(
            "input_hex has an odd number of digits ({})",
            hex.len()
        ));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!(
            "input_hex contains {:?}, not a hex digit",
            c as char
        )),
    };
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A line of a JSON Lines file that is not a valid request.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    pub kind: LineErrorKind,
}

/// What is wrong with the line.
#[derive(Debug, thiserror::Error)]
pub enum LineErrorKind {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a task request: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
}

/// Reads requests from JSON Lines, one object per line; blank lines are skipped. Each request is validated, so
/// an error names the line it comes from. Reading goes on after a bad line, so a caller can report them all.
pub fn read_jsonl(
    reader: impl BufRead,
) -> impl Iterator<Item = Result<(usize, TaskRequest), LineError>> {
    reader.lines().enumerate().filter_map(|(i, line)| {
        let line_no = i + 1;
        let at = |kind: LineErrorKind| LineError {
            line: line_no,
            kind,
        };
        match line {
            Err(e) => Some(Err(at(e.into()))),
            Ok(text) if text.trim().is_empty() => None,
            Ok(text) => Some(
                TaskRequest::from_json(&text)
                    .map_err(|e| at(e.into()))
                    .and_then(|request| match request.validate() {
                        Ok(_) => Ok((line_no, request)),
                        Err(e) => Err(at(e.into())),
                    }),
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> TaskRequest {
        TaskRequest::new("acme", Nanoton(2_000))
    }

    #[test]
    fn defaults_validate_into_the_wire_spec() {
        let (client, spec) = ok().validate().unwrap();
        assert_eq!(client.as_str(), "acme");
        assert_eq!(spec.priority.get(), DEFAULT_PRIORITY);
        assert_eq!(spec.requirements.gpu_count, 1);
        assert_eq!(spec.requirements.gpu_memory_mib, 0);
        assert_eq!(spec.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(spec.input, Blob::Inline(Vec::new()));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Change = Box<dyn Fn(&mut TaskRequest)>;
        let cases: Vec<(Change, InvalidRequest)> = vec![
            (Box::new(|r| r.priority = 0), InvalidRequest::Priority(0)),
            (Box::new(|r| r.priority = 11), InvalidRequest::Priority(11)),
            (
                Box::new(|r| r.requirements.gpu_count = 0),
                InvalidRequest::NoGpus,
            ),
            (Box::new(|r| r.timeout_ms = 0), InvalidRequest::ZeroTimeout),
            (
                Box::new(|r| r.timeout_ms = MAX_TIMEOUT_MS + 1),
                InvalidRequest::TimeoutTooLong(MAX_TIMEOUT_MS + 1),
            ),
            (
                Box::new(|r| r.input = vec![0; MAX_INPUT_BYTES + 1]),
                InvalidRequest::InputTooLarge {
                    size: MAX_INPUT_BYTES + 1,
                    max: MAX_INPUT_BYTES,
                },
            ),
            (
                Box::new(|r| r.max_price_per_gpu_second = Nanoton(u64::MAX)),
                InvalidRequest::TooLarge {
                    field: "max_price_per_gpu_second",
                    value: u64::MAX,
                    max: i64::MAX as u64,
                },
            ),
            (
                Box::new(|r| r.requirements.model_tag = Some(String::new())),
                InvalidRequest::ModelTag("must not be empty (omit it instead)"),
            ),
        ];
        for (change, expected) in cases {
            let mut r = ok();
            change(&mut r);
            assert_eq!(r.validate().unwrap_err(), expected);
        }
        let field = |change: &dyn Fn(&mut TaskRequest)| {
            let mut r = ok();
            change(&mut r);
            r.validate().unwrap_err().field()
        };
        assert_eq!(field(&|r| r.client_id = "a.b".into()), "client_id");
        assert_eq!(field(&|r| r.priority = 11), "priority");
        assert_eq!(
            field(&|r| r.requirements.gpu_count = 0),
            "requirements.gpu_count"
        );
        assert_eq!(
            field(&|r| r.requirements.gpu_memory_mib = u64::MAX),
            "requirements.gpu_memory_mib"
        );
        assert_eq!(
            field(&|r| r.requirements.model_tag = Some(String::new())),
            "requirements.model_tag"
        );
        assert_eq!(
            field(&|r| r.max_price_per_gpu_second = Nanoton(u64::MAX)),
            "max_price_per_gpu_second"
        );
        assert_eq!(field(&|r| r.timeout_ms = 0), "timeout_ms");
        assert_eq!(field(&|r| r.input = vec![0; MAX_INPUT_BYTES + 1]), "input");
        for bad in ["", "a.b", "results.*", "has space", &"x".repeat(65)] {
            let r = TaskRequest::new(bad, Nanoton(1));
            assert!(
                matches!(r.validate(), Err(InvalidRequest::ClientId(_))),
                "{bad:?} accepted"
            );
        }
        let msg = TaskRequest::new("a.b", Nanoton(1))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("client_id:"), "{msg}");
    }

    #[test]
    fn the_largest_input_fits_in_one_frame() {
        // Incompressible bytes: the worst case for the frame limit.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut r = ok();
        r.requirements.model_tag = Some("m".repeat(MAX_MODEL_TAG_BYTES));
        r.input = (0..MAX_INPUT_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (client_id, spec) = r.validate().unwrap();
        let record = events::EventRecord::new(
            events::ProducerId::new("p").unwrap(),
            events::tasks::TaskSubmitted {
                task_id: events::TaskId::new(),
                client_id,
                spec,
            },
        );
        let config = events::CodecConfig::default();
        let frame = events::encode_frame(config, &[record]).unwrap();
        assert!(frame.body.len() + 512 < config.max_frame_bytes);
    }

    #[test]
    fn json_takes_defaults_text_or_hex_input_and_refuses_unknown_fields() {
        let r =
            TaskRequest::from_json(r#"{"client_id":"c1","max_price_per_gpu_second":5}"#).unwrap();
        assert_eq!(r, TaskRequest::new("c1", Nanoton(5)));
        let r = TaskRequest::from_json(
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"priority":9,"timeout_ms":10,
                "requirements":{"gpu_count":2,"model_tag":"llama"},"input":"hi"}"#,
        )
        .unwrap();
        assert_eq!(r.priority, 9);
        assert_eq!(r.requirements.gpu_count, 2);
        assert_eq!(r.requirements.gpu_memory_mib, DEFAULT_GPU_MEMORY_MIB);
        assert_eq!(r.requirements.model_tag.as_deref(), Some("llama"));
        assert_eq!(r.input, b"hi");
        let r = TaskRequest::from_json(
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"input_hex":"00ffA0"}"#,
        )
        .unwrap();
        assert_eq!(r.input, vec![0x00, 0xff, 0xa0]);
        for bad in [
            r#"{"client_id":"c1"}"#,
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"priorty":3}"#,
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"input":"a","input_hex":"00"}"#,
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"input_hex":"0g"}"#,
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"priority":300}"#,
        ] {
            assert!(TaskRequest::from_json(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn jsonl_reports_the_line_of_each_bad_request() {
        let file = concat!(
            r#"{"client_id":"c1","max_price_per_gpu_second":5}"#,
            "\n\n",
            r#"{"client_id":"c1","max_price_per_gpu_second":5,"priority":0}"#,
            "\n",
            "not json\n",
            r#"{"client_id":"c2","max_price_per_gpu_second":7,"input":"x"}"#,
            "\n",
        );
        let items: Vec<_> = read_jsonl(file.as_bytes()).collect();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().unwrap().0, 1);
        let e = items[1].as_ref().unwrap_err();
        assert_eq!(e.line, 3);
        assert!(matches!(
            e.kind,
            LineErrorKind::Invalid(InvalidRequest::Priority(0))
        ));
        assert!(
            e.to_string()
                .starts_with("line 3: invalid request: priority 0")
        );
        let e = items[2].as_ref().unwrap_err();
        assert_eq!(e.line, 4);
        assert!(matches!(e.kind, LineErrorKind::Json(_)));
        let (line, r) = items[3].as_ref().unwrap();
        assert_eq!((*line, r.client_id.as_str()), (5, "c2"));
    }
}
