//! `vhd-util`: VHD images from the command line, with the verbs, flags and output of blktap's
//! `vhd-util` that xapi's storage manager (sm) runs and parses.
//!
//! Every verb is a thin call into the `vhd` library. What sm parses is printed exactly as
//! blktap prints it: `query` (one value per line, in blktap's order), `read -p` (the header
//! summaries), `read -B` (the allocation bitmap, raw), `coalesce` ("Coalesced N sectors"),
//! `check` ("NAME is valid"), `scan` (`vhd=... capacity=... size=... hidden=... parent=...`).
//! Errors are one line on stderr, `vhd-util: ...`, with a non-zero exit status. blktap's
//! `--debug` is accepted anywhere and ignored.

mod cli;
mod print;
mod scan;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vhd::{Chain, ChainOptions, CheckOptions, CreateOptions, DiskType, ParentSet, SnapshotOptions};

use cli::{Cli, Command};

const MB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MB;

fn main() -> ExitCode {
    // blktap drops `--debug` wherever it appears; so do we.
    let args = std::env::args_os().filter(|a| a != "--debug");
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other error: the first line of clap's message.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("vhd-util: {first} (see vhd-util --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("vhd-util: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn open_ro(name: &Path) -> Result<vhd::Image> {
    let b = vhd::FileBacking::open(name, true)
        .with_context(|| format!("opening {}", name.display()))?;
    Ok(vhd::Image::open(
        Box::new(b),
        &name.display().to_string(),
        &vhd::OpenOptions::default(),
    )?)
}

fn open_rw(name: &Path) -> Result<vhd::Image> {
    let b = vhd::FileBacking::open(name, false)
        .with_context(|| format!("opening {}", name.display()))?;
    let o = vhd::OpenOptions {
        read_only: false,
        ..Default::default()
    };
    Ok(vhd::Image::open(
        Box::new(b),
        &name.display().to_string(),
        &o,
    )?)
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Create(a) => {
            if a.max_size != 0 && a.max_size < a.size {
                bail!("-S {} must be at least -s {}", a.max_size, a.size);
            }
            // blktap rounds sizes up to whole 2 MiB blocks.
            let size = (a.size * MB).div_ceil(BLOCK) * BLOCK;
            let mut o = CreateOptions::dynamic(size);
            o.max_size = (a.max_size * MB).div_ceil(BLOCK) * BLOCK;
            if a.reserve {
                o.disk_type = DiskType::Fixed;
            }
            vhd::create(&a.name, &o)?;
        }
        Command::Snapshot(a) => {
            let o = SnapshotOptions {
                raw_parent: a.raw_parent,
                link_empty: a.link_empty,
                size: 0,
                max_size: a.max_size * MB,
            };
            if a.limit > 0 && !a.raw_parent {
                let set = ParentSet::new();
                let ro = ChainOptions {
                    read_only: true,
                    cache_slots: 16,
                    parent_cache_slots: 16,
                    ..Default::default()
                };
                let depth = Chain::open(&a.parent, &ro, &set)?.depth();
                if depth + 1 > a.limit {
                    bail!(
                        "snapshot depth exceeded: current depth: {depth}, limit: {}",
                        a.limit
                    );
                }
            }
            vhd::snapshot(&a.name, &a.parent, &o)?;
        }
        Command::Query(a) => query(a)?,
        Command::Read(a) => print::read(a)?,
        Command::Set(a) => {
            if a.value > 255 {
                bail!("invalid value {}: 0..=255", a.value);
            }
            let mut img = open_rw(&a.name)?;
            match a.field.as_str() {
                "hidden" => img.set_hidden(a.value as u8)?,
                "marker" => img.set_marker(a.value as u8)?,
                f => bail!("invalid field {f}: 'hidden' or 'marker'"),
            }
        }
        Command::Check(a) => {
            let o = CheckOptions {
                ignore_missing_footer: a.ignore_missing_footer,
                skip_parent: a.ignore_parent_uuid,
                parents: a.parents,
            };
            let r = vhd::check(&a.name, &o)
                .with_context(|| format!("{} appears invalid", a.name.display()))?;
            if r.clean() {
                println!("{} is valid", a.name.display());
            } else {
                for p in &r.problems {
                    println!("{p}");
                }
                bail!(
                    "{} appears invalid ({} problems)",
                    a.name.display(),
                    r.problems.len()
                );
            }
        }
        Command::Coalesce(a) => {
            let n = vhd::coalesce(&a.name)?;
            println!("Coalesced {n} sectors");
        }
        Command::Resize(a) => {
            if a.journal.is_none() && !a.fast {
                bail!("resize needs -j JOURNAL or -f");
            }
            let mut img = open_rw(&a.name)?;
            let size = if img.disk_type() == DiskType::Fixed {
                a.size * MB
            } else {
                (a.size * MB).div_ceil(BLOCK) * BLOCK
            };
            match &a.journal {
                // Past the reserved room only with a journal, as blktap.
                Some(j) if size > img.max_fast_size() && img.disk_type() != DiskType::Fixed => {
                    drop(img);
                    vhd::grow(&a.name, size, j)?;
                }
                _ => img.set_size(size)?,
            }
        }
        Command::Repair(a) => {
            let mut img = open_rw(&a.name)?;
            img.repair()?;
        }
        Command::Modify(a) => {
            let mut img = open_rw(&a.name)?;
            if a.zero {
                img.zero_all()?;
            }
            if let Some(s) = a.phys_size {
                img.set_phys_size(s)?;
            }
            if let Some(p) = &a.parent {
                img.set_parent(&a.name, p, a.raw_parent)?;
            }
        }
        Command::Scan(a) => scan::scan(a)?,
        Command::Revert(a) => vhd::revert(&a.name, &a.journal)?,
    }
    Ok(())
}

fn query(a: cli::QueryArgs) -> Result<()> {
    let mut img = open_ro(&a.name)?;
    let mut out = String::new();
    let mut failed = None;
    if a.virt {
        out += &format!("{}\n", img.size() >> 20);
    }
    if a.phys {
        out += &format!("{}\n", img.end_of_data() + 512);
    }
    if a.parent {
        if img.disk_type() != DiskType::Differencing {
            out += &format!("{} has no parent\n", a.name.display());
        } else {
            match vhd::find_parent(&img, &a.name, !a.unresolved) {
                Ok(p) => out += &format!("{}\n", p.path.display()),
                Err(e) => {
                    out += "query failed\n";
                    failed = Some(e);
                }
            }
        }
    }
    if a.fields {
        out += &format!("hidden: {}\n", img.footer().hidden);
    }
    if a.marker {
        out += &format!("marker: {}\n", img.marker());
    }
    if a.depth {
        let set = ParentSet::new();
        let o = ChainOptions {
            read_only: true,
            cache_slots: 16,
            parent_cache_slots: 16,
            ..Default::default()
        };
        // A raw parent counts as a level, as in blktap.
        let c = Chain::open(&a.name, &o, &set)?;
        out += &format!("chain depth: {}\n", c.depth());
    }
    if a.allocated {
        if img.disk_type() == DiskType::Fixed {
            print!("{out}");
            bail!("-a: {} is a fixed disk, it has no BAT", a.name.display());
        }
        out += &format!("{}\n", img.allocated_blocks()?);
    }
    if a.max_fast {
        out += &format!("{}\n", img.max_fast_size() >> 20);
    }
    print!("{out}");
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
