-- Read model of the WORKERS stream: registrations, heartbeats and GPU telemetry.

CREATE TABLE workers (
    worker_id                    text        PRIMARY KEY,
    status                       text        NOT NULL CHECK (status IN (
                                     'active', 'draining', 'deregistered', 'lost')),
    region                       text        NOT NULL,
    -- The worker's rate in nanoton per GPU-second (integer money).
    price_per_gpu_second_nanoton bigint      NOT NULL CHECK (price_per_gpu_second_nanoton >= 0),
    -- TON address payouts go to, as the worker registered it.
    payout_address               text        NOT NULL,
    max_concurrent               integer     NOT NULL CHECK (max_concurrent > 0),
    -- As the agent reports it in its heartbeat: one source, so it never goes negative
    -- whatever order other streams are projected in.
    running_tasks                integer     NOT NULL DEFAULT 0 CHECK (running_tasks >= 0),
    -- Whether the newest attestation verdict verified, and until when. The verdict comes
    -- from ATTESTATIONS, so whichever projection writes second fills these in; a reader
    -- still checks `attestation_valid_until > now()`, since `attested` does not expire itself.
    attested                     boolean     NOT NULL DEFAULT false,
    attestation_valid_until      timestamptz,
    registered_at                timestamptz NOT NULL,
    last_heartbeat_at            timestamptz,
    -- UUIDv7 of the newest event applied.
    last_event_id                uuid        NOT NULL,
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workers_attested_has_expiry CHECK (NOT attested OR attestation_valid_until IS NOT NULL)
);

-- Pool views and the active-worker count.
CREATE INDEX workers_status_idx ON workers (status);

-- Newest telemetry per GPU, overwritten by each heartbeat (history lives in the stream).
-- No foreign key to workers: telemetry must land even if it is projected before the
-- registration, so that projection order never turns into an error.
CREATE TABLE worker_gpus (
    worker_id        text        NOT NULL,
    gpu_index        smallint    NOT NULL CHECK (gpu_index >= 0),
    gpu_uuid         text        NOT NULL,
    name             text        NOT NULL,
    memory_total_mib bigint      NOT NULL CHECK (memory_total_mib >= 0),
    memory_used_mib  bigint      NOT NULL CHECK (memory_used_mib >= 0),
    utilization_pct  smallint    NOT NULL CHECK (utilization_pct BETWEEN 0 AND 100),
    temperature_c    smallint,
    power_mw         bigint      CHECK (power_mw >= 0),
    -- Simulated GPUs (run without NVML, on request) are labelled as such everywhere.
    simulated        boolean     NOT NULL DEFAULT false,
    telemetry_at     timestamptz NOT NULL,
    PRIMARY KEY (worker_id, gpu_index)
);
