#!/usr/bin/env bash
# An emulated LAN of iSCSI storage servers on one machine, for tests and benchmarks of striped
# IO. Each server is Debian's tgtd in its own network namespace, reached over a veth pair whose
# two ends are rate-limited with tc tbf (rate, not delay: the kernel here has no netem). Root only.
#
#   storage-lan.sh up [N=2] [RATE=1gbit] [LUN_SIZE=1G]   start N servers (N <= 8; RATE "none" = unshaped)
#   storage-lan.sh status                                 list servers and their iSCSI URLs
#   storage-lan.sh urls                                   the URLs only, one a line
#   storage-lan.sh down                                   stop what `up` started and remove everything
#   storage-lan.sh kill I                                 SIGKILL server I's tgtd (its LUN file stays)
#   storage-lan.sh start I                                start server I's tgtd again on the same LUN file
#   storage-lan.sh host H                                 add "host" H (1..4): a namespace that reaches every server
#   storage-lan.sh host-down H                            cut host H's links (its packets wait; TCP retransmits)
#   storage-lan.sh host-up H                              restore them
#   storage-lan.sh run N RATE -- CMD [ARGS...]            up, run CMD with $STORAGE_LAN_URLS set, down (always)
#   storage-lan.sh iscsi-rw                               build the libiscsi benchmark beside the state; print its path
#   storage-lan.sh selftest                               up 2 servers, write+verify each with iscsi-rw, down
#
# Server i (1-based) listens on 169.254.(100+i).2:3260 as target iqn.2026-11.rs.tapdisk:srv<i>,
# LUN 1 a preallocated tmpfs file of LUN_SIZE. The client end of its link, tdslan<i>a, has
# 169.254.(100+i).1 in the calling namespace. State (PID files, logs, LUN files, the iscsi-rw
# binary) lives in $STORAGE_LAN_DIR (default /dev/shm/tapdisk-storage-lan) and is removed by
# `down`. Namespaces are tdslan<i>; tgtd control ports are $STORAGE_LAN_CTL_BASE+i (default
# 20060+i), and its subnets are not those of /work/shared/lab, so the two can run side by side.
# Host h (a second dom0, for hand-off tests) is the namespace <prefix>h<h>: a point-to-point
# link to each server's namespace, where server i keeps its address 169.254.(NET+i).2 and the
# host has 169.254.(NET+i).(100+h) (no routing or forwarding anywhere), and one link to the
# calling namespace, 169.254.NET.(100+h) in the host and 169.254.NET.(200+h) outside (where a
# test's etcd listens for that host).
# Several LANs can run at once (tests do) when each has its own $STORAGE_LAN_DIR,
# $STORAGE_LAN_PREFIX (namespace and link names, default tdslan, at most 12 characters),
# $STORAGE_LAN_NET (server i gets 169.254.(NET+i).0/24, default 100) and $STORAGE_LAN_CTL_BASE.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_DIR=${STORAGE_LAN_DIR:-/dev/shm/tapdisk-storage-lan}
CTL_BASE=${STORAGE_LAN_CTL_BASE:-20060}
PREFIX=${STORAGE_LAN_PREFIX:-tdslan}
NET=${STORAGE_LAN_NET:-100}
[[ $PREFIX =~ ^[a-z][a-z0-9]{0,11}$ ]] || { echo "storage-lan: bad STORAGE_LAN_PREFIX" >&2; exit 2; }
[[ $NET =~ ^[0-9]+$ ]] && ((NET >= 1 && NET <= 246)) || { echo "storage-lan: bad STORAGE_LAN_NET" >&2; exit 2; }
cmd=${1:-status}

die() { echo "storage-lan: $*" >&2; exit 2; }
need() { command -v "$1" >/dev/null || die "missing $1: apt-get install -y ${2:-$1}"; }

down() {
  if [ -d "$LAB_DIR" ]; then
    for pidf in "$LAB_DIR"/tgtd-*.pid; do
      [ -f "$pidf" ] || continue
      p=$(cat "$pidf")
      # tgtd ignores SIGTERM while it has targets; its state is only the LUN files removed below.
      kill -9 "$p" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.01; done
      rm -f "$pidf"
    done
  fi
  for ns in $(ip netns list 2>/dev/null | awk -v p="^$PREFIX(h)?[0-9]+$" '$1 ~ p {print $1}'); do
    ip netns del "$ns" 2>/dev/null || true
  done
  for h in 1 2 3 4; do ip link del "${PREFIX}h${h}a" 2>/dev/null || true; done
  for i in $(seq 1 8); do
    ip link del "${PREFIX}${i}a" 2>/dev/null || true
    rm -f "/var/run/tgtd/socket.$((CTL_BASE + i))" "/var/run/tgtd/socket.$((CTL_BASE + i)).lock"
  done
  rm -rf "$LAB_DIR"
}

up() {
  local n=${1:-2} rate=${2:-1gbit} size=${3:-1G}
  need tgtd tgt; need tgtadm tgt; need ip iproute2; need tc iproute2
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  [[ $n =~ ^[1-8]$ ]] || die "N must be 1..8"
  down
  mkdir -p "$LAB_DIR"
  trap 'echo "storage-lan: up failed; cleaning up" >&2; down' ERR
  local burst=64kb
  case $rate in *gbit) burst=256kb ;; esac
  for i in $(seq 1 "$n"); do
    local ns=$PREFIX$i net=169.254.$((NET + i)) ctl=$((CTL_BASE + i))
    ip netns add "$ns"
    ip link add "${PREFIX}${i}a" type veth peer name "${PREFIX}${i}b"
    ip link set "${PREFIX}${i}b" netns "$ns"
    ip addr add "$net.1/24" dev "${PREFIX}${i}a"
    ip link set "${PREFIX}${i}a" up
    ip -n "$ns" addr add "$net.2/24" dev "${PREFIX}${i}b"
    ip -n "$ns" link set "${PREFIX}${i}b" up
    ip -n "$ns" link set lo up
    if [ "$rate" != none ]; then
      tc qdisc add dev "${PREFIX}${i}a" root tbf rate "$rate" burst "$burst" latency 20ms
      tc -n "$ns" qdisc add dev "${PREFIX}${i}b" root tbf rate "$rate" burst "$burst" latency 20ms
    fi
    fallocate -l "$size" "$LAB_DIR/lun-$i.img"
    start_server "$i"
  done
  trap - ERR
  status
}

# Starts tgtd of server $1 in its namespace with its target and LUN (the namespace, link and
# LUN file must exist).
start_server() {
  local i=$1 ns=$PREFIX$1 net=169.254.$((NET + $1)) ctl=$((CTL_BASE + $1))
  [ -f "$LAB_DIR/lun-$i.img" ] || die "server $i has no LUN file (run up first)"
  rm -f "/var/run/tgtd/socket.$ctl" "/var/run/tgtd/socket.$ctl.lock"
  setsid ip netns exec "$ns" tgtd -f -C "$ctl" --iscsi "portal=$net.2:3260" \
    >>"$LAB_DIR/tgtd-$i.log" 2>&1 </dev/null &
  echo $! >"$LAB_DIR/tgtd-$i.pid"
  disown $!
  local ok=
  for _ in $(seq 500); do
    if ip netns exec "$ns" tgtadm -C "$ctl" --lld iscsi --op show --mode sys >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.01
  done
  [ -n "$ok" ] || { cat "$LAB_DIR/tgtd-$i.log" >&2; die "tgtd $i did not start"; }
  local t=(ip netns exec "$ns" tgtadm -C "$ctl" --lld iscsi)
  "${t[@]}" --op new --mode target --tid 1 -T "iqn.2026-11.rs.tapdisk:srv$i"
  "${t[@]}" --op new --mode logicalunit --tid 1 --lun 1 --bstype rdwr -b "$LAB_DIR/lun-$i.img"
  "${t[@]}" --op update --mode logicalunit --tid 1 --lun 1 --params thin_provisioning=1
  "${t[@]}" --op bind --mode target --tid 1 -I ALL
}

# Adds host $1: see the header.
add_host() {
  local h=$1 hn=$PREFIX"h"$1
  [ -d "$LAB_DIR" ] || die "no LAN here (run up first)"
  ip netns add "$hn"
  ip -n "$hn" link set lo up
  ip link add "${hn}a" type veth peer name "${hn}b"
  ip link set "${hn}b" netns "$hn"
  ip addr add "169.254.$NET.$((200 + h))" peer "169.254.$NET.$((100 + h))" dev "${hn}a"
  ip link set "${hn}a" up
  ip -n "$hn" addr add "169.254.$NET.$((100 + h))" peer "169.254.$NET.$((200 + h))" dev "${hn}b"
  ip -n "$hn" link set "${hn}b" up
  for pidf in "$LAB_DIR"/tgtd-*.pid; do
    [ -f "$pidf" ] || continue
    local i=${pidf##*/tgtd-}; i=${i%.pid}
    local ns=$PREFIX$i srv=169.254.$((NET + i)).2 me=169.254.$((NET + i)).$((100 + h))
    ip link add "${hn}s$i" type veth peer name "${PREFIX}s${i}h$h"
    ip link set "${hn}s$i" netns "$hn"
    ip link set "${PREFIX}s${i}h$h" netns "$ns"
    ip -n "$hn" addr add "$me" peer "$srv" dev "${hn}s$i"
    ip -n "$hn" link set "${hn}s$i" up
    ip -n "$ns" addr add "$srv" peer "$me" dev "${PREFIX}s${i}h$h"
    ip -n "$ns" link set "${PREFIX}s${i}h$h" up
  done
  echo "host $h: namespace $hn, etcd side 169.254.$NET.$((200 + h))"
}

# Sets every link of host $1 $2 (up or down), inside its namespace.
host_links() {
  local hn=$PREFIX"h"$1
  for l in $(ip -n "$hn" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -v '^lo$'); do
    ip -n "$hn" link set "$l" "$2"
  done
}

kill_server() {
  local i=$1 pidf=$LAB_DIR/tgtd-$1.pid
  [ -f "$pidf" ] || die "no server $i"
  local p; p=$(cat "$pidf")
  kill -9 "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.01; done
}

urls() {
  for pidf in "$LAB_DIR"/tgtd-*.pid; do
    [ -f "$pidf" ] || return 0
    i=${pidf##*/tgtd-}; i=${i%.pid}
    echo "iscsi://169.254.$((NET + i)).2:3260/iqn.2026-11.rs.tapdisk:srv$i/1"
  done
}

status() {
  local any=
  for pidf in "$LAB_DIR"/tgtd-*.pid; do
    [ -f "$pidf" ] || continue
    any=1
    i=${pidf##*/tgtd-}; i=${i%.pid}
    state=dead; kill -0 "$(cat "$pidf")" 2>/dev/null && state=up
    echo "server $i $state iscsi://169.254.$((NET + i)).2:3260/iqn.2026-11.rs.tapdisk:srv$i/1"
  done
  [ -n "$any" ] || echo "no servers"
}

build_iscsi_rw() {
  need gcc gcc
  [ -f /usr/include/iscsi/iscsi.h ] || die "missing libiscsi headers: apt-get install -y libiscsi-dev"
  mkdir -p "$LAB_DIR"
  gcc -O2 -o "$LAB_DIR/iscsi-rw" "$here/iscsi-rw.c" -liscsi
  echo "$LAB_DIR/iscsi-rw"
}

case $cmd in
  up) shift; up "$@" ;;
  kill) [[ ${2:-} =~ ^[1-8]$ ]] || die "usage: $0 kill I"; kill_server "$2"; echo "server $2 killed" ;;
  start) [[ ${2:-} =~ ^[1-8]$ ]] || die "usage: $0 start I"; start_server "$2"; echo "server $2 started" ;;
  down) down; echo "storage LAN down" ;;
  host) [[ ${2:-} =~ ^[1-4]$ ]] || die "usage: $0 host H"; add_host "$2" ;;
  host-down) [[ ${2:-} =~ ^[1-4]$ ]] || die "usage: $0 host-down H"; host_links "$2" down ;;
  host-up) [[ ${2:-} =~ ^[1-4]$ ]] || die "usage: $0 host-up H"; host_links "$2" up ;;
  status) status ;;
  urls) urls ;;
  iscsi-rw) build_iscsi_rw ;;
  run)
    shift
    n=${1:-2}; rate=${2:-1gbit}; shift 2 || true
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "usage: $0 run N RATE -- CMD [ARGS...]"
    trap down EXIT
    up "$n" "$rate" >/dev/null
    STORAGE_LAN_URLS=$(urls | tr '\n' ' ') "$@"
    ;;
  selftest)
    trap down EXIT
    up 2 1gbit 64M
    rw=$(build_iscsi_rw)
    for u in $(urls); do "$rw" -V 16 "$u"; done
    echo "storage-lan selftest: OK"
    ;;
  *) echo "usage: $0 up [N] [RATE] [LUN_SIZE] | status | urls | down | kill I | start I | run N RATE -- CMD | iscsi-rw | selftest" >&2; exit 2 ;;
esac
