-- The reservations table holds only what is in flight (settling deletes a row), so a scan of
-- it is short, while each index is one more B-tree every reservation writes and deletes: two
-- more pages in nearly every commit of the request path. Listing credentials sums
-- reservations in one grouped scan instead of a lookup per credential.
DROP INDEX reservations_credential;
DROP INDEX reservations_owner;
