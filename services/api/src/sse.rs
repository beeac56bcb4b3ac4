//! `GET /api/v1/clients/{client_id}/results`: a client's results as Server-Sent Events.
//!
//! Each result is an event `id: <stream sequence>:<index in frame>`, `event: result`, `data: {json}`, read
//! from `results.<client>` through the client library's [`client::ResultStream`] (an ephemeral ordered
//! consumer: no acks, nothing left behind). A reconnecting browser sends `Last-Event-ID`; delivery resumes
//! right after that event, even inside a frame (its earlier results are skipped). `?from_seq=N` starts at
//! stream sequence N; with neither, delivery starts at the first result RESULTS still holds. A frame that does
//! not decode is reported as an `event: error` and the stream goes on. A comment `: keep-alive` is sent after
//! each `sse_keep_alive` of silence, and the stream ends when the server shuts down.

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use client::{ResultItem, ResultStream, ResultsError, StartAt};
use events::ClientId;
use events::payload::Blob;
use futures_util::StreamExt as _;
use futures_util::stream;
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::params::Params;

/// Where a stream resumes: a frame to start at, and the last event already delivered inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub start: StartAt,
    /// Events at or before this (sequence, index) are skipped.
    pub after: Option<(u64, u32)>,
}

/// Parses `Last-Event-ID` (`<sequence>:<index>`).
pub fn parse_last_event_id(text: &str) -> Option<(u64, u32)> {
    let (seq, index) = text.trim().split_once(':')?;
    Some((seq.parse().ok()?, index.parse().ok()?))
}

/// The SSE `data` of one result.
pub fn result_json(item: &ResultItem) -> serde_json::Value {
    let r = &item.result;
    let (text, base64, size) = match &r.output {
        Blob::Inline(bytes) => (
            std::str::from_utf8(bytes).ok().map(str::to_owned),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            bytes.len() as u64,
        ),
        Blob::Reference { size_bytes, .. } => (None, None, *size_bytes),
    };
    json!({
        "task_id": r.task_id.to_string(),
        "attempt": r.attempt,
        "worker_id": r.worker_id.as_str(),
        "stream_sequence": item.stream_sequence,
        "checksum": r.checksum,
        "size": size,
        "output_text": text,
        "output_base64": base64,
        "truncated": r.truncated,
    })
}

/// The route.
pub async fn results(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let client = ClientId::new(client_id)
        .map_err(|e| ApiError::invalid_query("client_id", e.to_string()))?;
    let Query(pairs) = query.map_err(|e| {
        ApiError::invalid_query("query", format!("the query string does not parse: {e}"))
    })?;
    let mut params = Params::new(pairs);
    let from_seq = params.take_u64("from_seq", 1..=u64::MAX)?;
    params.finish()?;
    let last_event = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(parse_last_event_id)
                .ok_or_else(|| {
                    ApiError::invalid_query(
                        "Last-Event-ID",
                        "expected <stream sequence>:<index>, as the events' ids",
                    )
                })
        })
        .transpose()?;
    let resume = match (last_event, from_seq) {
        (Some((seq, index)), _) => Resume {
            start: StartAt::Sequence(seq),
            after: Some((seq, index)),
        },
        (None, Some(seq)) => Resume {
            start: StartAt::Sequence(seq),
            after: None,
        },
        (None, None) => Resume {
            start: StartAt::Beginning,
            after: None,
        },
    };
    // Each stream holds an ordered consumer on the server: at most `max_streams` at once.
    let permit = state.streams().clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable(format!(
            "{} result streams are open, the most this API serves; retry later",
            state.config().max_streams
        ))
    })?;
    let results = ResultStream::open(&state.bus().jetstream, &client, resume.start)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot follow the results: {e}")))?;
    let events = stream::unfold(
        (results, resume.after, permit),
        |(mut results, after, permit)| async move {
            loop {
                let item = results.next().await?;
                let event = match item {
                    Ok(item) => {
                        if after.is_some_and(|a| (item.stream_sequence, item.index) <= a) {
                            continue;
                        }
                        Event::default()
                            .id(format!("{}:{}", item.stream_sequence, item.index))
                            .event("result")
                            .json_data(result_json(&item))
                            .unwrap_or_else(|_| Event::default().comment("unencodable result"))
                    }
                    Err(e) => {
                        let sequence = match &e {
                            ResultsError::Undecodable {
                                stream_sequence, ..
                            }
                            | ResultsError::UnexpectedEvent {
                                stream_sequence, ..
                            } => Some(*stream_sequence),
                            _ => None,
                        };
                        if sequence
                            .zip(after)
                            .is_some_and(|(seq, (after_seq, _))| seq < after_seq)
                        {
                            continue;
                        }
                        Event::default()
                            .event("error")
                            .json_data(
                                json!({"stream_sequence": sequence, "message": e.to_string()}),
                            )
                            .unwrap_or_else(|_| Event::default().comment("error"))
                    }
                };
                return Some((Ok::<_, Infallible>(event), (results, after, permit)));
            }
        },
    )
    .take_until(state.shutdown().clone().cancelled_owned());
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(state.config().sse_keep_alive)
                .text("keep-alive"),
        )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_ids_parse() {
        assert_eq!(parse_last_event_id("17:3"), Some((17, 3)));
        assert_eq!(parse_last_event_id(" 5:0 "), Some((5, 0)));
        for bad in ["", "17", "x:1", "1:y", "-1:0"] {
            assert_eq!(parse_last_event_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn results_carry_text_and_base64() {
        let item = ResultItem {
            stream_sequence: 9,
            index: 2,
            stored_at: events::Timestamp(0),
            result: events::results::TaskResult {
                task_id: events::TaskId::from_u128(1),
                client_id: ClientId::new("c").unwrap(),
                worker_id: events::WorkerId::new("w").unwrap(),
                attempt: 1,
                output: Blob::Inline(b"hi".to_vec()),
                checksum: "sha256:x".into(),
                truncated: false,
            },
        };
        let v = result_json(&item);
        assert_eq!(v["output_text"], "hi");
        assert_eq!(v["output_base64"], "aGk=");
        assert_eq!(v["size"], 2);
        assert_eq!(v["stream_sequence"], 9);
    }
}
