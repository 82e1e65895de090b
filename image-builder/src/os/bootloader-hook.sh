#!/bin/sh
# metal-bootloader-hook (installed by image-builder): makes the install disk boot this OS under
# UEFI with systemd-boot. metal-hammer runs it in a chroot of the installed OS, with the layout's
# filesystems mounted (the ESP at /boot/efi) and /etc/fstab already written; see docs/images.md.
# Without an ESP there is nothing to do (the machine boots by kexec, and later through PXE).
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
esp=/boot/efi
kernel="@KERNEL@"
initrd="@INITRD@"
cmdline="@CMDLINE@"

# An ESP is mounted at $esp when it lives on another device than the root. (Not `mountpoint`:
# busybox, which the test OS uses, has no such applet, and a missing command must not read as
# "no ESP".)
if [ ! -d "$esp" ] || [ "$(stat -c %d "$esp")" = "$(stat -c %d /)" ]; then
    echo "metal-bootloader-hook: no ESP mounted at $esp; nothing to do"
    exit 0
fi
root_uuid=$(awk '$1 !~ /^#/ && $2 == "/" { sub(/^UUID=/, "", $1); print $1; exit }' /etc/fstab)
if [ -z "$root_uuid" ]; then
    echo "metal-bootloader-hook: /etc/fstab has no / entry" >&2
    exit 1
fi
mkdir -p "$esp/EFI/BOOT" "$esp/loader/entries"
cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi "$esp/EFI/BOOT/BOOTX64.EFI"
cp "/$kernel" "$esp/vmlinuz"
entry="title @TITLE@
linux /vmlinuz
"
if [ -n "$initrd" ]; then
    cp "/$initrd" "$esp/initrd.img"
    entry="${entry}initrd /initrd.img
"
fi
printf 'default metal.conf\ntimeout 0\nconsole-mode keep\n' > "$esp/loader/loader.conf"
printf '%soptions root=UUID=%s rw %s\n' "$entry" "$root_uuid" "$cmdline" > "$esp/loader/entries/metal.conf"
sync
