-- Settling a reservation in one statement: the request path writes what was used into the
-- reservation row (`settled_at` last), and this trigger charges it to the counter and the
-- hour's usage history. The row is deleted right after, in the same transaction.
ALTER TABLE reservations ADD COLUMN settle_input INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD COLUMN settle_output INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD COLUMN settle_unreported INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD COLUMN settled_at INTEGER;

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
