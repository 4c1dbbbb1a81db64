-- Credentials, and the tombstones of those deleted through the API.

-- One row per credential. `fingerprint` is a keyed hash of the provider and the identifying
-- secret (the token, or the refresh token of an OAuth credential), used to find the same
-- credential again: an import matches its entries by it, and it is unique, so one credential
-- is stored once whatever its sources. The counters live apart, in `quotas`.
CREATE TABLE credentials (
    -- rowid alias: a stable creation order for listing, round-robin and the tie-break of equal
    -- priorities; `quotas` is stored in this order too.
    seq                  INTEGER PRIMARY KEY,
    id                   TEXT NOT NULL UNIQUE,
    provider             TEXT NOT NULL,
    kind                 TEXT NOT NULL CHECK (kind IN ('api_key', 'oauth')),
    label                TEXT,
    fingerprint          BLOB NOT NULL UNIQUE,
    token_sealed         BLOB,
    refresh_token_sealed BLOB,
    client_secret_sealed BLOB,
    token_preview        TEXT NOT NULL,
    -- Non-secret provider-specific fields (kiro: client_id, region, start_url, auth_method,
    -- client_secret_expires_at) as a JSON object.
    extra                TEXT NOT NULL DEFAULT '{}',
    priority             INTEGER NOT NULL DEFAULT 100,
    disabled             INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    -- What the provider last told us: active, or invalid / expired / exhausted with a reason.
    -- `disabled` and the cooldown are separate, so the effective status is computed on read.
    state                TEXT NOT NULL DEFAULT 'active'
                         CHECK (state IN ('active', 'invalid', 'expired', 'exhausted')),
    state_reason         TEXT,
    -- When the access token of an OAuth credential expires.
    expires_at           INTEGER,
    -- Not selected before this time (a rate limit or a wait the provider named).
    cooldown_until       INTEGER,
    -- Until when a credential marked `exhausted` stays so, when the provider named the date its
    -- credit or quota comes back ("You will regain access on ..."). Past it the credential is
    -- usable again without a reset; the mark itself stays in `state` (with its reason) and only
    -- reads as exhausted while `exhausted_until` is ahead. NULL: until the next quota reset.
    exhausted_until      INTEGER,
    last_refresh_at      INTEGER,
    -- Where it came from: file:<path>, api, import:api, oauth:<provider>.
    source               TEXT NOT NULL,
    -- Keyed digest of the import entry this credential was last imported from; an unchanged
    -- entry leaves the credential (and what was changed through the API) alone.
    import_digest        BLOB,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);

-- Listing and selecting one provider's credentials in priority order.
CREATE INDEX credentials_provider_priority ON credentials (provider, priority);

-- Credentials deleted through the API, by fingerprint, so the next import of an unchanged file
-- does not bring them back. Adding the credential again through the API (or the import
-- endpoint) removes its tombstone.
CREATE TABLE tombstones (
    fingerprint   BLOB PRIMARY KEY NOT NULL,
    provider      TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    deleted_at    INTEGER NOT NULL
) WITHOUT ROWID;
