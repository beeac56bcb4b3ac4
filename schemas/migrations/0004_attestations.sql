-- Read model of the ATTESTATIONS stream: TDX quotes submitted by workers and the
-- attestor's verdicts on them.

-- status_rank is generated, as on tasks: a verdict (rank 1) is never overwritten by a
-- redelivered or late submission (rank 0).
CREATE TABLE attestations (
    attestation_id uuid        PRIMARY KEY,
    worker_id      text        NOT NULL,
    -- Hex digest of the quote: the attestor's verdict cache key.
    quote_hash     text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('submitted', 'verified', 'rejected')),
    status_rank    smallint    NOT NULL GENERATED ALWAYS AS (
                       CASE status WHEN 'submitted' THEN 0 ELSE 1 END) STORED,
    -- From the verdict (dcap-qvl): TCB status, the TD measurements (MRTD, RTMRs, ...),
    -- and how long the verdict holds.
    tcb_status     text,
    measurements   jsonb,
    valid_until    timestamptz,
    -- Why it was rejected.
    reason         text,
    submitted_at   timestamptz NOT NULL,
    decided_at     timestamptz,
    last_event_id  uuid        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- A verified worker is trusted only until valid_until: it must be known.
    CONSTRAINT attestations_verified_has_expiry CHECK (status <> 'verified' OR valid_until IS NOT NULL)
);

-- A worker's attestation history, newest first (its current standing).
CREATE INDEX attestations_worker_idx ON attestations (worker_id, submitted_at DESC);

-- The same quote seen again.
CREATE INDEX attestations_quote_hash_idx ON attestations (quote_hash);
