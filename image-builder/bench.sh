#!/usr/bin/env bash
# Image-builder benchmark: build time and size of the metal-hammer initramfs, the test OS and
# (with DEBIAN_ROOT=<mmdebstrap directory>) a Debian image as tar.zst and raw.zst, per zstd level.
# Uses the release binary. Results go to stdout as Markdown table rows.
set -euo pipefail
cd "$(dirname "$0")/.."
ib=${IB:-target/release/image-builder}
cache=${METAL_CACHE:-/var/cache/metal}
musl=target/x86_64-unknown-linux-musl/release
levels=${LEVELS:-3 9 19}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kdir=$("$ib" kernel --cache "$cache" 2>/dev/null | tail -n 1)

secs() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
mib() { echo "scale=1; $(stat -c %s "$1") / 1048576" | bc; }

for l in $levels; do
  t=$(secs "$ib" hammer --kernel-dir "$kdir" --hammer-bin "$musl/metal-hammer" --out "$out/h$l" --zstd-level "$l")
  echo "| hammer initrd.img | $l | $(printf %.1f "$t") s | $(mib "$out/h$l/initrd.img") MiB |"
done
for l in $levels; do
  t=$(secs "$ib" test-os --kernel-dir "$kdir" --phone-home-bin "$musl/phone-home" --out "$out/t$l" --version b --zstd-level "$l")
  echo "| test-os tar.zst | $l | $(printf %.1f "$t") s | $(mib "$out/t$l/test-os-b.tar.zst") MiB |"
done
if [ -n "${DEBIAN_ROOT:-}" ]; then
  for l in ${DEBIAN_LEVELS:-3 9}; do
    t=$(secs "$ib" os --from-dir "$DEBIAN_ROOT" --name deb --version b --format tar.zst --out "$out/dt$l" --zstd-level "$l" --phone-home-bin "$musl/phone-home")
    echo "| debian tar.zst (from dir) | $l | $(printf %.1f "$t") s | $(mib "$out/dt$l/deb-b.tar.zst") MiB |"
    t=$(secs "$ib" os --from-dir "$DEBIAN_ROOT" --name deb --version b --format both --out "$out/db$l" --zstd-level "$l" --phone-home-bin "$musl/phone-home")
    echo "| debian tar.zst + raw.zst (from dir) | $l | $(printf %.1f "$t") s | $(mib "$out/db$l/deb-b.raw.zst") MiB raw.zst |"
    rm -rf "$out/dt$l" "$out/db$l"
  done
fi
