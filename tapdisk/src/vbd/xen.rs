//! Serving a Xen frontend's rings.
//!
//! tapback (the xenbus side, `tools/tapback`) reads the frontend's keys from xenstore,
//! checks them, and sends them to the tapdisk holding the VBD in a `xen_connect` command. Here
//! each queue's ring is mapped through gntdev, its event channel bound, and handed to
//! [`Vbd::attach_ring`]: one ring loop thread per queue, as Linux blkback does. A frontend that
//! breaks the protocol loses its rings (the loop exits and unmaps them); tapback sees the state
//! in `tap-ctl list` and closes the device in xenstore. `xen_disconnect` stops the loops, waits
//! for the IO in flight and unmaps.

use std::time::{Duration, Instant};

use blkif::request::DiskInfo;
use blkif::xen::backend::{GrantMode, RingAccess, XenRing};
use blkif::xen::{MAX_QUEUES, MAX_RING_ORDER};
use tapdisk_control::proto::{XenAttachmentInfo, XenConnectSpec};

use super::rings::RingLink;
use super::Vbd;
use crate::error::{Error, Result};
use crate::ring::lock;

/// Segments per indirect request in grant-copy mode, where each request slot owns that many
/// bounce pages (512 slots x 32 pages x 4 KiB = 64 MiB per queue at most).
pub const COPY_MAX_INDIRECT_SEGMENTS: u16 = 32;

/// One Xen frontend served by a VBD.
#[derive(Debug)]
pub struct XenAttachment {
    spec: XenConnectSpec,
    links: Vec<RingLink>,
}

impl XenAttachment {
    /// The listing line.
    pub fn info(&self) -> XenAttachmentInfo {
        let down = self
            .links
            .iter()
            .enumerate()
            .find_map(|(q, l)| lock(&l.exit).clone().map(|why| format!("queue {q}: {why}")));
        XenAttachmentInfo {
            domid: self.spec.domid,
            devid: self.spec.devid,
            vdev: self.spec.vdev.clone(),
            abi: self.spec.rings.abi,
            ring_order: self.spec.rings.ring_order,
            queues: self.links.len() as u32,
            grant_mode: self.spec.grant_mode,
            state: down.unwrap_or_else(|| "connected".into()),
        }
    }

    fn stop(self) {
        for l in &self.links {
            l.ctl.stop.store(true, std::sync::atomic::Ordering::Release);
            l.ctl.wake();
        }
        // The loops finish their IO in flight and drop their rings (unmapping them).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.links.iter().any(|l| lock(&l.exit).is_none()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The disk a Xen ring enforces: the VBD's, under Xen's rules. blkif gives a frontend no way to
/// learn a limit on direct-request segments below `BLKIF_MAX_SEGMENTS_PER_REQUEST` (11): Linux
/// blkfront sends up to 11 whatever the backend would like, so a Xen ring accepts 11 whatever
/// the VBD's `max_segments` (a setting for local frontends, which learn it when they attach).
/// In grant-copy mode every slot reserves bounce pages for its segments, so indirect requests
/// are bounded there.
pub fn ring_disk(vbd: DiskInfo, mode: GrantMode) -> DiskInfo {
    let mut disk = vbd;
    disk.max_segments = blkif::protocol::MAX_SEGMENTS_PER_REQUEST as u8;
    if mode == GrantMode::Copy {
        disk.max_indirect_segments = disk.max_indirect_segments.min(COPY_MAX_INDIRECT_SEGMENTS);
    }
    disk
}

/// The largest ring a Xen frontend may use on a VBD whose local rings may have `2^vbd_order`
/// pages: the VBD's setting, within Xen's own limit.
pub fn max_ring_order(vbd_order: u8) -> u8 {
    vbd_order.min(MAX_RING_ORDER)
}

/// Maps and serves the rings of `spec` on `vbd`. A frontend already attached with the same
/// domain and device id is disconnected first (a reconnecting frontend).
pub fn connect(vbd: &mut Vbd, spec: XenConnectSpec) -> Result<(DiskInfo, XenAttachmentInfo)> {
    let r = &spec.rings;
    if r.queues.is_empty() || r.queues.len() > MAX_QUEUES as usize {
        return Err(Error::Refused(format!(
            "{} queues (1..={MAX_QUEUES})",
            r.queues.len()
        )));
    }
    let max_order = max_ring_order(vbd.max_ring_order());
    if r.ring_order > max_order {
        return Err(Error::Refused(format!(
            "the frontend's ring has 2^{} pages; minor {} serves rings of at most 2^{max_order} \
             (its --ring-order, within Xen's {MAX_RING_ORDER})",
            r.ring_order, vbd.minor
        )));
    }
    disconnect_quiet(vbd, spec.domid, spec.devid);
    let mut disk = ring_disk(vbd.disk(), spec.grant_mode);
    if spec.read_only {
        disk.read_only = true;
        disk.discard = false;
    }
    let mut links = Vec::new();
    for (q, keys) in r.queues.iter().enumerate() {
        let access = RingAccess {
            mode: spec.grant_mode,
            max_segs: disk.segment_capacity(),
            max_persistent: spec.max_persistent_grants,
            persistent_io: vbd.persistent_io(),
        };
        let ring = XenRing::connect(
            spec.domid,
            &keys.ring_refs,
            r.ring_order,
            keys.evtchn,
            r.abi,
            access,
        )
        .map_err(|e| Error::Refused(format!("queue {q}: {e}")));
        let ring = match ring {
            Ok(ring) => ring,
            Err(e) => {
                XenAttachment { spec, links }.stop();
                return Err(e);
            }
        };
        let name = format!("xen{}.{}q{q}", spec.domid, spec.devid);
        match vbd.attach_ring(ring, &name, disk) {
            Ok(l) => links.push(l),
            Err(e) => {
                XenAttachment { spec, links }.stop();
                return Err(Error::io("cannot start a ring thread", e));
            }
        }
    }
    let a = XenAttachment { spec, links };
    let info = a.info();
    vbd.xen.push(a);
    Ok((disk, info))
}

fn disconnect_quiet(vbd: &mut Vbd, domid: u16, devid: u32) -> bool {
    let mut found = false;
    while let Some(i) = vbd
        .xen
        .iter()
        .position(|a| a.spec.domid == domid && a.spec.devid == devid)
    {
        vbd.xen.remove(i).stop();
        found = true;
    }
    found
}

/// Stops serving frontend `domid`/`devid`.
pub fn disconnect(vbd: &mut Vbd, domid: u16, devid: u32) -> Result<()> {
    if !disconnect_quiet(vbd, domid, devid) {
        return Err(Error::Refused(format!(
            "minor {} serves no Xen frontend {domid}/{devid}",
            vbd.minor
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vbd_disk(max_segments: u8, indirect: u16) -> DiskInfo {
        DiskInfo {
            sectors: 2048,
            sector_size: 512,
            read_only: false,
            flush: true,
            barrier: true,
            discard: true,
            max_segments,
            max_indirect_segments: indirect,
        }
    }

    #[test]
    fn a_xen_ring_takes_eleven_direct_segments_whatever_the_vbd_says() {
        // A VBD opened with --max-segments 8: a guest's 9-11 segment requests must still be
        // served (blkif cannot tell it about 8).
        let d = ring_disk(vbd_disk(8, 256), GrantMode::Map);
        assert_eq!(d.max_segments, 11);
        assert_eq!(d.max_indirect_segments, 256);
        let d = ring_disk(vbd_disk(1, 0), GrantMode::Map);
        assert_eq!((d.max_segments, d.max_indirect_segments), (11, 0));
        // Grant copy bounds indirect requests, nothing else.
        let d = ring_disk(vbd_disk(8, 4096), GrantMode::Copy);
        assert_eq!(d.max_segments, 11);
        assert_eq!(d.max_indirect_segments, COPY_MAX_INDIRECT_SEGMENTS);
    }

    #[test]
    fn xen_rings_honour_the_vbds_ring_order_within_xens() {
        assert_eq!(max_ring_order(0), 0);
        assert_eq!(max_ring_order(2), 2);
        assert_eq!(max_ring_order(8), MAX_RING_ORDER);
    }
}
