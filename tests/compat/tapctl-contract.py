#!/usr/bin/env python3
"""The tap-ctl contract of blktap3's two callers, driven exactly as they drive it.

Xen's hotplug script tools/hotplug/Linux/block-tap (Xen >= 4.19) and xapi's storage manager
(xapi-project/sm, class TapCtl in blktap2.py) run tap-ctl and parse what it prints. This script
runs the same commands with the same flags, parses the output their way (re-implemented here,
not copied), and checks what each caller relies on. Run it against any tap-ctl:

    tapctl-contract.py [--tap-ctl PATH] [--image-dir DIR]

It uses the run directory both callers hard-code, /run/blktap-control (root needed), and
removes what it made. Prints one line per step and ends with 'N passed, M failed'; exit 0 iff
none failed.
"""
import argparse
import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time

RUN = "/run/blktap-control"
TAP_MINOR_BASE = RUN + "/tapdisk"          # xapi's Blktap.TAP_MINOR_BASE
PAUSED, PAUSE_REQUESTED = 0x20, 0x10       # xapi's Tapdisk.Flags
PAUSE_MASK = PAUSED | PAUSE_REQUESTED


class Step(Exception):
    pass


def tapctl(args, stdin=None):
    """Runs tap-ctl as xapi's TapCtl._call does (pipes, text mode); returns (status, out, err)."""
    p = subprocess.run([TAPCTL] + [str(a) for a in args], input=stdin, capture_output=True,
                       text=True, timeout=180)
    return p.returncode, p.stdout, p.stderr


def ok(args):
    st, out, err = tapctl(args)
    if st != 0:
        raise Step("tap-ctl %s exited %d: %s" % (" ".join(map(str, args)), st, err.strip()))
    return out


def pread(args):
    """xapi's TapCtl._pread: the first line of stdout, stripped; non-zero exit fails."""
    return ok(args).split("\n", 1)[0].rstrip()


def xapi_list(**kw):
    """xapi's TapCtl.__list + Tapdisk.list: rows split on the first three spaces, key=value
    fields, state in hex; rows lacking pid, minor, state or args are skipped."""
    args = ["list"]
    for opt, key in (("-m", "minor"), ("-p", "pid"), ("-t", "_type"), ("-f", "path")):
        if kw.get(key) is not None:
            args += [opt, kw[key]]
    st, out, err = tapctl(args)
    if st != 0:
        raise Step("list exited %d: %s" % (st, err.strip()))
    rows = []
    for line in out.splitlines(True):
        row = {}
        for field in line.rstrip().split(" ", 3):
            bits = field.split("=")
            if len(bits) == 2:
                key, val = bits
                if key in ("pid", "minor"):
                    row[key] = int(val, 10)
                elif key == "state":
                    row[key] = int(val, 0x10)
                else:
                    row[key] = val
        if all(k in row for k in ("pid", "minor", "state", "args")):
            _type, path = row["args"].split(":", 1)
            row["type"], row["path"] = _type, path
            rows.append(row)
    return rows


def blocktap_find_device(_type, _file):
    """block-tap's find_device: `tap-ctl list -t TYPE -f FILE`, words split on commas and
    whitespace, pid= and minor= taken. Its exit status is not checked."""
    _, out, _ = tapctl(["list", "-t", _type, "-f", _file])
    pid = minor = None
    for param in out.replace(",", "\n").split():
        if param.startswith("pid="):
            pid = param[len("pid="):]
        elif param.startswith("minor="):
            minor = param[len("minor="):]
    return pid, minor


def blocktap_minor(devname):
    """block-tap's tap_create: strip the two prefixes it knows from `tap-ctl allocate`."""
    m = devname
    for prefix in (TAP_MINOR_BASE + "/tapdisk-", "/dev/xen/blktap-2/tapdev"):
        if m.startswith(prefix):
            m = m[len(prefix):]
    return m


def gone(pid, secs=15):
    end = time.time() + secs
    while time.time() < end:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZXx":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def nbd_greets(path):
    """An NBD server on the unix socket `path` sends NBDMAGIC and then IHAVEOPT (newstyle)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        data = b""
        while len(data) < 16:
            chunk = s.recv(16 - len(data))
            if not chunk:
                break
            data += chunk
        return data[:8] == b"NBDMAGIC" and data[8:16] == b"IHAVEOPT"
    finally:
        s.close()


def main():
    global TAPCTL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tap-ctl", default="tap-ctl")
    ap.add_argument("--image-dir", default=None)
    a = ap.parse_args()
    TAPCTL = a.tap_ctl
    work = tempfile.mkdtemp(prefix="tapctl-contract-", dir=a.image_dir)
    img1, img2 = os.path.join(work, "disk1.img"), os.path.join(work, "disk2.img")
    for p in (img1, img2):
        with open(p, "wb") as f:
            f.truncate(64 << 20)
    state = {}
    passed = failed = 0
    cleanup = []

    def step(name, fn):
        nonlocal passed, failed
        try:
            detail = fn() or ""
            passed += 1
            print("STEP %2d %-58s PASS %s" % (passed + failed, name, detail), flush=True)
        except Exception as e:  # a failed step names why; the next steps still run
            failed += 1
            print("STEP %2d %-58s FAIL %s" % (passed + failed, name, e), flush=True)

    # --- Xen's block-tap, add: allocate, spawn, attach, open; then find_device.
    def allocate():
        dev = pread(["allocate"])
        m = blocktap_minor(dev)
        if not m.isdigit():
            raise Step("allocate printed %r: block-tap gets minor %r" % (dev, m))
        if not re.search(r"%s/tapdisk-(\d+)$" % TAP_MINOR_BASE, dev):
            raise Step("xapi's Tapdisk._parse_minor cannot read %r" % dev)
        state["minor"] = int(m)
        cleanup.append(("free", state["minor"]))
        return "minor %d" % state["minor"]

    def spawn():
        state["pid"] = int(pread(["spawn"]))
        cleanup.append(("kill", state["pid"]))
        return "pid %d" % state["pid"]

    def attach():
        ok(["attach", "-p", state["pid"], "-m", state["minor"]])

    def open_():
        ok(["open", "-p", state["pid"], "-m", state["minor"], "-a", "aio:" + img1])

    def find_device():
        pid, minor = blocktap_find_device("aio", img1)
        if (pid, minor) != (str(state["pid"]), str(state["minor"])):
            raise Step("got pid=%r minor=%r" % (pid, minor))

    def nbd_socket():
        path = "%s/nbd%d.%d" % (RUN, state["pid"], state["minor"])
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise Step("%s is not a socket" % path)
        if not nbd_greets(path):
            raise Step("%s does not greet as a newstyle NBD server" % path)
        return path

    step("block-tap: tap-ctl allocate -> minor", allocate)
    step("block-tap: tap-ctl spawn -> pid", spawn)
    step("block-tap: tap-ctl attach -p -m", attach)
    step("block-tap: tap-ctl open -p -m -a aio:FILE", open_)
    step("block-tap: tap-ctl list -t aio -f FILE -> pid=, minor=", find_device)
    step("block-tap: physical-device-path nbd<pid>.<minor> serves NBD", nbd_socket)

    # --- xapi's TapCtl on the same VBD.
    def xapi_find():
        rows = xapi_list(path=img1)
        if len(rows) != 1 or rows[0]["pid"] != state["pid"] or rows[0]["minor"] != state["minor"]:
            raise Step("Tapdisk.find_by_path: %r" % rows)
        if rows[0]["type"] != "aio" or rows[0]["path"] != img1 or rows[0]["state"] & PAUSE_MASK:
            raise Step("row %r" % rows[0])
        return "state %#x" % rows[0]["state"]

    def xapi_stats():
        line = pread(["stats", "-p", state["pid"], "-m", state["minor"]])
        st = json.loads(line)
        if not isinstance(st, dict):
            raise Step("stats is not a JSON object: %r" % line[:80])
        return "%d keys" % len(st)

    def xapi_pause():
        pread(["pause", "-p", state["pid"], "-m", state["minor"]])
        rows = xapi_list(minor=state["minor"])
        if len(rows) != 1 or not rows[0]["state"] & PAUSED:
            raise Step("after pause: %r" % rows)
        return "state %#x" % rows[0]["state"]

    def xapi_unpause():
        pread(["unpause", "-p", state["pid"], "-m", state["minor"], "-a", "aio:" + img1])
        rows = xapi_list(minor=state["minor"])
        if len(rows) != 1 or rows[0]["state"] & PAUSE_MASK:
            raise Step("after unpause: %r" % rows)

    def xapi_close():
        pread(["close", "-p", state["pid"], "-m", state["minor"], "-t", "120"])

    def xapi_detach():
        pread(["detach", "-p", state["pid"], "-m", state["minor"]])
        if not gone(state["pid"]):
            raise Step("tapdisk %d still runs after its last VBD was detached" % state["pid"])

    def xapi_free():
        pread(["free", "-m", state["minor"]])
        if os.path.exists("%s/tapdisk-%d" % (TAP_MINOR_BASE, state["minor"])):
            raise Step("the minor's marker is still there")
        if xapi_list(minor=state["minor"]):
            raise Step("list still shows the minor")
        cleanup.remove(("free", state["minor"]))

    step("xapi: Tapdisk.find_by_path (list -f FILE)", xapi_find)
    step("xapi: TapCtl.stats -> one JSON line", xapi_stats)
    step("xapi: TapCtl.pause; list shows PAUSED (0x20)", xapi_pause)
    step("xapi: TapCtl.unpause -a; list shows running", xapi_unpause)
    step("xapi: TapCtl.close -t 120", xapi_close)
    step("xapi: TapCtl.detach; the tapdisk exits", xapi_detach)
    step("xapi: TapCtl.free; the minor is gone", xapi_free)

    # --- block-tap, remove: destroy -p -m on a second disk.
    def second():
        d = pread(["allocate"])
        m = int(blocktap_minor(d))
        cleanup.append(("free", m))
        pid = int(pread(["spawn"]))
        cleanup.append(("kill", pid))
        ok(["attach", "-p", pid, "-m", m])
        ok(["open", "-p", pid, "-m", m, "-a", "aio:" + img2])
        state["pid2"], state["minor2"] = pid, m

    def destroy():
        ok(["destroy", "-p", state["pid2"], "-m", state["minor2"]])
        if not gone(state["pid2"]):
            raise Step("tapdisk still runs")
        if blocktap_find_device("aio", img2) != (None, None):
            raise Step("list still finds the disk")
        if os.path.exists("%s/tapdisk-%d" % (TAP_MINOR_BASE, state["minor2"])):
            raise Step("the minor's marker is still there")
        cleanup.remove(("free", state["minor2"]))

    step("block-tap: add of a second disk", second)
    step("block-tap remove: tap-ctl destroy -p -m", destroy)

    # --- Failures the callers handle.
    def bad_open():
        m = int(blocktap_minor(pread(["allocate"])))
        cleanup.append(("free", m))
        pid = int(pread(["spawn"]))
        cleanup.append(("kill", pid))
        ok(["attach", "-p", pid, "-m", m])
        st, _, err = tapctl(["open", "-p", pid, "-m", m, "-a", "aio:" + img1 + ".missing"])
        if st == 0:
            raise Step("open of a missing image succeeded")
        ok(["detach", "-p", pid, "-m", m])      # block-tap's cleanup after a failed open
        ok(["free", "-m", m])
        cleanup.remove(("free", m))
        if not gone(pid):
            raise Step("the tapdisk stays after detach")
        return "open exited %d (%s)" % (st, errno.errorcode.get(st, "?"))

    def usage():
        st, _, _ = tapctl(["open", "-p", "1"])
        if st != errno.EINVAL:
            raise Step("a bad command line exited %d, not EINVAL (%d)" % (st, errno.EINVAL))

    def list_not_a_tapdisk():
        st, out, _ = tapctl(["list", "-p", os.getpid()])
        if st != 0 or out.strip():
            raise Step("exit %d, %r" % (st, out))

    step("block-tap: failed open, then detach + free", bad_open)
    step("a bad command line exits EINVAL", usage)
    step("xapi: list -p of a process that is no tapdisk: nothing", list_not_a_tapdisk)

    for what, n in reversed(cleanup):
        if what == "free":
            tapctl(["free", "-m", n])
        elif what == "kill":
            try:
                os.kill(n, 9)
            except OSError:
                pass
    for p in (img1, img2):
        os.unlink(p)
    os.rmdir(work)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
