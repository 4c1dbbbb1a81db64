-- `last_used_at` moves to the counter row, which every settlement updates anyway, so a
-- settlement no longer rewrites the (larger) credential row.
ALTER TABLE quotas ADD COLUMN last_used_at INTEGER;
UPDATE quotas SET last_used_at = (SELECT c.last_used_at FROM credentials c WHERE c.id = quotas.credential_id);
