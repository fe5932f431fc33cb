//! Grant mapping and event channels, as traits a transport implements.
//!
//! The Xen transport maps grants through `/dev/xen/gntdev` and signals through
//! `/dev/xen/evtchn`; the local transport ([`crate::local`]) names pages of a shared memfd and
//! signals with eventfds. The VBD event loop is written against these traits only.

use std::io;
use std::os::fd::RawFd;

use crate::protocol::Segment;
use crate::request::Problem;

/// Identifies one mapping made by [`GrantMapper::map`], to hand back to `unmap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapHandle(pub u64);

/// Maps the pages a frontend granted into this process.
pub trait GrantMapper {
    /// Makes the pages of `segs` reachable (read-only if `!writable`: the backend only reads
    /// them, for a write) and stores the address of each segment's page in `addrs[i]`. A
    /// transport that copies instead of mapping fills its bounce pages with the segments'
    /// sectors here when `!writable`. Must not allocate per call.
    fn map(
        &mut self,
        segs: &[Segment],
        writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem>;
    /// Releases a mapping once the IO into it has completed; a copying transport first copies
    /// the segments' sectors back to the frontend when the mapping was `writable` (a read).
    /// Call it before the request is answered: an error means the frontend must not be told
    /// the read succeeded.
    fn unmap(&mut self, handle: MapHandle) -> Result<(), Problem>;
}

/// One end of an event channel.
pub trait EventChannel {
    /// A descriptor that polls readable when the other side notified us.
    fn fd(&self) -> RawFd;
    /// Consumes pending notifications. Call before draining the ring.
    fn ack(&self) -> io::Result<()>;
    /// Re-enables notifications after the ring was drained and `req_event` re-armed (the
    /// late EOI of XSA-332: on Xen the port stays masked from the event until here, so a guest
    /// that kicks in a loop cannot keep us busy). A no-op where there is no masking.
    fn eoi(&self) -> io::Result<()> {
        Ok(())
    }
    /// Notifies the other side.
    fn notify(&self) -> io::Result<()>;
}
