-- The initial schema. `{serial}` becomes an auto-incrementing primary key on each backend.
-- Timestamps are milliseconds since the Unix epoch (BIGINT); JSON documents are TEXT;
-- flags are BIGINT 0/1 so the same statements run on SQLite and PostgreSQL.

CREATE TABLE partitions (id TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE sizes (id TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE layouts (id TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE projects (id TEXT PRIMARY KEY, body TEXT NOT NULL, created_ms BIGINT NOT NULL);

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    expires_ms BIGINT,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX images_by_name ON images (name);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    project TEXT,
    partition TEXT,
    machine TEXT,
    allocation TEXT,
    description TEXT NOT NULL,
    expires_ms BIGINT,
    created_ms BIGINT NOT NULL
);
CREATE INDEX tokens_by_machine ON tokens (machine);

CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    partition TEXT,
    size TEXT NOT NULL,
    inventory TEXT,
    state TEXT,
    crash_count BIGINT NOT NULL DEFAULT 0,
    crash_loop BIGINT NOT NULL DEFAULT 0,
    reclaiming BIGINT NOT NULL DEFAULT 0,
    reclaim_ms BIGINT,
    failed_reclaim BIGINT NOT NULL DEFAULT 0,
    last_seen_ms BIGINT,
    allocation TEXT,
    boot TEXT,
    wipe TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX machines_for_pick ON machines (partition, size, state);

CREATE TABLE machine_macs (mac TEXT PRIMARY KEY, machine TEXT NOT NULL);

CREATE TABLE allocations (
    id TEXT PRIMARY KEY,
    machine TEXT NOT NULL,
    project TEXT NOT NULL,
    body TEXT NOT NULL,
    idempotency_key TEXT,
    created_ms BIGINT NOT NULL,
    phoned_home_ms BIGINT,
    freed_ms BIGINT
);
CREATE UNIQUE INDEX allocations_idempotency ON allocations (project, idempotency_key);
-- The last line of defence against two allocations of one machine.
CREATE UNIQUE INDEX allocations_one_active_per_machine ON allocations (machine) WHERE freed_ms IS NULL;

CREATE TABLE events (
    seq {serial},
    machine TEXT NOT NULL,
    event TEXT NOT NULL,
    message TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    unexpected BIGINT NOT NULL
);
CREATE INDEX events_by_machine ON events (machine, seq);
