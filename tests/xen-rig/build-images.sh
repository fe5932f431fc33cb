#!/bin/bash
# build-images.sh - the dom0 root filesystem and the boot artefacts, from Debian packages only,
# cached under $RIG_WORK (stamp files make every step run once; FORCE=1 starts over).
#
#   rootfs     debootstrap --variant=minbase + linux-image-amd64, xen-hypervisor, xen-utils,
#              qemu-system-xen (the qdisk backend to compare with), busybox, e2fsprogs, ...
#   boot/xen   Xen, gunzipped (QEMU's multiboot loader wants the ELF image)
#   boot/vmlinuz, boot/initrd.img   dom0 kernel and a small initramfs-tools initrd
#   dom0.ext4  the rootfs as an ext4 image (mkfs.ext4 -d, no loop mount); booted with
#              snapshot=on, so it is never modified and one image serves every run
#
# Nothing of tapdisk-rs goes in here: run.sh puts the binaries on a second, small disk.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/config.sh"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
R=$RIG_ROOTFS
T0=$(date +%s)
stamp() { echo "xen-rig: [$(( $(date +%s) - T0 ))s] $*"; }
if [ "${FORCE:-0}" = 1 ]; then rm -rf "$R" "$RIG_BOOT" "$RIG_IMG"; fi
[ -e "$RIG_IMG" ] && [ -e "$RIG_BOOT/xen" ] && [ -e "$R/.rig-pkgs-done" ] && { stamp "images cached in $RIG_WORK"; exit 0; }

if [ ! -e "$R/.rig-debootstrap-done" ]; then
    rm -rf "$R"
    debootstrap --variant=minbase "$RIG_SUITE" "$R" "$RIG_MIRROR" > "$RIG_LOGS/debootstrap-$RIG_SUITE.log" 2>&1 \
        || { tail -20 "$RIG_LOGS/debootstrap-$RIG_SUITE.log"; exit 1; }
    touch "$R/.rig-debootstrap-done"
    stamp "debootstrap $RIG_SUITE done"
fi

cleanup() {
    for m in dev/pts dev sys proc; do mountpoint -q "$R/$m" && umount -l "$R/$m"; done
    rm -f "$R/usr/sbin/policy-rc.d"
}
trap cleanup EXIT
if [ ! -e "$R/.rig-pkgs-done" ]; then
    mount -t proc proc "$R/proc"; mount -t sysfs sysfs "$R/sys"
    mount --bind /dev "$R/dev"; mount --bind /dev/pts "$R/dev/pts"
    printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
    mkdir -p "$R/etc/initramfs-tools/conf.d"
    printf 'MODULES=list\nCOMPRESS=gzip\n' > "$R/etc/initramfs-tools/conf.d/rig.conf"
    printf 'virtio_pci\nvirtio_blk\next4\n' > "$R/etc/initramfs-tools/modules"
    cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    cat > "$R/etc/apt/sources.list" <<EOS
deb $RIG_MIRROR $RIG_SUITE main
deb $RIG_MIRROR $RIG_SUITE-updates main
deb $RIG_SECMIRROR $RIG_SUITE-security main
EOS
    chroot "$R" apt-get update -qq
    chroot "$R" apt-get install -y -qq --no-install-recommends \
        linux-image-amd64 initramfs-tools xen-hypervisor-$RIG_XENVER-amd64 xen-utils-$RIG_XENVER \
        xen-utils-common qemu-system-xen busybox kmod procps iproute2 util-linux e2fsprogs \
        > "$RIG_LOGS/chroot-apt-$RIG_SUITE.log" 2>&1 || { tail -30 "$RIG_LOGS/chroot-apt-$RIG_SUITE.log"; exit 1; }
    chroot "$R" apt-get clean
    cleanup
    echo 'root:xenrig' | chroot "$R" chpasswd
    echo dom0 > "$R/etc/hostname"
    printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$R/etc/fstab"
    touch "$R/.rig-pkgs-done"
    stamp "chroot packages installed"
fi

KVER=$(ls "$R/lib/modules" | sort -V | tail -1)
mkdir -p "$RIG_BOOT"
gunzip -c "$(ls "$R"/boot/xen-$RIG_XENVER*-amd64.gz | head -1)" > "$RIG_BOOT/xen"
cp "$R/boot/vmlinuz-$KVER" "$RIG_BOOT/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$RIG_BOOT/initrd.img"
echo "$KVER" > "$RIG_BOOT/kver"
rm -f "$RIG_IMG"
mkfs.ext4 -q -F -L dom0root -d "$R" "$RIG_IMG" "$RIG_IMG_SIZE"
{
  echo "xen:    $(chroot "$R" dpkg-query -W -f '${Package} ${Version}' xen-hypervisor-$RIG_XENVER-amd64)"
  echo "kernel: $(chroot "$R" dpkg-query -W -f '${Package} ${Version}' linux-image-$KVER)"
  echo "qemu-xen (dom0 qdisk): $(chroot "$R" dpkg-query -W -f '${Package} ${Version}' qemu-system-xen)"
} | tee "$RIG_BOOT/versions.txt"
stamp "images built in $RIG_WORK"
