//! The lock a VBD holds on its raw (`aio:`) image, so that two VBDs, in one tapdisk or in two,
//! cannot serve one image read-write without a word.
//!
//! It is an advisory `flock` on the image file (or block device node), the kind Parallax
//! images and stripe mapping files already take: exclusive for a read-write VBD, shared for a
//! read-only one, so readers share an image and a writer has it alone. A refused open names
//! the holder's pid (from `/proc`, [`stripe::map::flock_holder`]). The `force_share` setting
//! (`tap-ctl create/open --force-share`) overrides the refusal: the VBD then serves the image
//! without the lock if another holds it, and logs who does. `parallax-img` and
//! `stripe:` mapping files honour the same lock, so an `aio:` VBD and a Parallax writer of
//! one file exclude each other too.
//!
//! The lock belongs to the VBD, not to the image it opened: swapping images on unpause keeps
//! it when the new image is the same file, and takes the new file's before letting go of the
//! old one's otherwise.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use slog::{warn, Logger};

use crate::error::{Error, Result};
use crate::sys::file::try_flock;

/// A held lock on an image file.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
    dev: u64,
    ino: u64,
}

impl ImageLock {
    /// Whether `path` is the locked file.
    pub fn is_file(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

/// Locks the image at `path`: exclusively unless `read_only`. Refused (naming the holder)
/// if another open file holds a conflicting lock, unless `force_share`: then `Ok(None)` and a
/// warning. `Ok(None)` too where the file system has no `flock` (the image is served
/// unlocked).
pub fn lock_image(
    path: &Path,
    read_only: bool,
    force_share: bool,
    log: &Logger,
) -> Result<Option<ImageLock>> {
    let shown = path.display();
    let file = File::open(path)
        .map_err(|e| Error::io(format!("cannot open image {shown} to lock it"), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat image {shown}"), e))?;
    match try_flock(&file, !read_only) {
        Ok(true) => Ok(Some(ImageLock {
            _file: file,
            dev: meta.dev(),
            ino: meta.ino(),
        })),
        Ok(false) => {
            let holder = match stripe::map::flock_holder(path) {
                Some(pid) if pid == std::process::id() => {
                    format!("pid {pid} (this tapdisk, another of its VBDs)")
                }
                Some(pid) => format!("pid {pid} (another tapdisk, or a program holding its lock)"),
                None => "another process (another tapdisk, or a program holding its lock)".into(),
            };
            if force_share {
                warn!(log, "serving an image another process holds (force_share)";
                      "image" => %shown, "holder" => &holder, "read_only" => read_only);
                return Ok(None);
            }
            let how = if read_only { "read-only" } else { "read-write" };
            Err(Error::Refused(format!(
                "image {shown} is in use by {holder}: it cannot be served {how} here as well; \
                 close it there, or open it with --force-share (force_share) if sharing it is \
                 intended"
            )))
        }
        // No flock on this file system (some network file systems): served unlocked.
        Err(e) => {
            warn!(log, "the image cannot be locked; it is served unlocked"; "image" => %shown,
                  "error" => %e);
            Ok(None)
        }
    }
}
