//! One backend device and its xenbus state machine.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{anyhow, bail, Context, Result};
use blkif::xen::backend::GrantMode;
use blkif::xen::frontend_keys::{self, KeyLimits};
use blkif::xen::xenstore::{Tx, Xenstore};
use tapdisk_control::client::Client;
use tapdisk_control::proto::{Command, Reply, XenConnectSpec};
use tapdisk_control::{escape, RunDir, VbdSettings};

use super::Log;
use crate::tblog;

/// Segments per indirect request advertised at InitWait by default (tapdisk's default); the
/// VBD's own limit replaces it when the device connects.
pub const INDIRECT_SEGMENTS: u32 = VbdSettings::DEFAULT.max_indirect_segments as u32;

/// `enum xenbus_state` (xen/include/public/io/xenbus.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum XenbusState {
    /// 0: no state (the node is missing).
    Unknown,
    /// 1: the toolstack created the device.
    Initialising,
    /// 2: the backend waits for the frontend's details.
    InitWait,
    /// 3: the frontend published its rings.
    Initialised,
    /// 4: both sides are ready.
    Connected,
    /// 5: one side is going away.
    Closing,
    /// 6: closed.
    Closed,
    /// 7, 8: reconfiguration (not used by blkif); treated as unknown.
    Other(u8),
}

impl XenbusState {
    /// Parses a `state` node (text from xenstore, possibly a guest's).
    pub fn parse(v: Option<&str>) -> XenbusState {
        match v.and_then(|s| s.parse::<u8>().ok()) {
            None | Some(0) => XenbusState::Unknown,
            Some(1) => XenbusState::Initialising,
            Some(2) => XenbusState::InitWait,
            Some(3) => XenbusState::Initialised,
            Some(4) => XenbusState::Connected,
            Some(5) => XenbusState::Closing,
            Some(6) => XenbusState::Closed,
            Some(n) => XenbusState::Other(n),
        }
    }

    /// The number written to xenstore.
    pub fn code(self) -> u8 {
        match self {
            XenbusState::Unknown => 0,
            XenbusState::Initialising => 1,
            XenbusState::InitWait => 2,
            XenbusState::Initialised => 3,
            XenbusState::Connected => 4,
            XenbusState::Closing => 5,
            XenbusState::Closed => 6,
            XenbusState::Other(n) => n,
        }
    }
}

/// What tapback offers every frontend.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// max-ring-page-order.
    pub max_ring_order: u8,
    /// multi-queue-max-queues.
    pub max_queues: u32,
    /// feature-max-indirect-segments (0: not advertised).
    pub max_indirect_segments: u32,
    /// How tapdisk reaches request pages of frontends without persistent grants.
    pub grant_mode: GrantMode,
    /// feature-persistent: persistent grants offered (used with frontends that offer them too).
    pub persistent: bool,
    /// Persistent grants kept mapped per ring at most (None: the ring's capacity).
    pub max_persistent_grants: Option<u32>,
}

impl Features {
    /// How a frontend's requests are reached: persistent grants if both sides wrote
    /// `feature-persistent = 1` (Linux's rule since 6.0, decided at every connect), else the
    /// configured mode.
    pub fn grant_mode_for(&self, frontend_persistent: bool) -> GrantMode {
        if self.persistent && frontend_persistent {
            GrantMode::Persistent
        } else {
            self.grant_mode
        }
    }
}

/// Names a device: `backend/<kind>/<domid>/<devid>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey {
    /// `vbd3` or `vbd`.
    pub kind: String,
    /// The frontend's domain.
    pub domid: u16,
    /// The device id.
    pub devid: u32,
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.domid, self.devid)
    }
}

impl DeviceKey {
    /// The device a path under `base` (`/local/domain/0/backend`) belongs to, if any.
    pub fn from_backend_path(base: &str, path: &str) -> Option<DeviceKey> {
        let rest = path.strip_prefix(base)?.strip_prefix('/')?;
        let mut it = rest.split('/');
        let kind = it.next()?;
        let domid = it.next()?.parse().ok()?;
        let devid = it.next()?.parse().ok()?;
        Some(DeviceKey {
            kind: kind.to_owned(),
            domid,
            devid,
        })
    }

    fn token(&self) -> String {
        format!("fe:{}:{}:{}", self.kind, self.domid, self.devid)
    }

    /// The device a frontend watch token names.
    pub fn from_token(t: &str) -> Option<DeviceKey> {
        let mut it = t.strip_prefix("fe:")?.split(':');
        let kind = it.next()?.to_owned();
        let domid = it.next()?.parse().ok()?;
        let devid = it.next()?.parse().ok()?;
        Some(DeviceKey { kind, domid, devid })
    }
}

/// The tapdisk serving a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Served {
    pid: u32,
    minor: u32,
}

/// A backend device.
#[derive(Debug)]
pub struct Device {
    key: DeviceKey,
    be: String,
    fe: Option<String>,
    served: Option<Served>,
    /// Why tapdisk dropped the rings, if it did.
    broken: Option<String>,
}

fn read(xs: &mut Xenstore, path: &str) -> Result<Option<String>> {
    Ok(xs.read(Tx::NONE, path)?)
}

impl Device {
    /// A device not looked at yet.
    pub fn new(key: DeviceKey, base: &str) -> Device {
        let be = format!("{base}/{}/{}/{}", key.kind, key.domid, key.devid);
        Device {
            key,
            be,
            fe: None,
            served: None,
            broken: None,
        }
    }

    /// Drops the frontend watch.
    pub fn forget(self, xs: &mut Xenstore) {
        if let Some(fe) = &self.fe {
            let _ = xs.unwatch(&format!("{fe}/state"), &self.key.token());
        }
    }

    fn set_state(&self, xs: &mut Xenstore, log: &mut Log, s: XenbusState) -> Result<()> {
        xs.write(
            Tx::NONE,
            &format!("{}/state", self.be),
            &s.code().to_string(),
        )?;
        tblog!(log, "{}: backend -> {s:?}", self.key);
        Ok(())
    }

    /// Looks at the device's and its frontend's state and does the next step. Returns false
    /// when the device is gone (or not ours) and can be forgotten.
    pub fn step(
        &mut self,
        xs: &mut Xenstore,
        rundir: &RunDir,
        feat: &Features,
        log: &mut Log,
    ) -> Result<bool> {
        let be_state = read(xs, &format!("{}/state", self.be))?;
        if be_state.is_none() {
            // The toolstack removed the device.
            self.disconnect(rundir, log);
            return Ok(false);
        }
        let cur = XenbusState::parse(be_state.as_deref());
        if self.fe.is_none() {
            if self.key.kind == "vbd" {
                // backend/vbd is kernel blkback's too: take only devices given our script.
                let script = read(xs, &format!("{}/script", self.be))?.unwrap_or_default();
                if !script.ends_with("block-tap") {
                    return Ok(false);
                }
            }
            let fe = read(xs, &format!("{}/frontend", self.be))?
                .ok_or_else(|| anyhow!("no frontend key"))?;
            check_frontend_path(&fe, self.key.domid)?;
            xs.watch(&format!("{fe}/state"), &self.key.token())?;
            tblog!(
                log,
                "{}: new device, frontend {fe}, backend state {cur:?}",
                self.key
            );
            self.fe = Some(fe);
        }
        let fe = self.fe.clone().unwrap_or_default();
        let fe_state = XenbusState::parse(read(xs, &format!("{fe}/state"))?.as_deref());
        let online = read(xs, &format!("{}/online", self.be))?.as_deref() == Some("1");

        if !online && matches!(cur, XenbusState::Closing | XenbusState::Closed) {
            // The toolstack is taking the device away (xl block-detach, destroy).
            self.disconnect(rundir, log);
            if cur != XenbusState::Closed {
                self.set_state(xs, log, XenbusState::Closed)?;
            }
            return Ok(true);
        }
        if self.broken.is_some() && self.served.is_some() {
            let why = self.broken.clone().unwrap_or_default();
            tblog!(
                log,
                "{}: rings dropped by tapdisk ({why}); closing",
                self.key
            );
            self.disconnect(rundir, log);
            let _ = xs.write(Tx::NONE, &format!("{}/error", self.be), &escape::line(&why));
            self.set_state(xs, log, XenbusState::Closing)?;
            return Ok(true);
        }
        match (cur, fe_state) {
            (XenbusState::Initialising | XenbusState::Unknown, _) => {
                let offered = self.advertise(xs, rundir, feat)?;
                tblog!(log, "{}: backend -> InitWait ({offered:?})", self.key);
            }
            (XenbusState::Closing | XenbusState::Closed, XenbusState::Initialising) => {
                // A frontend that comes back (guest reboot, module reload): serve it again.
                self.broken = None;
                self.advertise(xs, rundir, feat)?;
                tblog!(
                    log,
                    "{}: frontend reinitialising; backend -> InitWait",
                    self.key
                );
            }
            (XenbusState::InitWait, XenbusState::Initialised | XenbusState::Connected) => {
                self.connect(xs, rundir, feat, log)?;
            }
            (XenbusState::Connected, XenbusState::Initialised | XenbusState::Connected)
                if self.served.is_none() =>
            {
                // Connected before we (re)started: adopt it if the tapdisk still serves it.
                self.served = adopt(xs, &self.be, rundir, &self.key)?;
                if self.served.is_some() {
                    tblog!(log, "{}: adopted a connected device", self.key);
                }
            }
            (_, XenbusState::Closing) => {
                self.disconnect(rundir, log);
                if cur != XenbusState::Closing && cur != XenbusState::Closed {
                    self.set_state(xs, log, XenbusState::Closing)?;
                }
            }
            (_, XenbusState::Closed | XenbusState::Unknown) => {
                self.disconnect(rundir, log);
                if cur != XenbusState::Closed && cur >= XenbusState::InitWait {
                    self.set_state(xs, log, XenbusState::Closed)?;
                }
            }
            _ => {}
        }
        Ok(true)
    }

    /// What to offer the frontend: tapback's features, within the limits of the VBD serving
    /// the device when the hotplug script already wrote which one it is (`pid`, `minor`): a
    /// ring above the VBD's `--ring-order` would be refused by the tapdisk.
    fn offer(&self, xs: &mut Xenstore, rundir: &RunDir, feat: &Features) -> Result<Features> {
        let mut offer = *feat;
        let (Some(pid), Some(minor)) = (
            read(xs, &format!("{}/pid", self.be))?,
            read(xs, &format!("{}/minor", self.be))?,
        ) else {
            return Ok(offer);
        };
        let (Ok(pid), Ok(minor)) = (pid.trim().parse::<u32>(), minor.trim().parse::<u32>()) else {
            return Ok(offer);
        };
        let listed = Client::connect_pid(rundir, pid).and_then(|mut c| c.call(Command::List));
        if let Ok(Reply::List { vbds }) = listed {
            if let Some(v) = vbds.iter().find(|v| v.minor == minor) {
                offer.max_ring_order = offer.max_ring_order.min(v.max_ring_order);
                offer.max_indirect_segments = offer
                    .max_indirect_segments
                    .min(u32::from(v.max_indirect_segments));
            }
        }
        Ok(offer)
    }

    fn advertise(&self, xs: &mut Xenstore, rundir: &RunDir, feat: &Features) -> Result<Features> {
        let feat = &self.offer(xs, rundir, feat)?;
        let be = self.be.clone();
        let mode = read(xs, &format!("{be}/mode"))?.unwrap_or_else(|| "w".into());
        let discard = mode.contains('w')
            && read(xs, &format!("{be}/discard-enable"))?.as_deref() != Some("0");
        xs.transaction(|xs, tx| {
            let mut w = |k: &str, v: String| xs.write(tx, &format!("{be}/{k}"), &v);
            w("feature-flush-cache", "1".into())?;
            w("feature-barrier", "1".into())?;
            w(
                "feature-persistent",
                if feat.persistent { "1" } else { "0" }.into(),
            )?;
            w("max-ring-page-order", feat.max_ring_order.to_string())?;
            w("multi-queue-max-queues", feat.max_queues.to_string())?;
            if feat.max_indirect_segments > 0 {
                w(
                    "feature-max-indirect-segments",
                    feat.max_indirect_segments.to_string(),
                )?;
            }
            if discard {
                w("feature-discard", "1".into())?;
                w("discard-granularity", "4096".into())?;
                w("discard-alignment", "0".into())?;
                w("discard-secure", "0".into())?;
            }
            w("state", XenbusState::InitWait.code().to_string())
        })?;
        Ok(*feat)
    }

    fn connect(
        &mut self,
        xs: &mut Xenstore,
        rundir: &RunDir,
        feat: &Features,
        log: &mut Log,
    ) -> Result<()> {
        let be = self.be.clone();
        // The hotplug script (block-tap) writes these once the image is open in a tapdisk.
        let (Some(pid), Some(minor)) = (
            read(xs, &format!("{be}/pid"))?,
            read(xs, &format!("{be}/minor"))?,
        ) else {
            tblog!(
                log,
                "{}: frontend ready, waiting for the hotplug script",
                self.key
            );
            return Ok(());
        };
        let served = Served {
            pid: pid.trim().parse().context("bad pid key")?,
            minor: minor.trim().parse().context("bad minor key")?,
        };
        let fe = self.fe.clone().unwrap_or_default();
        let limits = KeyLimits {
            max_ring_order: feat.max_ring_order,
            max_queues: feat.max_queues,
        };
        let mut xs_err = None;
        let rings = frontend_keys::parse(
            |k| match xs.read(Tx::NONE, &format!("{fe}/{k}")) {
                Ok(v) => v,
                Err(e) => {
                    xs_err = Some(e);
                    None
                }
            },
            limits,
        );
        if let Some(e) = xs_err {
            return Err(e.into());
        }
        let rings = match rings {
            Ok(r) => r,
            Err(e) => {
                // A frontend with unusable keys gets the device closed, as blkback does.
                tblog!(log, "{}: {e}; closing", self.key);
                let _ = xs.write(
                    Tx::NONE,
                    &format!("{be}/error"),
                    &escape::line(&e.to_string()),
                );
                self.set_state(xs, log, XenbusState::Closing)?;
                return Ok(());
            }
        };
        let vdev = read(xs, &format!("{be}/dev"))?.unwrap_or_default();
        // The toolstack's access mode: Xen's block-tap opens every image read-write, so a
        // read-only disk ("mode = r") is enforced on the frontend's rings.
        let read_only = read(xs, &format!("{be}/mode"))?.is_some_and(|m| m.starts_with('r'));
        let mode = feat.grant_mode_for(rings.persistent);
        let spec = XenConnectSpec {
            domid: self.key.domid,
            devid: self.key.devid,
            vdev,
            rings: rings.clone(),
            grant_mode: mode,
            read_only,
            max_persistent_grants: feat.max_persistent_grants,
        };
        let reply = Client::connect_pid(rundir, served.pid).and_then(|mut c| {
            c.call(Command::XenConnect {
                minor: served.minor,
                spec,
            })
        });
        let disk = match reply {
            Ok(Reply::XenConnected { disk, .. }) => disk,
            Ok(other) => bail!("unexpected reply {other:?}"),
            Err(e) => {
                tblog!(
                    log,
                    "{}: tapdisk {} refused the rings: {e:#}; closing",
                    self.key,
                    served.pid
                );
                let _ = xs.write(
                    Tx::NONE,
                    &format!("{be}/error"),
                    &escape::line(&format!("{e:#}")),
                );
                self.set_state(xs, log, XenbusState::Closing)?;
                return Ok(());
            }
        };
        self.served = Some(served);
        self.broken = None;
        let info = if disk.read_only { 4 } else { 0 }; // VDISK_READONLY
        xs.transaction(|xs, tx| {
            let mut w = |k: &str, v: String| xs.write(tx, &format!("{be}/{k}"), &v);
            w("sectors", disk.sectors.to_string())?;
            w("sector-size", disk.sector_size.to_string())?;
            w(
                "physical-sector-size",
                disk.sector_size.max(512).to_string(),
            )?;
            w("info", info.to_string())?;
            // What the rings really accept (blkfront reads it when the backend is Connected).
            if disk.max_indirect_segments > 0 {
                w(
                    "feature-max-indirect-segments",
                    disk.max_indirect_segments.to_string(),
                )?;
            }
            w("state", XenbusState::Connected.code().to_string())
        })?;
        tblog!(
            log,
            "{}: backend -> Connected: tapdisk {} minor {}, {} sectors, {} queue(s) of 2^{} pages, {} ABI, grants {mode} (frontend feature-persistent={}), {} indirect segments",
            self.key,
            served.pid,
            served.minor,
            disk.sectors,
            rings.queues.len(),
            rings.ring_order,
            rings.abi.name(),
            u8::from(rings.persistent),
            disk.max_indirect_segments
        );
        Ok(())
    }

    fn disconnect(&mut self, rundir: &RunDir, log: &mut Log) {
        if let Some(s) = self.served.take() {
            let r = Client::connect_pid(rundir, s.pid).and_then(|mut c| {
                c.call(Command::XenDisconnect {
                    minor: s.minor,
                    domid: self.key.domid,
                    devid: self.key.devid,
                })
            });
            match r {
                Ok(_) => tblog!(
                    log,
                    "{}: rings disconnected from tapdisk {}",
                    self.key,
                    s.pid
                ),
                Err(e) => tblog!(
                    log,
                    "{}: disconnect from tapdisk {}: {e:#}",
                    self.key,
                    s.pid
                ),
            }
        }
    }
}

fn adopt(xs: &mut Xenstore, be: &str, rundir: &RunDir, key: &DeviceKey) -> Result<Option<Served>> {
    let (Some(pid), Some(minor)) = (
        xs.read(Tx::NONE, &format!("{be}/pid"))?,
        xs.read(Tx::NONE, &format!("{be}/minor"))?,
    ) else {
        return Ok(None);
    };
    let (Ok(pid), Ok(minor)) = (pid.parse::<u32>(), minor.parse::<u32>()) else {
        return Ok(None);
    };
    let Ok(mut c) = Client::connect_pid(rundir, pid) else {
        return Ok(None);
    };
    if let Ok(Reply::List { vbds }) = c.call(Command::List) {
        let served = vbds.iter().any(|v| {
            v.minor == minor
                && v.xen
                    .iter()
                    .any(|x| x.domid == key.domid && x.devid == key.devid)
        });
        if served {
            return Ok(Some(Served { pid, minor }));
        }
    }
    Ok(None)
}

/// Asks each tapdisk serving a connected device whether its rings are still up, and marks the
/// devices whose rings were dropped (a frontend that broke the protocol, a dead tapdisk).
pub fn check_rings(rundir: &RunDir, devices: &mut BTreeMap<DeviceKey, Device>, log: &mut Log) {
    let mut by_pid: BTreeMap<u32, Vec<DeviceKey>> = BTreeMap::new();
    for (k, d) in devices.iter() {
        if let (Some(s), None) = (d.served, &d.broken) {
            by_pid.entry(s.pid).or_default().push(k.clone());
        }
    }
    for (pid, keys) in by_pid {
        let listing = Client::connect_pid(rundir, pid).and_then(|mut c| c.call(Command::List));
        for k in keys {
            let Some(d) = devices.get_mut(&k) else {
                continue;
            };
            let Some(s) = d.served else { continue };
            let state = match &listing {
                Ok(Reply::List { vbds }) => vbds
                    .iter()
                    .find(|v| v.minor == s.minor)
                    .and_then(|v| {
                        v.xen
                            .iter()
                            .find(|x| x.domid == k.domid && x.devid == k.devid)
                    })
                    .map(|x| x.state.clone())
                    .unwrap_or_else(|| "not served by its tapdisk any more".into()),
                Ok(_) => "unexpected reply".into(),
                Err(e) => format!("tapdisk {pid} unreachable: {e:#}"),
            };
            if state != "connected" {
                tblog!(log, "{k}: {state}");
                d.broken = Some(state);
            }
        }
    }
}

/// A frontend path (the backend's `frontend` key, which the toolstack wrote but which tapback
/// then watches and reads from) must lie in the frontend domain's own `device/` folder.
fn check_frontend_path(fe: &str, domid: u16) -> Result<()> {
    let want = format!("/local/domain/{domid}/device/");
    let rest = fe.strip_prefix(&want).unwrap_or("");
    if rest.is_empty()
        || fe.split('/').any(|c| c == ".." || c == ".")
        || fe.contains("//")
        || fe.chars().any(|c| c.is_control())
    {
        bail!("frontend path {fe:?} is not under {want}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_paths_outside_the_domains_device_folder_are_refused() {
        assert!(check_frontend_path("/local/domain/5/device/vbd/51712", 5).is_ok());
        for bad in [
            "/local/domain/6/device/vbd/51712",
            "/local/domain/5/device/",
            "/local/domain/5/device/../../0/backend",
            "/local/domain/5/device/vbd/./51712",
            "/local/domain/5/device//vbd",
            "/local/domain/5/devicex/vbd/1",
            "/local/domain/5/device/vbd/1\n",
            "local/domain/5/device/vbd/1",
            "",
        ] {
            assert!(check_frontend_path(bad, 5).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_and_tokens() {
        let b = "/local/domain/0/backend";
        let k =
            DeviceKey::from_backend_path(b, "/local/domain/0/backend/vbd3/5/51712/state").unwrap();
        assert_eq!(k.to_string(), "vbd3/5/51712");
        assert_eq!(DeviceKey::from_token(&k.token()), Some(k.clone()));
        assert_eq!(
            DeviceKey::from_backend_path(b, "/local/domain/0/backend/vbd3/5/51712"),
            Some(k)
        );
        assert_eq!(
            DeviceKey::from_backend_path(b, "/local/domain/0/backend/vbd3/5"),
            None
        );
        assert_eq!(
            DeviceKey::from_backend_path(b, "/local/domain/0/backend/vbd3"),
            None
        );
        assert_eq!(DeviceKey::from_backend_path(b, "/elsewhere/vbd3/5/1"), None);
        assert_eq!(DeviceKey::from_token("fe:vbd3:x:1"), None);
    }

    #[test]
    fn persistent_grants_only_when_both_sides_offer_them() {
        let mut f = Features {
            max_ring_order: 4,
            max_queues: 4,
            max_indirect_segments: 256,
            grant_mode: GrantMode::Map,
            persistent: true,
            max_persistent_grants: None,
        };
        assert_eq!(f.grant_mode_for(true), GrantMode::Persistent);
        assert_eq!(f.grant_mode_for(false), GrantMode::Map);
        f.grant_mode = GrantMode::Copy;
        assert_eq!(f.grant_mode_for(false), GrantMode::Copy);
        f.persistent = false;
        assert_eq!(f.grant_mode_for(true), GrantMode::Copy);
    }

    #[test]
    fn states_parse_leniently() {
        assert_eq!(XenbusState::parse(Some("4")), XenbusState::Connected);
        assert_eq!(XenbusState::parse(None), XenbusState::Unknown);
        assert_eq!(XenbusState::parse(Some("junk")), XenbusState::Unknown);
        assert_eq!(XenbusState::parse(Some("7")), XenbusState::Other(7));
        assert_eq!(XenbusState::Closed.code(), 6);
    }
}
