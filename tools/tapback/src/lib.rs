//! `tapback`: the xenbus half of the Xen backend (the role blktap3's tapback plays).
//!
//! It watches this domain's backend directories in xenstore, `backend/vbd3` (what xl writes
//! for `backendtype=tap` on Xen 4.19 and later) and optionally `backend/vbd` (Xen 4.17:
//! `backendtype=phy, script=block-tap` with xen-blkback unloaded), and drives each device
//! through the xenbus state machine ([`device`]):
//!
//! 1. a new device: advertise the backend's features and go to InitWait (within the limits of
//!    the VBD if `pid` and `minor` are there already); xl then runs the hotplug script
//!    `block-tap` (Xen's own, driving tap-ctl as blktap3's, or ours), which opens the image in
//!    a tapdisk and writes `pid`, `minor` and `physical-device-path` next to the device's
//!    keys;
//! 2. once the frontend is Initialised and the hotplug script ran: read and check the
//!    frontend's keys (ring refs, event channels, protocol, queues), hand them to that tapdisk
//!    (`xen_connect` on its control socket: it maps the rings and starts one loop per queue),
//!    write `sectors`, `sector-size`, `physical-sector-size` and `info` in one transaction, and
//!    go Connected;
//! 3. frontend Closing or Closed, the toolstack closing the device, or a ring the tapdisk
//!    dropped because the frontend broke the protocol: `xen_disconnect`, Closing, Closed; a
//!    frontend that initialises again is served again (reconnect).
//!
//! tapback holds no disk state: killing and restarting it leaves the rings being served,
//! and a restarted tapback adopts the Connected devices it finds. What it writes to xenstore
//! and its log is escaped ([`tapdisk_control::escape`]): an image name or a tapdisk's message
//! cannot forge a line.

pub mod device;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blkif::xen::backend::GrantMode;
use blkif::xen::xenstore::{Xenstore, XsError};
use clap::Parser;
use tapdisk_control::limits::{self, Limit};
use tapdisk_control::{RunDir, RUNDIR_ENV};

use device::{Device, DeviceKey, Features};

const EXAMPLES: &str = "\
Examples:
  tapback                                   # serve backend/vbd3 of dom0 (Xen >= 4.19)
  tapback --kinds vbd3,vbd                  # also backend/vbd with script=block-tap (Xen 4.17,
                                            # xen-blkback unloaded)
  tapback --grant-mode copy --max-queues 2 --log-file /var/log/tapback.log
  tapback --feature-persistent 0            # no persistent grants: every frontend gets
                                            # --grant-mode (map by default)

A disk for it in an xl config (Xen >= 4.19):
  disk = [ 'vdev=xvda, backendtype=tap, target=/srv/vm1.img' ]   (libxl adds the aio:)";

/// tapback: connect Xen guests' blkfront devices to tapdisk-rs.
#[derive(Debug, Parser)]
#[command(name = "tapback", version, after_help = EXAMPLES)]
pub struct Args {
    /// Run directory shared with tap-ctl and the tapdisks.
    #[arg(long, env = RUNDIR_ENV, default_value = tapdisk_control::DEFAULT_RUNDIR)]
    pub rundir: PathBuf,
    /// Backend directories to serve, comma separated: vbd3, vbd.
    #[arg(long, value_delimiter = ',', default_value = "vbd3")]
    pub kinds: Vec<String>,
    /// Domain this backend runs in.
    #[arg(long, default_value_t = 0)]
    pub domid: u16,
    /// How tapdisk reaches the request pages of frontends without persistent grants: map
    /// (gntdev mappings for each request's IO) or copy (grant copy).
    #[arg(long, default_value = "map")]
    pub grant_mode: GrantMode,
    /// Offer persistent grants (feature-persistent): a frontend that offers them too gets its
    /// grants kept mapped for the ring's life, whatever --grant-mode says.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub feature_persistent: bool,
    /// Persistent grants kept mapped per ring at most (default: the ring's capacity, its
    /// requests x segments; the least recently used go when a frontend uses more).
    #[arg(long, value_name = "N")]
    pub max_persistent_grants: Option<u32>,
    /// Queues offered to frontends (multi-queue-max-queues).
    #[arg(
        long,
        default_value_t = 4,
        help = format!(
            "Queues offered to frontends (multi-queue-max-queues, {})",
            limits::XEN_MAX_QUEUES.range()
        ),
    )]
    pub max_queues: u32,
    /// Largest ring offered: 2^N pages (max-ring-page-order).
    #[arg(
        long,
        default_value_t = blkif::xen::MAX_RING_ORDER.into(),
        help = format!(
            "Largest ring offered: 2^N pages (max-ring-page-order, {})",
            limits::XEN_MAX_RING_ORDER.range()
        ),
    )]
    pub max_ring_order: u32,
    /// Segments per indirect request offered (feature-max-indirect-segments; 0: not offered).
    #[arg(
        long,
        default_value_t = device::INDIRECT_SEGMENTS,
        help = format!(
            "Segments per indirect request offered (feature-max-indirect-segments, {}; 0: not \
             offered)",
            limits::MAX_INDIRECT_SEGMENTS.range()
        ),
    )]
    pub max_indirect_segments: u32,
    /// Log file (default: stderr).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// How often the tapdisks are asked whether a ring was dropped, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub check_ms: u64,
    /// Frontend domains whose devices another backend serves (e.g. blktap3's tapback started
    /// with `-x DOMID`), comma separated: tapback leaves them alone.
    #[arg(long, value_delimiter = ',', value_name = "DOMIDS")]
    pub skip_domids: Vec<u16>,
}

/// Entry point: parses `argv`, runs, returns the exit status.
pub fn main_with(argv: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tapback: {e:#}");
            1
        }
    }
}

/// A line on the log: `tapback: ...` with a timestamp relative to the start.
pub struct Log {
    out: Box<dyn std::io::Write + Send>,
    t0: Instant,
}

impl Log {
    fn open(path: Option<&PathBuf>) -> Result<Log> {
        let out: Box<dyn std::io::Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open {}", p.display()))?,
            ),
            None => Box::new(std::io::stderr()),
        };
        Ok(Log {
            out,
            t0: Instant::now(),
        })
    }

    /// Writes one line (text from xenstore, guests and tapdisks escaped: it stays one line).
    pub fn line(&mut self, msg: std::fmt::Arguments<'_>) {
        let t = self.t0.elapsed().as_secs_f64();
        let msg = msg.to_string();
        let _ = writeln!(
            self.out,
            "[{t:9.3}] {}",
            tapdisk_control::escape::text(&msg)
        );
        let _ = self.out.flush();
    }
}

/// Logs a formatted line.
#[macro_export]
macro_rules! tblog {
    ($log:expr, $($t:tt)*) => { $log.line(format_args!($($t)*)) };
}

/// `Ok` if `value` of `flag` is within `limit`.
fn check(flag: &str, value: u32, limit: &Limit) -> Result<()> {
    anyhow::ensure!(
        limit.contains(value.into()),
        "{flag} {value} is outside {}",
        limit.range()
    );
    Ok(())
}

fn run(args: Args) -> Result<()> {
    check("--max-queues", args.max_queues, &limits::XEN_MAX_QUEUES)?;
    check(
        "--max-ring-order",
        args.max_ring_order,
        &limits::XEN_MAX_RING_ORDER,
    )?;
    check(
        "--max-indirect-segments",
        args.max_indirect_segments,
        &limits::MAX_INDIRECT_SEGMENTS,
    )?;
    for k in &args.kinds {
        anyhow::ensure!(
            k == "vbd3" || k == "vbd",
            "unknown backend kind '{k}' (vbd3 or vbd)"
        );
    }
    anyhow::ensure!(
        args.grant_mode != GrantMode::Persistent,
        "--grant-mode is map or copy (what frontends without persistent grants get); \
         persistent grants are negotiated with each frontend (--feature-persistent)"
    );
    anyhow::ensure!(
        args.max_persistent_grants != Some(0),
        "--max-persistent-grants must be at least 1"
    );
    let mut log = Log::open(args.log_file.as_ref())?;
    let mut xs = Xenstore::open().context("cannot reach xenstore")?;
    let base = format!("/local/domain/{}/backend", args.domid);
    for k in &args.kinds {
        xs.watch(&format!("{base}/{k}"), "be")
            .with_context(|| format!("cannot watch {base}/{k}"))?;
    }
    let features = Features {
        // Checked against a range within u8 above.
        max_ring_order: args.max_ring_order as u8,
        max_queues: args.max_queues,
        max_indirect_segments: args.max_indirect_segments,
        grant_mode: args.grant_mode,
        persistent: args.feature_persistent,
        max_persistent_grants: args.max_persistent_grants,
    };
    let rundir = RunDir(args.rundir.clone());
    tblog!(
        log,
        "tapback: serving {} under {base}; features {features:?}",
        args.kinds.join(",")
    );
    let mut devices: BTreeMap<DeviceKey, Device> = BTreeMap::new();
    let check = Duration::from_millis(args.check_ms.max(50));
    let mut next_check = Instant::now() + check;
    loop {
        let timeout = next_check.saturating_duration_since(Instant::now());
        let ev = xs.next_event(Some(timeout)).context("xenstore")?;
        let mut todo: Vec<DeviceKey> = Vec::new();
        if let Some(ev) = ev {
            match ev.token.as_str() {
                "be" => {
                    if let Some(key) = DeviceKey::from_backend_path(&base, &ev.path) {
                        todo.push(key);
                    } else {
                        // The watched directory itself (first event) or a domain's folder:
                        // look at everything under it.
                        todo.extend(scan(&mut xs, &base, &args.kinds)?);
                        todo.extend(devices.keys().cloned());
                    }
                }
                t => {
                    if let Some(key) = DeviceKey::from_token(t) {
                        todo.push(key);
                    }
                }
            }
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + check;
            device::check_rings(&rundir, &mut devices, &mut log);
            todo.extend(devices.keys().cloned());
        }
        todo.sort();
        todo.dedup();
        todo.retain(|k| !args.skip_domids.contains(&k.domid));
        for key in todo {
            let dev = devices
                .entry(key.clone())
                .or_insert_with(|| Device::new(key.clone(), &base));
            match dev.step(&mut xs, &rundir, &features, &mut log) {
                Ok(true) => {}
                Ok(false) => {
                    if let Some(d) = devices.remove(&key) {
                        d.forget(&mut xs);
                    }
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => tblog!(log, "{key}: {e:#}"),
            }
        }
    }
}

fn is_fatal(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<blkif::Error>(),
        Some(blkif::Error::Xenstore(
            XsError::Io(_) | XsError::Protocol(_)
        ))
    )
}

/// Every device under the served backend directories.
fn scan(xs: &mut Xenstore, base: &str, kinds: &[String]) -> Result<Vec<DeviceKey>> {
    let mut out = Vec::new();
    for k in kinds {
        for dom in xs.directory(blkif::xen::xenstore::Tx::NONE, &format!("{base}/{k}"))? {
            let Ok(domid) = dom.parse::<u16>() else {
                continue;
            };
            for dev in xs.directory(blkif::xen::xenstore::Tx::NONE, &format!("{base}/{k}/{dom}"))? {
                if let Ok(devid) = dev.parse::<u32>() {
                    out.push(DeviceKey {
                        kind: k.clone(),
                        domid,
                        devid,
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod fatal_tests {
    use super::*;

    #[test]
    fn a_broken_xenstore_connection_is_fatal_a_refusal_is_not() {
        let broken = blkif::Error::from(XsError::Protocol("reply of type 9".into()));
        assert!(is_fatal(&anyhow::Error::from(broken)));
        let refused = blkif::Error::from(XsError::Refused {
            op: "READ",
            path: "/local/domain/0/backend".into(),
            errno: "EACCES".into(),
        });
        assert!(!is_fatal(&anyhow::Error::from(refused).context("scanning")));
        assert!(!is_fatal(&anyhow::anyhow!("something else")));
    }
}
