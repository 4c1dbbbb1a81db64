-- The quota limit a provider's new credentials take when they name none, as set through the
-- management API (`PUT .../quota` without `id`). A row wins over `auth.quota.default_limit` in
-- the config, so a change made live survives restarts; a row whose `limit_tokens` is NULL says
-- "unlimited" and wins too. A provider without a row takes the config's value.
CREATE TABLE provider_defaults (
    provider     TEXT PRIMARY KEY NOT NULL,
    limit_tokens INTEGER CHECK (limit_tokens IS NULL OR limit_tokens >= 0),   -- NULL: unlimited
    updated_at   INTEGER NOT NULL
) WITHOUT ROWID;
