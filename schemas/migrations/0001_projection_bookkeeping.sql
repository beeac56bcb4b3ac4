-- Bookkeeping shared by every projection: where each one has got to, and what it could not apply.
--
-- Names are never schema-qualified in these migrations: a rebuild runs the same SQL with
-- `search_path` pointing at a shadow schema, then swaps it in.

-- One row per (projection, stream, partition). The projector advances it in the same
-- transaction as the read-model rows it writes, so a frame at or below `last_sequence`
-- was already applied and is skipped on redelivery: this row is what makes projection
-- exactly once.
-- `partition` is the last subject token of a partitioned stream (`<stream>.<partition>`).
-- A stream consumed whole (the worker- or client-addressed ones) uses partition 0.
CREATE TABLE projection_checkpoints (
    projection    text        NOT NULL,
    stream        text        NOT NULL,
    partition     integer     NOT NULL CHECK (partition >= 0),
    -- JetStream stream sequence of the last frame applied; 0 means nothing yet.
    last_sequence bigint      NOT NULL CHECK (last_sequence >= 0),
    -- Occurrence time of the newest event applied, for lag dashboards.
    last_event_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, stream, partition)
);

-- A frame that could not be decoded or applied. The projection records it here, in the
-- same transaction as its checkpoint, and keeps going; an operator inspects and replays it.
CREATE TABLE dead_letters (
    id              bigserial   PRIMARY KEY,
    projection      text        NOT NULL,
    stream          text        NOT NULL,
    subject         text        NOT NULL,
    stream_sequence bigint      NOT NULL CHECK (stream_sequence > 0),
    -- Human-readable cause, and the typed error's kind (decode, unknown_event, oversized,
    -- apply, ...) so operators can group them.
    reason          text        NOT NULL,
    error_kind      text        NOT NULL,
    -- The frame exactly as it came off the wire, so a replay sees the same bytes.
    payload         bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    received_at     timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz,
    -- Redelivery of the same frame must not record it twice.
    UNIQUE (projection, stream, stream_sequence)
);

-- The operator's view: what is still waiting for a replay, per projection, oldest first.
CREATE INDEX dead_letters_pending_idx
    ON dead_letters (projection, received_at)
    WHERE replayed_at IS NULL;
