//! `/dev/xen/evtchn`: one interdomain event channel per open descriptor.
//!
//! Binding asks Xen for a local port connected to the frontend's port. The descriptor polls
//! readable when the port fired; reading it returns the pending ports. The kernel masks a port
//! when it fires and leaves it masked until we write the port number back: that is the late
//! EOI of XSA-332. A backend unmasks only after it drained the ring (and re-armed `req_event`),
//! so however fast a guest kicks, each kick costs us at most one wake-up per drain. Closing the
//! descriptor unbinds the port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{ioc_none, DomId};
use crate::transport::EventChannel;

const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong = ioc_none(b'E', 1, 8);
const IOCTL_EVTCHN_BIND_UNBOUND_PORT: libc::c_ulong = ioc_none(b'E', 2, 4);
const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = ioc_none(b'E', 4, 4);

#[repr(C)]
struct BindInterdomain {
    remote_domain: libc::c_uint,
    remote_port: libc::c_uint,
}

/// A bound event channel.
#[derive(Debug)]
pub struct Evtchn {
    file: File,
    port: u32,
}

fn open() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/xen/evtchn")
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/xen/evtchn: {e}")))
}

impl Evtchn {
    /// Binds to `remote_port` of domain `domid` (the port a frontend allocated for us).
    pub fn bind_interdomain(domid: DomId, remote_port: u32) -> io::Result<Evtchn> {
        let file = open()?;
        let mut arg = BindInterdomain {
            remote_domain: libc::c_uint::from(domid),
            remote_port,
        };
        // SAFETY: the kernel reads a live `BindInterdomain` of the size the number encodes.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Evtchn {
            file,
            port: r as u32,
        })
    }

    /// Allocates a port that domain `domid` may bind to (the frontend's side of a channel).
    pub fn bind_unbound(domid: DomId) -> io::Result<Evtchn> {
        let file = open()?;
        let mut arg: libc::c_uint = libc::c_uint::from(domid);
        // SAFETY: the kernel reads one live `unsigned int`, the size the number encodes.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), IOCTL_EVTCHN_BIND_UNBOUND_PORT, &mut arg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Evtchn {
            file,
            port: r as u32,
        })
    }

    /// Our local port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Sends an event to the other end.
    pub fn notify_port(&self) -> io::Result<()> {
        let mut port: libc::c_uint = self.port;
        // SAFETY: the kernel reads one live `unsigned int`, the size the number encodes.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, &mut port) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the pending events; returns how many there were (0 if none).
    ///
    /// The driver's read returns everything queued, up to the buffer: a read that does not
    /// fill the buffer drained the queue, and the next would only say EAGAIN (a system call
    /// saved per kick; an event arriving after it wakes the caller's poll again).
    pub fn take_pending(&self) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        let mut n = 0;
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) if k < buf.len() => return Ok(n + k / 4),
                Ok(k) => n += k / 4,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Unmasks the port: the next event wakes us again (and one that came while masked, at once).
    pub fn unmask(&self) -> io::Result<()> {
        (&self.file).write_all(&self.port.to_ne_bytes())
    }
}

impl EventChannel for Evtchn {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn ack(&self) -> io::Result<()> {
        self.take_pending().map(|_| ())
    }
    fn eoi(&self) -> io::Result<()> {
        self.unmask()
    }
    fn notify(&self) -> io::Result<()> {
        self.notify_port()
    }
}
