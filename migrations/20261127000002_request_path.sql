-- The request path: selection order and usage charged without a report.

-- A global, increasing pick number per counter: round-robin picks the least recently picked.
ALTER TABLE quotas ADD COLUMN last_pick INTEGER NOT NULL DEFAULT 0;

-- Tokens charged to a request without a usage report for them (a stream cut short is charged
-- its reservation or what was seen, whichever is larger), so that per period
-- used = sum(input_tokens + output_tokens + unreported_tokens) of live settlements.
ALTER TABLE usage_hourly ADD COLUMN unreported_tokens INTEGER NOT NULL DEFAULT 0;

-- What a lease was taken for and when it was reported, for the lease API.
ALTER TABLE reservations ADD COLUMN provider TEXT NOT NULL DEFAULT '';
