-- Read model of the TASKS stream (plus the task status changes that ALLOCATIONS carries).

-- One row per task, in its newest known state.
--
-- Projections of different streams interleave freely, so an allocation may be projected
-- before the submission it answers. The row can therefore be created by a later event,
-- with the submission columns still NULL; TaskSubmitted fills them in whenever it lands.
-- They are set all together or not at all (CHECK below).
--
-- State only moves forward: an upsert wins only when its (attempt, status_rank) is greater
-- than the row's. `status_rank` is generated from `status` so that writers cannot get the
-- order wrong, and it can be compared through EXCLUDED in ON CONFLICT ... WHERE.
--   rank 0: submitted, requeued  -- waiting in the queue; requeued opens the next attempt
--   rank 1: allocated
--   rank 2: running
--   rank 3: completed, failed, cancelled, expired, rejected  -- final for that attempt
CREATE TABLE tasks (
    task_id             uuid        PRIMARY KEY,
    status              text        NOT NULL CHECK (status IN (
                            'submitted', 'allocated', 'running', 'completed', 'failed',
                            'cancelled', 'requeued', 'expired', 'rejected')),
    status_rank         smallint    NOT NULL GENERATED ALWAYS AS (
                            CASE status
                                WHEN 'submitted' THEN 0
                                WHEN 'requeued'  THEN 0
                                WHEN 'allocated' THEN 1
                                WHEN 'running'   THEN 2
                                ELSE 3
                            END) STORED,
    attempt             integer     NOT NULL CHECK (attempt >= 0),

    -- Submission: what the client asked for.
    client_id           text,
    priority            smallint    CHECK (priority BETWEEN 1 AND 10),
    gpu_count           integer     CHECK (gpu_count > 0),
    gpu_memory_mib      bigint      CHECK (gpu_memory_mib >= 0),
    model_tag           text,
    -- The most the client pays, per GPU-second, in nanoton (money is integer, never float).
    max_price_nanoton   bigint      CHECK (max_price_nanoton >= 0),
    timeout_ms          bigint      CHECK (timeout_ms > 0),
    submitted_at        timestamptz,

    -- Execution: the current attempt.
    worker_id           text,
    allocated_at        timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    -- Usage in milli-GPU-seconds: integer, so payment arithmetic never meets a float.
    gpu_millis          bigint      CHECK (gpu_millis >= 0),
    peak_gpu_memory_mib bigint      CHECK (peak_gpu_memory_mib >= 0),
    failure_reason      text,
    retryable           boolean,

    -- UUIDv7 of the newest event applied: time-ordered, and what an operator looks up.
    last_event_id       uuid        NOT NULL,
    -- Wall-clock bookkeeping; a rebuild's verification leaves it out of its checksums.
    updated_at          timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT tasks_submission_complete CHECK (
        ROW(client_id, priority, gpu_count, gpu_memory_mib, max_price_nanoton, timeout_ms,
            submitted_at) IS NOT NULL
        OR ROW(client_id, priority, gpu_count, gpu_memory_mib, max_price_nanoton, timeout_ms,
            submitted_at) IS NULL)
);

-- The allocator's queue: `WHERE status IN ('submitted', 'requeued') ORDER BY priority DESC,
-- submitted_at LIMIT n` reads this index in order with no sort. Partial, because queued
-- tasks are a small fraction of all tasks and every index costs each upsert.
-- (A separate (status, priority) index would be a prefix of this one: left out.)
CREATE INDEX tasks_queue_idx
    ON tasks (priority DESC, submitted_at)
    WHERE status IN ('submitted', 'requeued');

-- What a worker is running, and lost-worker requeues.
CREATE INDEX tasks_worker_status_idx ON tasks (worker_id, status);

-- A client's tasks, newest first.
CREATE INDEX tasks_client_submitted_idx ON tasks (client_id, submitted_at DESC);

-- Time-range reads across all clients (operators, exports).
CREATE INDEX tasks_submitted_at_idx ON tasks (submitted_at DESC);
