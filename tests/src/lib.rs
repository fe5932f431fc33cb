//! End-to-end tests of tapdisk-rs live in `tests/`: they spawn the real `tapdisk`, `tap-ctl` and
//! `td-bench` binaries and drive them with real peers (qemu-io, qemu-img, nbdinfo, fio).
