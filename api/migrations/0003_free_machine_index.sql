-- The pick's pre-filter reads only free, waiting machines, newest heartbeat first; without this
-- index every allocation scans all allocated-but-still-Waiting machines.
CREATE INDEX machines_free ON machines (partition, size, last_seen_ms) WHERE state = 'Waiting' AND allocation IS NULL AND crash_loop = 0;
