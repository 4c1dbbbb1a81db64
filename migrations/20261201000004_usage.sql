-- Usage history: what every settlement charged, per credential per hour.

-- Aggregated per hour: a row per request would grow without bound. Per period,
-- used = sum(input_tokens + output_tokens + unreported_tokens) of live settlements, plus what
-- was settled from dead reservations. `unreported_tokens` are tokens charged to a request
-- without a usage report for them (a stream cut short is charged its reservation or what was
-- seen, whichever is larger). No foreign key: history outlives a deleted credential.
-- Stored in the order rows are first written (a rowid table), so the settlements of one hour
-- share pages; the key the ledger upserts by is the unique (credential_id, bucket_start).
CREATE TABLE usage_hourly (
    id                INTEGER PRIMARY KEY,
    credential_id     TEXT NOT NULL,
    provider          TEXT NOT NULL,
    bucket_start      INTEGER NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    input_tokens      INTEGER NOT NULL DEFAULT 0,
    output_tokens     INTEGER NOT NULL DEFAULT 0,
    unreported_tokens INTEGER NOT NULL DEFAULT 0,
    UNIQUE (credential_id, bucket_start)
);

-- Reading or pruning the history by time, across credentials.
CREATE INDEX usage_hourly_bucket ON usage_hourly (bucket_start);
