-- The token refresh worker's tables: its history made fit for the worker that writes it, the
-- claim that keeps a credential to one refresh at a time, and when to refresh a token that has
-- not expired yet.

-- No code ever wrote `refresh_runs` or `refresh_outcomes` (migration 5 only created them), so
-- they are made again rather than altered: a run may now be started by a 401 on a proxied
-- request too, and an outcome carries its run's trigger so the latest outcomes read without a
-- join.
DROP TABLE refresh_outcomes;
DROP TABLE refresh_runs;

-- One row per refresh check: the worker's every `check_interval` (schedule), a
-- `POST .../{provider}/refresh` (manual), or a provider's 401 to a proxied request (request).
CREATE TABLE refresh_runs (
    id          INTEGER PRIMARY KEY,
    trigger     TEXT NOT NULL CHECK (trigger IN ('schedule', 'manual', 'request')),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    checked     INTEGER NOT NULL DEFAULT 0,
    refreshed   INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);

-- The latest run of a trigger (the status's last scheduled check), and pruning by start.
CREATE INDEX refresh_runs_trigger_started ON refresh_runs (trigger, started_at);
CREATE INDEX refresh_runs_started ON refresh_runs (started_at);

-- One row per credential a run tried. No foreign key to `credentials`: the record outlives a
-- deleted credential. The latest outcomes are the highest ids (the rowid, no index needed).
CREATE TABLE refresh_outcomes (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES refresh_runs (id) ON DELETE CASCADE,
    credential_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    trigger       TEXT NOT NULL CHECK (trigger IN ('schedule', 'manual', 'request')),
    at            INTEGER NOT NULL,
    ok            INTEGER NOT NULL CHECK (ok IN (0, 1)),
    -- The provider's or the network's words, at most 300 characters; never a secret.
    error         TEXT
);

-- Pruning the outcomes by time, and deleting a run's outcomes with it (the cascade).
CREATE INDEX refresh_outcomes_at ON refresh_outcomes (at);
CREATE INDEX refresh_outcomes_run ON refresh_outcomes (run_id);

-- One refresh per credential at a time, across processes (a PostgreSQL backend shares this
-- table between instances): the worker, a manual refresh and a 401-triggered refresh that
-- meet on a credential make one call to its token endpoint. `owner` is the claiming process's
-- name (the one its reservations carry); a claim past `until` (its holder died or hung) may be
-- taken over. No transaction is held across the token call: the claim is what is held.
CREATE TABLE refresh_claims (
    credential_id TEXT PRIMARY KEY NOT NULL,
    owner         TEXT NOT NULL,
    until         INTEGER NOT NULL
) WITHOUT ROWID;

-- When to refresh even though the access token has not expired (copilot's `refresh_in`);
-- NULL: only by expiry. Cleared when the tokens are replaced through the API or an import.
ALTER TABLE credentials ADD COLUMN refresh_after INTEGER;

-- The worker's scan of one provider's refreshable credentials, whatever the other credentials.
CREATE INDEX credentials_refreshable ON credentials (provider, expires_at)
    WHERE kind = 'oauth' AND refresh_token_sealed IS NOT NULL;
