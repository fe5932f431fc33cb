//! `stripe-master`: the extent master of striped disks (thesis section 5.1) and the
//! operator's commands to talk to it.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use stripe::master::Store;
use stripe::master_server::Master;
use stripe::proto::{RegisterArgs, DEFAULT_PORT};
use stripe::MasterClient;
use td_cli::{fmt_bytes, fmt_size, parse_size as size_arg};

const LONG_ABOUT: &str = "\
The master of striped virtual disks: storage servers' extents are registered with it as
<portal, target, LUN, address>, and stripe-img asks it for extents when it creates a disk; each
extent is then locked to that disk. The master is needed only to create and delete disks, never
for their IO.

It speaks ONC RPC (Sun RPC) over TCP, port 20049 by default; the interface is stripe/master.x
in the source tree (rpcgen makes clients for other languages). Its state is one file in the
state folder, replaced atomically (fsync + rename) before each answer, so killing it at any
moment loses nothing it acknowledged and never gives one extent to two disks; calls are
idempotent, so clients simply retry. With --etcd the state lives in etcd instead (one key per
LUN, changed in compare-and-swap transactions): the master keeps nothing itself, and any number
of masters may serve the same state. It trusts its network: run it on the storage LAN.";

const EXAMPLES: &str = "\
Examples:
  stripe-master serve --state /var/lib/stripe-master --extent-size 1G
  stripe-master serve --etcd http://10.0.0.5:2379,http://10.0.0.6:2379 --extent-size 1G
  stripe-master register --master 10.0.0.1 iscsi://10.0.0.11/iqn.2026-11.lab:srv1/1
  stripe-master register --master 10.0.0.1 iscsi://10.0.0.12/iqn.2026-11.lab:srv2/1 --count 100
  stripe-master list --master 10.0.0.1
  stripe-master release --master 10.0.0.1 vm1-5f3a

Errors are one line on stderr, 'stripe-master: ...'. Exit status: 0 success, 1 failure,
2 bad command line.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "stripe-master",
    version,
    about = "The extent master of striped virtual disks, and its operator commands",
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
    /// Run the master (in the foreground; log lines on stderr).
    Serve(ServeArgs),
    /// Offer a storage server's LUN (or part of it) as extents.
    Register(RegisterCmd),
    /// List every extent and its owner.
    List(ListArgs),
    /// Give back every extent of a disk (its data is lost to it).
    Release(ReleaseArgs),
}

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// State folder (created if missing; locked while the master runs). The single-host
    /// default; give --etcd instead to share the state between masters.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    pub state: Option<PathBuf>,
    /// Keep the state in etcd (client URLs, comma-separated): the master is then stateless,
    /// and several may run at once (allocations are compare-and-swap transactions).
    #[arg(long, value_name = "URL[,URL...]", env = "STRIPE_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of the state in etcd.
    #[arg(long, value_name = "PREFIX", default_value = stripe_etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Address to listen on.
    #[arg(long, value_name = "IP:PORT", default_value_t = format!("0.0.0.0:{DEFAULT_PORT}"))]
    pub listen: String,
    /// Size of every extent (a multiple of 1M); needed when the state folder is new, and
    /// must match it otherwise.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub extent_size: Option<u64>,
}

/// Where the master is.
#[derive(Debug, Args)]
pub struct MasterAddr {
    /// The master's address (HOST or HOST:PORT).
    #[arg(long, short, value_name = "HOST[:PORT]", env = "STRIPE_MASTER")]
    pub master: String,
}

/// `register`.
#[derive(Debug, Args)]
pub struct RegisterCmd {
    #[command(flatten)]
    master: MasterAddr,
    /// The LUN, as iscsi://HOST[:PORT]/TARGET-IQN/LUN.
    #[arg(value_name = "ISCSI_URL")]
    pub url: String,
    /// First byte of the LUN to offer (a multiple of 4096).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, default_value = "0")]
    pub start: u64,
    /// Extents to offer (default: as many as fit in the LUN, asked with READ CAPACITY).
    #[arg(long)]
    pub count: Option<u32>,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    master: MasterAddr,
}

/// `release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    master: MasterAddr,
    /// The disk id (stripe-img info shows it).
    pub disk: String,
}

/// Parses `args` (the first is the program name), runs the command and returns the exit status.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    td_cli::main_for::<Cli, I, T, anyhow::Error>("stripe-master", args, run)
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.verb {
        Verb::Serve(a) => serve(a),
        Verb::Register(a) => register(a),
        Verb::List(a) => list(a),
        Verb::Release(a) => {
            let mut c = MasterClient::new(&a.master.master);
            let n = c.release(&a.disk)?;
            println!("released {n} extents of disk {}", a.disk);
            Ok(())
        }
    }
}

fn serve(a: &ServeArgs) -> Result<()> {
    use slog::Drain;
    let dec = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(dec).build().fuse();
    let log = slog::Logger::root(drain, slog::o!());
    let (m, l) = match (&a.state, &a.etcd) {
        (Some(dir), _) => {
            let (store, state) = Store::open(dir, a.extent_size)?;
            let l = TcpListener::bind(&a.listen)
                .with_context(|| format!("listening on {}", a.listen))?;
            let list = state.list();
            slog::info!(log, "stripe-master listening";
                "address" => %l.local_addr()?, "state" => %dir.display(),
                "extent_size" => fmt_size(state.extent_size()),
                "extents" => list.extents.len(),
                "allocated" => list.extents.iter().filter(|x| x.owner.is_some()).count());
            (Master::new(store, state, log), l)
        }
        (None, Some(eps)) => {
            let endpoints = stripe_etcd::Etcd::parse_endpoints(eps);
            let etcd = stripe_etcd::Etcd::connect(
                &endpoints,
                &a.etcd_prefix,
                std::time::Duration::from_secs(5),
            )?;
            let b = stripe_etcd::EtcdBackend::open(etcd, a.extent_size, log.clone())?;
            let l = TcpListener::bind(&a.listen)
                .with_context(|| format!("listening on {}", a.listen))?;
            slog::info!(log, "stripe-master listening (state in etcd)";
                "address" => %l.local_addr()?, "etcd" => eps, "prefix" => &a.etcd_prefix,
                "extent_size" => fmt_size(b.extent_size()));
            (Master::with_backend(Box::new(b), log), l)
        }
        (None, None) => bail!("give --state DIR or --etcd URL"),
    };
    m.serve(l)?;
    Ok(())
}

fn register(a: &RegisterCmd) -> Result<()> {
    let url: iscsi::Url = a.url.parse()?;
    let mut c = MasterClient::new(&a.master.master);
    let count = match a.count {
        Some(n) => n,
        None => {
            let es = c.list()?.extent_size;
            if es == 0 {
                bail!("the master has no extent size yet");
            }
            let mut cfg = iscsi::Config::new(url.portal.clone(), url.target.clone());
            cfg.chap = url.chap.clone();
            let cap = iscsi::Client::connect(&cfg, url.lun)
                .and_then(|mut cl| cl.read_capacity16())
                .with_context(|| format!("asking {} for its capacity", a.url))?;
            let n = cap.bytes().saturating_sub(a.start) / es;
            if n == 0 {
                bail!(
                    "{} has {} from {}: less than one extent of {}",
                    a.url,
                    fmt_bytes(cap.bytes().saturating_sub(a.start)),
                    a.start,
                    fmt_bytes(es)
                );
            }
            u32::try_from(n)
                .unwrap_or(u32::MAX)
                .min(stripe::proto::MAX_EXTENTS)
        }
    };
    let added = c.register(&RegisterArgs {
        portal: url.portal.clone(),
        target: url.target.clone(),
        lun: u32::from(url.lun),
        start: a.start,
        count,
    })?;
    println!(
        "registered {} {} LUN {}: {count} extents from byte {} ({added} new)",
        url.portal, url.target, url.lun, a.start
    );
    Ok(())
}

fn list(a: &ListArgs) -> Result<()> {
    let mut c = MasterClient::new(&a.master.master);
    let l = c.list()?;
    let used = l.extents.iter().filter(|x| x.owner.is_some()).count();
    println!(
        "{} extents of {} ({} allocated, {} free)",
        l.extents.len(),
        fmt_size(l.extent_size),
        used,
        l.extents.len() - used
    );
    println!(
        "{:>6}  {:<22} {:<36} {:>4} {:>14}  OWNER",
        "ID", "PORTAL", "TARGET", "LUN", "ADDRESS"
    );
    for x in &l.extents {
        let owner = match &x.owner {
            Some((d, i, r)) => format!("{d} index {i} replica {r}"),
            None => "-".into(),
        };
        println!(
            "{:>6}  {:<22} {:<36} {:>4} {:>14}  {owner}",
            x.extent.id, x.extent.portal, x.extent.target, x.extent.lun, x.extent.addr
        );
    }
    Ok(())
}
