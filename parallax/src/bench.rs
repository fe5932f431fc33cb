//! Measurements the thesis made on Parallax (section 3.5), for `parallax-img bench-cache`,
//! `parallax-img bench-io` and `td-bench thesis`.
//!
//! - [`cache_experiment`]: Table 3.7, metadata cache misses for 32768 sequential 4 KiB writes
//!   with N cache slots (the thesis: V2P 0 %, P2M 0.98 % at 10 slots, none at 128).
//! - [`throughput`]: Table 3.6, sequential throughput through Parallax against the same IO on
//!   a plain file in the same directory, measured in the same run.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::backing::MemBacking;
use crate::cache::CacheStats;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::image::{CreateOptions, Image};

/// The thesis's Table 3.7: `(slots, V2P miss %, P2M miss %)`.
pub const THESIS_MISS_RATES: [(usize, f64, f64); 2] = [(10, 0.0, 0.98), (128, 0.0, 0.0)];

/// The thesis's Table 3.6: `(block size KiB, MB/s without Parallax, MB/s with Parallax)`.
/// ("Virtual disk 2" is the plain one, "virtual disk 1" the Parallax one.)
pub const THESIS_THROUGHPUT: [(u64, f64, f64); 4] = [
    (4, 20.0, 18.0),
    (8, 31.0, 29.0),
    (16, 46.0, 40.0),
    (32, 64.0, 59.0),
];

/// Cache counters of one run of the miss-rate experiment.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CacheExperiment {
    /// Cache slots.
    pub slots: usize,
    /// Writes issued.
    pub writes: u64,
    /// Bytes per write.
    pub write_size: u64,
    /// Writing a fresh disk (the thesis's workload), flushing at the end.
    pub fresh: CacheStats,
    /// Writing the same blocks again after the cache was emptied (every node must be read
    /// once: compulsory misses).
    pub rewrite_cold: CacheStats,
}

/// Issues `writes` sequential writes of `write_size` bytes to a fresh in-memory disk whose
/// image has `slots` cache slots, flushes, and reports the cache counters; then empties the
/// cache and does it again over the same blocks.
pub fn cache_experiment(slots: usize, writes: u64, write_size: u64) -> Result<CacheExperiment> {
    if write_size == 0 || !write_size.is_multiple_of(512) || writes == 0 {
        return Err(Error::Invalid(
            "the write size must be a positive multiple of 512 and writes at least 1".into(),
        ));
    }
    let size = (writes * write_size).next_multiple_of(1 << 20);
    let mut o = CreateOptions::new(size);
    o.cache_slots = slots;
    let mut img = Image::create(MemBacking::new(), &o)?;
    let vol = img.volume(crate::image::DEFAULT_VOLUME)?;
    let buf = vec![0x5au8; write_size as usize];
    let pass = |img: &mut Image<MemBacking>| -> Result<CacheStats> {
        let before = img.stats();
        for i in 0..writes {
            img.write_at(vol, i * write_size, &buf)?;
        }
        img.flush()?;
        Ok(img.stats().since(&before))
    };
    let fresh = pass(&mut img)?;
    img.drop_cache()?;
    let rewrite_cold = pass(&mut img)?;
    Ok(CacheExperiment {
        slots,
        writes,
        write_size,
        fresh,
        rewrite_cold,
    })
}

/// Sequential throughput, in MB/s (10^6 bytes per second), through Parallax and on a plain
/// file, for one block size.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Throughput {
    /// Bytes per IO.
    pub block_size: u64,
    /// Bytes moved per pass.
    pub bytes: u64,
    /// Writing a new plain file, then fdatasync.
    pub raw_write: f64,
    /// Writing a new Parallax disk (allocating every block), then a commit.
    pub plx_write: f64,
    /// Writing the plain file again.
    pub raw_rewrite: f64,
    /// Writing the Parallax disk again (blocks in place), then a commit.
    pub plx_rewrite: f64,
    /// Reading the plain file (its pages dropped from the page cache first).
    pub raw_read: f64,
    /// Reading the Parallax disk (pages dropped likewise; metadata cache cold).
    pub plx_read: f64,
    /// CPU time of this thread per IO, in microseconds, in the same six passes (user and
    /// kernel time: what the IOs cost the machine, whatever else runs on it).
    pub cpu_us: [f64; 6],
}

/// CPU time this thread has used, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, a live local.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn drop_pages(f: &File) {
    // SAFETY: posix_fadvise on a descriptor the caller owns; no memory is passed.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Measures sequential IO of `bytes` bytes in `block_size` pieces on a plain file and through
/// Parallax's synchronous API ([`Disk::write_at`], [`Disk::read_at`]), both in `dir`, and
/// returns the medians of `repeat` runs. Within a run the two alternate every 1/16 of the
/// size, so that a busy machine slows both alike. Writes are timed with their final sync
/// (fdatasync, a Parallax commit); reads follow `posix_fadvise(DONTNEED)` on both files.
/// The files are removed afterwards.
pub fn throughput(dir: &Path, bytes: u64, block_size: u64, repeat: u32) -> Result<Throughput> {
    if block_size == 0 || !block_size.is_multiple_of(512) || bytes < block_size {
        return Err(Error::Invalid(
            "block size must be a positive multiple of 512, no larger than the size".into(),
        ));
    }
    let bytes = bytes / block_size * block_size;
    let io = |what: &str, e| Error::io(what.to_string(), e);
    let raw_path = dir.join(format!("parallax-bench-{}.raw", std::process::id()));
    let plx_path = dir.join(format!("parallax-bench-{}.plx", std::process::id()));
    let mut runs: [Vec<f64>; 6] = Default::default();
    let mut cpu: [Vec<f64>; 6] = Default::default();
    let buf = vec![0xa5u8; block_size as usize];
    let mut rbuf = vec![0u8; block_size as usize];
    let blocks = bytes / block_size;
    let chunks: Vec<(u64, u64)> = (0..16)
        .map(|c| {
            (
                blocks * c / 16 * block_size,
                blocks * (c + 1) / 16 * block_size,
            )
        })
        .filter(|(a, b)| b > a)
        .collect();
    let result = (|| -> Result<()> {
        for _ in 0..repeat.max(1) {
            let _ = std::fs::remove_file(&raw_path);
            let _ = std::fs::remove_file(&plx_path);
            let raw = FsOpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&raw_path)
                .map_err(|e| io("creating the plain file", e))?;
            let mut plx = Disk::create(&plx_path, &CreateOptions::new(bytes))?;
            for pass in 0..3 {
                let (mut t_raw, mut t_plx) = (0f64, 0f64);
                let (mut c_raw, mut c_plx) = (0f64, 0f64);
                if pass == 2 {
                    drop_pages(&raw);
                    plx.image_mut().drop_cache()?;
                    drop_pages(plx.file());
                }
                for &(from, to) in &chunks {
                    let c = thread_cpu();
                    let t = Instant::now();
                    for off in (from..to).step_by(block_size as usize) {
                        if pass < 2 {
                            raw.write_all_at(&buf, off).map_err(|e| io("writing", e))?;
                        } else {
                            raw.read_exact_at(&mut rbuf, off)
                                .map_err(|e| io("reading", e))?;
                        }
                    }
                    t_raw += t.elapsed().as_secs_f64();
                    c_raw += thread_cpu() - c;
                    let c = thread_cpu();
                    let t = Instant::now();
                    for off in (from..to).step_by(block_size as usize) {
                        if pass < 2 {
                            plx.write_at(off, &buf)?;
                        } else {
                            plx.read_at(off, &mut rbuf)?;
                        }
                    }
                    t_plx += t.elapsed().as_secs_f64();
                    c_plx += thread_cpu() - c;
                }
                if pass < 2 {
                    let (c, t) = (thread_cpu(), Instant::now());
                    raw.sync_data().map_err(|e| io("syncing", e))?;
                    t_raw += t.elapsed().as_secs_f64();
                    c_raw += thread_cpu() - c;
                    let (c, t) = (thread_cpu(), Instant::now());
                    plx.flush()?;
                    t_plx += t.elapsed().as_secs_f64();
                    c_plx += thread_cpu() - c;
                }
                runs[pass * 2].push(bytes as f64 / t_raw / 1e6);
                runs[pass * 2 + 1].push(bytes as f64 / t_plx / 1e6);
                cpu[pass * 2].push(c_raw * 1e6 / blocks as f64);
                cpu[pass * 2 + 1].push(c_plx * 1e6 / blocks as f64);
            }
            drop(raw);
            drop(plx);
            std::fs::remove_file(&raw_path).map_err(|e| io("removing the plain file", e))?;
            std::fs::remove_file(&plx_path).map_err(|e| io("removing the Parallax file", e))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&raw_path);
    let _ = std::fs::remove_file(&plx_path);
    result?;
    let [a, b, c, d, e, f] = runs;
    let cpu_us = cpu.map(median);
    Ok(Throughput {
        cpu_us,
        block_size,
        bytes,
        raw_write: median(a),
        plx_write: median(b),
        raw_rewrite: median(c),
        plx_rewrite: median(d),
        raw_read: median(e),
        plx_read: median(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_experiment_counts() {
        let e = cache_experiment(10, 2048, 4096).unwrap();
        assert!(e.fresh.v2p.lookups >= 2048);
        assert!(e.fresh.p2m.lookups >= 2048);
        assert!(e.rewrite_cold.p2m.misses >= 8, "{e:?}");
        assert!(cache_experiment(10, 0, 4096).is_err());
    }

    #[test]
    fn throughput_runs() {
        let dir = tempfile::tempdir().unwrap();
        let t = throughput(dir.path(), 1 << 20, 8192, 1).unwrap();
        assert!(t.raw_write > 0.0 && t.plx_read > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[cfg(test)]
mod perf {
    use super::*;
    use std::time::Instant;

    /// Nanoseconds per mapping call, without data IO (run with --release --ignored).
    #[test]
    #[ignore]
    fn mapping_cost() {
        let size = 256u64 << 20;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = Disk::create(&dir.path().join("p"), &CreateOptions::new(size)).unwrap();
        let mut img = d.into_image();
        let v = img.volume("base").unwrap();
        for bs in [4096u64, 32768] {
            let n = size / bs;
            let t = Instant::now();
            for i in 0..n {
                img.map_write(v, i * bs, bs).unwrap();
            }
            let w_new = t.elapsed().as_nanos() as f64 / n as f64;
            img.flush().unwrap();
            let t = Instant::now();
            for i in 0..n {
                img.map_write(v, i * bs, bs).unwrap();
            }
            let w = t.elapsed().as_nanos() as f64 / n as f64;
            let t = Instant::now();
            for i in 0..n {
                img.map_read(v, i * bs, bs).unwrap();
            }
            let r = t.elapsed().as_nanos() as f64 / n as f64;
            eprintln!(
                "bs {bs}: map_write new {w_new:.0} ns, map_write {w:.0} ns, map_read {r:.0} ns"
            );
            img.discard(v, 0, size).unwrap();
            img.flush().unwrap();
        }
    }
}
