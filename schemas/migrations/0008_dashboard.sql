-- Dashboard figures, maintained incrementally by the projections that see the changes,
-- so that reading them never scans the big tables.
--
-- Counters are sharded: each projection partition adds its deltas to its own `shard`
-- row (its partition number). One shared row would be locked by every partition's
-- transaction until commit and serialise partitions that otherwise run in parallel.
-- Readers sum the shards (views below). A single shard can go negative (a task counted
-- in on one partition and out on another); only the sum is meaningful.

CREATE TABLE task_status_counts (
    status text     NOT NULL CHECK (status IN (
               'submitted', 'allocated', 'running', 'completed', 'failed',
               'cancelled', 'requeued', 'expired', 'rejected')),
    shard  smallint NOT NULL CHECK (shard >= 0),
    count  bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (status, shard)
);

CREATE TABLE dashboard_counters (
    counter text     NOT NULL CHECK (counter IN (
                'active_workers', 'nanoton_accrued', 'nanoton_settled')),
    shard   smallint NOT NULL CHECK (shard >= 0),
    -- Nanoton for the money counters: integer, and bigint holds 9.2e9 TON.
    value   bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (counter, shard)
);

-- Shard 0 exists from the start, so an empty pool reads as zeros rather than no rows.
INSERT INTO task_status_counts (status, shard)
SELECT s, 0
FROM unnest(ARRAY['submitted', 'allocated', 'running', 'completed', 'failed',
                  'cancelled', 'requeued', 'expired', 'rejected']) AS s;

INSERT INTO dashboard_counters (counter, shard)
SELECT c, 0
FROM unnest(ARRAY['active_workers', 'nanoton_accrued', 'nanoton_settled']) AS c;

-- Tasks per status, summed over shards (sum of bigint is numeric: cast back).
CREATE VIEW task_status_totals AS
SELECT status, sum(count)::bigint AS count
FROM task_status_counts
GROUP BY status;

-- One row with the headline figures.
CREATE VIEW dashboard_stats AS
SELECT
    coalesce(sum(value) FILTER (WHERE counter = 'active_workers'), 0)::bigint  AS active_workers,
    coalesce(sum(value) FILTER (WHERE counter = 'nanoton_accrued'), 0)::bigint AS nanoton_accrued,
    coalesce(sum(value) FILTER (WHERE counter = 'nanoton_settled'), 0)::bigint AS nanoton_settled
FROM dashboard_counters;
