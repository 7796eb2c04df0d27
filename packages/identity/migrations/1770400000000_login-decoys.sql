-- Up Migration

-- What a refused login of an unknown username writes, so that it does the database work a
-- refused login of a real user does. A wrong password updates the user's row (its failure
-- count) and commits; an unknown username took only a transaction id and committed, and was
-- answered about half a millisecond sooner (of about nine): enough, over many tries, to tell
-- which usernames exist. It now updates one of these rows, chosen by the typed username, after
-- the password hash, as a wrong password updates the user's row after it. (Not before: held
-- through the hash, a row shared by unknown names anyone can pick would make them wait on each
-- other where real users never do.) The counts mean nothing; no column is indexed, so the update
-- is a heap-only one like the user's.
CREATE TABLE identity.login_decoys (
  slot     smallint PRIMARY KEY CHECK (slot BETWEEN 0 AND 63),
  refusals bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);
INSERT INTO identity.login_decoys (slot) SELECT generate_series(0, 63);

-- Down Migration
DROP TABLE identity.login_decoys;
