//! `vhd-util scan`: one line per image, as sm's `_parseVHDInfo` reads it:
//! `vhd=NAME capacity=BYTES size=BYTES hidden=N parent=NAME|none`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use vhd::DiskType;

use crate::cli::ScanArgs;

/// Whether `name` matches `pat` (`*` and `?` wildcards).
fn matches(pat: &[u8], name: &[u8]) -> bool {
    match (pat.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            matches(&pat[1..], name) || (!name.is_empty() && matches(pat, &name[1..]))
        }
        (Some(b'?'), Some(_)) => matches(&pat[1..], &name[1..]),
        (Some(a), Some(b)) if a == b => matches(&pat[1..], &name[1..]),
        _ => false,
    }
}

fn glob(pattern: &str) -> Result<Vec<PathBuf>> {
    let p = Path::new(pattern);
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(file) = p.file_name() else {
        bail!("no file name in the pattern {pattern}");
    };
    let pat = file.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if matches(pat.as_bytes(), name.as_bytes()) {
            out.push(dir.join(name));
        }
    }
    out.sort();
    Ok(out)
}

pub fn scan(a: ScanArgs) -> Result<()> {
    if a.volume_group.is_some() {
        bail!("LVM volume groups (-l) are not supported");
    }
    let mut files: Vec<PathBuf> = a.files.clone();
    if let Some(p) = &a.pattern {
        files.extend(glob(p)?);
    }
    let mut seen = BTreeSet::new();
    let mut queue: Vec<PathBuf> = files;
    let mut i = 0;
    while i < queue.len() {
        let f = queue[i].clone();
        i += 1;
        if !seen.insert(f.clone()) {
            continue;
        }
        let show = |p: &Path| {
            if a.verbose {
                p.display().to_string()
            } else {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }
        };
        let img = match crate::open_ro(&f) {
            Ok(i) => i,
            Err(e) => {
                if !a.continue_on_error {
                    return Err(e);
                }
                println!("vhd={} scan-error=-22 error-message='{e:#}'", f.display());
                continue;
            }
        };
        let parent = if img.disk_type() == DiskType::Differencing {
            match vhd::find_parent(&img, &f, true) {
                Ok(p) => {
                    if a.parents {
                        queue.push(p.path.clone());
                    }
                    show(&p.path)
                }
                Err(_) => match vhd::find_parent(&img, &f, false) {
                    Ok(p) => show(&p.path),
                    Err(_) => "none".into(),
                },
            }
        } else {
            "none".into()
        };
        println!(
            "vhd={} capacity={} size={} hidden={} parent={parent}",
            show(&f),
            img.size(),
            img.end_of_data() + 512,
            img.footer().hidden
        );
    }
    Ok(())
}
