-- The audit log: every management change, written in the same transaction as the change.

-- Who (client address, or startup / cli), what, which credential. `detail` is a JSON object of
-- non-secret fields; never a token. No foreign key: the record outlives a deleted credential.
CREATE TABLE audit_log (
    id            INTEGER PRIMARY KEY,
    at            INTEGER NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    credential_id TEXT,
    provider      TEXT,
    detail        TEXT NOT NULL DEFAULT '{}'
);

-- A credential's history of changes.
CREATE INDEX audit_log_credential ON audit_log (credential_id);
