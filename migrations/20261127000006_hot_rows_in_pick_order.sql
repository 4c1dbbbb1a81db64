-- Page locality for the request path. Round-robin picks credentials in creation order, and
-- every settlement rewrites the picked credential's counter row and its hour of history. Keyed
-- by random credential ids, consecutive picks landed on different pages, so with thousands of
-- credentials each commit wrote a page per request. Counters are now stored in creation order
-- (rowid = credentials.seq) and history in the order rows were first written, with the old
-- keys kept as unique indexes for lookups.

DROP TRIGGER reservations_reserve;
DROP TRIGGER reservations_release;
DROP TRIGGER reservations_settle;

CREATE TABLE quotas_by_seq (
    credential_seq INTEGER PRIMARY KEY,
    credential_id  TEXT NOT NULL UNIQUE REFERENCES credentials (id) ON DELETE CASCADE,
    limit_tokens   INTEGER CHECK (limit_tokens IS NULL OR limit_tokens >= 0),
    used           INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    reserved       INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    period_start   INTEGER NOT NULL,
    last_pick      INTEGER NOT NULL DEFAULT 0,
    last_used_at   INTEGER
);
INSERT INTO quotas_by_seq (credential_seq, credential_id, limit_tokens, used, reserved,
                           period_start, last_pick, last_used_at)
SELECT c.seq, q.credential_id, q.limit_tokens, q.used, q.reserved, q.period_start,
       q.last_pick, q.last_used_at
FROM quotas q JOIN credentials c ON c.id = q.credential_id;
DROP TABLE quotas;
ALTER TABLE quotas_by_seq RENAME TO quotas;

CREATE TABLE usage_hourly_appended (
    id                INTEGER PRIMARY KEY,
    credential_id     TEXT NOT NULL,
    provider          TEXT NOT NULL,
    bucket_start      INTEGER NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    input_tokens      INTEGER NOT NULL DEFAULT 0,
    output_tokens     INTEGER NOT NULL DEFAULT 0,
    unreported_tokens INTEGER NOT NULL DEFAULT 0,
    UNIQUE (credential_id, bucket_start)
);
INSERT INTO usage_hourly_appended (credential_id, provider, bucket_start, requests,
                                   input_tokens, output_tokens, unreported_tokens)
SELECT credential_id, provider, bucket_start, requests, input_tokens, output_tokens,
       unreported_tokens
FROM usage_hourly ORDER BY bucket_start, credential_id;
DROP TABLE usage_hourly;
ALTER TABLE usage_hourly_appended RENAME TO usage_hourly;
CREATE INDEX usage_hourly_bucket ON usage_hourly (bucket_start);

CREATE TRIGGER reservations_reserve AFTER INSERT ON reservations
BEGIN
    UPDATE quotas SET reserved = reserved + NEW.tokens WHERE credential_id = NEW.credential_id;
END;

CREATE TRIGGER reservations_release AFTER DELETE ON reservations
BEGIN
    UPDATE quotas SET reserved = max(reserved - OLD.tokens, 0) WHERE credential_id = OLD.credential_id;
END;

CREATE TRIGGER reservations_settle AFTER UPDATE OF settled_at ON reservations
WHEN OLD.settled_at IS NULL AND NEW.settled_at IS NOT NULL
BEGIN
    UPDATE quotas
       SET used = used + NEW.settle_input + NEW.settle_output + NEW.settle_unreported,
           last_used_at = NEW.settled_at
     WHERE credential_id = NEW.credential_id;
    INSERT INTO usage_hourly (credential_id, provider, bucket_start, requests,
                              input_tokens, output_tokens, unreported_tokens)
    VALUES (NEW.credential_id, NEW.provider, NEW.settled_at - (NEW.settled_at % 3600), 1,
            NEW.settle_input, NEW.settle_output, NEW.settle_unreported)
    ON CONFLICT (credential_id, bucket_start) DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        unreported_tokens = unreported_tokens + excluded.unreported_tokens;
END;
