-- Who reported an event (agent, pixie, phone_home, api) and whether it changed the machine's
-- state: pixie's PXE sightings of a machine whose metal-hammer is alive are kept but ignored.
ALTER TABLE events ADD COLUMN source TEXT NOT NULL DEFAULT 'agent';
ALTER TABLE events ADD COLUMN ignored BIGINT NOT NULL DEFAULT 0;
-- Phone-home tokens are deleted with their allocation.
CREATE INDEX tokens_by_allocation ON tokens (allocation);
