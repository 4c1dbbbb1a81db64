-- Fingerprint keys by generation. The highest generation is the current key; `rotate-key`
-- adds a new one and keeps the older ones, sealed under the current encryption key, only to
-- recognise the tombstones and import digests made under them: those hold keyed hashes of
-- tokens that are deleted or no longer at hand, so they cannot be recomputed under a new key.
-- The key that was in `meta` becomes generation 1, sealed as it was.
CREATE TABLE fingerprint_keys (
    generation INTEGER PRIMARY KEY,
    key_sealed BLOB NOT NULL
);

INSERT INTO fingerprint_keys (generation, key_sealed)
    SELECT 1, value FROM meta WHERE key = 'fingerprint_key';

DELETE FROM meta WHERE key = 'fingerprint_key';

-- `meta` now holds, besides:
--   database_id          16 random bytes as hex: part of the associated data of every sealed
--                        value, so a value copied from another database does not open;
--   key_check            present exactly when the database's secrets are encrypted: a known
--                        text sealed under the key, checked before anything is written;
--   token_preview_rule   set once the stored previews follow the current rule.
