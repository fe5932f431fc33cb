# config.sh - shared settings of the Xen rig, sourced by the other scripts.
# RIG_SUITE=trixie (default: Xen 4.20, Linux 6.12, backend/vbd3) or bookworm (Xen 4.17,
# Linux 6.1, backend/vbd with xen-blkback unloaded while our backend serves).
RIG_SUITE=${RIG_SUITE:-trixie}
case "$RIG_SUITE" in
    bookworm) RIG_XENVER=4.17;;
    trixie)   RIG_XENVER=4.20;;
    *) echo "xen-rig: unsupported RIG_SUITE=$RIG_SUITE (bookworm or trixie)" >&2; exit 2;;
esac
# Everything built is cached here between runs (about 2 GB per suite).
RIG_CACHE=${RIG_CACHE:-/var/tmp/tapdisk-rs-xen-rig}
RIG_WORK=$RIG_CACHE/$RIG_SUITE
RIG_ROOTFS=$RIG_WORK/rootfs                  # debootstrap'ed dom0 tree
RIG_BOOT=$RIG_WORK/boot                      # xen, dom0 kernel, dom0 initrd
RIG_IMG=$RIG_WORK/dom0.ext4                  # dom0 root disk (never written: snapshot=on)
RIG_IMG_SIZE=${RIG_IMG_SIZE:-3G}
# The Debian mirrors this machine's apt already uses (override with RIG_MIRROR / RIG_SECMIRROR).
_rig_uris() { { sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null
               sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\).*/\2/p' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | tr ' ' '\n' | grep -i debian || true; }
RIG_MIRROR=${RIG_MIRROR:-$(_rig_uris | grep -v security | head -1)}
RIG_SECMIRROR=${RIG_SECMIRROR:-$(_rig_uris | grep security | head -1)}
[ -n "$RIG_MIRROR" ] || { echo "xen-rig: no Debian mirror in the apt sources; set RIG_MIRROR" >&2; exit 2; }
RIG_LOGS=${RIG_LOGS:-$RIG_CACHE/logs}
mkdir -p "$RIG_WORK" "$RIG_LOGS"
