#!/usr/bin/env bash
# Benchmarks pixie against its peers on this machine, in network namespaces this script creates
# (removed on exit): DHCP (perfdhcp: pixie vs Kea memfile vs dnsmasq), TFTP (atftp: pixie vs
# tftpd-hpa vs dnsmasq, blksize 1468, and pixie with windowsize) and HTTP (wrk: pixie vs nginx for
# the initrd; iPXE scripts from pixie with the real metal-api deciding, decision cache off and on).
#
#   sudo scripts/bench-pixie.sh [dhcp|tftp|http|all]     (default: all)
#
# Needs root, a release build (cargo build --release -p pixie -p metal-api) and the Debian
# packages kea-admin (perfdhcp), kea-dhcp4-server, dnsmasq-base, tftpd-hpa, atftp, nginx, wrk.
# Results go to stdout as markdown table rows; docs/BENCHMARKS.md has a recorded run.
set -euo pipefail

WHAT=${1:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PIXIE=$TARGET/release/pixie
API=$TARGET/release/metal-api
[ -x "$PIXIE" ] || { echo "build first: cargo build --release -p pixie" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }

S=pbs$$; C=pbc$$
W=$(mktemp -d /tmp/bench-pixie.XXXXXX)
# Every process this script starts lives in one of its two namespaces: stopping means killing
# what `ip netns pids` lists there (a background `ip netns exec` is not the server's pid).
killns() { local p; for p in $(ip netns pids "$1" 2>/dev/null); do kill "$p" 2>/dev/null || true; done; }
cleanup() {
    killns "$S"; killns "$C"
    sleep 0.5
    ip netns del "$S" 2>/dev/null || true
    ip netns del "$C" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

ip netns add "$S"; ip netns add "$C"
ip -n "$S" link set lo up; ip -n "$C" link set lo up
ip link add "bv$$" type veth peer name "bp$$"
ip link set "bv$$" netns "$S" name vs
ip link set "bp$$" netns "$C" name vc
ip -n "$S" addr add 10.99.0.1/16 dev vs
ip -n "$C" addr add 10.99.0.2/16 dev vc
ip -n "$S" link set vs up; ip -n "$C" link set vc up
ns() { ip netns exec "$S" "$@"; }
nc() { ip netns exec "$C" "$@"; }

start() { # name, command...: starts in the server namespace
    local name=$1; shift
    ip netns exec "$S" "$@" > "$W/$name.log" 2>&1 &
    sleep 1
    kill -0 $! 2>/dev/null || { echo "$name did not start:" >&2; cat "$W/$name.log" >&2; exit 1; }
}
killns_pixie() { # only pixie (the API and nginx keep running)
    local p i
    for p in $(ip netns pids "$S" 2>/dev/null); do
        if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = pixie ]; then kill "$p" 2>/dev/null || true; fi
    done
    for i in $(seq 1 50); do
        p=$(for p in $(ip netns pids "$S" 2>/dev/null); do cat "/proc/$p/comm" 2>/dev/null; done | grep -cx pixie || true)
        [ "$p" = 0 ] && return; sleep 0.1
    done
}
stop() { # everything in the server namespace
    killns "$S"
    local i
    for i in $(seq 1 50); do [ -z "$(ip netns pids "$S")" ] && break; sleep 0.1; done
    wait 2>/dev/null || true
}

echo "# bench-pixie $(date -u +%FT%TZ) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

pixie_conf() { # extra lines for [tftp], extra lines for [http]
cat > "$W/pixie.toml" <<EOF
partition = "lab"
[api]
url = "http://10.99.0.1:8080"
token = "adm_bench_7d41c9e02fa35b8e6c19d4a7f0b3e528"
[dhcp]
mode = "server"
interface = "vs"
server_ip = "10.99.0.1"
lease_file = "$W/pixie-leases.json"
[dhcp.pool]
subnet = "10.99.0.0/16"
start = "10.99.1.0"
end = "10.99.255.254"
router = "10.99.0.1"
lease_time_s = 3600
[tftp]
listen = "10.99.0.1:69"
root = "$W/files"
$1
[http]
listen = "10.99.0.1:8081"
public_url = "http://10.99.0.1:8081"
hammer_dir = "$W/files"
${2:-}
EOF
}
mkdir -p "$W/files"

# ------------------------------------------------------------------------------------------
# DHCP: highest perfdhcp rate (full DORA, 50,000 clients, 10 s) with under 0.1% drops.
# perfdhcp acts as a relay (giaddr 10.99.0.2), so every server answers by unicast.
# ------------------------------------------------------------------------------------------
perf_rate() { # rate → "achieved drops%" (worst of the two exchanges)
    nc perfdhcp -4 -l 10.99.0.2 -r "$1" -R 50000 -p 10 10.99.0.1 2>&1 | awk '
        /^Rate:/ {rate=$2}
        /drops ratio:/ {d=$3+0; if (d>worst) worst=d}
        END {printf "%s %s\n", rate, worst+0}'
}
rcvbuf_errors() { # namespace → UDP datagrams its sockets dropped for a full receive buffer
    ip netns exec "$1" awk '/^Udp:/ {n++; if (n==1) for (i=1;i<=NF;i++) col[$i]=i; else print $col["RcvbufErrors"]}' /proc/net/snmp
}
dhcp_sweep() { # name, start-fn: every rate, fresh server and lease file each time
    local name=$1 best="none"
    for r in ${DHCP_RATES:-2000 5000 10000 15000}; do
        rm -f "$W"/pixie-leases.json "$W"/kea-leases.csv "$W"/dnsmasq.leases
        $2
        # Who lost the packets perfdhcp counts as dropped: the server's socket or perfdhcp's own.
        local s0 c0; s0=$(rcvbuf_errors "$S"); c0=$(rcvbuf_errors "$C")
        read -r got drops < <(perf_rate "$r")
        local sd=$(( $(rcvbuf_errors "$S") - s0 )) cd=$(( $(rcvbuf_errors "$C") - c0 ))
        stop
        echo "| DHCP DORA, 50k clients, offered $r/s | $name | $got/s, drops $drops% (receive-buffer overflows: server $sd, perfdhcp $cd) |"
        if awk -v d="$drops" 'BEGIN{exit !(d < 0.1)}'; then best=$r; fi
    done
    echo "| DHCP highest offered rate with <0.1% drops | $name | $best |"
}
start_pixie_dhcp() { pixie_conf ""; RUST_LOG=warn start pixie "$PIXIE" --config "$W/pixie.toml"; }
start_kea() {
cat > "$W/kea.json" <<EOF
{ "Dhcp4": {
  "interfaces-config": { "interfaces": ["vs"], "dhcp-socket-type": "udp" },
  "lease-database": { "type": "memfile", "persist": true, "name": "$W/kea-leases.csv", "lfc-interval": 0 },
  "control-socket": { "socket-type": "unix", "socket-name": "$W/kea.sock" },
  "valid-lifetime": 3600,
  "subnet4": [ { "id": 1, "subnet": "10.99.0.0/16", "pools": [ { "pool": "10.99.1.0 - 10.99.255.254" } ],
                 "option-data": [ { "name": "routers", "data": "10.99.0.1" } ] } ],
  "loggers": [ { "name": "kea-dhcp4", "severity": "WARN", "output_options": [ { "output": "$W/kea.out" } ] } ]
} }
EOF
    KEA_PIDFILE_DIR=$W KEA_LOCKFILE_DIR=$W start kea kea-dhcp4 -c "$W/kea.json"
}
start_dnsmasq_dhcp() {
    start dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface=vs --bind-interfaces \
        --dhcp-range=10.99.1.0,10.99.255.254,255.255.0.0,1h --dhcp-lease-max=100000 --no-ping \
        --dhcp-leasefile="$W/dnsmasq.leases" --pid-file="$W/dnsmasq.pid"
}

# ------------------------------------------------------------------------------------------
# TFTP: atftp, blksize 1468; checksums verified.
# ------------------------------------------------------------------------------------------
tftp_run() { # file, clients, extra atftp options → MB/s
    local file=$1 n=$2; shift 2
    local want; want=$(sha256sum "$W/files/$file" | cut -d' ' -f1)
    local t0 t1
    t0=$(date +%s.%N)
    for i in $(seq 1 "$n"); do
        nc atftp --get -r "$file" -l "$W/out.$i" --option "blksize 1468" "$@" 10.99.0.1 >/dev/null 2>&1 &
    done
    wait $(jobs -p | tail -n "$n") || true
    t1=$(date +%s.%N)
    for i in $(seq 1 "$n"); do
        [ "$(sha256sum "$W/out.$i" 2>/dev/null | cut -d' ' -f1)" = "$want" ] || { echo "CHECKSUM MISMATCH $file client $i" >&2; echo "fail"; return; }
    done
    rm -f "$W"/out.*
    awk -v b="$(stat -c %s "$W/files/$file")" -v n="$n" -v t="$(echo "$t1 - $t0" | bc)" 'BEGIN{printf "%.1f", b*n/t/1e6}'
}
tftp_suite() { # name, start-fn, extra atftp options...
    local name=$1 fn=$2; shift 2
    $fn
    echo "| TFTP 30 MiB, 1 client | $name | $(tftp_run big.bin 1 "$@") MB/s |"
    echo "| TFTP 1 MiB, 32 clients | $name | $(tftp_run small.bin 32 "$@") MB/s |"
    echo "| TFTP 30 MiB, 32 clients | $name | $(tftp_run big.bin 32 "$@") MB/s |"
    stop
}
start_pixie_tftp() { pixie_conf "max_windowsize = 64"; RUST_LOG=warn start pixie "$PIXIE" --config "$W/pixie.toml" --no-dhcp; }
start_tftpd_hpa() { start tftpd in.tftpd -L -a 10.99.0.1:69 -s "$W/files" -B 1468; }
start_dnsmasq_tftp() {
    start dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --port=0 --listen-address=10.99.0.1 --bind-interfaces \
        --enable-tftp --tftp-root="$W/files" --tftp-max=64 --pid-file="$W/dnsmasq.pid"
}

# ------------------------------------------------------------------------------------------
# HTTP: wrk, 10 s per point.
# ------------------------------------------------------------------------------------------
wrk_mbs() { # url, connections → MB/s
    nc wrk -t"$(( $2 < 2 ? 1 : 2 ))" -c"$2" -d10s --timeout 30s "$1" 2>&1 | awk '/Transfer\/sec/ {v=$2; u=substr(v,length(v)-1); x=v+0;
        if (u=="GB") x*=1024; else if (u=="KB") x/=1024; printf "%.0f", x*1.048576}'
}
wrk_rps() { # url, connections[, lua script] → req/s; says so on stderr when wrk saw errors
    local out
    out=$(nc wrk -t2 -c"$2" -d10s ${3:+-s "$3"} "$1" 2>&1)
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "wrk reported errors for $1:" >&2; echo "$out" >&2; fi
    awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out"
}
start_nginx() {
cat > "$W/nginx.conf" <<EOF
worker_processes auto;
pid $W/nginx.pid;
error_log $W/nginx.err;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path $W; proxy_temp_path $W; fastcgi_temp_path $W; uwsgi_temp_path $W; scgi_temp_path $W;
  server { listen 10.99.0.1:8082; root $W/files; location /hammer/ { alias $W/files/; } }
}
EOF
    start nginx nginx -c "$W/nginx.conf" -g "daemon off;"
}
pixie_counter() { # metric{labels} → its value in pixie's /metrics (0 when absent)
    ns curl -sf http://10.99.0.1:8081/metrics | awk -v k="$1" 'index($0, k " ") == 1 {print $2; f=1} END {if (!f) print 0}'
}
ipxe_rate() { # label, lua script or "" → one table row; pixie and the API must be running
    local url="http://10.99.0.1:8081/ipxe?mac=52:54:00:00:00:01&arch=bios_x86" r0 a0 ok0 rps
    r0=$(pixie_counter 'pixie_boot_decisions_total{outcome="retry"}')
    a0=$(pixie_counter 'pixie_boot_decision_source_total{source="api"}')
    ok0=$(pixie_counter 'pixie_boot_decisions_total{outcome="hammer"}')
    rps=$(wrk_rps "$url" 64 "$2")
    # Every answer should be a real decision: a retry script (API down or slow) is fast and wrong,
    # so the row says how many answers were decisions, retries, and calls to the API.
    local retries=$(( $(pixie_counter 'pixie_boot_decisions_total{outcome="retry"}') - r0 ))
    local asked=$(( $(pixie_counter 'pixie_boot_decision_source_total{source="api"}') - a0 ))
    local answered=$(( $(pixie_counter 'pixie_boot_decisions_total{outcome="hammer"}') - ok0 ))
    [ "$retries" = 0 ] || echo "WARNING: $retries retry scripts during '$1': the API did not decide every request" >&2
    echo "| iPXE script, 64 connections | pixie, $1 | $rps req/s ($answered metal-hammer scripts, $retries retry scripts, $asked API calls in 10 s) |"
}
http_suite() {
    [ -x "$API" ] || { echo "build first: cargo build --release -p metal-api (the iPXE figures need the real API)" >&2; exit 1; }
    start api "$API" --listen 10.99.0.1:8080 --admin-token adm_bench_7d41c9e02fa35b8e6c19d4a7f0b3e528 --db "sqlite://$W/metal.db"
    ns curl -sf -X POST -H 'authorization: Bearer adm_bench_7d41c9e02fa35b8e6c19d4a7f0b3e528' -H 'content-type: application/json' \
        -d '{"id":"lab","boot":{"kernel_url":"http://10.99.0.1:8081/hammer/vmlinuz","initrd_url":"http://10.99.0.1:8081/hammer/initrd.img","cmdline":"console=ttyS0","api_url":"http://10.99.0.1:8080"}}' \
        http://10.99.0.1:8080/v1/partitions > /dev/null
    pixie_conf "" ""
    RUST_LOG=warn start pixie "$PIXIE" --config "$W/pixie.toml" --no-dhcp
    start_nginx
    for c in 1 16 64 256; do
        echo "| HTTP 50 MiB initrd, $c clients | pixie | $(wrk_mbs http://10.99.0.1:8081/hammer/initrd.img "$c") MB/s |"
        echo "| HTTP 50 MiB initrd, $c clients | nginx | $(wrk_mbs http://10.99.0.1:8082/hammer/initrd.img "$c") MB/s |"
    done
    ns curl -sf "http://10.99.0.1:8081/ipxe?mac=52:54:00:00:00:01&arch=bios_x86" > "$W/files/script.ipxe"
    grep -q "^kernel " "$W/files/script.ipxe" \
        || { echo "pixie's script is not a metal-hammer boot decision:" >&2; cat "$W/files/script.ipxe" >&2; exit 1; }
    # 256 machines: the requests ask for 256 MACs in turn.
    cat > "$W/macs.lua" <<'EOF'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", string.format("/ipxe?mac=52:54:00:00:01:%02x&arch=bios_x86", n % 256))
end
EOF
    for cache in 0 1000; do
        killns_pixie
        pixie_conf "" "decision_cache_ms = $cache"
        RUST_LOG=warn start pixie "$PIXIE" --config "$W/pixie.toml" --no-dhcp
        if [ "$cache" = 0 ]; then
            ipxe_rate "decision cache off (every request asks the API)" ""
        else
            ipxe_rate "decision cache ${cache} ms, one machine" ""
            ipxe_rate "decision cache ${cache} ms, 256 machines in turn" "$W/macs.lua"
        fi
    done
    echo "| iPXE script, 64 connections | nginx (static file of that size) | $(wrk_rps http://10.99.0.1:8082/script.ipxe 64) req/s |"
    stop
}

echo "| benchmark | server | result |"
echo "|---|---|---|"
if [ "$WHAT" = all ] || [ "$WHAT" = dhcp ]; then
    dhcp_sweep pixie start_pixie_dhcp
    dhcp_sweep "Kea memfile" start_kea
    dhcp_sweep dnsmasq start_dnsmasq_dhcp
fi
if [ "$WHAT" = all ] || [ "$WHAT" = tftp ]; then
    head -c $((30 << 20)) /dev/urandom > "$W/files/big.bin"
    head -c $((1 << 20)) /dev/urandom > "$W/files/small.bin"
    tftp_suite pixie start_pixie_tftp
    tftp_suite "pixie windowsize 16" start_pixie_tftp --option "windowsize 16"
    tftp_suite "pixie windowsize 64" start_pixie_tftp --option "windowsize 64"
    tftp_suite tftpd-hpa start_tftpd_hpa
    tftp_suite dnsmasq start_dnsmasq_tftp
fi
if [ "$WHAT" = all ] || [ "$WHAT" = http ]; then
    head -c $((50 << 20)) /dev/urandom > "$W/files/initrd.img"
    http_suite
fi
