#!/usr/bin/env bash
# blktap3.sh - the original blktap3 (tapdisk, tap-ctl, tapback with the libxl fix), built from
# the peers folder beside the project (../shared/peers: build-blktap3.sh and its source
# tarball), as the reference the contract test and the Xen rig compare with. Prints the
# install prefix on stdout. Exit 3, with the reason on stderr, where the peers folder is absent
# (a user's machine): callers skip their blktap3 part then.
#
# The build (about a minute) is cached in $BLKTAP3_PREFIX (default /var/tmp/tapdisk-rs-blktap3,
# the same path in the rig's dom0, where tap-ctl finds its tapdisk by that prefix) and redone
# when the peers' script or tarball change. Peers are looked for in $TAPDISK_RS_PEERS, then
# ../shared/peers and ../../shared/peers from the project root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${BLKTAP3_PREFIX:-/var/tmp/tapdisk-rs-blktap3}
PEERS=
for d in "${TAPDISK_RS_PEERS:-}" "$ROOT/../shared/peers" "$ROOT/../../shared/peers"; do
    if [ -n "$d" ] && [ -x "$d/build-blktap3.sh" ]; then PEERS=$(cd "$d" && pwd); break; fi
done
if [ -z "$PEERS" ]; then
    echo "blktap3.sh: no peers folder with build-blktap3.sh (../shared/peers): blktap3 is not available here" >&2
    exit 3
fi
stamp=$(cat "$PEERS/build-blktap3.sh" "$PEERS"/blktap-*.tar.gz | sha256sum | cut -c1-16)
exec 9>"$PREFIX.lock"
flock 9
if [ "$(cat "$PREFIX/.built-from" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$PREFIX"
    log=$(mktemp)
    if ! "$PEERS/build-blktap3.sh" --libxl "$PREFIX" >"$log" 2>&1; then
        echo "blktap3.sh: building blktap3 failed:" >&2
        tail -20 "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    # tapdisk links libaio; the rig's dom0 (trixie) has none, so it travels with the build.
    for l in /lib/x86_64-linux-gnu/libaio.so.1*; do [ -e "$l" ] && cp -L "$l" "$PREFIX/lib/"; done
    echo "$stamp" > "$PREFIX/.built-from"
fi
echo "$PREFIX"
