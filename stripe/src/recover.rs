//! Stale replicas copied back when their server returns (md's recovery after a member comes
//! back, with the write-intent log's regions as the lock).
//!
//! A thread per replicated disk looks every [`EVERY`] for stale replicas whose server answers a
//! login. It copies each such extent from a replica that is not stale, one stripe unit at a
//! time: the guest regions over that unit are locked in the intent log ([`IntentLog::lock`]:
//! new writes to them wait, those in flight finish), the unit is read from the source and
//! written to the stale replica, then the regions are unlocked. Guest writes outside the
//! locked unit go to every replica (the stale one included) as always, so a unit copied stays
//! equal. Once the whole extent is copied and flushed, its mark is cleared, unless the replica
//! missed a write meanwhile ([`Disk::clear_stale`]); then the next round copies it again.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use iscsi::{Client, Config, Registration};

use crate::disk::Disk;
use crate::intent_log::IntentLog;
use crate::map::{Geometry, MapExtent};

/// How often stale replicas are looked at.
pub const EVERY: Duration = Duration::from_secs(1);

/// The disk byte where byte `off` of extent `index` lies (the inverse of [`Geometry::locate`]).
pub fn disk_offset(g: &Geometry, index: u32, off: u64) -> u64 {
    let n = u64::from(g.stripes);
    let (k, col) = (u64::from(index) / n, u64::from(index) % n);
    let co = k * g.extent_size + off;
    let (row, within) = (co / g.stripe_size, co % g.stripe_size);
    (row * n + col) * g.stripe_size + within
}

fn client(disk: &Disk, x: &MapExtent) -> Option<Client> {
    let mut cfg = Config::new(x.portal.clone(), x.target.clone());
    cfg.login_timeout = Duration::from_secs(2);
    cfg.reconnect_timeout = Duration::from_secs(2);
    if disk.pr_key.load(Ordering::SeqCst) != 0 {
        cfg.registration = Some(Registration {
            key: disk.pr_key.clone(),
            luns: vec![x.lun],
        });
    }
    Client::connect(&cfg, x.lun).ok()
}

/// Copies replica `r` of extent `i` from replica `src`; false if a server failed.
fn copy_extent(disk: &Disk, log: &IntentLog, i: u32, r: u32, src: u32) -> bool {
    let m = disk.map();
    let g = m.geometry;
    let reps = &m.extents[i as usize];
    let (Some(mut from), Some(mut to)) = (
        client(disk, &reps[src as usize]),
        client(disk, &reps[r as usize]),
    ) else {
        return false;
    };
    let before = disk.misses(i, r);
    let unit = g.stripe_size;
    let mut buf = vec![0u8; unit as usize];
    let mut off = 0;
    while off < g.extent_size {
        if disk.fenced() {
            return false;
        }
        let at = disk_offset(&g, i, off);
        if at >= g.size {
            break; // The last extents may reach past the disk's end: nothing there.
        }
        let len = unit.min(g.size - at);
        let data = &mut buf[..len as usize];
        log.lock(at, len);
        let ok = from
            .read16((reps[src as usize].addr + off) / 512, data, 512)
            .and_then(|()| to.write16((reps[r as usize].addr + off) / 512, data, 512, false));
        log.unlock(at, len);
        if ok.is_err() {
            return false;
        }
        disk.resync.stale_bytes.fetch_add(len, Ordering::Relaxed);
        off += unit;
    }
    if to.synchronize_cache16().is_err() {
        return false;
    }
    disk.clear_stale(i, r, before)
}

/// The thread: see the module docs. Ends when the disk is gone.
pub fn run(disk: Weak<Disk>) {
    loop {
        std::thread::sleep(EVERY);
        let Some(d) = disk.upgrade() else {
            return;
        };
        if d.fenced() {
            return;
        }
        let Some(log) = d.intent.clone() else {
            return;
        };
        one_round(&d, &log);
    }
}

fn one_round(d: &Arc<Disk>, log: &IntentLog) {
    let marks = d.stale_marks();
    if marks.is_empty() {
        return;
    }
    let m = d.map();
    for (i, r) in marks {
        let reps = &m.extents[i as usize];
        // A login to the stale replica's server says whether it is back.
        if client(d, &reps[r as usize]).is_none() {
            continue;
        }
        let Some(src) = (0..reps.len() as u32).find(|&k| k != r && !d.is_stale(i, k)) else {
            continue;
        };
        d.resync.stale_copying.fetch_add(1, Ordering::Relaxed);
        let done = copy_extent(d, log, i, r, src);
        d.resync.stale_copying.fetch_sub(1, Ordering::Relaxed);
        if done {
            d.resync.stale_copied.fetch_add(1, Ordering::Relaxed);
            slog::info!(d.opts.logger, "stale replica copied back"; "index" => i, "replica" => r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_offset_inverts_locate() {
        let g = Geometry {
            size: 3 << 20,
            stripes: 3,
            stripe_size: 64 << 10,
            replicas: 2,
            extent_size: 256 << 10,
        };
        let mut off = 0;
        while off < g.size {
            let l = g.locate(off);
            assert_eq!(disk_offset(&g, l.index, l.offset), off);
            off += 4096;
        }
    }
}
