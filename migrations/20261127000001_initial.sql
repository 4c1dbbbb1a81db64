-- The credential store. Times are unix seconds (UTC). Secrets are stored only as values sealed
-- by the crypto module (`*_sealed` columns), never in clear columns; `fingerprint` is a keyed
-- hash of provider and identifying secret, used to find the same credential again.

-- Per-database values, such as the sealed fingerprint key.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE credentials (
    -- rowid alias: a stable creation order for listing and the tie-break of equal priorities.
    seq                 INTEGER PRIMARY KEY,
    id                  TEXT NOT NULL UNIQUE,
    provider            TEXT NOT NULL,
    kind                TEXT NOT NULL CHECK (kind IN ('api_key', 'oauth')),
    label               TEXT,
    fingerprint         BLOB NOT NULL UNIQUE,
    token_sealed        BLOB,
    refresh_token_sealed BLOB,
    client_secret_sealed BLOB,
    token_preview       TEXT NOT NULL,
    -- Non-secret provider-specific fields (kiro: client_id, region, start_url, auth_method,
    -- client_secret_expires_at) as a JSON object.
    extra               TEXT NOT NULL DEFAULT '{}',
    priority            INTEGER NOT NULL DEFAULT 100,
    disabled            INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    -- What the provider last told us: active, or invalid / expired / exhausted with a reason.
    -- `disabled` and cooldown are separate, so the effective status is computed on read.
    state               TEXT NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'invalid', 'expired', 'exhausted')),
    state_reason        TEXT,
    expires_at          INTEGER,
    cooldown_until      INTEGER,
    last_used_at        INTEGER,
    last_refresh_at     INTEGER,
    -- Where it came from: file:<path>, api, import:api, oauth:<provider>.
    source              TEXT NOT NULL,
    -- Keyed digest of the import entry this credential was last imported from; an unchanged
    -- entry leaves the credential (and what was changed through the API) alone.
    import_digest       BLOB,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

CREATE INDEX credentials_provider_priority ON credentials (provider, priority);

-- Hot counters apart from the credential row, so a settlement rewrites a small row.
CREATE TABLE quotas (
    credential_id TEXT PRIMARY KEY NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    limit_tokens  INTEGER CHECK (limit_tokens IS NULL OR limit_tokens >= 0),   -- NULL: unlimited
    used          INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    reserved      INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    period_start  INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per request or lease in flight; settling deletes it, so a settlement applies once.
-- `owner` names the process that made it: rows of a dead process are settled at start.
CREATE TABLE reservations (
    id            TEXT PRIMARY KEY NOT NULL,
    credential_id TEXT NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    kind          TEXT NOT NULL CHECK (kind IN ('request', 'lease')),
    tokens        INTEGER NOT NULL CHECK (tokens >= 0),
    owner         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER
) WITHOUT ROWID;

CREATE INDEX reservations_credential ON reservations (credential_id);
CREATE INDEX reservations_owner ON reservations (owner);

-- Usage aggregated per credential per hour: a row per request would grow without bound.
-- No foreign key: history outlives a deleted credential.
CREATE TABLE usage_hourly (
    credential_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    bucket_start  INTEGER NOT NULL,
    requests      INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (credential_id, bucket_start)
) WITHOUT ROWID;

CREATE INDEX usage_hourly_bucket ON usage_hourly (bucket_start);

-- One row per refresh check (scheduled or manual) and one per credential it touched.
CREATE TABLE refresh_runs (
    id          INTEGER PRIMARY KEY,
    trigger     TEXT NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    checked     INTEGER NOT NULL DEFAULT 0,
    refreshed   INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE refresh_outcomes (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES refresh_runs (id) ON DELETE CASCADE,
    credential_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    at            INTEGER NOT NULL,
    ok            INTEGER NOT NULL CHECK (ok IN (0, 1)),
    error         TEXT
);

CREATE INDEX refresh_outcomes_at ON refresh_outcomes (at);

-- Credentials deleted through the API, by fingerprint, so the next import of an unchanged file
-- does not bring them back. Adding the credential again through the API removes its tombstone.
CREATE TABLE tombstones (
    fingerprint   BLOB PRIMARY KEY NOT NULL,
    provider      TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    deleted_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- Every management change: who (client address, or startup / cli), what, which credential.
-- `detail` is a JSON object of non-secret fields; never a token.
CREATE TABLE audit_log (
    id            INTEGER PRIMARY KEY,
    at            INTEGER NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    credential_id TEXT,
    provider      TEXT,
    detail        TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_log_credential ON audit_log (credential_id);
