//! `stripe-img`: create, inspect and delete striped virtual disks (thesis section 5.2).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use stripe::map::{flock_holder, Geometry, MapExtent, StripeMap};
use stripe::proto::AllocArgs;
use stripe::MasterClient;
use td_cli::{fmt_bytes, fmt_size, parse_size as size_arg};

const LONG_ABOUT: &str = "\
Create, inspect and delete striped virtual disks.

A striped disk lives on extents of several iSCSI storage servers, handed out by stripe-master.
Its mapping file holds the geometry (size, stripes, stripe size, replicas) and where each
extent lives; tapdisk serves it as stripe:MAPFILE, holding the file locked. Consecutive stripe
units go to different servers, so large IOs use them all at once; with replicas, every write
goes to each copy and reads fall back to another copy when a server fails.";

const EXAMPLES: &str = "\
Examples:
  stripe-img create --master 10.0.0.1 --size 20G --stripes 4 --stripe-size 64k -o vm1.map
  stripe-img create --master 10.0.0.1 --size 20G --stripes 2 --replicas 2 -o vm2.map
  stripe-img info vm1.map
  tap-ctl create -a stripe:vm1.map
  stripe-img delete vm1.map          # give the extents back to the master, remove the file

Errors are one line on stderr, 'stripe-img: ...'. Exit status: 0 success, 1 failure, 2 bad
command line.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "stripe-img",
    version,
    about = "Create, inspect and delete striped virtual disks",
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    arg_required_else_help = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a disk: allocate its extents from the master and write the mapping file.
    Create(CreateArgs),
    /// Show a mapping file: geometry, extents, lock holder, stale replicas.
    Info(InfoArgs),
    /// Give a disk's extents back to the master and remove its mapping file.
    Delete(DeleteArgs),
    /// Write this host's mapping file of an etcd-backed disk (so tapdisk can serve it here).
    Pull(PullArgs),
}

/// Where etcd is.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// Keep the disk's record in etcd (client URLs, comma-separated): the disk can then be
    /// opened on any host that reaches etcd, with one writer at a time.
    #[arg(long, value_name = "URL[,URL...]", env = "STRIPE_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix in etcd.
    #[arg(long, value_name = "PREFIX", default_value = stripe_etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
}

impl EtcdArgs {
    fn connect(&self) -> Result<Option<stripe_etcd::Etcd>> {
        let Some(e) = &self.etcd else {
            return Ok(None);
        };
        let eps = stripe_etcd::Etcd::parse_endpoints(e);
        if eps.is_empty() {
            bail!("--etcd names no endpoint");
        }
        Ok(Some(stripe_etcd::Etcd::connect(
            &eps,
            &self.etcd_prefix,
            std::time::Duration::from_secs(5),
        )?))
    }
}

/// `pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The disk id.
    pub disk: String,
    /// The mapping file to write (replaced if it exists).
    #[arg(short, long, value_name = "MAPFILE")]
    pub output: PathBuf,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The master's address (HOST or HOST:PORT).
    #[arg(long, short, value_name = "HOST[:PORT]", env = "STRIPE_MASTER")]
    pub master: String,
    /// Disk size (a multiple of 512 bytes; e.g. 20G).
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub size: u64,
    /// Stripes: consecutive stripe units go to this many extents in turn.
    #[arg(long, default_value_t = 2)]
    pub stripes: u32,
    /// Bytes per stripe unit (a multiple of 4k dividing the master's extent size).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, default_value = "64k")]
    pub stripe_size: u64,
    /// Copies of every extent, on distinct servers.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// The disk's id at the master (default: the file name and a random suffix). Creating
    /// again with the same id returns the same extents.
    #[arg(long)]
    pub disk_id: Option<String>,
    /// The mapping file to write (must not exist).
    #[arg(short, long, value_name = "MAPFILE")]
    pub output: PathBuf,
    /// Where the disk's record goes (etcd), if anywhere but the mapping file.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The mapping file.
    pub map: PathBuf,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The mapping file.
    pub map: PathBuf,
}

/// Parses `args` (the first is the program name), runs the command and returns the exit status.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    td_cli::main_for::<Cli, I, T, anyhow::Error>("stripe-img", args, run)
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.verb {
        Verb::Create(a) => create(a),
        Verb::Info(a) => info(a),
        Verb::Delete(a) => delete(a),
        Verb::Pull(a) => pull(a),
    }
}

fn default_disk_id(out: &std::path::Path) -> String {
    let stem: String = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let r = (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let stem = if stem.is_empty() { "disk".into() } else { stem };
    format!("{stem}-{:08x}", r >> 32)
}

/// Allocates the extents of a disk of `geometry` (whose extent size is the master's) from the
/// master `c` as `disk_id`, and builds its mapping.
pub fn allocate_map(c: &mut MasterClient, geometry: Geometry, disk_id: &str) -> Result<StripeMap> {
    geometry.check().map_err(anyhow::Error::msg)?;
    let count = geometry.extent_count();
    let placements = c.allocate(&AllocArgs {
        disk: disk_id.to_owned(),
        first: 0,
        count,
        replicas: geometry.replicas,
    })?;
    let mut extents: Vec<Vec<Option<MapExtent>>> =
        vec![vec![None; geometry.replicas as usize]; count as usize];
    for p in placements {
        let slot = extents
            .get_mut(p.index as usize)
            .and_then(|r| r.get_mut(p.replica as usize))
            .context("the master answered with an extent index out of range")?;
        let lun = u16::try_from(p.extent.lun).context("the master gave a LUN above 65535")?;
        if p.extent.len != geometry.extent_size {
            bail!("the master gave an extent of {} bytes", p.extent.len);
        }
        *slot = Some(MapExtent {
            portal: p.extent.portal,
            target: p.extent.target,
            lun,
            addr: p.extent.addr,
        });
    }
    let extents = extents
        .into_iter()
        .map(|r| r.into_iter().collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()
        .context("the master left extents out of its answer")?;
    let map = StripeMap {
        disk_id: disk_id.to_owned(),
        master: c.addr().to_owned(),
        geometry,
        extents,
        store: stripe::map::Store::File,
    };
    map.check().map_err(anyhow::Error::msg)?;
    Ok(map)
}

/// Checks every argument that needs no master: the shape of the disk, the disk id, and that
/// the mapping file can be written where it goes. Runs before the master is contacted, so a
/// mistake costs no network round trip (and no retries against an unreachable master).
pub fn check_create_args(a: &CreateArgs) -> Result<()> {
    if a.size == 0 || !a.size.is_multiple_of(512) {
        bail!("--size {} is not a positive multiple of 512 bytes", a.size);
    }
    if a.stripes == 0 || a.stripes > stripe::map::MAX_STRIPES {
        bail!(
            "--stripes {} is out of range: 1..={}",
            a.stripes,
            stripe::map::MAX_STRIPES
        );
    }
    if a.stripe_size == 0 || !a.stripe_size.is_multiple_of(4096) || a.stripe_size > 1 << 30 {
        bail!(
            "--stripe-size {} is not a positive multiple of 4k up to 1G",
            a.stripe_size
        );
    }
    if a.replicas == 0 || a.replicas > stripe::map::MAX_REPLICAS {
        bail!(
            "--replicas {} is out of range: 1..={}",
            a.replicas,
            stripe::map::MAX_REPLICAS
        );
    }
    if let Some(id) = &a.disk_id {
        stripe::master::check_name("--disk-id", id).map_err(|f| anyhow::anyhow!(f.message))?;
    }
    if a.output.exists() {
        bail!("{} exists already", a.output.display());
    }
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if a.output.file_name().is_none() {
        bail!("-o {}: not a file name", a.output.display());
    }
    // Prove the folder takes a file now (it may still fail later: then the extents go back).
    let probe = dir.join(format!(".stripe-img-probe-{}", std::process::id()));
    std::fs::File::create(&probe)
        .with_context(|| format!("cannot write the mapping file in {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn create(a: &CreateArgs) -> Result<()> {
    check_create_args(a)?;
    // etcd first: an unreachable etcd costs no allocation.
    let etcd = a.etcd.connect()?;
    let mut c = MasterClient::new(&a.master);
    let list = c.list()?;
    let extent_size = list.extent_size;
    if extent_size == 0 {
        bail!("master {} has no extents registered", c.addr());
    }
    let geometry = Geometry {
        size: a.size,
        stripes: a.stripes,
        stripe_size: a.stripe_size,
        replicas: a.replicas,
        extent_size,
    };
    geometry
        .check()
        .map_err(|e| anyhow::anyhow!("{e} (the master's extents are {})", fmt_size(extent_size)))?;
    let disk_id = a
        .disk_id
        .clone()
        .unwrap_or_else(|| default_disk_id(&a.output));
    // A disk that had extents before this call keeps them whatever happens here.
    let existed = list
        .extents
        .iter()
        .any(|x| x.owner.as_ref().is_some_and(|o| o.0 == disk_id));
    let mut recorded = false;
    let made = allocate_map(&mut c, geometry, &disk_id).and_then(|map| match &etcd {
        None => {
            map.write_new(&a.output)?;
            Ok(map)
        }
        Some(e) => {
            let rec = stripe_etcd::DiskRecord::from_map(&map);
            stripe_etcd::record::create(e, &rec)?;
            recorded = true;
            Ok(stripe_etcd::record::write_cache(e, &rec, &a.output)?)
        }
    });
    if made.is_err() && recorded && !existed {
        if let Some(e) = &etcd {
            let _ = stripe_etcd::record::delete(e, &disk_id);
        }
    }
    let map = match made {
        Ok(m) => m,
        Err(e) => return Err(undo_create(&mut c, &disk_id, existed, e)),
    };
    let servers: std::collections::BTreeSet<&str> = map
        .extents
        .iter()
        .flatten()
        .map(|x| x.portal.as_str())
        .collect();
    if let Some(e) = &etcd {
        println!(
            "recorded disk {} in etcd {} under {}",
            map.disk_id,
            e.endpoints().join(","),
            e.prefix
        );
    }
    println!(
        "created {}: disk {} of {} ({}), {} stripes of {}, {} replica(s), {} extents of {} on {} servers allocated at master {}",
        a.output.display(),
        map.disk_id,
        fmt_bytes(a.size),
        a.size,
        a.stripes,
        fmt_size(a.stripe_size),
        a.replicas,
        map.extents.len() * a.replicas as usize,
        fmt_size(extent_size),
        servers.len(),
        c.addr()
    );
    Ok(())
}

/// A create that failed after asking for extents: gives them back (unless the disk had them
/// before), and says which disk and what became of its extents.
fn undo_create(c: &mut MasterClient, disk: &str, existed: bool, e: anyhow::Error) -> anyhow::Error {
    if existed {
        return e.context(format!(
            "disk {disk} already had extents at master {}: they are left allocated to it",
            c.addr()
        ));
    }
    // Short retries: the master answered a moment ago.
    c.retry_for = std::time::Duration::from_secs(10);
    match c.release(disk) {
        Ok(0) => e.context(format!("created nothing (disk {disk} got no extents)")),
        Ok(n) => e.context(format!(
            "created nothing: the {n} extents allocated to disk {disk} were given back to master {}",
            c.addr()
        )),
        Err(r) => e.context(format!(
            "disk {disk} keeps extents at master {} that could not be given back ({r}): run \
             'stripe-master release --master {} {disk}'",
            c.addr(),
            c.addr()
        )),
    }
}

fn info(a: &InfoArgs) -> Result<()> {
    let m = StripeMap::read(&a.map)?;
    let g = m.geometry;
    println!(
        "{}: disk {} from master {}",
        a.map.display(),
        m.disk_id,
        m.master
    );
    println!(
        "size {} ({} bytes), {} stripes of {}, {} replica(s), extents of {}",
        fmt_bytes(g.size),
        g.size,
        g.stripes,
        fmt_size(g.stripe_size),
        g.replicas,
        fmt_size(g.extent_size)
    );
    let stale: Vec<String> = match &m.store {
        stripe::map::Store::File => {
            match flock_holder(&a.map) {
                Some(pid) => println!("in use by pid {pid}"),
                None => println!("not in use"),
            }
            let mut stale_path = a.map.as_os_str().to_owned();
            stale_path.push(".stale");
            let stale = std::fs::read_to_string(&stale_path).unwrap_or_default();
            stale.lines().map(str::to_owned).collect()
        }
        stripe::map::Store::Etcd {
            endpoints,
            prefix,
            generation,
        } => {
            println!(
                "record in etcd {} under {prefix}; this file holds generation {generation}",
                endpoints.join(",")
            );
            let e =
                stripe_etcd::Etcd::connect(endpoints, prefix, std::time::Duration::from_secs(5))?;
            let (rec, _) = stripe_etcd::record::get(&e, &m.disk_id)?;
            println!("etcd has generation {}", rec.generation);
            let wk = e.key(&format!("writers/{}", m.disk_id));
            let mut cl = e.client();
            let w = e
                .block_on(cl.get(wk.as_str(), None))
                .map_err(|x| e.err(x))?;
            match w.kvs().first() {
                Some(kv) => println!(
                    "writer (fencing token {}): {}",
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.value())
                ),
                None => println!("no writer"),
            }
            rec.stale.iter().map(|(i, r)| format!("{i} {r}")).collect()
        }
    };
    println!(
        "{:>5} {:>3}  {:<22} {:<36} {:>4} {:>14}",
        "INDEX", "REP", "PORTAL", "TARGET", "LUN", "ADDRESS"
    );
    for (i, reps) in m.extents.iter().enumerate() {
        for (r, x) in reps.iter().enumerate() {
            let mark = if stale.contains(&format!("{i} {r}")) {
                "  stale"
            } else {
                ""
            };
            println!(
                "{i:>5} {r:>3}  {:<22} {:<36} {:>4} {:>14}{mark}",
                x.portal, x.target, x.lun, x.addr
            );
        }
    }
    Ok(())
}

fn delete(a: &DeleteArgs) -> Result<()> {
    let m = StripeMap::read(&a.map)?;
    if let stripe::map::Store::Etcd {
        endpoints, prefix, ..
    } = &m.store
    {
        if m.master == "-" {
            bail!("{} names no master; remove it by hand", a.map.display());
        }
        // The record goes first, and only while no tapdisk holds the disk.
        let e = stripe_etcd::Etcd::connect(endpoints, prefix, std::time::Duration::from_secs(5))?;
        stripe_etcd::record::delete(&e, &m.disk_id)?;
        let mut c = MasterClient::new(&m.master);
        let n = c.release(&m.disk_id)?;
        std::fs::remove_file(&a.map).with_context(|| format!("removing {}", a.map.display()))?;
        println!(
            "deleted {}: its record in etcd, and {n} extents of disk {} given back to {}",
            a.map.display(),
            m.disk_id,
            m.master
        );
        return Ok(());
    }
    // Hold the lock while deleting, so a running tapdisk is never left without its file.
    let held = stripe::LockedMap::open(&a.map)?;
    let m = &held.map;
    if m.master == "-" {
        bail!("{} names no master; remove it by hand", a.map.display());
    }
    let mut c = MasterClient::new(&m.master);
    let n = c.release(&m.disk_id)?;
    std::fs::remove_file(&a.map).with_context(|| format!("removing {}", a.map.display()))?;
    let mut stale_path = a.map.as_os_str().to_owned();
    stale_path.push(".stale");
    let _ = std::fs::remove_file(stale_path);
    let _ = std::fs::remove_file(stripe::control::beside(&a.map, ".intent"));
    println!(
        "deleted {}: {n} extents of disk {} given back to {}",
        a.map.display(),
        m.disk_id,
        m.master
    );
    Ok(())
}

fn pull(a: &PullArgs) -> Result<()> {
    let Some(e) = a.etcd.connect()? else {
        bail!("give --etcd URL (or $STRIPE_ETCD)");
    };
    let (rec, _) = stripe_etcd::record::get(&e, &a.disk)?;
    stripe_etcd::record::write_cache(&e, &rec, &a.output)?;
    println!(
        "wrote {}: disk {} generation {} from etcd {}",
        a.output.display(),
        rec.disk_id,
        rec.generation,
        e.endpoints().join(",")
    );
    Ok(())
}
