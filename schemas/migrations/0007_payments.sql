-- Read model of the PAYMENTS stream: accruals from completed tasks, and the settlements
-- that pay them out on TON. Every amount is an integer number of nanoton.

-- One accrual per task, enforced by the primary key: a redelivered or duplicated
-- TaskCompleted can never accrue twice.
CREATE TABLE payment_accruals (
    task_id                      uuid        PRIMARY KEY,
    worker_id                    text        NOT NULL,
    attempt                      integer     NOT NULL CHECK (attempt >= 0),
    amount_nanoton               bigint      NOT NULL CHECK (amount_nanoton >= 0),
    -- The inputs of the amount, kept so an operator can recompute it.
    gpu_millis                   bigint      NOT NULL CHECK (gpu_millis >= 0),
    price_per_gpu_second_nanoton bigint      NOT NULL CHECK (price_per_gpu_second_nanoton >= 0),
    accrued_at                   timestamptz NOT NULL,
    -- The settlement that pays it; NULL while pending. One column, so an accrual belongs
    -- to at most one settlement. No foreign key: the accrual and the settlement events
    -- sit on different partitions and may be projected in either order.
    settlement_id                uuid,
    last_event_id                uuid        NOT NULL,
    updated_at                   timestamptz NOT NULL DEFAULT now()
);

-- The settler's batching: pending accruals per worker, oldest first. Partial, because
-- settled accruals are the bulk and are never read this way.
CREATE INDEX payment_accruals_pending_idx
    ON payment_accruals (worker_id, accrued_at)
    WHERE settlement_id IS NULL;

-- Which accruals a settlement paid.
CREATE INDEX payment_accruals_settlement_idx
    ON payment_accruals (settlement_id)
    WHERE settlement_id IS NOT NULL;

-- One TON transaction from the pool wallet (wallet v5r1), carrying up to 255 transfers.
-- It is recorded as prepared (signed) before it is sent, and moves forward by status_rank:
--   rank 0: prepared   rank 1: submitted   rank 2: confirmed, expired, failed
CREATE TABLE settlements (
    settlement_id            uuid        PRIMARY KEY,
    status                   text        NOT NULL CHECK (status IN (
                                 'prepared', 'submitted', 'confirmed', 'expired', 'failed')),
    status_rank              smallint    NOT NULL GENERATED ALWAYS AS (
                                 CASE status
                                     WHEN 'prepared'  THEN 0
                                     WHEN 'submitted' THEN 1
                                     ELSE 2
                                 END) STORED,
    -- Not unique: a batch rebuilt after its predecessor expired reuses the same seqno,
    -- because the expired message never executed.
    wallet_seqno             bigint      NOT NULL CHECK (wallet_seqno >= 0),
    valid_until              timestamptz NOT NULL,
    -- Hash of the signed external message: the same message is resent until it lands.
    message_hash             text        NOT NULL,
    -- The batch this one replaces, when it was rebuilt after an expiry.
    supersedes_settlement_id uuid,
    tx_hash                  text,
    tx_lt                    bigint      CHECK (tx_lt >= 0),
    total_nanoton            bigint      NOT NULL CHECK (total_nanoton >= 0),
    payout_count             integer     NOT NULL CHECK (payout_count BETWEEN 1 AND 255),
    prepared_at              timestamptz NOT NULL,
    submitted_at             timestamptz,
    confirmed_at             timestamptz,
    failure_reason           text,
    last_event_id            uuid        NOT NULL,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT settlements_confirmed_has_tx CHECK (status <> 'confirmed' OR tx_hash IS NOT NULL)
);

-- Looking a settlement up by its on-chain transaction. Unique: one transaction confirms
-- one settlement (NULLs, not yet on chain, do not collide).
CREATE UNIQUE INDEX settlements_tx_hash_idx ON settlements (tx_hash);

-- The settler's open batches, to resend or expire.
CREATE INDEX settlements_open_idx
    ON settlements (prepared_at)
    WHERE status IN ('prepared', 'submitted');

-- One transfer of a settlement. The primary key pays a worker at most once per
-- settlement. The foreign key holds because SettlementPrepared carries the settlement
-- and its payouts together.
CREATE TABLE settlement_payouts (
    settlement_id       uuid        NOT NULL REFERENCES settlements (settlement_id) ON DELETE CASCADE,
    worker_id           text        NOT NULL,
    -- The TON address paid (non-bounceable form for fresh wallets).
    destination_address text        NOT NULL,
    -- Below the minimum an amount carries over instead of being paid, so never zero here.
    amount_nanoton      bigint      NOT NULL CHECK (amount_nanoton > 0),
    -- parked: held back for an operator (e.g. an address that cannot receive).
    status              text        NOT NULL CHECK (status IN ('pending', 'paid', 'failed', 'parked')),
    reason              text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (settlement_id, worker_id)
);

-- A worker's payout history.
CREATE INDEX settlement_payouts_worker_idx ON settlement_payouts (worker_id, status);
