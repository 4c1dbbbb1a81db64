-- The request path's tables: a counter per credential and the reservations in flight. The
-- ledger (`src/store/ledger/`) writes both in group commits; every row it touches per request
-- is one more page in a commit, so these tables carry no column or index the request path
-- does not need.

-- Hot counters apart from the credential row, so a settlement rewrites a small row. Stored in
-- the credentials' creation order (rowid = credentials.seq): round-robin picks credentials in
-- that order, so consecutive picks land on the same pages (keyed by random credential ids,
-- each commit wrote a page per request). `credential_id` stays unique for lookups.
-- A credential's `reserved` is not a column: it is the sum of its reservation rows, read with
-- them.
CREATE TABLE quotas (
    credential_seq INTEGER PRIMARY KEY,
    credential_id  TEXT NOT NULL UNIQUE REFERENCES credentials (id) ON DELETE CASCADE,
    limit_tokens   INTEGER CHECK (limit_tokens IS NULL OR limit_tokens >= 0),   -- NULL: unlimited
    used           INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    period_start   INTEGER NOT NULL,
    -- On the counter row, which every settlement updates anyway, so a settlement does not
    -- rewrite the (larger) credential row.
    last_used_at   INTEGER
);

-- One row per request or lease in flight; settling or releasing deletes it, so a settlement
-- applies once. `owner` names the process that made it: rows of a dead process are settled at
-- start. No index: the table holds only what is in flight, so a scan of it is short, while
-- each index would be one more B-tree every reservation writes and deletes. Listing
-- credentials sums reservations in one grouped scan.
CREATE TABLE reservations (
    id            TEXT PRIMARY KEY NOT NULL,
    credential_id TEXT NOT NULL REFERENCES credentials (id) ON DELETE CASCADE,
    kind          TEXT NOT NULL CHECK (kind IN ('request', 'lease')),
    tokens        INTEGER NOT NULL CHECK (tokens >= 0),
    owner         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    -- The provider it was taken for, charged in the usage history when it settles.
    provider      TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
