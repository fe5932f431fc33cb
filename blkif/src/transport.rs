//! Grant mapping and event channels, as traits a transport implements.
//!
//! The Xen transport maps grants through `/dev/xen/gntdev` and signals through
//! `/dev/xen/evtchn`; the local transport ([`crate::local`]) names pages of a shared memfd and
//! signals with eventfds. The VBD event loop is written against these traits only.

use std::io;
use std::os::fd::RawFd;

use crate::protocol::Segment;
use crate::request::Problem;

/// Identifies one mapping made by [`GrantMapper::map`] or [`GrantMapper::queue`], to hand
/// back to `unmap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapHandle(pub u64);

/// What the pages of a mapping are to the IO that goes into them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Memory {
    /// They stay mapped after the request is answered (a local frontend's memory, bounce
    /// pages, persistent grants): any IO may go into them, direct IO included.
    #[default]
    Stable,
    /// They are unmapped as soon as the request is done (one-shot grant mappings): never
    /// direct IO into them. Linux posts a direct IO's completion before it drops its pins on
    /// the pages, and a grant unmapped while a pin is held is not unmapped (the kernel warns,
    /// the frontend finds its grant still in use after the response). Buffered IO copies
    /// inside the kernel and holds no pin past the syscall.
    UnmappedAfterIo,
}

/// Maps the pages a frontend granted into this process.
///
/// Requests are mapped one at a time ([`GrantMapper::map`]), or a batch at once: each request
/// is [`queue`](GrantMapper::queue)d, one [`map_queued`](GrantMapper::map_queued) maps them
/// all (one map call, or one grant copy, for the whole batch), then
/// [`addrs`](GrantMapper::addrs) gives each request's pages or its error. Every handle, good
/// or failed, goes back with `unmap` once. Nothing here may allocate per call.
pub trait GrantMapper {
    /// Makes the pages of `segs` reachable now (read-only if `!writable`: the backend only
    /// reads them, for a write) and stores the address of each segment's page in `addrs[i]`.
    /// A transport that copies instead of mapping fills its bounce pages with the segments'
    /// sectors here when `!writable`. On an error nothing stays held.
    fn map(
        &mut self,
        segs: &[Segment],
        writable: bool,
        addrs: &mut [*mut u8],
    ) -> Result<MapHandle, Problem>;
    /// Takes `segs` for the next [`GrantMapper::map_queued`]. An error here (a request the
    /// transport can never map) holds nothing.
    fn queue(&mut self, segs: &[Segment], writable: bool) -> Result<MapHandle, Problem>;
    /// Maps everything queued since the last call.
    fn map_queued(&mut self);
    /// After [`GrantMapper::map_queued`]: the address of each page of `segs` (the segments
    /// queued with `handle`) into `addrs`, or why the request cannot be mapped (its handle
    /// must still be unmapped).
    fn addrs(
        &mut self,
        handle: MapHandle,
        segs: &[Segment],
        addrs: &mut [*mut u8],
    ) -> Result<(), Problem>;
    /// What the pages of `handle` are to direct IO.
    fn memory(&self, handle: MapHandle) -> Memory;
    /// Releases a mapping once the IO into it has completed; a copying transport first copies
    /// the segments' sectors back to the frontend when the mapping was `writable` (a read).
    /// Call it before the request is answered: an error means the frontend must not be told
    /// the read succeeded.
    fn unmap(&mut self, handle: MapHandle) -> Result<(), Problem>;
    /// Releases several mappings, as [`GrantMapper::unmap`] each (a copying transport copies
    /// all their read data back in one call); `results[i]` is `handles[i]`'s outcome.
    fn unmap_batch(&mut self, handles: &[MapHandle], results: &mut [Result<(), Problem>]) {
        for (h, r) in handles.iter().zip(results.iter_mut()) {
            *r = self.unmap(*h);
        }
    }
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
