//! HTTP caching: a strong `ETag` on every successful GET with a whole body, `304 Not Modified` when
//! `If-None-Match` names it, and a `Cache-Control` on each (the handler's, else `no-cache`).
//!
//! The tag is `"` + the first 16 hex digits of SHA-256 of the uncompressed body + `"`: this layer sits inside
//! compression, so gzip and zstd answers of one body share its tag. Event streams are passed through untouched.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// `Cache-Control` of lists and stats: a second is fresh enough for a dashboard and spares the database.
pub const SHORT: &str = "max-age=1";
/// `Cache-Control` of one task: always revalidate (its ETag makes that cheap).
pub const REVALIDATE: &str = "no-cache";
/// `Cache-Control` of health answers: never stored.
pub const NO_STORE: &str = "no-store";

/// The strong ETag of a body.
pub fn etag_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut hex = String::with_capacity(18);
    hex.push('"');
    for byte in &digest[..8] {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.push('"');
    hex
}

/// Whether `If-None-Match` matches `etag` (weak comparison, as RFC 9110 prescribes for this header).
pub fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let etag = strip(etag);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| {
            let candidate = candidate.trim();
            candidate == "*" || strip(candidate) == etag
        })
}

/// The middleware.
pub async fn etag(request: Request, next: Next) -> Response {
    let cacheable = request.method() == Method::GET || request.method() == Method::HEAD;
    let conditions = request.headers().clone();
    let response = next.run(request).await;
    if !cacheable || response.status() != StatusCode::OK {
        return response;
    }
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_stream {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(error = %e, "response body could not be read for its ETag");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let tag = etag_of(&bytes);
    if let Ok(value) = HeaderValue::from_str(&tag) {
        parts.headers.insert(header::ETAG, value);
    }
    parts
        .headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static(REVALIDATE));
    if none_match(&conditions, &tag) {
        let mut not_modified = Response::new(Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [header::ETAG, header::CACHE_CONTROL, header::VARY] {
            if let Some(v) = parts.headers.get(&name) {
                not_modified.headers_mut().insert(name, v.clone());
            }
        }
        return not_modified;
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Hot reads served from memory: a list or stats answer (`Cache-Control: max-age=1`) is kept for `ttl` per URL
/// (path and query) and served again to the next requests for it, so a dashboard's polling and a burst of
/// identical reads cost one query per `ttl`. Clients are told the answer may be a second old; this serves it at
/// most `ttl` old. A read with a consistency token bypasses it (it must reflect its position).
#[derive(Debug)]
pub struct HotCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, HotEntry>>,
}

#[derive(Debug, Clone)]
struct HotEntry {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

/// Entries kept at most, and their bodies' bytes at most: past either, expired entries are dropped, then
/// everything if still over. A body over an eighth of the byte budget is not kept.
const HOT_ENTRIES: usize = 4_096;
const HOT_BYTES: usize = 64 << 20;

impl HotCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &str) -> Option<HotEntry> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|e| e.at.elapsed() < self.ttl)
            .cloned()
    }

    fn put(&self, key: String, entry: HotEntry) {
        if entry.body.len() > HOT_BYTES / 8 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = |entries: &HashMap<String, HotEntry>| -> usize {
            entries.values().map(|e| e.body.len()).sum()
        };
        if entries.len() >= HOT_ENTRIES || bytes(&entries) + entry.body.len() > HOT_BYTES {
            let ttl = self.ttl;
            entries.retain(|_, e| e.at.elapsed() < ttl);
            if entries.len() >= HOT_ENTRIES || bytes(&entries) + entry.body.len() > HOT_BYTES {
                entries.clear();
            }
        }
        entries.insert(key, entry);
    }
}

/// The hot-read middleware (inside the ETag layer, so a cached answer still gets its tag and 304).
pub async fn hot(State(state): State<crate::AppState>, request: Request, next: Next) -> Response {
    let cache = state.hot_cache();
    let consistent = request.headers().contains_key("cocoon-consistent-with")
        || request
            .uri()
            .query()
            .is_some_and(|q| q.contains("consistent_with"));
    // Stats keep their own single-flight cache (`stats_ttl`).
    let own_cache = request.uri().path() == "/api/v1/stats";
    if cache.ttl.is_zero() || request.method() != Method::GET || consistent || own_cache {
        return next.run(request).await;
    }
    let key = request.uri().to_string();
    if let Some(hit) = cache.get(&key) {
        metrics::counter!("cocoon_api_hot_cache_hits_total").increment(1);
        let mut response = Response::new(Body::from(hit.body));
        *response.headers_mut() = hit.headers;
        return response;
    }
    let response = next.run(request).await;
    let short = response
        .headers()
        .get(header::CACHE_CONTROL)
        .is_some_and(|v| v.as_bytes() == SHORT.as_bytes());
    if response.status() != StatusCode::OK || !short {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    cache.put(
        key,
        HotEntry {
            at: Instant::now(),
            headers: parts.headers.clone(),
            body: bytes.clone(),
        },
    );
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_quoted_16_hex_digits_and_match_lists() {
        let tag = etag_of(b"{}");
        assert_eq!(tag.len(), 18);
        assert!(tag.starts_with('"') && tag.ends_with('"'));
        // SHA-256("{}") = 44136fa355b3678a...
        assert_eq!(tag, "\"44136fa355b3678a\"");
        let mut h = HeaderMap::new();
        assert!(!none_match(&h, &tag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/{tag}")).unwrap(),
        );
        assert!(none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!none_match(&h, &tag));
    }
}
