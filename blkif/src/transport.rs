//! Grant mapping and event channels, as traits a transport implements.
//!
//! The Xen transport maps grants through `/dev/xen/gntdev` and signals through
//! `/dev/xen/evtchn`; the local transport ([`crate::local`]) names pages of a shared memfd and
//! signals with eventfds. The VBD event loop is written against these traits only.

use std::io;
use std::os::fd::RawFd;

use crate::protocol::GrantRef;
use crate::request::Problem;

/// Identifies one mapping made by [`GrantMapper::map`], to hand back to `unmap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapHandle(pub u64);

/// Maps the pages a frontend granted into this process.
pub trait GrantMapper {
    /// Maps `refs` (read-only if `!writable`: the backend only reads them) and stores the
    /// address of each page in `addrs[i]`. Must not allocate on the local transport's path.
    fn map(
        &mut self,
        refs: &[GrantRef],
        writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem>;
    /// Releases a mapping once the IO into it has completed.
    fn unmap(&mut self, handle: MapHandle);
}

/// One end of an event channel.
pub trait EventChannel {
    /// A descriptor that polls readable when the other side notified us.
    fn fd(&self) -> RawFd;
    /// Consumes pending notifications (and unmasks, on Xen). Call before draining the ring.
    fn ack(&self) -> io::Result<()>;
    /// Notifies the other side.
    fn notify(&self) -> io::Result<()>;
}
