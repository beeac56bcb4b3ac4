-- Read model of the RESULTS stream (one subject per client): where each task's result is.
--
-- Only metadata: the payload stays in the stream, and `stream_sequence` lets a consumer
-- fetch it directly (a JetStream direct get) without scanning its subject.
CREATE TABLE task_results (
    task_id         uuid        NOT NULL,
    attempt         integer     NOT NULL CHECK (attempt >= 0),
    client_id       text        NOT NULL,
    worker_id       text        NOT NULL,
    stream_sequence bigint      NOT NULL CHECK (stream_sequence > 0),
    size_bytes      bigint      NOT NULL CHECK (size_bytes >= 0),
    -- Hex digest of the payload, so a consumer can check what it fetched.
    digest          text        NOT NULL,
    published_at    timestamptz NOT NULL,
    last_event_id   uuid        NOT NULL,
    -- One result per attempt: a redelivered result is the same row.
    PRIMARY KEY (task_id, attempt)
);

-- A client's results, newest first.
CREATE INDEX task_results_client_idx ON task_results (client_id, published_at DESC);
