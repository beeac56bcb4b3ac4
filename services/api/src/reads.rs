//! Reads of the read models: one task, and the lists of tasks, workers, payouts and settlements.
//!
//! Lists are keyset-paginated: each page is ordered by a total key, the cursor holds the last item's key and
//! the next page starts strictly after it, so rows written while a client pages (new tasks land before the
//! first page, newest first) never shift what follows. Orders and the indexes they read:
//! - tasks: (`submitted_at`, `task_id`) descending, NULLs first (a task whose allocation was projected before
//!   its submission has no `submitted_at` yet: it is the newest, and its cursor keeps it apart):
//!   `tasks_submitted_at_idx`, `tasks_client_submitted_idx` with a client filter;
//! - workers: `worker_id` (primary key);
//! - settlements: (`prepared_at`, `settlement_id`) descending: `settlements_prepared_idx` (migration 0012);
//! - payouts: (`settlement_id`, `worker_id`) (primary key).
//!
//! Each page fetches one row more than asked, so `next_cursor` is null exactly when nothing follows.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use events::{ClientId, TaskId, Timestamp, WorkerId};
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;

use crate::AppState;
use crate::cache::{REVALIDATE, SHORT};
use crate::consistency::{self, Projection, Scope};
use crate::error::ApiError;
use crate::params::{self, Consistency, Cursor, Fields, Params};

/// Top-level fields of a task.
pub const TASK_FIELDS: &[&str] = &[
    "task_id",
    "client_id",
    "status",
    "priority",
    "attempt",
    "worker_id",
    "submitted_at",
    "allocated_at",
    "started_at",
    "finished_at",
    "gpu_count",
    "usage",
    "failure",
    "result",
    "updated_at",
];

/// Top-level fields of a worker.
pub const WORKER_FIELDS: &[&str] = &[
    "worker_id",
    "status",
    "region",
    "price_per_gpu_second",
    "payout_address",
    "max_concurrent",
    "running_tasks",
    "admission",
    "attestation_valid_until",
    "last_heartbeat_at",
    "gpus",
];

/// Top-level fields of a payout.
pub const PAYOUT_FIELDS: &[&str] = &[
    "settlement_id",
    "worker_id",
    "destination_address",
    "amount_nanoton",
    "status",
    "reason",
    "settlement_status",
    "tx_hash",
    "updated_at",
];

/// Top-level fields of a settlement.
pub const SETTLEMENT_FIELDS: &[&str] = &[
    "settlement_id",
    "status",
    "wallet_seqno",
    "payouts",
    "total_nanoton",
    "valid_until",
    "prepared_at",
    "submitted_at",
    "sends",
    "confirmed_at",
    "tx_hash",
    "failed_transfers",
    "failure_reason",
];

/// Statuses a payout filter accepts (the column's values).
const PAYOUT_STATUSES: &[&str] = &["pending", "paid", "failed", "parked"];

/// `timestamptz` as integer microseconds (tokio-postgres runs without a date library here).
macro_rules! micros {
    ($col:literal) => {
        concat!("(extract(epoch FROM ", $col, ") * 1000000)::bigint")
    };
}

/// A bound microsecond count as a `timestamptz` (exact: microsecond counts of real dates fit a double's
/// 53 bits, which `interval * bigint` goes through).
fn ts_param(placeholder: &str) -> String {
    format!("('epoch'::timestamptz + {placeholder}::int8 * interval '1 microsecond')")
}

/// RFC 3339 (UTC, microseconds) of an optional microsecond count.
fn time(micros: Option<i64>) -> Value {
    micros.map_or(Value::Null, |m| Timestamp(m).to_string().into())
}

/// Runs a list query that asked for one row more than `limit`: the page's rows, and whether more follow.
async fn page_rows(
    client: &deadpool_postgres::Object,
    text: &str,
    sql: &Sql,
    limit: u32,
) -> Result<(Vec<tokio_postgres::Row>, bool), ApiError> {
    let mut rows = client
        .query(&client.prepare_cached(text).await?, &sql.refs())
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok((rows, more))
}

/// A statement with positional parameters, built clause by clause.
#[derive(Default)]
struct Sql {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    conditions: Vec<String>,
}

impl Sql {
    /// Binds `value` and returns its placeholder.
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn and(&mut self, condition: String) {
        self.conditions.push(condition);
    }

    fn filter(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// The query parameters, or 400 naming what is wrong with them.
fn query_params(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Params, ApiError> {
    let Query(pairs) = query.map_err(|e| {
        ApiError::invalid_query("query", format!("the query string does not parse: {e}"))
    })?;
    Ok(Params::new(pairs))
}

/// A list answer: the selected fields of each item and the cursor after the last one (if more follow).
fn page(items: Vec<Value>, fields: &Fields, next: Option<Cursor>) -> Response {
    let items: Vec<Value> = items.into_iter().map(|i| fields.apply(i)).collect();
    crate::json_response(
        StatusCode::OK,
        Some(SHORT),
        &json!({"items": items, "next_cursor": next.map(|c| c.encode())}),
    )
}

async fn wait_if_asked(
    state: &AppState,
    consistency: &Consistency,
    projection: Projection,
    scope: Scope,
) -> Result<(), ApiError> {
    match consistency.token {
        Some(token) => {
            consistency::wait_for(state, token, projection, scope, consistency.wait).await
        }
        None => Ok(()),
    }
}

// ----- tasks -----

const TASK_SELECT: &str = concat!(
    "SELECT t.task_id, t.client_id, t.status, t.priority, t.attempt, t.worker_id, ",
    micros!("t.submitted_at"),
    ", ",
    micros!("t.allocated_at"),
    ", ",
    micros!("t.started_at"),
    ", ",
    micros!("t.finished_at"),
    ", t.gpu_count, t.gpu_millis, t.peak_gpu_memory_mib, t.failure_reason, t.retryable, ",
    "r.attempt, r.worker_id, r.stream_sequence, r.size_bytes, r.digest, ",
    micros!("r.published_at"),
    ", ",
    micros!("t.updated_at"),
    " FROM tasks t LEFT JOIN LATERAL (",
    "SELECT * FROM task_results x WHERE x.task_id = t.task_id ORDER BY x.attempt DESC LIMIT 1",
    ") r ON true"
);

fn task_json(r: &tokio_postgres::Row) -> Result<Value, tokio_postgres::Error> {
    let task_id: uuid::Uuid = r.try_get(0)?;
    let gpu_millis: Option<i64> = r.try_get(11)?;
    let failure_reason: Option<String> = r.try_get(13)?;
    let result_attempt: Option<i32> = r.try_get(15)?;
    Ok(json!({
        "task_id": task_id.to_string(),
        "client_id": r.try_get::<_, Option<String>>(1)?,
        "status": r.try_get::<_, String>(2)?,
        "priority": r.try_get::<_, Option<i16>>(3)?,
        "attempt": r.try_get::<_, i32>(4)?,
        "worker_id": r.try_get::<_, Option<String>>(5)?,
        "submitted_at": time(r.try_get(6)?),
        "allocated_at": time(r.try_get(7)?),
        "started_at": time(r.try_get(8)?),
        "finished_at": time(r.try_get(9)?),
        "gpu_count": r.try_get::<_, Option<i32>>(10)?,
        "usage": match gpu_millis {
            Some(ms) => json!({
                "gpu_millis": ms,
                "peak_gpu_memory_mib": r.try_get::<_, Option<i64>>(12)?,
            }),
            None => Value::Null,
        },
        "failure": match failure_reason {
            Some(reason) => json!({"reason": reason, "retryable": r.try_get::<_, Option<bool>>(14)?}),
            None => Value::Null,
        },
        "result": match result_attempt {
            Some(attempt) => json!({
                "attempt": attempt,
                "worker_id": r.try_get::<_, String>(16)?,
                "stream_sequence": r.try_get::<_, i64>(17)?,
                "size": r.try_get::<_, i64>(18)?,
                "checksum": r.try_get::<_, String>(19)?,
                "published_at": time(r.try_get(20)?),
            }),
            None => Value::Null,
        },
        "updated_at": time(r.try_get(21)?),
    }))
}

/// `GET /api/v1/tasks/{task_id}`.
pub async fn get_task(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let task_id: TaskId = task_id
        .parse()
        .map_err(|e: events::IdError| ApiError::invalid_query("task_id", e.to_string()))?;
    let mut params = query_params(query)?;
    let fields = Fields::parse(&mut params, TASK_FIELDS)?;
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    params.finish()?;
    wait_if_asked(
        &state,
        &consistency,
        Projection::Tasks,
        Scope::Task(task_id),
    )
    .await?;
    let client = state.pg().await?;
    let sql = format!("{TASK_SELECT} WHERE t.task_id = $1");
    let row = client
        .query_opt(&client.prepare_cached(&sql).await?, &[&task_id.0])
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task {task_id}")))?;
    Ok(crate::json_response(
        StatusCode::OK,
        Some(REVALIDATE),
        &fields.apply(task_json(&row)?),
    ))
}

/// The filters of the task list, parsed once and bound into each statement of a page.
#[derive(Debug, Default)]
struct TaskFilters {
    status: Option<&'static str>,
    client: Option<String>,
    worker: Option<String>,
    priority_min: Option<i16>,
    priority_max: Option<i16>,
}

impl TaskFilters {
    fn parse(params: &mut Params) -> Result<TaskFilters, ApiError> {
        let status = params
            .take("status")?
            .map(|s| {
                client::TaskStatus::parse(&s)
                    .map(client::TaskStatus::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid_query("status", format!("{s:?} is not a task status"))
                    })
            })
            .transpose()?;
        let client = params
            .take("client_id")?
            .map(|c| {
                ClientId::new(c)
                    .map(String::from)
                    .map_err(|e| ApiError::invalid_query("client_id", e.to_string()))
            })
            .transpose()?;
        let worker = params
            .take("worker_id")?
            .map(|w| {
                WorkerId::new(w)
                    .map(String::from)
                    .map_err(|e| ApiError::invalid_query("worker_id", e.to_string()))
            })
            .transpose()?;
        let priority_min = params.take_u64("priority_min", 1..=10)?.map(|v| v as i16);
        let priority_max = params.take_u64("priority_max", 1..=10)?.map(|v| v as i16);
        Ok(TaskFilters {
            status,
            client,
            worker,
            priority_min,
            priority_max,
        })
    }

    fn sql(&self) -> Sql {
        let mut sql = Sql::default();
        if let Some(status) = self.status {
            let p = sql.bind(status);
            sql.and(format!("t.status = {p}"));
        }
        if let Some(client) = &self.client {
            let p = sql.bind(client.clone());
            sql.and(format!("t.client_id = {p}"));
        }
        if let Some(worker) = &self.worker {
            let p = sql.bind(worker.clone());
            sql.and(format!("t.worker_id = {p}"));
        }
        if let Some(min) = self.priority_min {
            let p = sql.bind(min);
            sql.and(format!("t.priority >= {p}"));
        }
        if let Some(max) = self.priority_max {
            let p = sql.bind(max);
            sql.and(format!("t.priority <= {p}"));
        }
        sql
    }
}

/// `GET /api/v1/tasks`.
pub async fn list_tasks(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut params = query_params(query)?;
    let limit = params::limit(&mut params)?;
    let cursor = match Cursor::parse(&mut params)? {
        None => None,
        Some(Cursor::Tasks { at, id }) => Some((at, id)),
        Some(_) => {
            return Err(ApiError::cursor_of_another_list());
        }
    };
    let fields = Fields::parse(&mut params, TASK_FIELDS)?;
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    let filters = TaskFilters::parse(&mut params)?;
    params.finish()?;
    wait_if_asked(&state, &consistency, Projection::Tasks, Scope::All).await?;

    let client = state.pg().await?;
    let want = i64::from(limit) + 1;
    let order = "ORDER BY t.submitted_at DESC, t.task_id DESC";
    let mut sql = filters.sql();
    let mut rows = Vec::new();
    match cursor {
        None => {
            let l = sql.bind(want);
            let text = format!("{TASK_SELECT} {} {order} LIMIT {l}", sql.filter());
            rows = client
                .query(&client.prepare_cached(&text).await?, &sql.refs())
                .await?;
        }
        Some((Some(at), id)) => {
            let a = sql.bind(at);
            let i = sql.bind(id);
            let ts = ts_param(&a);
            sql.and(format!(
                "t.submitted_at <= {ts} AND (t.submitted_at < {ts} OR t.task_id < {i})"
            ));
            let l = sql.bind(want);
            let text = format!("{TASK_SELECT} {} {order} LIMIT {l}", sql.filter());
            rows = client
                .query(&client.prepare_cached(&text).await?, &sql.refs())
                .await?;
        }
        Some((None, id)) => {
            // Rows without `submitted_at` come first (by id); the rest follow in time order.
            let i = sql.bind(id);
            sql.and(format!("t.submitted_at IS NULL AND t.task_id < {i}"));
            let l = sql.bind(want);
            let text = format!(
                "{TASK_SELECT} {} ORDER BY t.task_id DESC LIMIT {l}",
                sql.filter()
            );
            rows.extend(
                client
                    .query(&client.prepare_cached(&text).await?, &sql.refs())
                    .await?,
            );
            if (rows.len() as i64) < want {
                let mut sql = filters.sql();
                sql.and("t.submitted_at IS NOT NULL".into());
                let l = sql.bind(want - rows.len() as i64);
                let text = format!("{TASK_SELECT} {} {order} LIMIT {l}", sql.filter());
                rows.extend(
                    client
                        .query(&client.prepare_cached(&text).await?, &sql.refs())
                        .await?,
                );
            }
        }
    }
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(Cursor::Tasks {
            at: last.try_get(6)?,
            id: last.try_get(0)?,
        }),
        _ => None,
    };
    let items = rows.iter().map(task_json).collect::<Result<Vec<_>, _>>()?;
    Ok(page(items, &fields, next))
}

// ----- workers -----

/// `GET /api/v1/workers`.
pub async fn list_workers(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut params = query_params(query)?;
    let limit = params::limit(&mut params)?;
    let after = match Cursor::parse(&mut params)? {
        None => None,
        Some(Cursor::Workers { id }) => Some(id),
        Some(_) => {
            return Err(ApiError::cursor_of_another_list());
        }
    };
    let fields = Fields::parse(&mut params, WORKER_FIELDS)?;
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    let mut sql = Sql::default();
    if let Some(s) = params.take("status")? {
        let status = client::WorkerStatus::parse(&s).ok_or_else(|| {
            ApiError::invalid_query(
                "status",
                format!("{s:?} is not a worker status (active, draining, deregistered, lost)"),
            )
        })?;
        let p = sql.bind(status.as_str());
        sql.and(format!("w.status = {p}"));
    }
    if let Some(after) = after {
        let p = sql.bind(after);
        sql.and(format!("w.worker_id > {p}"));
    }
    params.finish()?;
    wait_if_asked(&state, &consistency, Projection::Workers, Scope::All).await?;

    let l = sql.bind(i64::from(limit) + 1);
    // The newest verdict per worker, as the `worker_attestation_state` view defines it, for this page only.
    let text = format!(
        concat!(
            "SELECT w.worker_id, w.status, w.region, w.price_per_gpu_second_nanoton, w.payout_address, ",
            "w.max_concurrent, w.running_tasks, ",
            micros!("w.last_heartbeat_at"),
            ", ",
            micros!("a.valid_until"),
            ", coalesce(a.status = 'verified' AND a.valid_until > now(), false) ",
            "FROM workers w LEFT JOIN LATERAL (",
            "SELECT x.status, x.valid_until FROM attestations x ",
            "WHERE x.worker_id = w.worker_id AND x.status <> 'submitted' ",
            "ORDER BY x.decided_at DESC, x.attestation_id DESC LIMIT 1) a ON true ",
            "{} ORDER BY w.worker_id LIMIT {}"
        ),
        sql.filter(),
        l
    );
    let client = state.pg().await?;
    let (rows, more) = page_rows(&client, &text, &sql, limit).await?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<_, _>>()?;
    let mut gpus: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let gpus_of = client
        .prepare_cached(
            "SELECT worker_id, gpu_index, name, memory_total_mib, memory_used_mib, utilization_pct, simulated
             FROM worker_gpus WHERE worker_id = ANY($1) ORDER BY worker_id, gpu_index",
        )
        .await?;
    for g in client.query(&gpus_of, &[&ids]).await? {
        gpus.entry(g.try_get(0)?).or_default().push(json!({
            "index": g.try_get::<_, i16>(1)?,
            "name": g.try_get::<_, Option<String>>(2)?,
            "memory_total_mib": g.try_get::<_, i64>(3)?,
            "memory_used_mib": g.try_get::<_, i64>(4)?,
            "utilization_percent": g.try_get::<_, i16>(5)?,
            "simulated": g.try_get::<_, bool>(6)?,
        }));
    }
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.try_get(0)?;
        let attested: bool = r.try_get(9)?;
        items.push(json!({
            "worker_id": id,
            "status": r.try_get::<_, String>(1)?,
            "region": r.try_get::<_, Option<String>>(2)?,
            "price_per_gpu_second": r.try_get::<_, Option<i64>>(3)?,
            "payout_address": r.try_get::<_, Option<String>>(4)?,
            "max_concurrent": r.try_get::<_, Option<i32>>(5)?,
            "running_tasks": r.try_get::<_, i32>(6)?,
            "admission": if attested { "attested" } else { "unattested" },
            "attestation_valid_until": time(r.try_get(8)?),
            "last_heartbeat_at": time(r.try_get(7)?),
            "gpus": gpus.remove(&id).unwrap_or_default(),
        }));
    }
    let next = match (more, ids.last()) {
        (true, Some(last)) => Some(Cursor::Workers { id: last.clone() }),
        _ => None,
    };
    Ok(page(items, &fields, next))
}

// ----- payouts -----

/// `GET /api/v1/payouts`.
pub async fn list_payouts(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut params = query_params(query)?;
    let limit = params::limit(&mut params)?;
    let after = match Cursor::parse(&mut params)? {
        None => None,
        Some(Cursor::Payouts { settlement, worker }) => Some((settlement, worker)),
        Some(_) => {
            return Err(ApiError::cursor_of_another_list());
        }
    };
    let fields = Fields::parse(&mut params, PAYOUT_FIELDS)?;
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    let mut sql = Sql::default();
    if let Some(w) = params.take("worker_id")? {
        let w =
            WorkerId::new(w).map_err(|e| ApiError::invalid_query("worker_id", e.to_string()))?;
        let p = sql.bind(String::from(w));
        sql.and(format!("p.worker_id = {p}"));
    }
    if let Some(s) = params.take("status")? {
        if !PAYOUT_STATUSES.contains(&s.as_str()) {
            return Err(ApiError::invalid_query(
                "status",
                format!("{s:?} is not a payout status (pending, paid, failed)"),
            ));
        }
        let p = sql.bind(s);
        sql.and(format!("p.status = {p}"));
    }
    if let Some(s) = params.take("settlement_id")? {
        let id: uuid::Uuid = s.parse().map_err(|_| {
            ApiError::invalid_query("settlement_id", format!("{s:?} is not a UUID"))
        })?;
        let p = sql.bind(id);
        sql.and(format!("p.settlement_id = {p}"));
    }
    if let Some((settlement, worker)) = after {
        let s = sql.bind(settlement);
        let w = sql.bind(worker);
        sql.and(format!("(p.settlement_id, p.worker_id) > ({s}, {w})"));
    }
    params.finish()?;
    wait_if_asked(&state, &consistency, Projection::Payments, Scope::All).await?;

    let l = sql.bind(i64::from(limit) + 1);
    let text = format!(
        concat!(
            "SELECT p.settlement_id, p.worker_id, p.destination_address, p.amount_nanoton, p.status, p.reason, ",
            "s.status, s.tx_hash, ",
            micros!("p.updated_at"),
            " FROM settlement_payouts p JOIN settlements s USING (settlement_id) ",
            "{} ORDER BY p.settlement_id, p.worker_id LIMIT {}"
        ),
        sql.filter(),
        l
    );
    let client = state.pg().await?;
    let (rows, more) = page_rows(&client, &text, &sql, limit).await?;
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(Cursor::Payouts {
            settlement: last.try_get(0)?,
            worker: last.try_get(1)?,
        }),
        _ => None,
    };
    let items = rows
        .iter()
        .map(|r| -> Result<Value, tokio_postgres::Error> {
            Ok(json!({
                "settlement_id": r.try_get::<_, uuid::Uuid>(0)?.to_string(),
                "worker_id": r.try_get::<_, String>(1)?,
                "destination_address": r.try_get::<_, String>(2)?,
                "amount_nanoton": r.try_get::<_, i64>(3)?,
                "status": r.try_get::<_, String>(4)?,
                "reason": r.try_get::<_, Option<String>>(5)?,
                "settlement_status": r.try_get::<_, String>(6)?,
                "tx_hash": r.try_get::<_, Option<String>>(7)?,
                "updated_at": time(r.try_get(8)?),
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page(items, &fields, next))
}

// ----- settlements -----

/// `GET /api/v1/settlements`.
pub async fn list_settlements(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut params = query_params(query)?;
    let limit = params::limit(&mut params)?;
    let after = match Cursor::parse(&mut params)? {
        None => None,
        Some(Cursor::Settlements { at, id }) => Some((at, id)),
        Some(_) => {
            return Err(ApiError::cursor_of_another_list());
        }
    };
    let fields = Fields::parse(&mut params, SETTLEMENT_FIELDS)?;
    let consistency = Consistency::parse(&mut params, &headers, state.wait_limits())?;
    let mut sql = Sql::default();
    if let Some(s) = params.take("status")? {
        let status = client::SettlementStatus::parse(&s).ok_or_else(|| {
            ApiError::invalid_query(
                "status",
                format!(
                    "{s:?} is not a settlement status (prepared, submitted, confirmed, expired, failed)"
                ),
            )
        })?;
        let p = sql.bind(status.as_str());
        sql.and(format!("s.status = {p}"));
    }
    if let Some((at, id)) = after {
        let a = sql.bind(at);
        let i = sql.bind(id);
        sql.and(format!(
            "(s.prepared_at, s.settlement_id) < ({}, {i})",
            ts_param(&a)
        ));
    }
    params.finish()?;
    wait_if_asked(&state, &consistency, Projection::Payments, Scope::All).await?;

    let l = sql.bind(i64::from(limit) + 1);
    let text = format!(
        concat!(
            "SELECT s.settlement_id, s.status, s.wallet_seqno, s.payout_count, s.total_nanoton, ",
            micros!("s.valid_until"),
            ", ",
            micros!("s.prepared_at"),
            ", ",
            micros!("s.submitted_at"),
            ", s.sends, ",
            micros!("s.confirmed_at"),
            ", s.tx_hash, ",
            "(SELECT count(*) FROM settlement_payouts p WHERE p.settlement_id = s.settlement_id AND p.status = 'failed'), ",
            "s.failure_reason FROM settlements s ",
            "{} ORDER BY s.prepared_at DESC, s.settlement_id DESC LIMIT {}"
        ),
        sql.filter(),
        l
    );
    let client = state.pg().await?;
    let (rows, more) = page_rows(&client, &text, &sql, limit).await?;
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(Cursor::Settlements {
            at: last.try_get(6)?,
            id: last.try_get(0)?,
        }),
        _ => None,
    };
    let items = rows
        .iter()
        .map(|r| -> Result<Value, tokio_postgres::Error> {
            Ok(json!({
                "settlement_id": r.try_get::<_, uuid::Uuid>(0)?.to_string(),
                "status": r.try_get::<_, String>(1)?,
                "wallet_seqno": r.try_get::<_, i64>(2)?,
                "payouts": r.try_get::<_, i32>(3)?,
                "total_nanoton": r.try_get::<_, i64>(4)?,
                "valid_until": time(r.try_get(5)?),
                "prepared_at": time(r.try_get(6)?),
                "submitted_at": time(r.try_get(7)?),
                "sends": r.try_get::<_, i32>(8)?,
                "confirmed_at": time(r.try_get(9)?),
                "tx_hash": r.try_get::<_, Option<String>>(10)?,
                "failed_transfers": r.try_get::<_, i64>(11)?,
                "failure_reason": r.try_get::<_, Option<String>>(12)?,
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page(items, &fields, next))
}
