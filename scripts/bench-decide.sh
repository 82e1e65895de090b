#!/usr/bin/env bash
# The API's boot decision alone: `POST /v1/boot/decide` as pixie sends it, against a release
# metal-api on 127.0.0.1 (loopback only), wrk with 64 connections, 10 s per point.
#
#   scripts/bench-decide.sh [METAL_API_BINARY]     (default: target/release/metal-api)
#
# Points: SQLite (a fresh file) and, when METAL_TEST_POSTGRES_URL is set (run it through
# api/scripts/with-postgres), PostgreSQL with a fresh database. Two requests, both answered with
# "boot metal-hammer" and an enrolment token: an unknown MAC, and the MAC of a registered (not
# allocated) machine. Pixie authenticates with a pixie token. Prints Markdown rows.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
API=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/metal-api}
[ -x "$API" ] || { echo "build first: cargo build --release -p metal-api" >&2; exit 1; }
command -v wrk >/dev/null || { echo "needs wrk" >&2; exit 1; }
PORT=${PORT:-18480}
BASE=http://127.0.0.1:$PORT
ADMIN=adm_bench_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n")
KNOWN_UUID=6b1c2a4e-0000-4000-8000-00000000be02
W=$(mktemp -d /tmp/bench-decide.XXXXXX)
API_PID=
PG_DB=
cleanup() {
    if [ -n "$API_PID" ]; then kill "$API_PID" 2>/dev/null || true; wait "$API_PID" 2>/dev/null || true; fi
    if [ -n "$PG_DB" ]; then psql "$METAL_TEST_POSTGRES_URL" -qAtc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1 || true; fi
    rm -rf "$W"
}
trap cleanup EXIT

call() { # method path token [body]
    curl -sf -X "$1" -H "authorization: Bearer $3" -H 'content-type: application/json' ${4:+--data "$4"} "$BASE$2"
}

start_api() { # db url
    RUST_LOG=warn "$API" --listen "127.0.0.1:$PORT" --admin-token "$ADMIN" --db "$1" --dead-after-s 3600 > "$W/api.log" 2>&1 &
    API_PID=$!
    local i
    for i in $(seq 1 100); do curl -sf "$BASE/healthz" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "metal-api did not start:" >&2; cat "$W/api.log" >&2; exit 1
}
stop_api() { kill "$API_PID"; wait "$API_PID" 2>/dev/null || true; API_PID=; }

catalog() { # → the pixie token on stdout; registers one allocated, phoned-home machine
    call POST /v1/partitions "$ADMIN" '{"id":"lab","boot":{"kernel_url":"http://127.0.0.1:9/k","initrd_url":"http://127.0.0.1:9/i","api_url":"'"$BASE"'"}}' >/dev/null
    call POST /v1/sizes "$ADMIN" '{"id":"small","constraints":[]}' >/dev/null
    call POST /v1/tokens "$ADMIN" '{"role":"pixie","description":"bench"}' | sed 's/.*"token":"\([^"]*\)".*/\1/'
}

lua() { # mac → wrk script that POSTs a boot request for that MAC
cat > "$W/decide.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"partition":"lab","mac":"$1","arch":"bios_x86"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $PIXIE"
EOF
}

rps() { # label mac
    lua "$2"
    local first
    first=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "authorization: Bearer $PIXIE" -H 'content-type: application/json' \
        --data "{\"partition\":\"lab\",\"mac\":\"$2\",\"arch\":\"bios_x86\"}" "$BASE/v1/boot/decide")
    [ "$first" = 200 ] || { echo "decide answered $first" >&2; cat "$W/api.log" >&2; exit 1; }
    local out
    out=$(wrk -t2 -c64 -d10s -s "$W/decide.lua" "$BASE/v1/boot/decide" 2>&1)
    local r lat non2xx
    r=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    lat=$(awk '/^    Latency/ {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "| $STORE | $1 | $r req/s | $lat | ${non2xx:-0} | $(cut -d' ' -f1-3 /proc/loadavg) |"
}

run_store() { # label db-url
    STORE=$1
    start_api "$2"
    PIXIE=$(catalog)
    # One registered machine (the admin token may register), found by its MAC.
    call POST /v1/agent/register "$ADMIN" '{"partition":"lab","inventory":{"uuid":"'"$KNOWN_UUID"'","cpus":[{"model":"x","cores":2,"threads":2}],
        "memory_bytes":2147483648,"disks":[{"name":"vda","size_bytes":8589934592,"rotational":false,"logical_sector_size":512,"physical_sector_size":512}],
        "nics":[{"name":"eth0","mac":"52:54:00:be:00:02","carrier":true}],
        "dmi":{"sys_vendor":"","product_name":"","product_serial":"","board_vendor":"","board_name":"","bios_vendor":"","bios_version":"","bios_date":""}}}' >/dev/null
    rps "unknown MAC" "52:54:00:be:00:01"
    rps "registered machine, by MAC" "52:54:00:be:00:02"
    stop_api
}

echo "# bench-decide $(date -u +%FT%TZ) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $("$API" --version 2>/dev/null || basename "$API")"
echo "| store | request | rate | mean latency | non-2xx | load (1/5/15 min) |"
echo "|---|---|---|---|---|---|"
run_store SQLite "sqlite://$W/metal.db"
if [ -n "${METAL_TEST_POSTGRES_URL:-}" ]; then
    PG_DB=metal_bench_decide_$$
    psql "$METAL_TEST_POSTGRES_URL" -qAtc "CREATE DATABASE $PG_DB" >/dev/null
    run_store "PostgreSQL 15" "${METAL_TEST_POSTGRES_URL%/*}/$PG_DB"
fi
