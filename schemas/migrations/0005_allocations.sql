-- Read model of the ALLOCATIONS stream: which worker each attempt of a task went to, and why.

-- One row per attempt: a requeued task gets a new attempt and a new row, so the history
-- of placements stays visible. No foreign key to tasks: the two come from different
-- streams and either may be projected first.
CREATE TABLE allocations (
    task_id         uuid             NOT NULL,
    attempt         integer          NOT NULL CHECK (attempt >= 0),
    worker_id       text             NOT NULL,
    -- Fencing epoch of the allocator lease that made the decision: an allocation from a
    -- stale epoch can be told apart (and ignored) after a failover.
    allocator_epoch bigint           NOT NULL CHECK (allocator_epoch >= 0),
    -- The placement score and its parts (load, free memory, history, latency, affinity).
    -- A float is fine here: it ranks, it never pays.
    score           double precision NOT NULL,
    score_breakdown jsonb            NOT NULL DEFAULT '{}'::jsonb,
    -- GPU memory reserved on the worker by this allocation.
    gpu_count       integer          NOT NULL CHECK (gpu_count > 0),
    gpu_memory_mib  bigint           NOT NULL CHECK (gpu_memory_mib >= 0),
    allocated_at    timestamptz      NOT NULL,
    revoked_at      timestamptz,
    revoke_reason   text,
    last_event_id   uuid             NOT NULL,
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt),
    CONSTRAINT allocations_reason_needs_revocation CHECK (revoke_reason IS NULL OR revoked_at IS NOT NULL)
);

-- A worker's live allocations (what it should be running).
CREATE INDEX allocations_worker_live_idx
    ON allocations (worker_id, allocated_at)
    WHERE revoked_at IS NULL;
