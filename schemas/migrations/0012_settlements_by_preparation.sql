-- The HTTP API lists settlements newest first, keyset-paginated by (prepared_at, settlement_id):
-- without this index every page sorts the whole table. Settlements are written rarely (one per
-- batch of up to 255 payouts), so the index costs the projector next to nothing.
CREATE INDEX settlements_prepared_idx ON settlements (prepared_at, settlement_id);
