#!/usr/bin/env bash
# run.sh [CARGO-TEST-ARGS...] - the test suite, on a fresh Debian machine too: installs the
# Debian packages the tests drive (those missing, with apt-get as root or through sudo), checks
# their tools are there, then runs `cargo test --workspace --locked`. With arguments, runs
# `cargo test --locked ARGS...` instead (e.g. `tests/run.sh -p iscsi`, `tests/run.sh -p blkif
# ring`). The end-to-end tests need root: a loop device, private tgtds in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests drive: fio (baselines), qemu-io/qemu-img (NBD clients), nbdinfo/nbdcopy
# (libnbd), tgt (iSCSI targets for the initiator and the striped disks), iproute2 (ip, tc: the
# storage LAN's namespaces and rate-limited links), gcc with rpcsvc-proto and libtirpc-dev (a C
# client generated with rpcgen from the stripe master's interface talks to it), mount
# (losetup), a font for td-bench's charts, libvhdi-utils (vhdiinfo, vhdimount: an independent VHD
# reader for vhd-util's interop tests), python3 (tests/compat/tapctl-contract.py drives tap-ctl
# as xapi's storage manager does, in Python), bpftrace (tapdisk's USDT probes), prometheus
# (promtool checks `tap-ctl stats --prometheus`), etcd-server (the striped disks' records and
# writer lease: a 3-member cluster on loopback). Add a package here when a test starts using it.
packages=(fio qemu-utils libnbd-bin tgt iproute2 gcc rpcsvc-proto libtirpc-dev mount
  fonts-dejavu-core libvhdi-utils python3 bpftrace prometheus etcd-server)
tools=(fio qemu-io qemu-img nbdinfo nbdcopy tgtd tgtadm ip tc gcc rpcgen losetup vhdiinfo vhdimount
  python3 bpftrace promtool etcd)

bash tests/apt-install-missing.sh "${packages[@]}"
for tool in "${tools[@]}"; do
  PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null ||
    { echo "$0: $tool is missing after installing ${packages[*]}" >&2; exit 1; }
done

if (($#)); then
  exec cargo test --locked "$@"
fi
exec cargo test --workspace --locked
