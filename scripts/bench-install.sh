#!/usr/bin/env bash
# Install throughput of metal-hammer against the reference shell pipelines, on the same image,
# the same loop device and in the same run (rounds alternate between the two).
#
#   tar.zst:  mkfs.ext4 + mount + `curl | zstd -d | tar -x` + umount + sync
#        vs.  metal-hammer install (GPT + mke2fs + mount + HTTP → SHA-256 → zstd → tar
#             + configure + remount read-only) + umount + sync
#   raw.zst:  `curl | zstd -d | dd of=DEV bs=4M` + sync
#        vs.  metal-hammer install of the raw image (HTTP → SHA-256 → zstd → DEV, fsync, then
#             mount + configure) + umount + sync
#
# Usage: sudo scripts/bench-install.sh [IMAGE.tar.zst]
#   Without an image it builds a Debian bookworm minbase image with debootstrap (cached in
#   $CACHE), compressed as image-builder compresses OS images (`image-builder compress`: zstd -9
#   in independent 8 MiB frames; `zstd -d` reads it like any other). ROUNDS (default 3) rounds
#   each. Needs: curl zstd tar losetup mkfs.ext4 wipefs (and debootstrap without an image).
#   Prints a Markdown table for docs/BENCHMARKS.md.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
CACHE=${CACHE:-/var/cache/metal/bench}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, mounts)" >&2; exit 1; }

echo "building image-builder (release)…" >&2
(cd "$HERE" && cargo build --release -q -p image-builder) >&2
IB=$HERE/target/release/image-builder

IMAGE=${1:-}
if [ -z "$IMAGE" ]; then
    IMAGE=$CACHE/minbase-framed.tar.zst
    if [ ! -f "$IMAGE" ]; then
        mkdir -p "$CACHE"
        if [ -f "$CACHE/minbase.tar.zst" ]; then   # the single-frame image of earlier runs
            zstd -dcq "$CACHE/minbase.tar.zst" | "$IB" compress --zstd-level 9 - "$IMAGE" >&2
        else
            [ -d "$CACHE/rootfs" ] || debootstrap --variant=minbase bookworm "$CACHE/rootfs" http://deb.debian.org/debian >&2
            tar -C "$CACHE/rootfs" --numeric-owner -cf - . | "$IB" compress --zstd-level 9 - "$IMAGE" >&2
        fi
    fi
fi

echo "building the benchmark driver (release)…" >&2
BENCH=$(cd "$HERE" && cargo bench -p metal-hammer --bench install --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("target",{}).get("name")=="install" and m.get("executable"): print(m["executable"])' | tail -1)
[ -x "$BENCH" ] || { echo "could not build the benchmark driver" >&2; exit 1; }

# Our mounts live in a mount namespace of their own: processes that other tools start in new
# namespaces meanwhile (ip netns exec, unshare) cannot pin them.
if [ -z "${BENCH_IN_NS:-}" ]; then
    exec env BENCH_IN_NS=1 unshare --mount --propagation private "$0" "$@"
fi

# The loop devices' backing files live in RAM (BENCH_DIR, default /dev/shm): the comparison is
# about the software pipelines, not this machine's shared disk.
WORK=$(mktemp -d /tmp/bench-install.XXXXXX)
DISKS=$(mktemp -d "${BENCH_DIR:-/dev/shm}/bench-install.XXXXXX")
LOOP=""
SMALL=""
SERVER_PID=""
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && umount -l "$WORK/mnt"
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    [ -n "$SMALL" ] && losetup -d "$SMALL"
    rm -rf "$WORK" "$DISKS"
}
trap cleanup EXIT
mkdir -p "$WORK/mnt"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
median() { python3 -c 'import sys,statistics; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }

serve() { # FILE → URL in $URL, server pid in $SERVER_PID
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    rm -f "$WORK/fifo"; mkfifo "$WORK/fifo"
    "$BENCH" serve "$1" < "$WORK/fifo" > "$WORK/url" &
    SERVER_PID=$!
    exec 9>"$WORK/fifo"   # keeps the server's stdin open
    for _ in $(seq 50); do [ -s "$WORK/url" ] && break; sleep 0.1; done
    URL=$(cat "$WORK/url")
}

truncate -s 4G "$DISKS/disk.img"
LOOP=$(losetup --find --show --partscan "$DISKS/disk.img")
reset_disk() { wipefs -a -q "$LOOP" >/dev/null 2>&1 || true; dd if=/dev/zero of="$LOOP" bs=1M count=2 conv=notrunc status=none; sync; }

SIZE=$(stat -c %s "$IMAGE")
SHA=$(sha256sum "$IMAGE" | cut -d' ' -f1)
UNPACKED=$(zstd -dc -q "$IMAGE" | wc -c)
FILES=$(zstd -dc -q "$IMAGE" | tar -t | wc -l)
serve "$IMAGE"

echo "## tar.zst: $(basename "$IMAGE") — $((UNPACKED / 1000000)) MB tar, $((SIZE / 1000000)) MB tar.zst, $FILES entries; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | reference s | metal-hammer s | ratio |"
echo "|---|---|---|---|"
REF=(); OURS=()
for r in $(seq "$ROUNDS"); do
    reset_disk
    t0=$(now)
    mkfs.ext4 -q -F -F "$LOOP"
    mount "$LOOP" "$WORK/mnt"
    curl -sf "$URL" | zstd -d -q | tar -x -C "$WORK/mnt"
    umount "$WORK/mnt"; sync
    ref=$(secs "$t0" "$(now)")
    reset_disk
    t0=$(now)
    BENCH_STAGES=1 "$BENCH" run "$URL" "$SHA" "$SIZE" tar.zst "$LOOP" "$WORK/mnt" > /dev/null 2>>"${STAGES_LOG:-/dev/stderr}"
    ours=$(secs "$t0" "$(now)")
    REF+=("$ref"); OURS+=("$ours")
    echo "| $r | $ref | $ours | $(python3 -c "print(f'{$ref/$ours:.2f}x')") |"
done
mr=$(median "${REF[@]}"); mo=$(median "${OURS[@]}")
echo "| median | $mr ($((UNPACKED / 1000000)) MB → $(python3 -c "print(int($UNPACKED/1e6/$mr))") MB/s) | $mo ($(python3 -c "print(int($UNPACKED/1e6/$mo))") MB/s) | **$(python3 -c "print(f'{$mr/$mo:.2f}x')")** |"

# raw.zst: the tar installed onto a 1 GiB disk by metal-hammer, read back and compressed.
truncate -s 1G "$DISKS/small.img"
SMALL=$(losetup --find --show --partscan "$DISKS/small.img")
"$BENCH" run "$URL" "$SHA" "$SIZE" tar.zst "$SMALL" "$WORK/mnt" > /dev/null
"$IB" compress --zstd-level 3 "$SMALL" "$WORK/image.raw.zst" >&2
losetup -d "$SMALL"; SMALL=""
RAW="$WORK/image.raw.zst"
RSIZE=$(stat -c %s "$RAW"); RSHA=$(sha256sum "$RAW" | cut -d' ' -f1); RUN=$((1 << 30))
serve "$RAW"
echo
echo "## raw.zst: 1 GiB raw disk ($((RSIZE / 1000000)) MB raw.zst) written to a 4 GiB loop device"
echo
echo "| round | reference s | metal-hammer s | ratio |"
echo "|---|---|---|---|"
REF=(); OURS=()
for r in $(seq "$ROUNDS"); do
    reset_disk
    t0=$(now)
    curl -sf "$URL" | zstd -d -q | dd of="$LOOP" bs=4M iflag=fullblock status=none
    sync
    ref=$(secs "$t0" "$(now)")
    reset_disk
    t0=$(now)
    "$BENCH" run "$URL" "$RSHA" "$RSIZE" raw.zst "$LOOP" "$WORK/mnt" > /dev/null
    ours=$(secs "$t0" "$(now)")
    REF+=("$ref"); OURS+=("$ours")
    echo "| $r | $ref | $ours | $(python3 -c "print(f'{$ref/$ours:.2f}x')") |"
done
mr=$(median "${REF[@]}"); mo=$(median "${OURS[@]}")
echo "| median | $mr ($(python3 -c "print(int($RUN/1e6/$mr))") MB/s) | $mo ($(python3 -c "print(int($RUN/1e6/$mo))") MB/s) | **$(python3 -c "print(f'{$mr/$mo:.2f}x')")** |"
