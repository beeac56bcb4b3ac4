//! `api`: the HTTP API of the pool for producers, consumers and operators (contract: `CONTRACT.md`).
//!
//! - consumes: the Postgres read models the projector writes (tasks, workers, payments, checkpoints, dead
//!   letters), read-only, through a connection pool; `results.<client>` on RESULTS for Server-Sent Events
//!   (ephemeral ordered consumers: nothing durable is left behind); stream heads and message positions from
//!   JetStream for consistency waits and projection lag;
//! - produces: `TaskSubmitted` on TASKS through the client library's batching [`client::Producer`];
//! - owns: nothing durable; a short cache of the stats answer and the samples its throughput is computed from;
//! - guarantees: a submit answers only once the log stored the event, with its position and a consistency
//!   token; a read carrying a token answers only once its projection reflects the token (or 504); list pages
//!   are keyset-paginated over a total order, so rows written while paging never duplicate or skip the rows
//!   already paged through; every error is `{"error": {code, message, field}}`; request metrics are labelled
//!   by route template and status, never by id.
//!
//! Modules: [`error`] (typed errors → JSON), [`params`] (query parameters, `fields`, cursors),
//! [`consistency`] (tokens and waits), [`submit`], [`reads`] (one task and the lists), [`stats`], [`sse`]
//! (results as Server-Sent Events), [`cache`] (ETag / 304 / Cache-Control), [`ops`] (health, readiness,
//! metrics, the operator page and the OpenAPI document), [`metrics`] (request metrics).

pub mod cache;
pub mod consistency;
pub mod error;
pub mod metrics;
pub mod ops;
pub mod params;
pub mod reads;
pub mod sse;
pub mod stats;
pub mod submit;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use events::{Partitions, ProducerId};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate as _, SizeAbove};

pub use error::ApiError;

/// The media type of every JSON answer.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A JSON answer with the contract's content type and, when given, a `Cache-Control`.
pub(crate) fn json_response(
    status: axum::http::StatusCode,
    cache_control: Option<&'static str>,
    value: &serde_json::Value,
) -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse as _;
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = (status, [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)], body).into_response();
    if let Some(cc) = cache_control {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static(cc),
        );
    }
    response
}

/// The API's settings. Defaults match the contract; tests shorten the waits.
#[derive(Clone)]
pub struct ApiConfig {
    /// Where `api` listens (the binary binds it; [`serve`] takes a bound listener).
    pub listen: SocketAddr,
    pub nats_url: String,
    /// The NATS user to connect as (`bus::auth::Role::Api`); `None` on a server without users.
    pub nats_credentials: Option<bus::Credentials>,
    pub database_url: String,
    /// Postgres connections at most.
    pub pg_pool_size: usize,
    /// `wait_ms` when a read with a consistency token names none (2 s).
    pub default_wait: Duration,
    /// The largest `wait_ms` accepted (10 s).
    pub max_wait: Duration,
    /// How often a consistency wait polls the checkpoints (20 ms).
    pub consistency_poll: Duration,
    /// Silence after which a result stream sends `: keep-alive` (15 s).
    pub sse_keep_alive: Duration,
    /// How long a computed stats answer is served again (1 s, its `max-age`); zero computes every time.
    pub stats_ttl: Duration,
    /// How long a list answer (`Cache-Control: max-age=1`) is served again from memory for the same URL
    /// (500 ms); zero turns the hot-read cache off. Reads with a consistency token always go to the database.
    pub hot_ttl: Duration,
    /// Result streams (SSE) open at once at most (1,024); past it, 503 `unavailable`.
    pub max_streams: usize,
    /// Largest request body (4 MiB).
    pub max_body_bytes: usize,
    /// Most tasks in one batch (1,000).
    pub max_batch: usize,
    /// Partitions of the keyed streams (fixed per deployment).
    pub partitions: Partitions,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub shutdown_grace: Duration,
}

impl fmt::Debug for ApiConfig {
    /// The database URL's password is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("nats_url", &self.nats_url)
            .field("nats_credentials", &self.nats_credentials)
            .field(
                "database_url",
                &client::read_model::redact(&self.database_url),
            )
            .field("pg_pool_size", &self.pg_pool_size)
            .field("default_wait", &self.default_wait)
            .field("max_wait", &self.max_wait)
            .field("consistency_poll", &self.consistency_poll)
            .field("sse_keep_alive", &self.sse_keep_alive)
            .field("stats_ttl", &self.stats_ttl)
            .field("hot_ttl", &self.hot_ttl)
            .field("max_streams", &self.max_streams)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch", &self.max_batch)
            .field("partitions", &self.partitions)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// The embedded stack's NATS, as `infra/stack.sh up` runs it.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The embedded stack's Postgres.
pub const DEFAULT_DATABASE_URL: &str = "postgres://cocoon@127.0.0.1:55432/cocoon";

impl ApiConfig {
    /// The contract's defaults, on 127.0.0.1:8080.
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            nats_url: nats_url.into(),
            nats_credentials: None,
            database_url: database_url.into(),
            pg_pool_size: 16,
            default_wait: Duration::from_millis(2_000),
            max_wait: Duration::from_millis(10_000),
            consistency_poll: Duration::from_millis(20),
            sse_keep_alive: Duration::from_secs(15),
            stats_ttl: Duration::from_secs(1),
            hot_ttl: Duration::from_millis(500),
            max_streams: 1_024,
            max_body_bytes: 4 * 1024 * 1024,
            max_batch: 1_000,
            partitions: Partitions::DEFAULT,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self::new(DEFAULT_NATS_URL, DEFAULT_DATABASE_URL)
    }
}

/// What every handler shares: the configuration, the Postgres pool, the NATS connection, the producer, the
/// metrics handle, the shutdown signal and the stats cache. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    pool: deadpool_postgres::Pool,
    bus: bus::Bus,
    producer: client::Producer,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    stats: stats::StatsCache,
    hot: cache::HotCache,
    streams: Arc<tokio::sync::Semaphore>,
    checkpoints: consistency::SharedCheckpoints,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Connects to NATS (which must be up: submits need it) and builds the Postgres pool (lazily: the API
    /// starts while Postgres is down, and `/readyz` says so).
    pub async fn connect(config: &ApiConfig) -> anyhow::Result<AppState> {
        let mut pg: tokio_postgres::Config = config
            .database_url
            .parse()
            .context("invalid database URL")?;
        pg.connect_timeout(Duration::from_secs(5));
        pg.application_name("cocoon-api");
        let manager = deadpool_postgres::Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(config.pg_pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .context("building the Postgres pool")?;
        let bus = bus::Bus::connect(
            &bus::BusConfig::new(&config.nats_url, "api")
                .with_credentials(config.nats_credentials.clone()),
        )
        .await?;
        let producer = client::Producer::from_bus(
            &bus,
            client::ProducerConfig {
                producer: ProducerId::new("api").expect("a valid constant id"),
                publisher: bus::PublisherConfig {
                    partitions: config.partitions,
                    ..bus::PublisherConfig::default()
                },
            },
        )?;
        Ok(AppState {
            inner: Arc::new(Inner {
                config: config.clone(),
                pool,
                bus,
                producer,
                metrics: metrics::handle(),
                shutdown: CancellationToken::new(),
                stats: stats::StatsCache::default(),
                hot: cache::HotCache::new(config.hot_ttl),
                streams: Arc::new(tokio::sync::Semaphore::new(config.max_streams)),
                checkpoints: Default::default(),
            }),
        })
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn bus(&self) -> &bus::Bus {
        &self.inner.bus
    }

    pub fn producer(&self) -> &client::Producer {
        &self.inner.producer
    }

    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }

    /// A pooled Postgres connection, or 503.
    pub async fn pg(&self) -> Result<deadpool_postgres::Object, ApiError> {
        Ok(self.inner.pool.get().await?)
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// Cancelled when the server shuts down: long-lived responses (result streams) end on it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub(crate) fn checkpoints(&self) -> &consistency::SharedCheckpoints {
        &self.inner.checkpoints
    }

    pub(crate) fn streams(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.streams
    }

    pub(crate) fn hot_cache(&self) -> &cache::HotCache {
        &self.inner.hot
    }

    pub(crate) fn stats_cache(&self) -> &stats::StatsCache {
        &self.inner.stats
    }

    pub(crate) fn wait_limits(&self) -> params::WaitLimits {
        params::WaitLimits {
            default: self.inner.config.default_wait,
            max: self.inner.config.max_wait,
        }
    }
}

/// Every route of the contract, with the layers in this order from the outside: request metrics, compression
/// (gzip or zstd, bodies over 1 KiB, never event streams), ETag/304, the body limit.
pub fn router(state: AppState) -> Router {
    let compress = SizeAbove::new(1025)
        .and(NotForContentType::SSE)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::GRPC);
    Router::new()
        .route(
            "/api/v1/tasks",
            post(submit::submit_one).get(reads::list_tasks),
        )
        .route("/api/v1/tasks/batch", post(submit::submit_batch))
        .route("/api/v1/tasks/{task_id}", get(reads::get_task))
        .route("/api/v1/workers", get(reads::list_workers))
        .route("/api/v1/payouts", get(reads::list_payouts))
        .route("/api/v1/settlements", get(reads::list_settlements))
        .route("/api/v1/stats", get(stats::get_stats))
        .route("/api/v1/clients/{client_id}/results", get(sse::results))
        .route("/api/v1/openapi.json", get(ops::openapi))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/", get(ops::index))
        .route("/static/app.js", get(ops::app_js))
        .route("/static/app.css", get(ops::app_css))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cache::hot,
        ))
        .layer(axum::middleware::from_fn(cache::etag))
        .layer(CompressionLayer::new().compress_when(compress))
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(state)
}

/// Serves the API on `listener` until `cancel`: connects ([`AppState::connect`]), serves, then lets in-flight
/// requests finish (up to the grace time; result streams end at once), flushes the producer and drains NATS.
pub async fn serve(
    config: ApiConfig,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::connect(&config).await?;
    serve_state(state, listener, cancel).await
}

/// [`serve`] with a state already connected.
pub async fn serve_state(
    state: AppState,
    listener: TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let shutdown = state.shutdown().clone();
    let linked = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            shutdown.cancel();
        })
    };
    let sampler = tokio::spawn(stats::sample_throughput(state.clone()));
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "api listening");
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let grace = state.config().shutdown_grace;
    let outcome = tokio::select! {
        result = server => result.context("serving HTTP"),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests did not finish within the grace time");
            Ok(())
        }
    };
    shutdown.cancel();
    linked.abort();
    sampler.abort();
    match tokio::time::timeout(grace, state.producer().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "some submissions failed while stopping"),
        Err(_) => tracing::warn!(?grace, "the producer did not flush within the grace time"),
    }
    match tokio::time::timeout(grace, state.bus().client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "draining NATS failed"),
        Err(_) => tracing::warn!(?grace, "draining NATS did not finish within the grace time"),
    }
    tracing::info!("api stopped");
    outcome
}
