//! Operations: liveness, readiness, Prometheus metrics, the operator page and the OpenAPI document.
//!
//! The page and the document are compiled in (`include_str!`), so the binary serves them without files.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use crate::AppState;
use crate::cache::{NO_STORE, REVALIDATE};
use crate::error::ApiError;

/// The operator page (`static/`, see CONTRACT.md "The operator page").
pub const INDEX_HTML: &str = include_str!("../static/index.html");
pub const APP_JS: &str = include_str!("../static/app.js");
pub const APP_CSS: &str = include_str!("../static/app.css");
/// The OpenAPI document of this API.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// How long readiness waits for each dependency.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`: 200 while the process runs.
pub async fn healthz() -> Response {
    crate::json_response(StatusCode::OK, Some(NO_STORE), &json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when NATS and Postgres answer, else 503 `not_ready` naming what is down.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let nats = match tokio::time::timeout(READY_TIMEOUT, state.bus().client.flush()).await {
        Ok(Ok(()))
            if state.bus().client.connection_state()
                == async_nats::connection::State::Connected =>
        {
            Ok(())
        }
        Ok(Ok(())) => Err("not connected".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let postgres = match tokio::time::timeout(READY_TIMEOUT, async {
        let client = state.pool().get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    {
        Ok(result) => result,
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let word = |r: &Result<(), String>| if r.is_ok() { "ok" } else { "down" };
    if nats.is_ok() && postgres.is_ok() {
        return crate::json_response(
            StatusCode::OK,
            Some(NO_STORE),
            &json!({"status": "ready", "nats": "ok", "postgres": "ok"}),
        );
    }
    let down: Vec<String> = [("nats", &nats), ("postgres", &postgres)]
        .into_iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name} is down: {e}")))
        .collect();
    let body = json!({
        "status": "not_ready",
        "nats": word(&nats),
        "postgres": word(&postgres),
        "error": {"code": "not_ready", "message": down.join("; ")},
    });
    crate::json_response(StatusCode::SERVICE_UNAVAILABLE, Some(NO_STORE), &body)
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (header::CACHE_CONTROL, NO_STORE),
        ],
        state.metrics().render(),
    )
        .into_response()
}

/// `GET /`: the operator page.
pub async fn index() -> Response {
    ([(header::CACHE_CONTROL, REVALIDATE)], Html(INDEX_HTML)).into_response()
}

pub async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, REVALIDATE),
        ],
        APP_JS,
    )
        .into_response()
}

pub async fn app_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, REVALIDATE),
        ],
        APP_CSS,
    )
        .into_response()
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (header::CACHE_CONTROL, REVALIDATE),
        ],
        OPENAPI_JSON,
    )
        .into_response()
}

/// Any other path: 404 in the API's error shape.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route {}", uri.path()))
}

/// A route that exists, asked with a method it does not serve: 405 in the API's error shape.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not serve {method}", uri.path()))
}
