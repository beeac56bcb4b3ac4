//! Writing a batch's [`Changes`] to Postgres with set-based statements (UNNEST upserts), plus checkpoints and
//! dead letters. Every statement joins with the stored row by the same rules as [`crate::fold`], so
//! transactions of different streams touching one row still converge.

use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::fold::Changes;

/// Microseconds since the epoch as timestamptz, exactly (no float rounding).
macro_rules! ts {
    ($e:literal) => {
        concat!(
            "('epoch'::timestamptz + ",
            $e,
            " * interval '1 microsecond')"
        )
    };
}

const UPSERT_TASKS: &str = concat!(
    "INSERT INTO tasks AS t (task_id, status, attempt, client_id, priority, gpu_count, gpu_memory_mib, model_tag,
        max_price_nanoton, timeout_ms, submitted_at, worker_id, allocated_at, started_at, finished_at, gpu_millis,
        peak_gpu_memory_mib, failure_reason, retryable, last_event_id)
     SELECT task_id, status, attempt, client_id, priority, gpu_count, gpu_memory_mib, model_tag, max_price, timeout_ms, ",
    ts!("submitted_at"), ", worker_id, ", ts!("allocated_at"), ", ", ts!("started_at"), ", ", ts!("finished_at"),
    ", gpu_millis, peak, failure_reason, retryable, event_id
     FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::int2[], $6::int4[], $7::int8[], $8::text[],
                 $9::int8[], $10::int8[], $11::int8[], $12::text[], $13::int8[], $14::int8[], $15::int8[], $16::int8[],
                 $17::int8[], $18::text[], $19::bool[], $20::uuid[])
       AS u(task_id, status, attempt, client_id, priority, gpu_count, gpu_memory_mib, model_tag, max_price, timeout_ms,
            submitted_at, worker_id, allocated_at, started_at, finished_at, gpu_millis, peak, failure_reason, retryable,
            event_id)
     ON CONFLICT (task_id) DO UPDATE SET
        client_id = coalesce(t.client_id, EXCLUDED.client_id),
        priority = coalesce(t.priority, EXCLUDED.priority),
        gpu_count = coalesce(t.gpu_count, EXCLUDED.gpu_count),
        gpu_memory_mib = coalesce(t.gpu_memory_mib, EXCLUDED.gpu_memory_mib),
        model_tag = CASE WHEN t.submitted_at IS NULL THEN EXCLUDED.model_tag ELSE t.model_tag END,
        max_price_nanoton = coalesce(t.max_price_nanoton, EXCLUDED.max_price_nanoton),
        timeout_ms = coalesce(t.timeout_ms, EXCLUDED.timeout_ms),
        submitted_at = coalesce(t.submitted_at, EXCLUDED.submitted_at),
        attempt = greatest(t.attempt, EXCLUDED.attempt),
        status = CASE WHEN ", "(EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
                 > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)",
    " THEN EXCLUDED.status ELSE t.status END,
        worker_id = CASE WHEN ", "(EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
                 > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)",
    " THEN EXCLUDED.worker_id ELSE t.worker_id END,
        failure_reason = CASE WHEN ", "(EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
                 > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)",
    " THEN EXCLUDED.failure_reason ELSE t.failure_reason END,
        retryable = CASE WHEN ", "(EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
                 > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)",
    " THEN EXCLUDED.retryable ELSE t.retryable END,
        last_event_id = CASE WHEN ", "(EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
                 > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)",
    " THEN EXCLUDED.last_event_id ELSE t.last_event_id END,
        allocated_at = greatest(t.allocated_at, EXCLUDED.allocated_at),
        started_at = greatest(t.started_at, EXCLUDED.started_at),
        finished_at = greatest(t.finished_at, EXCLUDED.finished_at),
        gpu_millis = greatest(t.gpu_millis, EXCLUDED.gpu_millis),
        peak_gpu_memory_mib = greatest(t.peak_gpu_memory_mib, EXCLUDED.peak_gpu_memory_mib),
        updated_at = now()
     WHERE t.submitted_at IS NULL AND EXCLUDED.submitted_at IS NOT NULL
        OR (EXCLUDED.final, CASE WHEN EXCLUDED.final THEN 0 ELSE EXCLUDED.attempt END, EXCLUDED.status_rank, EXCLUDED.last_event_id)
           > (t.final, CASE WHEN t.final THEN 0 ELSE t.attempt END, t.status_rank, t.last_event_id)
        OR EXCLUDED.attempt > t.attempt
        OR EXCLUDED.allocated_at > t.allocated_at OR (t.allocated_at IS NULL AND EXCLUDED.allocated_at IS NOT NULL)
        OR EXCLUDED.started_at > t.started_at OR (t.started_at IS NULL AND EXCLUDED.started_at IS NOT NULL)
        OR EXCLUDED.finished_at > t.finished_at OR (t.finished_at IS NULL AND EXCLUDED.finished_at IS NOT NULL)
        OR EXCLUDED.gpu_millis > t.gpu_millis OR (t.gpu_millis IS NULL AND EXCLUDED.gpu_millis IS NOT NULL)
        OR EXCLUDED.peak_gpu_memory_mib > t.peak_gpu_memory_mib
        OR (t.peak_gpu_memory_mib IS NULL AND EXCLUDED.peak_gpu_memory_mib IS NOT NULL)"
);

const INSERT_ALLOCATIONS: &str = concat!(
    "INSERT INTO allocations (task_id, attempt, worker_id, allocator_epoch, score, score_breakdown, gpu_count,
        gpu_memory_mib, allocated_at, last_event_id)
     SELECT task_id, attempt, worker_id, epoch, score, breakdown, gpu_count, gpu_memory_mib, ", ts!("allocated_at"), ", event_id
     FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::int8[], $5::float8[], $6::jsonb[], $7::int4[], $8::int8[],
                 $9::int8[], $10::uuid[])
       AS u(task_id, attempt, worker_id, epoch, score, breakdown, gpu_count, gpu_memory_mib, allocated_at, event_id)
     ON CONFLICT (task_id, attempt) DO NOTHING"
);

// A revocation lands on its allocation; both come from one ordered subject, so the allocation is there first.
const REVOKE_ALLOCATIONS: &str = concat!(
    "UPDATE allocations a SET revoked_at = ",
    ts!("u.revoked_at"),
    ", revoke_reason = u.reason,
        last_event_id = u.event_id, updated_at = now()
     FROM unnest($1::uuid[], $2::int4[], $3::int8[], $4::text[], $5::uuid[])
       AS u(task_id, attempt, revoked_at, reason, event_id)
     WHERE a.task_id = u.task_id AND a.attempt = u.attempt AND a.revoked_at IS NULL"
);

const INSERT_RESULTS: &str = concat!(
    "INSERT INTO task_results (task_id, attempt, client_id, worker_id, stream_sequence, size_bytes, digest,
        published_at, last_event_id)
     SELECT task_id, attempt, client_id, worker_id, seq, size_bytes, digest, ", ts!("published_at"), ", event_id
     FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[], $8::int8[],
                 $9::uuid[])
       AS u(task_id, attempt, client_id, worker_id, seq, size_bytes, digest, published_at, event_id)
     ON CONFLICT (task_id, attempt) DO NOTHING"
);

// Workers are written only from their own ordered subject (one consumer at a time, under the checkpoint
// lock), so update-then-insert cannot race; the position guard ignores replays of older frames.
const UPDATE_WORKERS: &str = concat!(
    "UPDATE workers w SET
        status = coalesce(u.status, w.status),
        region = coalesce(u.region, w.region),
        price_per_gpu_second_nanoton = coalesce(u.price, w.price_per_gpu_second_nanoton),
        payout_address = coalesce(u.payout_address, w.payout_address),
        max_concurrent = coalesce(u.max_concurrent, w.max_concurrent),
        registered_at = coalesce(", ts!("u.registered_at"), ", w.registered_at),
        running_tasks = coalesce(u.running_tasks, w.running_tasks),
        last_heartbeat_at = coalesce(", ts!("u.last_heartbeat_at"), ", w.last_heartbeat_at),
        last_event_id = u.event_id, last_position = u.position, updated_at = now()
     FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int4[], $8::int8[],
                 $9::int4[], $10::int8[], $11::uuid[])
       AS u(worker_id, position, status, region, price, payout_address, max_concurrent, registered_at,
            running_tasks, last_heartbeat_at, event_id)
     WHERE w.worker_id = u.worker_id AND u.position > w.last_position"
);

const INSERT_WORKERS: &str = concat!(
    "INSERT INTO workers (worker_id, last_position, status, region, price_per_gpu_second_nanoton, payout_address,
        max_concurrent, registered_at, running_tasks, last_heartbeat_at, last_event_id)
     SELECT worker_id, position, coalesce(status, 'active'), region, price, payout_address, max_concurrent, ",
    ts!("registered_at"), ", coalesce(running_tasks, 0), ", ts!("last_heartbeat_at"), ", event_id
     FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int4[], $8::int8[],
                 $9::int4[], $10::int8[], $11::uuid[])
       AS u(worker_id, position, status, region, price, payout_address, max_concurrent, registered_at,
            running_tasks, last_heartbeat_at, event_id)
     ON CONFLICT (worker_id) DO NOTHING"
);

const UPSERT_GPUS: &str = concat!(
    "INSERT INTO worker_gpus AS g (worker_id, gpu_index, last_position, gpu_uuid, name, simulated, memory_total_mib,
        memory_used_mib, utilization_pct, temperature_c, power_mw, telemetry_at)
     SELECT worker_id, gpu_index, position, gpu_uuid, name, coalesce(simulated, false), total, used, util, temp, power, ",
    ts!("at"), "
     FROM unnest($1::text[], $2::int2[], $3::int8[], $4::text[], $5::text[], $6::bool[], $7::int8[], $8::int8[],
                 $9::int2[], $10::int2[], $11::int8[], $12::int8[])
       AS u(worker_id, gpu_index, position, gpu_uuid, name, simulated, total, used, util, temp, power, at)
     ON CONFLICT (worker_id, gpu_index) DO UPDATE SET
        gpu_uuid = coalesce(EXCLUDED.gpu_uuid, g.gpu_uuid),
        name = coalesce(EXCLUDED.name, g.name),
        simulated = CASE WHEN EXCLUDED.gpu_uuid IS NOT NULL THEN EXCLUDED.simulated ELSE g.simulated END,
        memory_total_mib = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.memory_total_mib ELSE g.memory_total_mib END,
        memory_used_mib = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.memory_used_mib ELSE g.memory_used_mib END,
        utilization_pct = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.utilization_pct ELSE g.utilization_pct END,
        temperature_c = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.temperature_c ELSE g.temperature_c END,
        power_mw = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.power_mw ELSE g.power_mw END,
        telemetry_at = CASE WHEN EXCLUDED.last_position > g.last_position THEN EXCLUDED.telemetry_at ELSE g.telemetry_at END,
        last_position = greatest(g.last_position, EXCLUDED.last_position)
     WHERE EXCLUDED.last_position > g.last_position OR (g.gpu_uuid IS NULL AND EXCLUDED.gpu_uuid IS NOT NULL)"
);

const UPSERT_ATTESTATIONS: &str = concat!(
    "INSERT INTO attestations AS a (attestation_id, worker_id, quote_hash, status, tcb_status, measurements,
        valid_until, reason, submitted_at, decided_at, last_event_id)
     SELECT id, worker_id, quote_hash, status, tcb_status, measurements, ", ts!("valid_until"), ", reason, ",
    ts!("submitted_at"), ", ", ts!("decided_at"), ", event_id
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::int8[], $8::text[],
                 $9::int8[], $10::int8[], $11::uuid[])
       AS u(id, worker_id, quote_hash, status, tcb_status, measurements, valid_until, reason, submitted_at,
            decided_at, event_id)
     ON CONFLICT (attestation_id) DO UPDATE SET
        submitted_at = least(a.submitted_at, EXCLUDED.submitted_at),
        status = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.status ELSE a.status END,
        quote_hash = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.quote_hash ELSE a.quote_hash END,
        tcb_status = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.tcb_status ELSE a.tcb_status END,
        measurements = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.measurements ELSE a.measurements END,
        valid_until = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.valid_until ELSE a.valid_until END,
        reason = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.reason ELSE a.reason END,
        decided_at = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.decided_at ELSE a.decided_at END,
        last_event_id = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id) THEN EXCLUDED.last_event_id ELSE a.last_event_id END,
        updated_at = now()
     WHERE (EXCLUDED.status_rank, EXCLUDED.last_event_id) > (a.status_rank, a.last_event_id)
        OR EXCLUDED.submitted_at < a.submitted_at"
);

const INSERT_ACCRUALS: &str = concat!(
    "INSERT INTO payment_accruals (task_id, worker_id, attempt, amount_nanoton, gpu_millis,
        price_per_gpu_second_nanoton, accrued_at, last_event_id)
     SELECT task_id, worker_id, attempt, amount, gpu_millis, price, ", ts!("accrued_at"), ", event_id
     FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::uuid[])
       AS u(task_id, worker_id, attempt, amount, gpu_millis, price, accrued_at, event_id)
     ON CONFLICT (task_id) DO NOTHING"
);

const INSERT_SETTLEMENTS: &str = concat!(
    "INSERT INTO settlements (settlement_id, status, wallet_seqno, valid_until, message_hash, total_nanoton,
        payout_count, prepared_at, last_event_id)
     SELECT id, 'prepared', seqno, ", ts!("valid_until"), ", message_hash, total, payouts, ", ts!("prepared_at"), ", event_id
     FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::text[], $5::int8[], $6::int4[], $7::int8[], $8::uuid[])
       AS u(id, seqno, valid_until, message_hash, total, payouts, prepared_at, event_id)
     ON CONFLICT (settlement_id) DO NOTHING"
);

const INSERT_PAYOUTS: &str = "INSERT INTO settlement_payouts (settlement_id, worker_id, destination_address, amount_nanoton, status)
     SELECT id, worker_id, destination, amount, 'pending'
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[]) AS u(id, worker_id, destination, amount)
     ON CONFLICT (settlement_id, worker_id) DO NOTHING";

// Settlement events share the settlement's subject, so Prepared is applied before any later step. The first
// send's time and the highest send attempt are kept whatever order sends are applied in.
const ADVANCE_SETTLEMENTS: &str = concat!(
    "UPDATE settlements s SET
        status = CASE WHEN u.rank > s.status_rank THEN u.status ELSE s.status END,
        submitted_at = least(s.submitted_at, ", ts!("u.submitted_at"), "),
        sends = greatest(s.sends, u.sends),
        confirmed_at = CASE WHEN u.status = 'confirmed' AND u.rank > s.status_rank THEN ", ts!("u.at"), " ELSE s.confirmed_at END,
        tx_hash = coalesce(s.tx_hash, u.tx_hash),
        tx_lt = coalesce(s.tx_lt, u.tx_lt),
        failure_reason = CASE WHEN u.rank > s.status_rank THEN coalesce(u.failure_reason, s.failure_reason) ELSE s.failure_reason END,
        last_event_id = CASE WHEN u.rank > s.status_rank THEN u.event_id ELSE s.last_event_id END,
        updated_at = now()
     FROM unnest($1::uuid[], $2::text[], $3::int2[], $4::int8[], $5::int8[], $6::text[], $7::int8[], $8::text[], $9::uuid[],
                 $10::int4[])
       AS u(id, status, rank, at, submitted_at, tx_hash, tx_lt, failure_reason, event_id, sends)
     WHERE s.settlement_id = u.id
       AND (u.rank > s.status_rank OR u.sends > s.sends
            OR ", ts!("u.submitted_at"), " < s.submitted_at OR (s.submitted_at IS NULL AND u.submitted_at IS NOT NULL))"
);

// Which accruals a settlement carries; insert-once, like the payouts it comes with.
const INSERT_SETTLEMENT_TASKS: &str =
    "INSERT INTO settlement_tasks (settlement_id, task_id, worker_id)
     SELECT id, task_id, worker_id FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS u(id, task_id, worker_id)
     ON CONFLICT (settlement_id, task_id) DO NOTHING";

// The latest park of an accrual wins, by (parked_at, event id), as in `ParkedRow::join`.
const UPSERT_PARKED: &str = concat!(
    "INSERT INTO parked_payouts AS p (task_id, worker_id, destination, reason, parked_at, last_event_id)
     SELECT task_id, worker_id, destination, reason, ", ts!("parked_at"), ", event_id
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::uuid[])
       AS u(task_id, worker_id, destination, reason, parked_at, event_id)
     ON CONFLICT (task_id) DO UPDATE SET
        worker_id = EXCLUDED.worker_id,
        destination = EXCLUDED.destination,
        reason = EXCLUDED.reason,
        parked_at = EXCLUDED.parked_at,
        last_event_id = EXCLUDED.last_event_id
     WHERE (EXCLUDED.parked_at, EXCLUDED.last_event_id) > (p.parked_at, p.last_event_id)"
);

const FAIL_PAYOUTS: &str =
    "UPDATE settlement_payouts p SET status = 'failed', reason = u.reason, updated_at = now()
     FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, worker_id, reason)
     WHERE p.settlement_id = u.id AND p.worker_id = u.worker_id AND p.status = 'pending'";

const PAY_PAYOUTS: &str = "UPDATE settlement_payouts p SET status = 'paid', updated_at = now()
     WHERE p.settlement_id = ANY($1::uuid[]) AND p.status = 'pending'";

/// Writes every change of a batch. Statements run only for tables with changes.
pub async fn write_changes(tx: &Transaction<'_>, c: &Changes) -> Result<(), tokio_postgres::Error> {
    if !c.tasks.is_empty() {
        let rows: Vec<_> = c.tasks.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let status: Vec<&str> = rows.iter().map(|r| r.state.status).collect();
        let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let sub = |f: &dyn Fn(&crate::fold::Submission) -> i64| -> Vec<Option<i64>> {
            rows.iter().map(|r| r.submission.as_ref().map(f)).collect()
        };
        let client: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.submission.as_ref().map(|s| s.client_id.as_str()))
            .collect();
        let priority: Vec<Option<i16>> = rows
            .iter()
            .map(|r| r.submission.as_ref().map(|s| s.priority))
            .collect();
        let gpu_count: Vec<Option<i32>> = rows
            .iter()
            .map(|r| r.submission.as_ref().map(|s| s.gpu_count))
            .collect();
        let gpu_mem = sub(&|s| s.gpu_memory_mib);
        let model: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.submission.as_ref().and_then(|s| s.model_tag.as_deref()))
            .collect();
        let price = sub(&|s| s.max_price_nanoton);
        let timeout = sub(&|s| s.timeout_ms);
        let submitted_at = sub(&|s| s.submitted_at);
        let worker: Vec<Option<&str>> = rows.iter().map(|r| r.state.worker_id.as_deref()).collect();
        let allocated_at: Vec<Option<i64>> = rows.iter().map(|r| r.allocated_at).collect();
        let started_at: Vec<Option<i64>> = rows.iter().map(|r| r.started_at).collect();
        let finished_at: Vec<Option<i64>> = rows.iter().map(|r| r.finished_at).collect();
        let gpu_millis: Vec<Option<i64>> = rows.iter().map(|r| r.gpu_millis).collect();
        let peak: Vec<Option<i64>> = rows.iter().map(|r| r.peak_gpu_memory_mib).collect();
        let reason: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.state.failure_reason.as_deref())
            .collect();
        let retryable: Vec<Option<bool>> = rows.iter().map(|r| r.state.retryable).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.state.event_id).collect();
        let params: [&(dyn ToSql + Sync); 20] = [
            &id,
            &status,
            &attempt,
            &client,
            &priority,
            &gpu_count,
            &gpu_mem,
            &model,
            &price,
            &timeout,
            &submitted_at,
            &worker,
            &allocated_at,
            &started_at,
            &finished_at,
            &gpu_millis,
            &peak,
            &reason,
            &retryable,
            &event,
        ];
        tx.execute(UPSERT_TASKS, &params).await?;
    }
    if !c.allocations.is_empty() {
        let rows: Vec<_> = c.allocations.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let epoch: Vec<i64> = rows.iter().map(|r| r.allocator_epoch).collect();
        let score: Vec<f64> = rows.iter().map(|r| r.score).collect();
        let breakdown: Vec<&serde_json::Value> = rows.iter().map(|r| &r.score_breakdown).collect();
        let gpu_count: Vec<i32> = rows.iter().map(|r| r.gpu_count).collect();
        let gpu_mem: Vec<i64> = rows.iter().map(|r| r.gpu_memory_mib).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.allocated_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            INSERT_ALLOCATIONS,
            &[
                &id, &attempt, &worker, &epoch, &score, &breakdown, &gpu_count, &gpu_mem, &at,
                &event,
            ],
        )
        .await?;
    }
    if !c.revocations.is_empty() {
        let rows: Vec<_> = c.revocations.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.revoked_at).collect();
        let reason: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(REVOKE_ALLOCATIONS, &[&id, &attempt, &at, &reason, &event])
            .await?;
    }
    if !c.results.is_empty() {
        let rows: Vec<_> = c.results.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let client: Vec<&str> = rows.iter().map(|r| r.client_id.as_str()).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let seq: Vec<i64> = rows.iter().map(|r| r.stream_sequence).collect();
        let size: Vec<i64> = rows.iter().map(|r| r.size_bytes).collect();
        let digest: Vec<&str> = rows.iter().map(|r| r.digest.as_str()).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.published_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            INSERT_RESULTS,
            &[
                &id, &attempt, &client, &worker, &seq, &size, &digest, &at, &event,
            ],
        )
        .await?;
    }
    if !c.workers.is_empty() {
        let rows: Vec<_> = c.workers.values().collect();
        let id: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let position: Vec<i64> = rows.iter().map(|r| r.position).collect();
        let status: Vec<Option<&str>> = rows.iter().map(|r| r.status).collect();
        let reg = |r: &&crate::fold::WorkerChange| r.registration.clone();
        let region: Vec<Option<String>> = rows.iter().map(|r| reg(r).map(|g| g.region)).collect();
        let price: Vec<Option<i64>> = rows
            .iter()
            .map(|r| reg(r).map(|g| g.price_per_gpu_second_nanoton))
            .collect();
        let address: Vec<Option<String>> = rows
            .iter()
            .map(|r| reg(r).map(|g| g.payout_address))
            .collect();
        let max_concurrent: Vec<Option<i32>> = rows
            .iter()
            .map(|r| reg(r).map(|g| g.max_concurrent))
            .collect();
        let registered_at: Vec<Option<i64>> = rows
            .iter()
            .map(|r| reg(r).map(|g| g.registered_at))
            .collect();
        let running: Vec<Option<i32>> = rows.iter().map(|r| r.running_tasks).collect();
        let heartbeat: Vec<Option<i64>> = rows.iter().map(|r| r.last_heartbeat_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        let params: [&(dyn ToSql + Sync); 11] = [
            &id,
            &position,
            &status,
            &region,
            &price,
            &address,
            &max_concurrent,
            &registered_at,
            &running,
            &heartbeat,
            &event,
        ];
        tx.execute(UPDATE_WORKERS, &params).await?;
        tx.execute(INSERT_WORKERS, &params).await?;
    }
    if !c.gpus.is_empty() {
        let rows: Vec<_> = c.gpus.values().collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let index: Vec<i16> = rows.iter().map(|r| r.gpu_index).collect();
        let position: Vec<i64> = rows.iter().map(|r| r.position).collect();
        let uuid: Vec<Option<&str>> = rows.iter().map(|r| r.gpu_uuid.as_deref()).collect();
        let name: Vec<Option<&str>> = rows.iter().map(|r| r.name.as_deref()).collect();
        let simulated: Vec<Option<bool>> = rows.iter().map(|r| r.simulated).collect();
        let total: Vec<i64> = rows.iter().map(|r| r.memory_total_mib).collect();
        let used: Vec<i64> = rows.iter().map(|r| r.memory_used_mib).collect();
        let util: Vec<i16> = rows.iter().map(|r| r.utilization_pct).collect();
        let temp: Vec<Option<i16>> = rows.iter().map(|r| r.temperature_c).collect();
        let power: Vec<Option<i64>> = rows.iter().map(|r| r.power_mw).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.telemetry_at).collect();
        tx.execute(
            UPSERT_GPUS,
            &[
                &worker, &index, &position, &uuid, &name, &simulated, &total, &used, &util, &temp,
                &power, &at,
            ],
        )
        .await?;
    }
    if !c.attestations.is_empty() {
        let rows: Vec<_> = c.attestations.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.attestation_id).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let hash: Vec<&str> = rows.iter().map(|r| r.quote_hash.as_str()).collect();
        let status: Vec<&str> = rows.iter().map(|r| r.status).collect();
        let tcb: Vec<Option<&str>> = rows.iter().map(|r| r.tcb_status.as_deref()).collect();
        let measurements: Vec<Option<&serde_json::Value>> =
            rows.iter().map(|r| r.measurements.as_ref()).collect();
        let valid_until: Vec<Option<i64>> = rows.iter().map(|r| r.valid_until).collect();
        let reason: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
        let submitted_at: Vec<i64> = rows.iter().map(|r| r.submitted_at).collect();
        let decided_at: Vec<Option<i64>> = rows.iter().map(|r| r.decided_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            UPSERT_ATTESTATIONS,
            &[
                &id,
                &worker,
                &hash,
                &status,
                &tcb,
                &measurements,
                &valid_until,
                &reason,
                &submitted_at,
                &decided_at,
                &event,
            ],
        )
        .await?;
    }
    if !c.accruals.is_empty() {
        let rows: Vec<_> = c.accruals.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let amount: Vec<i64> = rows.iter().map(|r| r.amount_nanoton).collect();
        let gpu_millis: Vec<i64> = rows.iter().map(|r| r.gpu_millis).collect();
        let price: Vec<i64> = rows
            .iter()
            .map(|r| r.price_per_gpu_second_nanoton)
            .collect();
        let at: Vec<i64> = rows.iter().map(|r| r.accrued_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            INSERT_ACCRUALS,
            &[
                &id,
                &worker,
                &attempt,
                &amount,
                &gpu_millis,
                &price,
                &at,
                &event,
            ],
        )
        .await?;
    }
    if !c.settlements.is_empty() {
        let rows: Vec<_> = c.settlements.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.settlement_id).collect();
        let seqno: Vec<i64> = rows.iter().map(|r| r.wallet_seqno).collect();
        let valid_until: Vec<i64> = rows.iter().map(|r| r.valid_until).collect();
        let hash: Vec<&str> = rows.iter().map(|r| r.message_hash.as_str()).collect();
        let total: Vec<i64> = rows.iter().map(|r| r.total_nanoton).collect();
        let count: Vec<i32> = rows.iter().map(|r| r.payout_count).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.prepared_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            INSERT_SETTLEMENTS,
            &[
                &id,
                &seqno,
                &valid_until,
                &hash,
                &total,
                &count,
                &at,
                &event,
            ],
        )
        .await?;
    }
    if !c.payouts.is_empty() {
        let rows: Vec<_> = c.payouts.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.settlement_id).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let destination: Vec<&str> = rows.iter().map(|r| r.destination.as_str()).collect();
        let amount: Vec<i64> = rows.iter().map(|r| r.amount_nanoton).collect();
        tx.execute(INSERT_PAYOUTS, &[&id, &worker, &destination, &amount])
            .await?;
    }
    if !c.settlement_tasks.is_empty() {
        let rows: Vec<_> = c.settlement_tasks.values().collect();
        let id: Vec<Uuid> = rows.iter().map(|r| r.settlement_id).collect();
        let task: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        tx.execute(INSERT_SETTLEMENT_TASKS, &[&id, &task, &worker])
            .await?;
    }
    if !c.parked.is_empty() {
        let rows: Vec<_> = c.parked.values().collect();
        let task: Vec<Uuid> = rows.iter().map(|r| r.task_id).collect();
        let worker: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let destination: Vec<&str> = rows.iter().map(|r| r.destination.as_str()).collect();
        let reason: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
        let at: Vec<i64> = rows.iter().map(|r| r.parked_at).collect();
        let event: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        tx.execute(
            UPSERT_PARKED,
            &[&task, &worker, &destination, &reason, &at, &event],
        )
        .await?;
    }
    if !c.settlement_steps.is_empty() {
        let steps = c.settlement_steps_reduced();
        let id: Vec<Uuid> = steps.iter().map(|r| r.step.settlement_id).collect();
        let status: Vec<&str> = steps.iter().map(|r| r.step.status).collect();
        let rank: Vec<i16> = steps
            .iter()
            .map(|r| if r.step.status == "submitted" { 1 } else { 2 })
            .collect();
        let at: Vec<i64> = steps.iter().map(|r| r.step.at).collect();
        let submitted_at: Vec<Option<i64>> = steps.iter().map(|r| r.submitted_at).collect();
        let tx_hash: Vec<Option<&str>> = steps.iter().map(|r| r.step.tx_hash.as_deref()).collect();
        let tx_lt: Vec<Option<i64>> = steps.iter().map(|r| r.step.tx_lt).collect();
        let reason: Vec<Option<&str>> = steps
            .iter()
            .map(|r| r.step.failure_reason.as_deref())
            .collect();
        let event: Vec<Uuid> = steps.iter().map(|r| r.step.event_id).collect();
        let sends: Vec<i32> = steps.iter().map(|r| r.sends).collect();
        tx.execute(
            ADVANCE_SETTLEMENTS,
            &[
                &id,
                &status,
                &rank,
                &at,
                &submitted_at,
                &tx_hash,
                &tx_lt,
                &reason,
                &event,
                &sends,
            ],
        )
        .await?;
        let confirmed: Vec<_> = steps
            .iter()
            .filter(|r| r.step.status == "confirmed")
            .map(|r| &r.step)
            .collect();
        if !confirmed.is_empty() {
            let failed: Vec<(Uuid, &str, &str)> = confirmed
                .iter()
                .flat_map(|s| {
                    s.failed_workers
                        .iter()
                        .map(move |(w, r)| (s.settlement_id, w.as_str(), r.as_str()))
                })
                .collect();
            if !failed.is_empty() {
                let id: Vec<Uuid> = failed.iter().map(|f| f.0).collect();
                let worker: Vec<&str> = failed.iter().map(|f| f.1).collect();
                let reason: Vec<&str> = failed.iter().map(|f| f.2).collect();
                tx.execute(FAIL_PAYOUTS, &[&id, &worker, &reason]).await?;
            }
            let id: Vec<Uuid> = confirmed.iter().map(|s| s.settlement_id).collect();
            tx.execute(PAY_PAYOUTS, &[&id]).await?;
        }
    }
    Ok(())
}
