-- Secrets every replica must agree on, e.g. the HMAC key of enrolment tokens. The first API that
-- needs one inserts a random value (INSERT … ON CONFLICT DO NOTHING) and every API reads back
-- whatever row won. Deleting a row rotates that secret: the APIs create a new one.
CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL, created_ms BIGINT NOT NULL);
