//! Task submission: `POST /api/v1/tasks` and `POST /api/v1/tasks/batch`.
//!
//! A body is checked field by field before anything is published, so an error names the field at fault with
//! its JSON path (`requirements.gpu_count`, `tasks[3].priority`): the shape first (400 `invalid_json`: not
//! JSON, a missing or mistyped field, an unknown field), then the values (422 `invalid_field`: numbers out of
//! range, and everything [`client::TaskRequest::validate`] refuses). A valid request is parsed by the client
//! library itself (`TaskRequest`'s JSON form: defaults, `input` or `input_hex`) and published through its
//! batching [`client::Producer`]; the answer comes once the log stored every event, with the positions from
//! the receipts. A batch is all or nothing as far as validation goes: one bad item rejects it unpublished.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::Response;
use events::Stream;
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::error::ApiError;

/// Fields of a task request, as `client::TaskRequest` reads them.
const REQUEST_FIELDS: [&str; 7] = [
    "client_id",
    "max_price_per_gpu_second",
    "priority",
    "timeout_ms",
    "requirements",
    "input",
    "input_hex",
];
const REQUIREMENT_FIELDS: [&str; 3] = ["gpu_count", "gpu_memory_mib", "model_tag"];

/// `POST /api/v1/tasks`.
pub async fn submit_one(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let request = parse_request(&value, "")?;
    let submitted = state
        .producer()
        .submit(&request)
        .await
        .map_err(submit_error)?;
    Ok(crate::json_response(
        StatusCode::ACCEPTED,
        Some(crate::cache::NO_STORE),
        &receipt(&submitted),
    ))
}

/// `POST /api/v1/tasks/batch`.
pub async fn submit_batch(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let object = value.as_object().ok_or_else(|| {
        ApiError::invalid_json("the body must be a JSON object {\"tasks\": [...]}", None)
    })?;
    if let Some(unknown) = object.keys().find(|k| *k != "tasks") {
        return Err(ApiError::invalid_json(
            format!("unknown field {unknown:?}"),
            Some(unknown.clone()),
        ));
    }
    let items = match object.get("tasks") {
        None => {
            return Err(ApiError::invalid_json(
                "tasks is required",
                Some("tasks".into()),
            ));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid_json(
                "tasks must be an array",
                Some("tasks".into()),
            ));
        }
    };
    let max = state.config().max_batch;
    if items.is_empty() {
        return Err(ApiError::invalid_field(
            "tasks",
            "a batch holds at least one task",
        ));
    }
    if items.len() > max {
        return Err(ApiError::TooLarge {
            message: format!("{} tasks in one batch; at most {max}", items.len()),
            field: Some("tasks".into()),
        });
    }
    let requests = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_request(item, &format!("tasks[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let results = state.producer().submit_many(&requests).await;
    let mut tasks = Vec::with_capacity(results.len());
    let mut highest = 0;
    let mut first_error: Option<ApiError> = None;
    for result in results {
        match result {
            Ok(submitted) => {
                highest = highest.max(submitted.stream_sequence);
                tasks.push(receipt(&submitted));
            }
            Err(e) => {
                let e = submit_error(e);
                tasks.push(json!({"error": e.body()["error"].clone()}));
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        // Publishing failed part way: the items stored are in the log, so the answer says which, and a client
        // retries only the others (retrying all would submit the stored ones twice).
        let mut body = e.body();
        body["tasks"] = Value::Array(tasks);
        return Ok(crate::json_response(
            e.status(),
            Some(crate::cache::NO_STORE),
            &body,
        ));
    }
    Ok(crate::json_response(
        StatusCode::ACCEPTED,
        Some(crate::cache::NO_STORE),
        &json!({"tasks": tasks, "consistency_token": token(highest)}),
    ))
}

fn token(sequence: u64) -> String {
    format!("{}:{sequence}", Stream::Tasks.name())
}

fn receipt(s: &client::Submitted) -> Value {
    json!({
        "task_id": s.task_id.to_string(),
        "position": {"stream": Stream::Tasks.name(), "sequence": s.stream_sequence},
        "consistency_token": token(s.stream_sequence),
    })
}

fn submit_error(e: client::SubmitError) -> ApiError {
    match e {
        client::SubmitError::Invalid(e) => ApiError::invalid_field(e.field(), e.to_string()),
        client::SubmitError::Publish(bus::PublishError::TooLarge { reason, .. }) => {
            ApiError::TooLarge {
                message: format!("the task is larger than the log accepts: {reason}"),
                field: None,
            }
        }
        client::SubmitError::Publish(e) => {
            ApiError::Unavailable(format!("the task was not stored: {e}"))
        }
    }
}

/// The body as JSON; an unreadable or oversized body is refused here.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                message: "the body is larger than 4 MiB".into(),
                field: None,
            }
        } else {
            ApiError::invalid_json(format!("cannot read the body: {rejection}"), None)
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid_json(format!("the body is not JSON: {e}"), None))
}

/// Checks one task request's shape and values; `at` prefixes field paths (`tasks[3].`).
pub fn parse_request(value: &Value, at: &str) -> Result<client::TaskRequest, ApiError> {
    let path = |name: &str| format!("{at}{name}");
    let object = value.as_object().ok_or_else(|| {
        ApiError::invalid_json(
            "a task request must be a JSON object",
            (!at.is_empty()).then(|| at.trim_end_matches('.').to_owned()),
        )
    })?;
    check_known(object, &REQUEST_FIELDS, at)?;
    expect_string(object, "client_id", true, at)?;
    expect_integer(object, "max_price_per_gpu_second", true, u64::MAX, at)?;
    expect_integer(object, "priority", false, u64::from(u8::MAX), at)?;
    expect_integer(object, "timeout_ms", false, u64::MAX, at)?;
    expect_string(object, "input", false, at)?;
    expect_string(object, "input_hex", false, at)?;
    if let Some(requirements) = object.get("requirements") {
        let nested = format!("{at}requirements.");
        let r = requirements.as_object().ok_or_else(|| {
            ApiError::invalid_json("requirements must be an object", Some(path("requirements")))
        })?;
        check_known(r, &REQUIREMENT_FIELDS, &nested)?;
        expect_integer(r, "gpu_count", false, u64::from(u16::MAX), &nested)?;
        expect_integer(r, "gpu_memory_mib", false, u64::MAX, &nested)?;
        expect_string(r, "model_tag", false, &nested)?;
    }
    let given = |name: &str| object.get(name).is_some_and(|v| !v.is_null());
    if given("input") && given("input_hex") {
        return Err(ApiError::invalid_field(
            path("input_hex"),
            "give either input or input_hex, not both",
        ));
    }
    // The shape is right: the client library's own JSON form parses it (defaults, hex input).
    let request = client::TaskRequest::deserialize(value).map_err(|e| {
        ApiError::invalid_field(
            if given("input_hex") {
                path("input_hex")
            } else {
                at.trim_end_matches('.').to_owned()
            },
            e.to_string(),
        )
    })?;
    request
        .validate()
        .map_err(|e| ApiError::invalid_field(path(e.field()), e.to_string()))?;
    Ok(request)
}

fn check_known(object: &Map<String, Value>, known: &[&str], at: &str) -> Result<(), ApiError> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::invalid_json(
            format!("unknown field {unknown:?}; known: {}", known.join(", ")),
            Some(format!("{at}{unknown}")),
        )),
        None => Ok(()),
    }
}

/// A string field (`null` counts as absent for optional fields, as in the client's JSON form).
fn expect_string(
    object: &Map<String, Value>,
    name: &str,
    required: bool,
    at: &str,
) -> Result<(), ApiError> {
    match object.get(name) {
        None | Some(Value::Null) if required => Err(ApiError::invalid_json(
            format!("{name} is required"),
            Some(format!("{at}{name}")),
        )),
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(ApiError::invalid_json(
            format!("{name} must be a string"),
            Some(format!("{at}{name}")),
        )),
    }
}

/// A non-negative integer field of at most `max`: not a number is a shape error (400), a number out of range
/// a value error (422).
fn expect_integer(
    object: &Map<String, Value>,
    name: &str,
    required: bool,
    max: u64,
    at: &str,
) -> Result<(), ApiError> {
    let field = || format!("{at}{name}");
    match object.get(name) {
        None if required => Err(ApiError::invalid_json(
            format!("{name} is required"),
            Some(field()),
        )),
        None => Ok(()),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(()),
            _ => Err(ApiError::invalid_field(
                field(),
                format!("{name} {n} is not an integer in 0..={max}"),
            )),
        },
        Some(_) => Err(ApiError::invalid_json(
            format!("{name} must be a number"),
            Some(field()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(v: Value) -> ApiError {
        parse_request(&v, "").unwrap_err()
    }

    fn field_of(e: &ApiError) -> Option<String> {
        e.body()["error"]["field"].as_str().map(str::to_owned)
    }

    #[test]
    fn a_valid_request_takes_the_client_defaults() {
        let r = parse_request(
            &json!({"client_id": "acme", "max_price_per_gpu_second": 2000, "input_hex": "00ff"}),
            "",
        )
        .unwrap();
        assert_eq!(r.priority, client::request::DEFAULT_PRIORITY);
        assert_eq!(r.input, vec![0, 0xff]);
    }

    #[test]
    fn shape_errors_are_400_and_name_the_field() {
        for (body, field) in [
            (json!({"max_price_per_gpu_second": 1}), "client_id"),
            (json!({"client_id": "a"}), "max_price_per_gpu_second"),
            (
                json!({"client_id": 7, "max_price_per_gpu_second": 1}),
                "client_id",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "priorty": 3}),
                "priorty",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "priority": "high"}),
                "priority",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "requirements": {"gpus": 1}}),
                "requirements.gpus",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "requirements": 3}),
                "requirements",
            ),
        ] {
            let e = err(body);
            assert_eq!(e.code(), "invalid_json", "{e:?}");
            assert_eq!(field_of(&e).as_deref(), Some(field), "{e:?}");
        }
        assert_eq!(err(json!([1])).code(), "invalid_json");
    }

    #[test]
    fn value_errors_are_422_and_name_the_field() {
        for (body, field) in [
            (
                json!({"client_id": "a.b", "max_price_per_gpu_second": 1}),
                "client_id",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": -1}),
                "max_price_per_gpu_second",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "priority": 300}),
                "priority",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "priority": 0}),
                "priority",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "requirements": {"gpu_count": 0}}),
                "requirements.gpu_count",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "timeout_ms": 0}),
                "timeout_ms",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "input_hex": "0g"}),
                "input_hex",
            ),
            (
                json!({"client_id": "a", "max_price_per_gpu_second": 1, "input": "x", "input_hex": "00"}),
                "input_hex",
            ),
        ] {
            let e = err(body);
            assert_eq!(e.code(), "invalid_field", "{e:?}");
            assert_eq!(field_of(&e).as_deref(), Some(field), "{e:?}");
        }
        let e = parse_request(
            &json!({"client_id": "a", "max_price_per_gpu_second": 1, "priority": 11}),
            "tasks[1].",
        )
        .unwrap_err();
        assert_eq!(field_of(&e).as_deref(), Some("tasks[1].priority"));
    }
}
