//! The local transport end to end in one process: handshake checks, requests, hang-ups.

use crate::transport::{EventChannel, GrantMapper};

use super::*;
use crate::protocol::op;
use crate::protocol::{Response, Segment};
use crate::request::Problem;

const INFO: DiskInfo = DiskInfo::writable(2048);

#[test]
fn handshake_and_one_request() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let mut fe = LocalFrontend::attach(
        a,
        FrontendConfig {
            mem_pages: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let mut be = t.join().unwrap().unwrap();
    assert_eq!(fe.info(), &INFO);
    assert_eq!(fe.ring_size(), 32);
    fe.write_mem(4096, b"hello");
    let seg = [Segment {
        gref: 1,
        first_sect: 0,
        last_sect: 7,
        pad: 0,
    }];
    assert!(fe.queue(&FrontRequest::Rw {
        op: op::WRITE,
        id: 9,
        sector: 0,
        segments: &seg
    }));
    fe.push().unwrap();
    be.evtchn.ack().unwrap();
    assert_eq!(be.ring.pending().unwrap(), 1);
    let mut addrs = [std::ptr::null_mut(); 1];
    let sg = |gref| Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
        pad: 0,
    };
    be.grants.map(&[sg(1)], false, &mut addrs).unwrap();
    // SAFETY: the page is mapped by `be.grants`, which is alive.
    assert_eq!(unsafe { std::slice::from_raw_parts(addrs[0], 5) }, b"hello");
    assert_eq!(
        be.grants.map(&[sg(4)], false, &mut addrs),
        Err(Problem::BadGrant(4))
    );
    be.ring.put_response(&Response {
        id: 9,
        operation: op::WRITE,
        status: 0,
    });
    if be.ring.push_responses() {
        be.evtchn.notify().unwrap();
    }
    assert!(fe.wait(Some(Duration::from_secs(5))).unwrap());
    let mut got = vec![];
    fe.poll(|r| got.push(r));
    assert_eq!(
        got,
        vec![Response {
            id: 9,
            operation: op::WRITE,
            status: 0
        }]
    );
    drop(be);
    assert!(fe.wait(Some(Duration::from_secs(5))).is_err());
}

#[test]
fn limits_are_enforced() {
    let (a, b) = UnixStream::pair().unwrap();
    let lim = AttachLimits {
        max_ring_order: 2,
        max_mem_pages: 8,
    };
    let t = std::thread::spawn(move || accept(b, &lim, &INFO));
    let r = LocalFrontend::attach(
        a,
        FrontendConfig {
            ring_order: 3,
            mem_pages: 4,
            ..Default::default()
        },
    );
    assert!(
        matches!(r, Err(crate::Error::Attach(AttachError::Refused(m))) if m.contains("ring order 3"))
    );
    assert!(t.join().unwrap().is_err());
}

#[test]
fn unsealed_or_missing_descriptors_are_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let ev = new_eventfd().unwrap();
    let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":1}\n";
    send_line(&a, line, &[ev.as_raw_fd()]).unwrap();
    let err = t.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("expected 4 descriptors"), "{err}");

    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let f = new_eventfd().unwrap();
    send_line(
        &a,
        line,
        &[f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd()],
    )
    .unwrap();
    let err = t.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("sealed"), "{err}");

    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    (&a).write_all(b"not json\n").unwrap();
    assert!(t.join().unwrap().unwrap_err().to_string().contains("JSON"));
}

#[test]
fn early_read_reports_never_block_on_a_peer_that_does_not_read() {
    let mem = new_sealed_memfd(c"mem", 4 * PAGE_SIZE as u64).unwrap();
    let ring = new_sealed_memfd(c"ring", PAGE_SIZE as u64).unwrap();
    let (k, n) = (new_eventfd().unwrap(), new_eventfd().unwrap());
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":4}\n";
    let fds = [
        mem.as_raw_fd(),
        ring.as_raw_fd(),
        k.as_raw_fd(),
        n.as_raw_fd(),
    ];
    send_line(&a, line, &fds).unwrap();
    let be = t.join().unwrap().unwrap();
    // `a` never reads again: the socket buffer fills, and then each report fails at once
    // (the ring thread logs it and goes on) instead of blocking the ring thread.
    let t0 = std::time::Instant::now();
    let mut sent = 0u64;
    let err = loop {
        match be.report_early_read_done(sent, true) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000_000, "the buffer never filled");
    };
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    assert!(sent > 0);
    for _ in 0..1000 {
        assert!(be.report_early_read_done(0, false).is_err());
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    drop(a);
}

/// Sends the attach line for one ring page and `claimed` pages of memory with `fds`, and
/// returns why the backend refused it.
fn refusal(claimed: u32, fds: &[RawFd]) -> String {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let line = format!(
        "{{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":{claimed}}}\n"
    );
    send_line(&a, line.as_bytes(), fds).unwrap();
    t.join().unwrap().unwrap_err().to_string()
}

#[test]
fn short_memfds_and_foreign_event_descriptors_are_refused() {
    let mem = new_sealed_memfd(c"mem", 4 * PAGE_SIZE as u64).unwrap();
    let ring = new_sealed_memfd(c"ring", PAGE_SIZE as u64).unwrap();
    let short_ring = new_sealed_memfd(c"ring", 512).unwrap();
    let (k, n) = (new_eventfd().unwrap(), new_eventfd().unwrap());
    let (m, r) = (mem.as_raw_fd(), ring.as_raw_fd());
    let (k, n) = (k.as_raw_fd(), n.as_raw_fd());
    // Guest memory smaller than claimed: mapping it whole would fault (SIGBUS) on use.
    let err = refusal(5, &[m, r, k, n]);
    assert!(err.contains("smaller than mem_pages"), "{err}");
    let err = refusal(4, &[m, short_ring.as_raw_fd(), k, n]);
    assert!(err.contains("ring memfd is smaller"), "{err}");
    // A memfd, a pipe or a socket where an eventfd belongs.
    let (pr, _pw) = nix::unistd::pipe().unwrap();
    let (sa, _sb) = UnixStream::pair().unwrap();
    for (fds, what) in [
        ([m, r, m, n], "kick"),
        ([m, r, k, pr.as_raw_fd()], "notify"),
        ([m, r, sa.as_raw_fd(), n], "kick"),
    ] {
        let err = refusal(4, &fds);
        assert!(
            err.contains(&format!("the {what} descriptor is not an eventfd")),
            "{err}"
        );
    }
    // The same descriptors, right, attach.
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || accept(b, &AttachLimits::default(), &INFO));
    let line = b"{\"version\":1,\"abi\":\"x86_64-abi\",\"ring_order\":0,\"mem_pages\":4}\n";
    send_line(&a, line, &[m, r, k, n]).unwrap();
    assert!(t.join().unwrap().is_ok());
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// A signal whose handler does not ask for restarting (or task work an io_uring the thread
/// closed left behind) interrupts the handshake's blocking receive; the attach must retry
/// it, not fail with EINTR.
#[test]
fn an_interrupted_handshake_is_retried() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // No SA_RESTART: a receive the signal interrupts returns EINTR.
    let act = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing (async-signal-safe) and lives as long as the process;
    // no other test of this binary uses SIGUSR1.
    unsafe { sigaction(Signal::SIGUSR1, &act) }.unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let t = std::thread::spawn(move || {
        // The frontend is blocked in the handshake by then (it waits for the answer).
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: `me` is the test's thread, alive until it joins this one.
        assert_eq!(unsafe { libc::pthread_kill(me, libc::SIGUSR1) }, 0);
        std::thread::sleep(Duration::from_millis(100));
        accept(b, &AttachLimits::default(), &INFO)
    });
    let fe = LocalFrontend::attach(
        a,
        FrontendConfig {
            mem_pages: 4,
            ..Default::default()
        },
    );
    let be = t.join().unwrap();
    let fe = fe.expect("the attach survives the signal");
    assert!(be.is_ok());
    assert_eq!(fe.info(), &INFO);
}
