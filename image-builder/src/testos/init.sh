#!/bin/sh
# /sbin/init of the metal test OS (PID 1): mount the kernel filesystems, bring the network up
# with DHCP, phone home, verify what metal-hammer provisioned, then stay up.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

echo "TEST-OS booted kernel=$(uname -r)"
[ -s /etc/hostname ] && hostname "$(head -n 1 /etc/hostname)"

# Network modules were loaded by the initramfs; load any others shipped in the root fs.
v=$(uname -r)
if [ -f "/lib/modules/$v/load.list" ]; then
    while read -r m; do insmod "/lib/modules/$v/$m" 2>/dev/null; done < "/lib/modules/$v/load.list"
fi

ip link set lo up
iface=""
for n in /sys/class/net/*; do
    n=${n##*/}
    [ "$n" = lo ] && continue
    [ -e "/sys/class/net/$n/device" ] || continue
    iface=$n
    break
done
if [ -n "$iface" ]; then
    ip link set "$iface" up
    if udhcpc -i "$iface" -s /etc/udhcpc/default.script -n -q -t 10 -T 1 >/dev/null 2>&1; then
        echo "TEST-OS network iface=$iface addr=$(ip -4 addr show dev "$iface" | awk '/inet /{print $2; exit}')"
    else
        echo "TEST-OS network iface=$iface dhcp=failed"
    fi
else
    echo "TEST-OS network none"
fi

/usr/local/sbin/metal-phone-home
/usr/local/sbin/metal-verify

echo "TEST-OS ready"
while true; do
    sleep 3600
done
