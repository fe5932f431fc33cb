//! How `td-bench run` kicks tapdisk and waits for its answers: through an io_uring of its own,
//! one `io_uring_enter` per wait that also carries the kick for what the loop just published,
//! as fio's own loop does one enter per wait.
//!
//! [`LocalFrontend::wait`] takes three system calls for the same (the kick's write, a `poll`
//! of two descriptors with a timer, the eventfd's read), and the benchmark's frontend is on
//! the measured path: at depth 1 its time is added to every IO's, at depth 32 it shares the
//! machine's two CPUs with tapdisk. A guest's blkfront takes an interrupt instead.
//!
//! The notify eventfd is polled multishot and never read: each signal tapdisk writes is one
//! wake-up and one completion, and the counter only grows (filling it takes 2^64 signals).
//! The socket's hang-up is polled once. A timeout ticks once a second for the stall limit, so
//! no wait arms a timer of its own. A frontend that spins ([`LocalFrontend::set_spin`]) keeps
//! [`LocalFrontend::wait`], which spins before it sleeps.

use std::io;
use std::time::Duration;

use blkif::local::LocalFrontend;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// User data of the notify eventfd's multishot poll.
const NOTIFY: u64 = 1;
/// User data of the socket's hang-up poll.
const HANGUP: u64 = 2;
/// User data of the once-a-second tick.
const TICK: u64 = 3;
/// User data of a kick's write.
const KICK: u64 = 4;

/// One frontend's kicks and waits.
pub struct Waiter {
    ring: IoUring,
    /// What a kick writes: read by the kernel while the write is submitted, never changed.
    one: Box<u64>,
    /// The tick's period: copied by the kernel when the timeout is submitted.
    second: Box<types::Timespec>,
    notify_fd: i32,
    /// The tick may repeat by itself (Linux 6.4 and later); otherwise it is re-armed.
    multishot_tick: bool,
    /// A kick is queued and not yet submitted.
    kick_queued: bool,
    hung_up: bool,
    ticks: u64,
}

impl Waiter {
    /// A waiter for `fe`'s ring.
    pub fn new(fe: &LocalFrontend) -> io::Result<Waiter> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(8)
            .or_else(|_| IoUring::new(8))?;
        let mut w = Waiter {
            ring,
            one: Box::new(1),
            second: Box::new(types::Timespec::new().sec(1)),
            notify_fd: fe.notify_fd(),
            multishot_tick: true,
            kick_queued: false,
            hung_up: false,
            ticks: 0,
        };
        w.push(&w.notify_poll())?;
        let hangup = opcode::PollAdd::new(types::Fd(fe.hangup_fd()), libc::POLLRDHUP as u32)
            .build()
            .user_data(HANGUP);
        w.push(&hangup)?;
        w.push(&w.tick())?;
        w.ring.submit()?;
        Ok(w)
    }

    fn notify_poll(&self) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(self.notify_fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(NOTIFY)
    }

    fn tick(&self) -> squeue::Entry {
        let flags = if self.multishot_tick {
            types::TimeoutFlags::MULTISHOT
        } else {
            types::TimeoutFlags::empty()
        };
        opcode::Timeout::new(&*self.second)
            .flags(flags)
            .build()
            .user_data(TICK)
    }

    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the entries are polls of descriptors the frontend keeps open while it lives
        // (and the waiter lives inside one `measure` call with it), a timeout whose timespec
        // is boxed in `self`, and an 8-byte write from `self.one`, boxed and never changed:
        // everything they point to outlives their submission.
        if unsafe { self.ring.submission().push(e) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above; the queue was just emptied.
            unsafe { self.ring.submission().push(e) }
                .map_err(|_| io::Error::other("td-bench's io_uring queue is full"))?;
        }
        Ok(())
    }

    /// Publishes what the frontend queued; the kick, if tapdisk asked for one, goes out with
    /// the next [`Waiter::wait`].
    pub fn publish(&mut self, fe: &mut LocalFrontend) -> io::Result<()> {
        if fe.publish() && !self.kick_queued {
            let kick = opcode::Write::new(
                types::Fd(fe.kick_fd()),
                std::ptr::from_ref::<u64>(&self.one).cast(),
                8,
            )
            .build()
            .user_data(KICK);
            self.push(&kick)?;
            self.kick_queued = true;
        }
        Ok(())
    }

    /// Sends a queued kick and waits until responses are published (`Ok(true)`), about
    /// `timeout` passes with none (`Ok(false)`; whole seconds, never less than asked), or
    /// tapdisk drops the ring (an error).
    pub fn wait(&mut self, fe: &mut LocalFrontend, timeout: Duration) -> io::Result<bool> {
        let started = self.ticks;
        loop {
            let ready = fe.prepare_wait();
            if ready && !self.kick_queued {
                return Ok(true);
            }
            match self.ring.submit_and_wait(usize::from(!ready)) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.kick_queued = !self.ring.submission().is_empty();
            self.reap()?;
            if ready {
                return Ok(true);
            }
            if self.hung_up {
                if fe.prepare_wait() {
                    return Ok(true);
                }
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the backend disconnected the ring",
                ));
            }
            // A wait that started just before a tick sees it at once: one tick more.
            if self.ticks - started > timeout.as_secs() {
                return Ok(false);
            }
        }
    }

    fn reap(&mut self) -> io::Result<()> {
        let (rearm_notify, rearm_tick) = self.take_completions()?;
        if rearm_notify {
            self.push(&self.notify_poll())?;
        }
        if rearm_tick {
            self.push(&self.tick())?;
        }
        Ok(())
    }

    /// Takes the completions waiting; says whether the notify poll and the tick ended and
    /// need arming again.
    fn take_completions(&mut self) -> io::Result<(bool, bool)> {
        let (mut rearm_notify, mut rearm_tick) = (false, false);
        let mut failed = None;
        for c in self.ring.completion() {
            let (res, more) = (c.result(), cqueue::more(c.flags()));
            match c.user_data() {
                NOTIFY if res < 0 && res != -libc::ECANCELED => failed = Some(-res),
                NOTIFY => rearm_notify |= !more,
                HANGUP => self.hung_up |= res != -libc::ECANCELED,
                TICK if res == -libc::EINVAL && self.multishot_tick => {
                    self.multishot_tick = false;
                    rearm_tick = true;
                }
                TICK if res == -libc::ECANCELED => {}
                TICK => {
                    self.ticks += 1;
                    rearm_tick |= !more;
                }
                KICK if res < 0 => failed = Some(-res),
                _ => {}
            }
        }
        match failed {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok((rearm_notify, rearm_tick)),
        }
    }
}

#[cfg(test)]
mod tests_support {
    use blkif::local::{accept, AttachLimits, FrontendConfig, LocalBackend, LocalFrontend};
    use blkif::request::DiskInfo;
    use std::os::unix::net::UnixStream;

    const INFO: DiskInfo = DiskInfo::writable(2048);

    /// A frontend attached to a backend in this process.
    pub fn attached() -> (LocalFrontend, LocalBackend) {
        attached_after(std::time::Duration::ZERO)
    }

    /// The same, with a backend that takes `delay` to answer (the frontend blocks meanwhile).
    pub fn attached_after(delay: std::time::Duration) -> (LocalFrontend, LocalBackend) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(delay);
            accept(b, &AttachLimits::default(), &INFO)
        });
        let cfg = FrontendConfig {
            mem_pages: 4,
            ..Default::default()
        };
        let fe = LocalFrontend::attach(a, cfg).unwrap();
        (fe, t.join().unwrap().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::attached;
    use super::*;
    use blkif::local::FrontRequest;
    use blkif::protocol::op;
    use blkif::ring::SlotCopy;
    use blkif::transport::EventChannel;
    use blkif::{Response, Segment};
    use std::time::Instant;

    fn read(fe: &mut LocalFrontend, id: u64) {
        let seg = [Segment {
            gref: 0,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        }];
        assert!(fe.queue(&FrontRequest::Rw {
            op: op::READ,
            id,
            sector: 0,
            segments: &seg,
        }));
    }

    #[test]
    fn kicks_go_out_with_the_wait_and_answers_wake_it() {
        let (mut fe, mut be) = attached();
        let mut w = Waiter::new(&fe).unwrap();
        for id in 0..3u64 {
            read(&mut fe, id);
            w.publish(&mut fe).unwrap();
            // The backend answers once it is kicked, as tapdisk does; the kick only leaves
            // with the wait, so the answer can only come if it did.
            let backend = std::thread::spawn(move || {
                let mut fds = [libc::pollfd {
                    fd: be.evtchn.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd, for the length given.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
                assert_eq!(n, 1, "no kick within 5 s");
                be.evtchn.ack().unwrap();
                assert_eq!(be.ring.pending().unwrap(), 1);
                be.ring.pop(&mut SlotCopy::default());
                // Asks for the next kick, as a backend does before it sleeps.
                assert_eq!(be.ring.final_check().unwrap(), 0);
                be.ring.put_response(&Response {
                    id,
                    operation: op::READ,
                    status: 0,
                });
                assert!(
                    be.ring.push_responses(),
                    "the frontend asked to be notified"
                );
                be.evtchn.notify().unwrap();
                be
            });
            assert!(w.wait(&mut fe, Duration::from_secs(5)).unwrap());
            let mut got = vec![];
            fe.poll(|r| got.push(r.id));
            assert_eq!(got, [id]);
            be = backend.join().unwrap();
        }
    }

    #[test]
    fn a_silent_backend_times_out_and_a_gone_one_is_an_error() {
        let (mut fe, be) = attached();
        let mut w = Waiter::new(&fe).unwrap();
        read(&mut fe, 1);
        w.publish(&mut fe).unwrap();
        let t = Instant::now();
        assert!(!w.wait(&mut fe, Duration::from_secs(1)).unwrap());
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
        drop(be);
        let e = w.wait(&mut fe, Duration::from_secs(30)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    }
}

#[cfg(test)]
mod drop_tests {
    use super::tests_support::{attached, attached_after};
    use super::*;

    /// Closing an io_uring queues work that interrupts the closing thread's next blocking
    /// system call; a socket read with a timeout, as in the local transport's handshake, is
    /// not restarted. The next attach must still succeed (the handshake retries).
    #[test]
    fn an_attach_right_after_a_waiter_went_away_succeeds() {
        let (mut fe, mut be) = attached();
        for _ in 0..20 {
            drop(Waiter::new(&fe).unwrap());
            drop((fe, be));
            (fe, be) = attached_after(Duration::from_millis(20));
        }
    }
}
