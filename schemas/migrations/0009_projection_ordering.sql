-- What the projector needs to converge whatever the interleaving, and dashboard counters that
-- maintain themselves.
--
-- 1. Position guards. Rows written from one ordered subject (a worker's registration and
--    heartbeats, one GPU's telemetry) keep the log position of the event that last wrote them:
--    `(stream sequence << 16) | index in frame`. An upsert wins only with a higher position, so a
--    redelivered or replayed frame never moves a row backwards.
ALTER TABLE workers ADD COLUMN last_position bigint NOT NULL DEFAULT 0 CHECK (last_position >= 0);
ALTER TABLE worker_gpus ADD COLUMN last_position bigint NOT NULL DEFAULT 0 CHECK (last_position >= 0);

-- 2. Attestation state is owned by the attestations projection (another stream than the
--    worker's registration, so it may be projected first); eligibility is read through a view
--    instead of columns on `workers` that a second projection would have to write.
ALTER TABLE workers DROP CONSTRAINT workers_attested_has_expiry;
ALTER TABLE workers DROP COLUMN attested;
ALTER TABLE workers DROP COLUMN attestation_valid_until;

-- The newest verdict per worker (by decision time), with whether it is still valid.
CREATE VIEW worker_attestation_state AS
SELECT DISTINCT ON (worker_id)
       worker_id, attestation_id, status, tcb_status, valid_until, decided_at,
       (status = 'verified' AND valid_until > now()) AS attested
FROM attestations
WHERE status <> 'submitted'
ORDER BY worker_id, decided_at DESC, attestation_id DESC;

-- 3. Task state order. The row's state changes only for a greater
--    (final, attempt, status_rank, last_event_id): cancellations, expiries and rejections are
--    final whatever the attempt; ties between different events are broken by event id (UUIDv7),
--    so every interleaving picks the same winner.
ALTER TABLE tasks ADD COLUMN final boolean GENERATED ALWAYS AS (
    status IN ('cancelled', 'expired', 'rejected')) STORED;

-- 4. Dashboard counters maintained by statement-level triggers with transition tables: one
--    set-based update per statement, whatever the number of rows. Each backend adds to its own
--    shard (pid mod 16), so concurrent projector transactions do not queue on one counter row.
CREATE FUNCTION cocoon_shard() RETURNS smallint LANGUAGE sql STABLE AS
$$ SELECT (pg_backend_pid() % 16)::smallint $$;

CREATE FUNCTION tasks_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_status_counts AS c (status, shard, count)
    SELECT status, cocoon_shard(), count(*) FROM new_rows GROUP BY status
    ON CONFLICT (status, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END $$;

CREATE FUNCTION tasks_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_status_counts AS c (status, shard, count)
    SELECT status, cocoon_shard(), sum(delta)
    FROM (
        SELECT o.status, -1 AS delta FROM old_rows o JOIN new_rows n USING (task_id) WHERE o.status <> n.status
        UNION ALL
        SELECT n.status, 1 FROM old_rows o JOIN new_rows n USING (task_id) WHERE o.status <> n.status
    ) d
    GROUP BY status
    ON CONFLICT (status, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END $$;

CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_insert();
CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasks_count_update();

CREATE FUNCTION workers_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'active_workers', cocoon_shard(), count(*) FROM new_rows WHERE status = 'active'
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;

CREATE FUNCTION workers_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'active_workers', cocoon_shard(),
           coalesce(sum((n.status = 'active')::int - (o.status = 'active')::int), 0)
    FROM old_rows o JOIN new_rows n USING (worker_id)
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;

CREATE TRIGGER workers_count_insert AFTER INSERT ON workers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION workers_count_insert();
CREATE TRIGGER workers_count_update AFTER UPDATE ON workers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION workers_count_update();

-- Accruals are insert-only (one per task).
CREATE FUNCTION accruals_sum_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'nanoton_accrued', cocoon_shard(), coalesce(sum(amount_nanoton), 0) FROM new_rows
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;

CREATE TRIGGER accruals_sum_insert AFTER INSERT ON payment_accruals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION accruals_sum_insert();

-- Settled = payouts that became paid.
CREATE FUNCTION payouts_sum_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'nanoton_settled', cocoon_shard(),
           coalesce(sum(CASE WHEN n.status = 'paid' AND o.status <> 'paid' THEN n.amount_nanoton
                             WHEN o.status = 'paid' AND n.status <> 'paid' THEN -o.amount_nanoton
                             ELSE 0 END), 0)
    FROM old_rows o JOIN new_rows n USING (settlement_id, worker_id)
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;

CREATE TRIGGER payouts_sum_update AFTER UPDATE ON settlement_payouts
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION payouts_sum_update();

-- 5. Rows that a later event may create before the event that fills them in. The WORKERS stream
--    keeps a week, so a worker's heartbeats can outlive its registration in the log; a rebuild must
--    still produce a row. Registration columns are therefore nullable (all set together), and so are
--    a GPU's static columns, which only the registration carries.
ALTER TABLE workers ALTER COLUMN region DROP NOT NULL;
ALTER TABLE workers ALTER COLUMN price_per_gpu_second_nanoton DROP NOT NULL;
ALTER TABLE workers ALTER COLUMN payout_address DROP NOT NULL;
ALTER TABLE workers ALTER COLUMN max_concurrent DROP NOT NULL;
ALTER TABLE workers ALTER COLUMN registered_at DROP NOT NULL;
ALTER TABLE workers ADD CONSTRAINT workers_registration_complete CHECK (
    ROW(region, price_per_gpu_second_nanoton, payout_address, max_concurrent, registered_at) IS NOT NULL
    OR ROW(region, price_per_gpu_second_nanoton, payout_address, max_concurrent, registered_at) IS NULL);
ALTER TABLE worker_gpus ALTER COLUMN gpu_uuid DROP NOT NULL;
ALTER TABLE worker_gpus ALTER COLUMN name DROP NOT NULL;
