#!/bin/sh
# metal-verify: checks what metal-hammer provisioned into the test OS and prints
# `TEST-OS VERIFY PASS` or `TEST-OS VERIFY FAIL reason=<what> …`.
#
# /etc/metal/userdata is flat JSON (no escaped quotes inside values, one key per name):
#   {"expect": {"hostname": "web-1", "ssh_key": "ssh-ed25519 AAAA… me@x", "userdata_marker": "m-42"}}
fail() {
    echo "TEST-OS VERIFY FAIL reason=$*"
    exit 1
}

# json_string KEY FILE: the string value of "KEY": "…" (first match), or nothing.
json_string() {
    tr '\n' ' ' < "$2" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" | head -n 1
}

ud=/etc/metal/userdata
[ -s "$ud" ] || fail "no-userdata file=$ud"
grep -q '"expect"' "$ud" || fail "userdata-without-expect"
want_host=$(json_string hostname "$ud")
want_key=$(json_string ssh_key "$ud")
marker=$(json_string userdata_marker "$ud")

[ -n "$want_host" ] || fail "expect-without-hostname"
got_host=$(head -n 1 /etc/hostname 2>/dev/null)
[ "$got_host" = "$want_host" ] || fail "hostname expected=$want_host got=$got_host"

if [ -n "$want_key" ]; then
    [ -f /root/.ssh/authorized_keys ] || fail "no-authorized-keys"
    grep -qF "$want_key" /root/.ssh/authorized_keys || fail "ssh-key-missing"
fi

[ -n "$marker" ] || fail "no-userdata-marker"
echo "TEST-OS userdata_marker=$marker"

# The fstab entry for / must name, by UUID, the filesystem that is mounted as /.
fstab_root=$(awk '$1 !~ /^#/ && $2 == "/" {print $1; exit}' /etc/fstab 2>/dev/null)
case "$fstab_root" in
    UUID=*) uuid=${fstab_root#UUID=} ;;
    "") fail "fstab-no-root-entry" ;;
    *) fail "fstab-root-not-by-uuid got=$fstab_root" ;;
esac
dev=$(findfs "UUID=$uuid" 2>/dev/null) || fail "fstab-root-uuid-unknown uuid=$uuid"
dev_num=$(( 0x$(stat -L -c %t "$dev") * 256 + 0x$(stat -L -c %T "$dev") ))
root_num=$(stat -c %d /)
[ "$dev_num" = "$root_num" ] || fail "fstab-root-uuid-not-mounted uuid=$uuid dev=$dev"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=UUID=*) [ "${arg#root=UUID=}" = "$uuid" ] || fail "cmdline-root-differs cmdline=${arg#root=} fstab=$uuid" ;;
    esac
done

# machine-id: empty (to be generated) or a fresh 32-hex-digit id, never the build's.
if [ -s /etc/machine-id ]; then
    grep -qE '^[0-9a-f]{32}$' /etc/machine-id || fail "machine-id-malformed"
fi

echo "TEST-OS VERIFY PASS"
