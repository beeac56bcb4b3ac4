-- The update triggers of 0009 joined the old and new transition tables to find rows whose status
-- changed. The join is not needed: subtracting every old row's contribution and adding every new
-- row's nets to zero for rows that did not change, and it costs a scan of each table instead of a
-- hash join per statement (measured in load-tests/RESULTS.md, "Projector").

CREATE OR REPLACE FUNCTION tasks_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_status_counts AS c (status, shard, count)
    SELECT status, cocoon_shard(), sum(delta)
    FROM (
        SELECT status, -1 AS delta FROM old_rows
        UNION ALL
        SELECT status, 1 FROM new_rows
    ) d
    GROUP BY status
    HAVING sum(delta) <> 0
    ON CONFLICT (status, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION workers_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'active_workers', cocoon_shard(), delta
    FROM (SELECT coalesce((SELECT count(*) FROM new_rows WHERE status = 'active'), 0)
               - coalesce((SELECT count(*) FROM old_rows WHERE status = 'active'), 0) AS delta) d
    WHERE delta <> 0
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION payouts_sum_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dashboard_counters AS c (counter, shard, value)
    SELECT 'nanoton_settled', cocoon_shard(), delta
    FROM (SELECT coalesce((SELECT sum(amount_nanoton) FROM new_rows WHERE status = 'paid'), 0)
               - coalesce((SELECT sum(amount_nanoton) FROM old_rows WHERE status = 'paid'), 0) AS delta) d
    WHERE delta <> 0
    ON CONFLICT (counter, shard) DO UPDATE SET value = c.value + EXCLUDED.value;
    RETURN NULL;
END $$;
