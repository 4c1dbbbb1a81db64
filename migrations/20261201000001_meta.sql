-- The schema of the credential store, one migration per group of tables.
--
-- A migration that has landed on main is never edited or dropped: a database records the
-- version and checksum of every migration it ran, and refuses to start when one it ran has
-- changed or is missing. Every change to the schema is a new migration after the last one.
--
-- Times are unix seconds (UTC). Secrets are stored only as values sealed by the crypto module
-- (`*_sealed` columns and `fingerprint_keys`), never in clear columns.

-- Per-database values, one row each:
--   database_id          16 random bytes as hex: part of the associated data of every sealed
--                        value, so a value copied from another database does not open;
--   key_check            present exactly when the database's secrets are encrypted: a known
--                        text sealed under the key, checked before anything is written;
--   token_preview_rule   set once the stored previews follow the current rule.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- The keys of the keyed hashes (credential fingerprints, tombstones, import digests), by
-- generation. The highest generation is the current key; `rotate-key` adds a new one and keeps
-- the older ones, sealed under the current encryption key, only to recognise the tombstones
-- and import digests made under them: those hold keyed hashes of tokens that are deleted or no
-- longer at hand, so they cannot be recomputed under a new key.
CREATE TABLE fingerprint_keys (
    generation INTEGER PRIMARY KEY,
    key_sealed BLOB NOT NULL
);
