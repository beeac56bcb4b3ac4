//! Typed API errors and their JSON form: `{"error": {"code", "message", "field"}}` with the contract's status.
//!
//! Every handler returns `Result<_, ApiError>`, so no error leaves the API in another shape. Codes are stable
//! snake_case strings that clients branch on; messages are for people.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Where a consistency wait stopped: the partition that had not reached the token yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub stream: &'static str,
    pub partition: u16,
    /// The partition's checkpoint when the wait gave up.
    pub checkpoint: u64,
}

/// Everything the API answers with other than success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON, or not the expected shape (a missing or mistyped field, an unknown field).
    #[error("{message}")]
    InvalidJson {
        message: String,
        field: Option<String>,
    },
    /// 400: a query parameter (or a header standing in for one) is malformed or unknown.
    #[error("{field}: {message}")]
    InvalidQuery { field: String, message: String },
    /// 400: a cursor that this API did not hand out for this list.
    #[error("{0}")]
    InvalidCursor(String),
    /// 422: a well-formed request whose field value is not acceptable.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: a batch over the maximum, or a body over the limit.
    #[error("{message}")]
    TooLarge {
        message: String,
        field: Option<String>,
    },
    /// 503: NATS or Postgres cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// 504: the consistency token was not reached within the wait.
    #[error("{message}")]
    NotYetConsistent { message: String, reached: Reached },
    /// 500: a bug or a database that does not match this build.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid_json(message: impl Into<String>, field: Option<String>) -> Self {
        ApiError::InvalidJson {
            message: message.into(),
            field,
        }
    }

    pub fn invalid_query(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidQuery {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. }
            | ApiError::InvalidQuery { .. }
            | ApiError::InvalidCursor(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotYetConsistent { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::InvalidQuery { .. } => "invalid_query",
            ApiError::InvalidCursor(_) => "invalid_cursor",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotYetConsistent { .. } => "not_yet_consistent",
            ApiError::Internal(_) => "internal",
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidJson { field, .. } | ApiError::TooLarge { field, .. } => {
                field.as_deref()
            }
            ApiError::InvalidQuery { field, .. } | ApiError::InvalidField { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidQuery { message, .. } | ApiError::InvalidField { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), self.code().into());
        error.insert("message".into(), self.message().into());
        if let Some(field) = self.field() {
            error.insert("field".into(), field.into());
        }
        if let ApiError::NotYetConsistent { reached, .. } = self {
            error.insert(
                "checkpoint".into(),
                json!({
                    "stream": reached.stream,
                    "partition": reached.partition,
                    "sequence": reached.checkpoint,
                }),
            );
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_) | ApiError::Unavailable(_)) {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        }
        crate::json_response(self.status(), Some("no-store"), &self.body())
    }
}

impl ApiError {
    /// 400: a cursor this API made for a different list.
    pub fn cursor_of_another_list() -> Self {
        ApiError::InvalidCursor("the cursor belongs to another list".into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Unavailable(format!("Postgres is unavailable: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    /// A closed connection or an I/O failure is Postgres being unavailable; an error the server answered with is
    /// a query this build got wrong (or a database it does not match).
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code().map(|c| c.code()) {
            // Connection exceptions, insufficient resources, operator intervention (shutdown, statement
            // timeout): the database cannot serve now.
            Some(code)
                if code.starts_with("08") || code.starts_with("53") || code.starts_with("57") =>
            {
                ApiError::Unavailable(format!("Postgres is unavailable: {e}"))
            }
            Some(_) => ApiError::Internal(format!("read-model query failed: {e}")),
            None if e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) =>
            {
                ApiError::Unavailable(format!("Postgres is unavailable: {e}"))
            }
            // No SQLSTATE and not the connection: a row this build could not decode.
            None => ApiError::Internal(format!("read-model row could not be read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_code_message_and_field() {
        let e = ApiError::invalid_field("tasks[3].priority", "priority 11 is outside 1..=10");
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            e.body(),
            json!({"error": {"code": "invalid_field", "message": "priority 11 is outside 1..=10",
                             "field": "tasks[3].priority"}})
        );
        let e = ApiError::NotFound("no task x".into());
        assert_eq!(
            e.body(),
            json!({"error": {"code": "not_found", "message": "no task x"}})
        );
        let e = ApiError::NotYetConsistent {
            message: "late".into(),
            reached: Reached {
                stream: "TASKS",
                partition: 3,
                checkpoint: 7,
            },
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            e.body()["error"]["checkpoint"],
            json!({"stream": "TASKS", "partition": 3, "sequence": 7})
        );
    }
}
