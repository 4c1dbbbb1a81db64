-- Until when a credential marked `exhausted` stays so, when the provider named the date its
-- credit or quota comes back ("You will regain access on ..."). Past it the credential is
-- usable again without a reset; the mark itself stays in `state` (with its reason) and only
-- reads as exhausted while `exhausted_until` is ahead. NULL: until the next quota reset.
ALTER TABLE credentials ADD COLUMN exhausted_until INTEGER;
