-- Device-flow login sessions (RFC 8628): one row per `POST /v0/oauth/{provider}/start`, polled
-- in the background by the login service until it ends, and kept an hour after that so a page
-- can still read how it ended.

-- The device code (and the secret of a client registered for the login, kiro) are sealed like
-- every secret, bound to the session's id; they are wiped (set NULL) when the session ends,
-- so a finished session holds no secret. `extra` is the credential's non-secret fields to be
-- (an `OauthExtra` JSON object). Times are unix seconds; `interval_secs` is the wait between
-- polls, raised by `slow_down`; `next_poll_at` lets a restarted server resume the wait.
CREATE TABLE oauth_sessions (
    id                        TEXT PRIMARY KEY NOT NULL,
    provider                  TEXT NOT NULL,
    status                    TEXT NOT NULL DEFAULT 'pending'
                              CHECK (status IN ('pending', 'success', 'denied', 'expired', 'error')),
    device_code_sealed        BLOB,
    client_id                 TEXT,
    client_secret_sealed      BLOB,
    client_secret_expires_at  INTEGER,
    user_code                 TEXT NOT NULL,
    verification_uri          TEXT NOT NULL,
    verification_uri_complete TEXT,
    interval_secs             INTEGER NOT NULL,
    expires_at                INTEGER NOT NULL,
    next_poll_at              INTEGER NOT NULL,
    extra                     TEXT NOT NULL DEFAULT '{}',
    -- The credential a successful login stored (no foreign key: deleting the credential
    -- leaves the record of the login).
    credential_id             TEXT,
    -- Why it ended, when not `success` (the provider's words or ours; never a secret).
    message                   TEXT,
    created_at                INTEGER NOT NULL,
    updated_at                INTEGER NOT NULL,
    finished_at               INTEGER
) WITHOUT ROWID;

-- The pending sessions (resume, the limit on them, expiry) and the finished ones by age
-- (cleanup).
CREATE INDEX oauth_sessions_status ON oauth_sessions (status, finished_at);
