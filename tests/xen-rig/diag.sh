# diag.sh - sourced by dom0-init when run.sh is given RIG_DIAG (kernel argument rig.diag): a
# diagnostic run instead of the checks, then dom0 powers off. Not part of CI.
#   dom0fio  fio in dom0 itself on a benchmark image (O_DIRECT through io_uring and libaio,
#            buffered) and on a loop device over blkback's image: what dom0's storage gives
#            with no guest and no grant in the way, the ceiling of every backend's column.
#   prof     one guest on tapdisk (blkfront defaults) runs rig.benchw (default read:256k:4)
#            for three rounds; tapdisk is profiled with perf (cpu-clock, call graphs) during
#            the second and the report's top lines are printed (DIAG-PROF), then its system
#            calls by kind are counted for 4 s (DIAG-SYSCALLS).
# fio and perf are the host's, with their libraries, on the payload disk under tools/.
T=/opt/rig/tools
tool() { # name args...: a host binary with the host's libraries
    local b=$1; shift
    "$T/lib64/ld-linux-x86-64.so.2" --library-path "$T/lib" "$T/bin/$b" "$@"
}
diag_fio() { # label fio-args...: one 4 s job on a cold page cache
    local n=$1; shift
    drop_caches
    mark "DIAG-FIO $n $(tool fio --name=d --output-format=terse --terse-version=3 --runtime=4 --time_based \
        --size=64M "$@" 2>&1 | awk -F';' 'NF < 50 {printf "error: %s ", $0; next}
            {printf "read_iops=%s read_kib_s=%s write_iops=%s write_kib_s=%s", $8, $7, $49, $48}')"
}
case "$DIAG" in
dom0fio)
    L=$(losetup -f --show /root/blkback.img)
    for d in "file:/root/tapcopy.img" "loop:$L"; do
        f=${d#*:}
        diag_fio "${d%%:*} read-256k-qd4 direct" --filename=$f --ioengine=io_uring --direct=1 --rw=read --bs=256k --iodepth=4
        diag_fio "${d%%:*} read-256k-qd4 buffered" --filename=$f --ioengine=io_uring --direct=0 --rw=read --bs=256k --iodepth=4
        diag_fio "${d%%:*} write-1m-qd4 direct" --filename=$f --ioengine=io_uring --direct=1 --rw=write --bs=1m --iodepth=4
        diag_fio "${d%%:*} randread-4k-qd16 direct" --filename=$f --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=16
        diag_fio "${d%%:*} randwrite-4k-qd16 direct" --filename=$f --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=16
    done
    losetup -d "$L"
    ;;
prof)
    EXTRA_DOMU="rig.blkfront=default rig.benchw=${DIAG_BENCH:-read:256k:4}"
    BENCHSECS=15; BENCHROUNDS=3
    guest prof compare "tapdisk:xvdc" "vdev=xvdc, access=rw, $TAPDISK, target=/root/tapcopy.img" || finish
    wait_console prof "BENCH tapdisk" 600
    P=$(pgrep -x tapdisk | head -1)
    sleep 2
    (cd /tmp && tool perf record -q -e cpu-clock -F 1000 -g -p "$P" -o /tmp/perf.data -- sleep 8) 2>&1 | tail -3
    # System calls the tapdisk makes in 4 s (needs the kernel's syscall trace points); with the
    # BENCH line of round 2 that is system calls per request.
    tool perf stat -x, -p "$P" -e syscalls:sys_enter_clock_gettime,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_ioctl,syscalls:sys_enter_read,syscalls:sys_enter_write -- sleep 4 2>&1 \
        | awk -F, '{printf "  DIAG-SYSCALLS| %s in 4 s: %s\n", $3, $1}'
    tool perf report -i /tmp/perf.data --no-children --sort comm,dso --stdio -g none 2>/dev/null \
        | grep '%' | head -12 | sed 's/^/  DIAG-PROF| /'
    tool perf report -i /tmp/perf.data --no-children --sort dso,sym --stdio \
        2>/dev/null | grep -v '^$' | grep '%' | head -80 | sed 's/^/  DIAG-PROF| /'
    wait_console prof "RESULT" 600
    console prof | grep -a BENCH | sed 's/^/  /'
    finish_guest prof 120
    ;;
*) mark "unknown RIG_DIAG '$DIAG' (dom0fio or prof)"; FAILS=$((FAILS+1));;
esac
finish
