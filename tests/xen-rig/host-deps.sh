#!/bin/bash
# host-deps.sh - the host tools the rig needs, from Debian packages: qemu-system-x86_64 (TCG),
# debootstrap, busybox-static, cpio, e2fsprogs (mkfs.ext4 -d), xz, zstd, fio (copied into the
# guest's initramfs with its libraries), qemu-utils (qemu-img and qemu-io make the qcow2 chain
# a guest's disk is served from).
#
# Quirk of this machine kind: qemu-utils from bookworm-backports is preinstalled and Breaks
# qemu-system-common (<< 8.0), so bookworm's qemu-system-x86 7.2 cannot go next to it. Then
# qemu-system-x86 comes from bookworm-backports through a private apt sources list under the
# rig's cache (the system's sources are not touched).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/config.sh"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in debootstrap busybox-static cpio e2fsprogs xz-utils zstd kmod file fio bc qemu-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
    qu=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
    if [[ "$qu" == *bpo12* ]]; then
        A=$RIG_CACHE/apt-bpo
        mkdir -p "$A/lists/partial"
        K=/usr/share/keyrings/debian-archive-keyring.gpg
        cat > "$A/sources.list" <<EOS
deb [signed-by=$K] $RIG_MIRROR bookworm main
deb [signed-by=$K] $RIG_MIRROR bookworm-updates main
deb [signed-by=$K] $RIG_SECMIRROR bookworm-security main
deb [signed-by=$K] $RIG_MIRROR bookworm-backports main
EOS
        O=(-o "Dir::Etc::sourcelist=$A/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::lists=$A/lists")
        apt-get "${O[@]}" update -qq
        apt-get "${O[@]}" install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
    else
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
    fi
fi
qemu-system-x86_64 --version | head -1
