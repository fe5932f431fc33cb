#!/bin/bash
# ratios.sh LOG... - the backend comparison over several rig runs: IOPS and each column's
# ratio to blkback, qdisk and blktap3, computed within each run, then the median over the runs
# (TCG numbers move from run to run; only medians of per-run ratios mean much). Also the
# multi-queue lines of each run.
#   tests/xen-rig/ratios.sh /var/tmp/tapdisk-rs-xen-rig/logs/run-trixie-*.log
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 RIG-LOG..." >&2; exit 2; }
k=0
for log in "$@"; do
    k=$((k + 1))
    grep -a 'DOMU: BENCH' "$log" | sed "s/.*DOMU: BENCH /run=$k /"
done | awk -f "$HERE/bench-table.awk"
echo
k=0
for log in "$@"; do
    k=$((k + 1))
    grep -a 'DOMU: MQ' "$log" | sed "s/.*DOMU: MQ /run $k: /"
done
