#!/bin/bash
# run.sh - the Xen rig, one command from a fresh machine:
#   1. host packages (host-deps.sh) and the dom0 image (build-images.sh), cached under
#      /var/tmp/tapdisk-rs-xen-rig/<suite>;
#   2. this project's binaries, built on the host (cargo build --release), with block-tap and
#      the guests' initramfs, on a small second disk for dom0;
#   3. Xen + a Linux PV dom0 under qemu-system-x86_64 (TCG); dom0 runs dom0-init: tapback,
#      the main guest on our backend (dd, fio verify, flush-heavy fio, mkfs + fstrim + fsck,
#      xl block-attach/detach, a hostile frontend from dom0), a second guest on the same disk
#      (reconnect) with a second disk served from a qcow2 chain (a leaf over a compressed
#      base, both made by qemu-img), then one benchmark guest for kernel blkback, QEMU qdisk
#      and tapdisk;
#   4. prints the checks, what the guests negotiated, and the backend comparison table.
# Exit 0 iff dom0 printed "RIG: RESULT PASS".
#
# RIG_SUITE=trixie (default; Xen 4.20, backend/vbd3) or bookworm (Xen 4.17, backend/vbd).
# Knobs: RIG_TIMEOUT (s, default 1200; 2400 with RIG_BENCHSET=full), RIG_BENCHSECS (s per
# benchmark job, default 5; 3 with RIG_PROFILE=dev), RIG_BENCHROUNDS (rounds of the benchmark,
# default 2: each workload runs on every disk of a guest in turn), RIG_BENCHSET=full (also the guest whose
# blkfront offers no persistent grants, column tapdisk-map: for measurements), RIG_GRANT_COPY=0
# (skip the guest on tapdisk in grant-copy mode; default 1, Xen >= 4.19 only), RIG_PROFILE
# (cargo profile, default release; CI uses dev, whose binaries are unoptimised: measure with
# release), FORCE=1 (rebuild the images), RIG_DIAG=dom0fio|prof (a diagnostic run instead of
# the checks, see diag.sh; RIG_DIAG_BENCH=rw:bs:qd,... the workloads prof profiles).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/config.sh"
T0=$(date +%s.%N)
el() { printf '%.0f' "$(echo "$(date +%s.%N) - $T0" | bc)"; }
step() { echo "xen-rig: [$(el)s] $*"; }

"$HERE/host-deps.sh" > "$RIG_LOGS/host-deps.log" 2>&1 || { tail -20 "$RIG_LOGS/host-deps.log"; exit 1; }
step "host packages ready"
"$HERE/build-images.sh" > "$RIG_LOGS/build-images-$RIG_SUITE.log" 2>&1 || { tail -30 "$RIG_LOGS/build-images-$RIG_SUITE.log"; exit 1; }
step "dom0 image ready ($(tail -1 "$RIG_LOGS/build-images-$RIG_SUITE.log" | sed 's/^xen-rig: //'))"

PROFILE=${RIG_PROFILE:-release}
(cd "$ROOT" && cargo build --locked --profile "$PROFILE" -p tapdisk -p tap-ctl -p tapback -p xen-frontend) > "$RIG_LOGS/cargo.log" 2>&1 \
    || { tail -30 "$RIG_LOGS/cargo.log"; exit 1; }
TGT=$ROOT/target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
step "binaries built ($PROFILE)"

# The guests' initramfs: busybox, fio, e2fsprogs, util-linux (host binaries and their libraries),
# xen-blkfront and ext4 from the dom0 kernel. Cached per kernel version.
R=$RIG_ROOTFS
KVER=$(cat "$RIG_BOOT/kver")
INITRD=$RIG_WORK/domu-initrd-$KVER.cpio
if [ ! -s "$INITRD" ] || [ "$HERE/domu-init" -nt "$INITRD" ]; then
    D=$RIG_WORK/domu-initrd
    rm -rf "$D"; mkdir -p "$D"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules}
    cp /bin/busybox "$D/bin/busybox"
    install -m 0755 "$HERE/domu-init" "$D/init"
    for b in fio mkfs.ext4 mke2fs e2fsck fstrim blkdiscard; do
        p=$(command -v $b) || { echo "xen-rig: $b missing on the host"; exit 1; }
        cp -L "$p" "$D/bin/"
        ldd "$p" | awk '/=>/ {print $3} /^\t\/lib64/ {print $1}' | while read -r l; do
            [ -e "$D$l" ] || cp -L --parents "$l" "$D"
        done
    done
    : > "$D/lib/modules/order"
    for mod in ext4 xen-blkfront; do
        modprobe -d "$R" -S "$KVER" --show-depends "$mod" 2>/dev/null | awk '/^insmod/ {print $2}'
    done | while read -r m; do
        m=${m#"$R"}
        n=$(basename "$m"); n=${n%.xz}; n=${n%.zst}
        case "$m" in
            *.xz)  xz -dc "$R$m" > "$D/lib/modules/$n";;
            *.zst) zstd -dcq "$R$m" > "$D/lib/modules/$n";;
            *)     cp "$R$m" "$D/lib/modules/$n";;
        esac
        grep -qx "$n" "$D/lib/modules/order" || echo "$n" >> "$D/lib/modules/order"
    done
    grep -q xen-blkfront "$D/lib/modules/order" || { echo "xen-rig: xen-blkfront module not found"; exit 1; }
    # Uncompressed: under TCG, unpacking ~90 MB costs the guest more than reading it does.
    (cd "$D" && find . | cpio -o -H newc --quiet) > "$INITRD.tmp" && mv "$INITRD.tmp" "$INITRD"
    step "guest initramfs built ($(du -h "$INITRD" | cut -f1), modules: $(tr '\n' ' ' < "$D/lib/modules/order"))"
fi

# The payload disk: our binaries, block-tap, the guests' initramfs.
P=$RIG_WORK/payload
rm -rf "$P"; mkdir -p "$P/bin"
for b in tapdisk tap-ctl tapback xen-frontend; do
    install -m 0755 "$TGT/$b" "$P/bin/"
    strip --strip-debug "$P/bin/$b" 2>/dev/null || true
done
install -m 0755 "$ROOT/xen-configs/block-tap" "$P/block-tap"
cp "$INITRD" "$P/domu-initrd.cpio"
install -m 0644 "$HERE/diag.sh" "$P/diag.sh"
# A diagnostic run (RIG_DIAG, see diag.sh) takes the host's fio and perf along, with their
# libraries and loader, run in dom0 as tools/lib64/ld-linux-x86-64.so.2 --library-path tools/lib.
if [ -n "${RIG_DIAG:-}" ]; then
    mkdir -p "$P/tools/bin" "$P/tools/lib" "$P/tools/lib64"
    for b in fio perf; do
        p=$(command -v $b) || { echo "xen-rig: RIG_DIAG needs $b on the host"; exit 1; }
        cp -L "$p" "$P/tools/bin/"
        ldd "$p" | awk '/=>/ {print $3}' | while read -r l; do cp -L "$l" "$P/tools/lib/"; done
    done
    cp -L /lib64/ld-linux-x86-64.so.2 "$P/tools/lib64/"
fi
# The reference, blktap3 (tapdisk, tap-ctl, tapback with the libxl fix), for dom0-init's
# blktap3 phase: built from ../shared/peers (cached), unpacked in dom0 at the same path.
# Where the peers folder is absent (a user's machine) the phase is skipped, saying why.
if BT3=$(bash "$ROOT/tests/compat/blktap3.sh" 2>"$RIG_LOGS/blktap3.log"); then
    tar -czf "$P/blktap3.tar.gz" -C / "${BT3#/}"
    step "blktap3 (the reference) ready: $BT3"
else
    tail -3 "$RIG_LOGS/blktap3.log" | tr '\n' ' ' > "$P/blktap3.skipped"
    step "blktap3 phase will be skipped: $(cat "$P/blktap3.skipped")"
fi
# A qcow2 chain made by QEMU's tools for the "again" guest's second disk: base.qcow2 (32 MiB:
# 8 MiB of 0x5a in compressed clusters, `qemu-img convert -c`, then 8 MiB of 0xa5 in ordinary
# clusters, `qemu-io`, then zeroes) under leaf.qcow2 (empty; backing file base.qcow2).
Q=$RIG_WORK/qcow2
rm -rf "$Q"; mkdir -p "$Q"
{ truncate -s 32M "$Q/base.raw" && qemu-io -f raw -c "write -P 0x5a 0 8M" "$Q/base.raw" \
    && qemu-img convert -c -f raw -O qcow2 "$Q/base.raw" "$Q/base.qcow2" \
    && qemu-io -f qcow2 -c "write -P 0xa5 8M 8M" "$Q/base.qcow2" \
    && (cd "$Q" && qemu-img create -f qcow2 -b base.qcow2 -F qcow2 leaf.qcow2) \
    && qemu-img check -q "$Q/base.qcow2" && qemu-img check -q "$Q/leaf.qcow2"; } > "$RIG_LOGS/qcow2.log" 2>&1 \
    || { echo "xen-rig: making the qcow2 chain failed"; tail -20 "$RIG_LOGS/qcow2.log"; exit 1; }
cp "$Q/base.qcow2" "$Q/leaf.qcow2" "$P/"
rm -f "$RIG_WORK/payload.ext4"
mkfs.ext4 -q -F -L rigpayload -d "$P" "$RIG_WORK/payload.ext4" 512M
install -m 0755 "$HERE/dom0-init" "$RIG_WORK/dom0-init"
step "payload disk ready"

BENCHSET=${RIG_BENCHSET:-short}
BENCHSECS=${RIG_BENCHSECS:-$([ "$PROFILE" = dev ] && echo 3 || echo 5)}
BENCHROUNDS=${RIG_BENCHROUNDS:-2}
TIMEOUT=${RIG_TIMEOUT:-$([ "$BENCHSET" = full ] && echo 2400 || echo 1200)}
LOG=$RIG_LOGS/run-$RIG_SUITE-$(date +%Y%m%d-%H%M%S).log
PIDF=$RIG_WORK/qemu.pid
XEN_CMD="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=warning guest_loglvl=warning noreboot"
DOM0_CMD="console=hvc0 earlyprintk=xen root=/dev/vda rw init=/usr/sbin/rig-init rig.suite=$RIG_SUITE rig.benchsecs=$BENCHSECS rig.benchrounds=$BENCHROUNDS rig.grantcopy=${RIG_GRANT_COPY:-1} rig.benchset=$BENCHSET${RIG_DIAG:+ rig.diag=$RIG_DIAG}${RIG_DIAG_BENCH:+ rig.diagbench=$RIG_DIAG_BENCH}"
# dom0's init goes into the cached root image with debugfs (no mount); the image is then
# booted with snapshot=on, so the guests' disks and logs never change it.
if ! debugfs -R "stat /usr/sbin/rig-init" "$RIG_IMG" 2>/dev/null | grep -q Inode || ! cmp -s "$HERE/dom0-init" "$RIG_WORK/dom0-init.installed"; then
    debugfs -w -R "rm /usr/sbin/rig-init" "$RIG_IMG" >/dev/null 2>&1
    debugfs -w -R "write $HERE/dom0-init /usr/sbin/rig-init" "$RIG_IMG" >/dev/null 2>&1
    debugfs -w -R "set_inode_field /usr/sbin/rig-init mode 0100755" "$RIG_IMG" >/dev/null 2>&1
    cp "$HERE/dom0-init" "$RIG_WORK/dom0-init.installed"
fi
rm -f "$PIDF"
step "booting Xen $RIG_XENVER ($RIG_SUITE) under QEMU TCG; log $LOG; load: $(cut -d' ' -f1-3 /proc/loadavg)"
timeout --foreground "$TIMEOUT" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi,tb-size=512 \
    -cpu qemu64 -smp 2 -m 4G -display none -monitor none -serial stdio -no-reboot \
    -kernel "$RIG_BOOT/xen" -append "$XEN_CMD" \
    -initrd "$RIG_BOOT/vmlinuz $DOM0_CMD,$RIG_BOOT/initrd.img" \
    -drive "file=$RIG_IMG,if=none,id=d0,format=raw,cache=unsafe,snapshot=on" -device virtio-blk-pci,drive=d0 \
    -drive "file=$RIG_WORK/payload.ext4,if=none,id=d1,format=raw,readonly=on" -device virtio-blk-pci,drive=d1 \
    -pidfile "$PIDF" < /dev/null 2>&1 | while IFS= read -r line; do
        printf '%6d %s\n' "$(( ${EPOCHSECONDS} - ${T0%.*} ))" "${line//$'\r'/}"
    done > "$LOG"
step "QEMU exited; load: $(cut -d' ' -f1-3 /proc/loadavg)"

grep -aE 'RIG: |  (main|again|ref|qd|copy|nopersist|blktap3)(-console)?\| |XENFRONT|  tap(back|disk)\||  dmesg\|' "$LOG" | grep -avE 'guest_loglvl' | sed 's/^ *[0-9.]* //' > "$RIG_LOGS/summary.txt"
if [ -n "${RIG_DIAG:-}" ]; then
    grep -aE 'RIG: (DIAG|RESULT|unknown)|DIAG-PROF\||DOMU: BENCH' "$LOG" | sed 's/^ *[0-9.]* //'
    grep -aq 'RIG: RESULT PASS' "$LOG" && { step "diagnostic run $RIG_DIAG done"; exit 0; }
    step "diagnostic run $RIG_DIAG FAILED: see $LOG"; exit 1
fi
grep -aE 'RIG: (CHECK|RESULT|frontend|main.img|grants|after|blktap3)|DOMU: (CHECK|NEGOTIATED)|XENFRONT' "$LOG" | sed 's/^ *[0-9.]* //'
echo
echo "=== backend comparison (same guest workload, fio O_DIRECT libaio, ${BENCHSECS} s per job; TCG: only the ratios mean something)"
if [ "$PROFILE" = release ]; then
    echo "    our binaries: release build"
else
    echo "    our binaries: $PROFILE build, NOT OPTIMISED (a check that the columns run, not a measurement; measure with RIG_PROFILE=release)"
fi
echo "    tapdisk: persistent grants, IO staged through its own pages (its main configuration); tapdisk-direct: IO on the"
echo "    guest's pages; tapdisk-buffered: --direct off; tapdisk-copy: grant copy; tapdisk-map: per-request mapping (a guest"
echo "    without persistent grants); tapdisk-large: persistent, 16-page ring, 2 queues; tapdisk-bt3: tapdisk in blktap3's guest,"
echo "    interleaved with blktap3's disk (its ratio to blktap3 is the one taken at the same moments)"
grep -a 'DOMU: BENCH' "$LOG" | sed 's/.*DOMU: BENCH //' | awk -f "$HERE/bench-table.awk"
echo
echo "=== multi-queue (tapdisk, persistent grants, 16-page ring: fio randread 4k qd16 numjobs=2)"
grep -a 'DOMU: MQ' "$LOG" | sed 's/.*DOMU: MQ /  /'
echo
if grep -aq 'RIG: RESULT PASS' "$LOG"; then
    step "PASS (suite $RIG_SUITE)"; exit 0
fi
step "FAIL (suite $RIG_SUITE): see $LOG"; exit 1
