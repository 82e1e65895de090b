#!/usr/bin/env bash
# Allocation throughput and latency of metal-api: 10,000 waiting machines, 64 concurrent clients,
# on SQLite (both sync modes) and on PostgreSQL with two replicas; double allocations counted.
set -euo pipefail
cd "$(dirname "$0")/.."
exec api/scripts/with-postgres cargo bench -p metal-api --bench allocate
