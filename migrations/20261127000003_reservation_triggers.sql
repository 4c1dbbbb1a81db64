-- Reserved tokens follow the reservation rows: inserting a reservation adds its tokens to the
-- credential's `reserved`, deleting it (settled, released, or cascaded) takes them away. The
-- request path writes reservations in batches; the triggers keep `reserved` exact for every
-- row of a batch within the same statement.
CREATE TRIGGER reservations_reserve AFTER INSERT ON reservations
BEGIN
    UPDATE quotas SET reserved = reserved + NEW.tokens WHERE credential_id = NEW.credential_id;
END;

CREATE TRIGGER reservations_release AFTER DELETE ON reservations
BEGIN
    UPDATE quotas SET reserved = max(reserved - OLD.tokens, 0) WHERE credential_id = OLD.credential_id;
END;
