-- The OAuth refresh job's record: one row per refresh check (scheduled or manual) and one per
-- credential it touched.

CREATE TABLE refresh_runs (
    id          INTEGER PRIMARY KEY,
    trigger     TEXT NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    checked     INTEGER NOT NULL DEFAULT 0,
    refreshed   INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);

-- No foreign key to `credentials`: the record outlives a deleted credential.
CREATE TABLE refresh_outcomes (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES refresh_runs (id) ON DELETE CASCADE,
    credential_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    at            INTEGER NOT NULL,
    ok            INTEGER NOT NULL CHECK (ok IN (0, 1)),
    error         TEXT
);

-- Reading or pruning the outcomes by time.
CREATE INDEX refresh_outcomes_at ON refresh_outcomes (at);
