-- The ledger now charges a settlement with its own statements (counter, then the hour's
-- history) and deletes the reservation, rather than writing the usage into the reservation
-- row for a trigger to charge: one row write fewer per request, and no statement journal.
-- The reservation's settle_* columns stay, unused, as migrations never rewrite tables.
DROP TRIGGER reservations_settle;
