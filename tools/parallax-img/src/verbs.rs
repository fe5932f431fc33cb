//! The image verbs of `parallax-img`.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use parallax::disk::open_image;
use parallax::{
    Backing, CreateOptions, DiskSpec, FileBacking, Image, OpenOptions as ImgOpen, VolumeKind,
};
use serde::Serialize;
use td_cli::emit;
use td_cli::{fmt_bytes, parse_size};

use super::{fmt_time, Progress};

/// Examples shown by `parallax-img create --help`.
pub const CREATE_EXAMPLES: &str = "\
Examples:
  parallax-img create vm1.plx --size 20G
  parallax-img create big.plx --size 2T --block-size 64k --name root";

/// Examples shown by `parallax-img snapshot --help`.
pub const SNAPSHOT_EXAMPLES: &str = "\
Examples:
  parallax-img snapshot vm1.plx nightly-2024-05-01     # of vm1.plx@base
  parallax-img snapshot vm1.plx@test before-patch      # of another disk";

/// Examples shown by `parallax-img clone --help`.
pub const CLONE_EXAMPLES: &str = "\
Examples:
  parallax-img clone vm1.plx@nightly-2024-05-01 restore-test
  tap-ctl create -a parallax:vm1.plx@restore-test";

fn open(spec_path: &Path, write: bool) -> Result<Image<FileBacking>> {
    let o = ImgOpen {
        cache_slots: parallax::DEFAULT_SLOTS,
        read_only: !write,
    };
    open_image(spec_path, &o).with_context(|| spec_path.display().to_string())
}

fn label(p: &Path) -> String {
    p.display().to_string()
}

/// Options of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image file to create (it must not exist), or a block device to format (whatever it
    /// holds is lost).
    pub path: PathBuf,
    /// Virtual size of the disk, a multiple of 512 bytes: e.g. 20G, 512M, 1T.
    #[arg(long, short, value_parser = parse_size)]
    pub size: u64,
    /// Data block size: 4k, 8k, 16k, 32k or 64k. Writes smaller than a block copy the rest of
    /// it first when it is shared; larger blocks mean less metadata.
    #[arg(long, short, value_parser = parse_size, default_value = "4k")]
    pub block_size: u64,
    /// Name of the image's first disk.
    #[arg(long, default_value = parallax::DEFAULT_VOLUME)]
    pub name: String,
}

/// `create`.
pub fn create(a: &CreateArgs) -> Result<()> {
    let mut o = CreateOptions::new(a.size);
    o.block_size = a.block_size;
    o.name = a.name.clone();
    let is_device = std::fs::metadata(&a.path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let d = if is_device {
        // A block device is formatted in place (whatever it held is lost).
        let b = parallax::disk::open_backing(&a.path, false).with_context(|| label(&a.path))?;
        let img = Image::create(b, &o).with_context(|| label(&a.path))?;
        parallax::Disk::from_image(img, &a.name, false)?
    } else {
        parallax::Disk::create(&a.path, &o).with_context(|| label(&a.path))?
    };
    emit(&format!(
        "created {}: disk '{}' of {} ({} bytes) in {}-byte blocks\n",
        label(&a.path),
        a.name,
        fmt_bytes(a.size),
        a.size,
        d.block_size()
    ))
}

/// Options of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image file.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info {
    path: String,
    format_version: u32,
    uuid: String,
    generation: u64,
    created: u64,
    committed: u64,
    virtual_size: u64,
    block_size: u64,
    v2p_levels: u8,
    p2m_levels: u8,
    volumes: usize,
    disks: usize,
    snapshots: usize,
    store_bytes: u64,
    store_used_bytes: u64,
    file_bytes_allocated: u64,
    features: String,
}

/// `info`.
pub fn info(a: &InfoArgs) -> Result<()> {
    let img = open(&a.path, false)?;
    let sb = img.superblock();
    let snapshots = img
        .volumes()
        .iter()
        .filter(|v| v.kind == VolumeKind::Snapshot)
        .count();
    let allocated = std::fs::metadata(&a.path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
    let i = Info {
        path: label(&a.path),
        format_version: parallax::format::VERSION,
        uuid,
        generation: sb.generation,
        created: sb.created,
        committed: sb.committed,
        virtual_size: sb.virtual_size,
        block_size: sb.data_block(),
        v2p_levels: sb.v2p_levels,
        p2m_levels: sb.p2m_levels,
        volumes: img.volumes().len(),
        disks: img.volumes().len() - snapshots,
        snapshots,
        store_bytes: sb.store_blocks * 4096,
        store_used_bytes: sb.used_machine * 4096,
        file_bytes_allocated: allocated,
        features: if sb.incompat | sb.ro_compat | sb.compat == 0 {
            "none".into()
        } else {
            format!(
                "incompat {:#x}, ro_compat {:#x}, compat {:#x}",
                sb.incompat, sb.ro_compat, sb.compat
            )
        },
    };
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&i)?));
    }
    emit(&format!(
        "image: {}\n\
         format: Parallax version {}, features {}\n\
         uuid: {}\n\
         virtual size: {} ({} bytes), {}-byte blocks, {} V2P levels\n\
         volumes: {} ({} disk(s), {} snapshot(s))\n\
         store: {} ({} in use, {} allocated on disk)\n\
         created: {}\n\
         last commit: {} (generation {})\n",
        i.path,
        i.format_version,
        i.features,
        i.uuid,
        fmt_bytes(i.virtual_size),
        i.virtual_size,
        i.block_size,
        i.v2p_levels,
        i.volumes,
        i.disks,
        i.snapshots,
        fmt_bytes(i.store_bytes),
        fmt_bytes(i.store_used_bytes),
        fmt_bytes(i.file_bytes_allocated),
        fmt_time(i.created),
        fmt_time(i.committed),
        i.generation
    ))
}

/// Options of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The image file.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    name: String,
    kind: VolumeKind,
    created: u64,
    created_utc: String,
    parent: Option<String>,
    mapped_bytes: u64,
    exclusive_bytes: u64,
}

/// `list`.
pub fn list(a: &ListArgs, p: &Progress) -> Result<()> {
    let mut img = open(&a.path, false)?;
    img.set_progress(p.callback("list"));
    let bs = img.block_size();
    let vols = img.volumes().to_vec();
    let mut rows = Vec::new();
    for v in &vols {
        let u = img
            .usage(parallax::VolumeId(v.id))
            .with_context(|| format!("{}@{}", label(&a.path), v.name))?;
        rows.push(Row {
            name: v.name.clone(),
            kind: v.kind,
            created: v.created,
            created_utc: fmt_time(v.created),
            parent: vols
                .iter()
                .find(|x| x.id == v.parent)
                .map(|x| x.name.clone())
                .or_else(|| (v.parent != 0).then(|| format!("(deleted #{})", v.parent))),
            mapped_bytes: u.mapped_blocks * bs,
            exclusive_bytes: u.exclusive_blocks * bs,
        });
    }
    p.clear();
    if a.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
    }
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let pw = rows
        .iter()
        .map(|r| r.parent.as_deref().unwrap_or("-").len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:w$}  {:8}  {:23}  {:pw$}  {:>10}  {:>10}\n",
        "NAME", "KIND", "CREATED", "PARENT", "MAPPED", "EXCLUSIVE"
    );
    for r in &rows {
        out.push_str(&format!(
            "{:w$}  {:8}  {:23}  {:pw$}  {:>10}  {:>10}\n",
            r.name,
            r.kind.to_string(),
            r.created_utc,
            r.parent.as_deref().unwrap_or("-"),
            fmt_bytes(r.mapped_bytes),
            fmt_bytes(r.exclusive_bytes)
        ));
    }
    emit(&out)
}

/// Options of `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The volume to snapshot: PATH (its disk 'base') or PATH@VOLUME.
    pub volume: DiskSpec,
    /// Name of the new snapshot: letters, digits and - _ . + : (at most 64).
    pub name: String,
}

/// `snapshot`.
pub fn snapshot(a: &SnapshotArgs) -> Result<()> {
    take(&a.volume, &a.name, true)
}

/// Options of `clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The volume to clone, usually a snapshot: PATH@VOLUME.
    pub volume: DiskSpec,
    /// Name of the new disk.
    pub name: String,
}

/// `clone`.
pub fn clone(a: &CloneArgs) -> Result<()> {
    take(&a.volume, &a.name, false)
}

fn take(spec: &DiskSpec, name: &str, snap: bool) -> Result<()> {
    let mut img = open(&spec.path, true)?;
    let ctx = || spec.to_string();
    let v = img.volume(spec.volume_name()).with_context(ctx)?;
    if snap {
        img.snapshot(v, name).with_context(ctx)?;
    } else {
        img.clone_volume(v, name).with_context(ctx)?;
    }
    img.flush().with_context(ctx)?;
    emit(&format!(
        "{} {}@{name} of {}\n",
        if snap { "took snapshot" } else { "made clone" },
        label(&spec.path),
        spec.volume_name()
    ))
}

/// Options of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The volume to delete, named explicitly: PATH@VOLUME.
    pub volume: DiskSpec,
}

/// `delete`.
pub fn delete(a: &DeleteArgs, p: &Progress) -> Result<()> {
    let Some(name) = a.volume.volume.as_deref() else {
        bail!(
            "name the volume to delete explicitly, as {}@VOLUME",
            label(&a.volume.path)
        );
    };
    let mut img = open(&a.volume.path, true)?;
    img.set_progress(p.callback("delete"));
    let ctx = || a.volume.to_string();
    let v = img.volume(name).with_context(ctx)?;
    let kind = img.volume_info(v).with_context(ctx)?.kind;
    let before = img.superblock().used_machine;
    let freed = img.delete(v).with_context(ctx)?;
    img.flush().with_context(ctx)?;
    let after = img.superblock().used_machine;
    p.clear();
    emit(&format!(
        "deleted {kind} {}: {freed} data blocks ({}) given back; store use {} -> {}\n",
        a.volume,
        fmt_bytes(freed * img.block_size()),
        fmt_bytes(before * 4096),
        fmt_bytes(after * 4096)
    ))
}

/// Options of `rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// The volume: PATH@VOLUME.
    pub volume: DiskSpec,
    /// Its new name.
    pub name: String,
}

/// `rename`.
pub fn rename(a: &RenameArgs) -> Result<()> {
    let mut img = open(&a.volume.path, true)?;
    let ctx = || a.volume.to_string();
    let v = img.volume(a.volume.volume_name()).with_context(ctx)?;
    img.rename(v, &a.name).with_context(ctx)?;
    img.flush().with_context(ctx)?;
    emit(&format!(
        "renamed {} to {}@{}\n",
        a.volume,
        label(&a.volume.path),
        a.name
    ))
}

/// Options of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image file.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `check`.
pub fn check(a: &CheckArgs, p: &Progress) -> Result<()> {
    let ctx = || label(&a.path);
    let b = parallax::disk::open_backing(&a.path, true).with_context(ctx)?;
    let mut cb = p.callback("check");
    let mut f = |what: &str, done: u64, total: u64| {
        if let Some(cb) = cb.as_mut() {
            cb(what, done, total)
        }
    };
    let r = parallax::check(&b, Some(&mut f)).with_context(ctx)?;
    p.clear();
    if a.json {
        emit::<anyhow::Error>(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else {
        emit::<anyhow::Error>(&format!("{}: {r}\n", label(&a.path)))?;
    }
    if !r.is_clean() {
        return Err(ProblemsFound(format!(
            "{}: check found {} problem(s)",
            label(&a.path),
            r.problem_count()
        ))
        .into());
    }
    Ok(())
}

/// `check` found problems (exit status 1); any other error of `check` means it could not
/// check (exit status 2).
#[derive(Debug)]
pub struct ProblemsFound(pub String);

impl std::fmt::Display for ProblemsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProblemsFound {}

/// Options of `defrag`.
#[derive(Debug, Args)]
pub struct DefragArgs {
    /// The volume: PATH (its disk 'base') or PATH@VOLUME.
    pub volume: DiskSpec,
}

/// `defrag`.
pub fn defrag(a: &DefragArgs, p: &Progress) -> Result<()> {
    let mut img = open(&a.volume.path, true)?;
    img.set_progress(p.callback("defrag"));
    let ctx = || a.volume.to_string();
    let v = img.volume(a.volume.volume_name()).with_context(ctx)?;
    let r = img.defrag(v).with_context(ctx)?;
    p.clear();
    emit(&format!(
        "{}: moved {} blocks; contiguous runs {} -> {}\n",
        a.volume, r.moved, r.extents_before, r.extents_after
    ))
}

/// Options of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume: PATH (its disk 'base') or PATH@VOLUME.
    pub volume: DiskSpec,
    /// The raw file to write.
    pub output: PathBuf,
    /// Overwrite the output if it exists.
    #[arg(long, short)]
    pub force: bool,
}

const CHUNK: u64 = 1 << 20;

/// `export`.
pub fn export(a: &ExportArgs, p: &Progress) -> Result<()> {
    let mut img = open(&a.volume.path, false)?;
    let ctx = || a.volume.to_string();
    let v = img.volume(a.volume.volume_name()).with_context(ctx)?;
    let size = img.size();
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .create_new(!a.force)
        .truncate(true)
        .open(&a.output)
        .map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => {
                anyhow!("{} exists (use --force to overwrite it)", label(&a.output))
            }
            _ => anyhow!("{}: {}", label(&a.output), td_cli::io_msg(&e)),
        })?;
    out.set_len(size)
        .map_err(|e| anyhow!("{}: {}", label(&a.output), td_cli::io_msg(&e)))?;
    let mut tick = p.callback("export");
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    let mut written = 0;
    while off < size {
        let ext = img
            .map_read(v, off, (size - off).min(CHUNK))
            .with_context(ctx)?;
        if let Some(m) = ext.machine {
            let b = &mut buf[..ext.len as usize];
            img.backing()
                .read_at(b, m)
                .map_err(|e| anyhow!("{}: reading: {}", ctx(), td_cli::io_msg(&e)))?;
            out.write_all_at(b, off)
                .map_err(|e| anyhow!("{}: {}", label(&a.output), td_cli::io_msg(&e)))?;
            written += ext.len;
        }
        off += ext.len;
        if let Some(t) = tick.as_mut() {
            t("bytes", off, size);
        }
    }
    out.sync_all()
        .map_err(|e| anyhow!("{}: {}", label(&a.output), td_cli::io_msg(&e)))?;
    p.clear();
    emit(&format!(
        "exported {} to {}: {} of data, the rest holes\n",
        a.volume,
        label(&a.output),
        fmt_bytes(written)
    ))
}

/// Options of `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The volume to write: PATH (its disk 'base') or PATH@VOLUME (a disk, not a snapshot).
    pub volume: DiskSpec,
    /// The raw file to read (no larger than the volume).
    pub input: PathBuf,
}

/// `import`.
pub fn import(a: &ImportArgs, p: &Progress) -> Result<()> {
    let mut img = open(&a.volume.path, true)?;
    let ctx = || a.volume.to_string();
    let v = img.volume(a.volume.volume_name()).with_context(ctx)?;
    let input = std::fs::File::open(&a.input)
        .map_err(|e| anyhow!("{}: {}", label(&a.input), td_cli::io_msg(&e)))?;
    let len = input
        .metadata()
        .map_err(|e| anyhow!("{}: {}", label(&a.input), td_cli::io_msg(&e)))?
        .len();
    if len > img.size() {
        bail!(
            "{} holds {len} bytes, more than the volume's {}",
            label(&a.input),
            img.size()
        );
    }
    let bs = img.block_size();
    let mut tick = p.callback("import");
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK) as usize;
        input
            .read_exact_at(&mut buf[..n], off)
            .map_err(|e| anyhow!("{}: {}", label(&a.input), td_cli::io_msg(&e)))?;
        // Whole zero blocks are discarded rather than written.
        let mut i = 0;
        while i < n {
            let end = (i + bs as usize).min(n);
            let piece = &buf[i..end];
            let at = off + i as u64;
            if piece.len() as u64 == bs && piece.iter().all(|&b| b == 0) {
                img.discard(v, at, bs).with_context(ctx)?;
            } else {
                img.write_at(v, at, piece).with_context(ctx)?;
            }
            i = end;
        }
        off += n as u64;
        if let Some(t) = tick.as_mut() {
            t("bytes", off, len);
        }
    }
    img.flush().with_context(ctx)?;
    p.clear();
    emit(&format!(
        "imported {} ({}) into {}\n",
        label(&a.input),
        fmt_bytes(len),
        a.volume
    ))
}
