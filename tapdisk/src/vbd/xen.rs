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

use anyhow::{bail, Context, Result};
use blkif::request::DiskInfo;
use blkif::xen::backend::{GrantMode, XenRing};
use blkif::xen::{MAX_QUEUES, MAX_RING_ORDER};
use tapdisk_control::proto::{XenAttachmentInfo, XenConnectSpec};

use super::rings::RingLink;
use super::Vbd;
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

/// Maps and serves the rings of `spec` on `vbd`. A frontend already attached with the same
/// domain and device id is disconnected first (a reconnecting frontend).
pub fn connect(vbd: &mut Vbd, spec: XenConnectSpec) -> Result<(DiskInfo, XenAttachmentInfo)> {
    let r = &spec.rings;
    if r.queues.is_empty() || r.queues.len() > MAX_QUEUES as usize {
        bail!("{} queues (1..={MAX_QUEUES})", r.queues.len());
    }
    if r.ring_order > MAX_RING_ORDER {
        bail!("ring order {} (at most {MAX_RING_ORDER})", r.ring_order);
    }
    disconnect_quiet(vbd, spec.domid, spec.devid);
    let mut disk = vbd.disk();
    if spec.grant_mode == GrantMode::Copy {
        // Bounce pages are reserved per request slot and segment: keep that bounded.
        disk.max_indirect_segments = disk.max_indirect_segments.min(COPY_MAX_INDIRECT_SEGMENTS);
    }
    let mut links = Vec::new();
    for (q, keys) in r.queues.iter().enumerate() {
        let ring = XenRing::connect(
            spec.domid,
            &keys.ring_refs,
            r.ring_order,
            keys.evtchn,
            r.abi,
            spec.grant_mode,
            disk.segment_capacity(),
        )
        .with_context(|| format!("queue {q}"));
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
                return Err(e).context("cannot start a ring thread");
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
        bail!("minor {} serves no Xen frontend {domid}/{devid}", vbd.minor);
    }
    Ok(())
}
