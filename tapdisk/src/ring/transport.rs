//! What a ring loop needs from a transport, and the two transports that provide it: the
//! local one (a frontend process on this host, [`blkif::local`]) and Xen's (grant-mapped or
//! grant-copied pages of a guest, [`blkif::xen::backend`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use blkif::local::EarlyReadPort;
use blkif::ring::BackRing;
use blkif::transport::{EventChannel, GrantMapper};
use blkif::xen::backend::{GrantCounters, XenGrants, XenRing};
use blkif::xen::evtchn::Evtchn;
use blkif::Abi;

/// A ring as a transport hands it over: the back ring, grant mapper and event channel.
pub trait RingTransport: Send + 'static {
    /// Grant mapper.
    type Grants: GrantMapper;
    /// Event channel.
    type Evtchn: EventChannel;
    /// Disjoint borrows of the parts the loop drives.
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn);
    /// The frontend's ABI.
    fn abi(&self) -> Abi;
    /// A descriptor that polls readable or hung-up when the frontend is gone, if any.
    fn hangup_fd(&self) -> Option<RawFd>;
    /// The early-read contract, if the frontend set it up (local transport only: an
    /// unmodified Xen frontend ends its grant access when it sees the response, so answering
    /// a read before its data is in would hand the guest garbage).
    fn early_read(&self) -> Option<&EarlyReadPort> {
        None
    }
    /// Sends the completion record of early-answered read `id`.
    fn report_early_read_done(&self, _id: u64, _ok: bool) -> io::Result<()> {
        Ok(())
    }
    /// What a Xen ring's grant access did (persistent grants, batched maps or copies).
    fn grant_counters(&self) -> Option<GrantCounters> {
        None
    }
    /// The event channel as eventfds (kicks in, notifications out), if it is made of them:
    /// the loop then drains kicks and sends notifications through its io_uring ([`super::kick`]).
    fn eventfds(&self) -> Option<EventFds> {
        None
    }
}

/// An event channel made of two eventfds (both nonblocking: a read drains the count, an
/// 8-byte write adds to it).
#[derive(Clone, Copy, Debug)]
pub struct EventFds {
    /// Kicks from the frontend.
    pub kick: RawFd,
    /// Notifications to the frontend.
    pub notify: RawFd,
}

impl RingTransport for blkif::local::LocalBackend {
    type Grants = blkif::local::LocalGrants;
    type Evtchn = blkif::local::LocalEvtchn;
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn) {
        (&mut self.ring, &mut self.grants, &self.evtchn)
    }
    fn abi(&self) -> Abi {
        self.abi
    }
    fn hangup_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn early_read(&self) -> Option<&EarlyReadPort> {
        self.early_read.as_ref()
    }
    fn report_early_read_done(&self, id: u64, ok: bool) -> io::Result<()> {
        blkif::local::LocalBackend::report_early_read_done(self, id, ok)
    }
    fn eventfds(&self) -> Option<EventFds> {
        Some(EventFds {
            kick: self.evtchn.fd(),
            notify: self.evtchn.notify_fd(),
        })
    }
}

impl RingTransport for XenRing {
    type Grants = XenGrants;
    type Evtchn = Evtchn;
    fn parts(&mut self) -> (&mut BackRing, &mut Self::Grants, &Self::Evtchn) {
        (&mut self.ring, &mut self.grants, &self.evtchn)
    }
    fn abi(&self) -> Abi {
        self.abi
    }
    fn hangup_fd(&self) -> Option<RawFd> {
        None
    }
    fn grant_counters(&self) -> Option<GrantCounters> {
        Some(self.grants.counters())
    }
}
