-- `reserved` is the sum of a credential's reservation rows, read with them, no longer a
-- column kept in step by triggers: each request saves two row updates (on reserve and on
-- settle or release). The column stays, at 0, unused.
DROP TRIGGER reservations_reserve;
DROP TRIGGER reservations_release;
UPDATE quotas SET reserved = 0;
