#!/bin/sh
# /init of the test OS's initramfs: load the storage, filesystem and network modules (in the
# dependency order image-builder computed), find root=UUID=… (or LABEL=, or a device path),
# mount it and switch_root to its /sbin/init.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

fail() {
    echo "TEST-OS initrd FAIL reason=$1"
    echo "dropping to a shell"
    exec sh
}

v=$(uname -r)
if [ ! -f "/lib/modules/$v/load.list" ]; then
    fail "no-modules-for-kernel-$v"
fi
while read -r m; do
    insmod "/lib/modules/$v/$m" 2>/dev/null
done < "/lib/modules/$v/load.list"

root=""
rootfstype=ext4
rootflags=rw
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
        ro) rootflags=ro ;;
    esac
done
[ -n "$root" ] || fail "no-root-on-cmdline"

# Disks may appear a little after their driver loads: wait up to 30 s.
dev=""
i=0
while [ $i -lt 300 ]; do
    case "$root" in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
        /dev/*) [ -b "$root" ] && dev="$root" ;;
    esac
    [ -n "$dev" ] && break
    usleep 100000
    i=$((i + 1))
done
[ -n "$dev" ] || fail "root-not-found root=$root"

mkdir -p /newroot
mount -t "$rootfstype" -o "$rootflags" "$dev" /newroot || fail "mount-root dev=$dev"
[ -x /newroot/sbin/init ] || fail "no-sbin-init-on-root"
for d in dev proc sys; do
    mount --move "/$d" "/newroot/$d" 2>/dev/null || umount "/$d"
done
exec switch_root /newroot /sbin/init
