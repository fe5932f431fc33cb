//! Two VBDs on one raw image: a read-write VBD locks its `aio:` image, so a second one that
//! would write it too (in another tapdisk or the same one), or read it while it is written,
//! is refused with a message naming the holder; `--force-share` overrides; readers share.

use std::path::Path;

use tapdisk_control::VbdSettings;
use tapdisk_e2e::*;

fn create(rundir: &Path, args: &[&str]) -> std::process::Output {
    tap_ctl(rundir)
        .arg("create")
        .args(args)
        .output()
        .expect("running tap-ctl")
}

fn destroy_all(rundir: &Path, minors: usize) {
    for m in 0..minors {
        let _ = tap_ctl(rundir)
            .args(["destroy", "-m", &m.to_string()])
            .output();
    }
}

/// Destroys what the test created in its run directories, also when it fails.
struct Cleanup<'a>(Vec<&'a Path>);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for r in &self.0 {
            destroy_all(r, 4);
        }
    }
}

fn pid_of(rundir: &Path) -> u32 {
    let ctl = std::fs::read_dir(tapdisk_control::RunDir(rundir.to_owned()).ctl_dir()).unwrap();
    ctl.flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("tapdisk-")?
                .strip_suffix(".sock")?
                .parse()
                .ok()
        })
        .expect("a tapdisk")
}

#[test]
fn a_raw_image_is_served_read_write_by_one_vbd_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_idir, img) = image(16 << 20).unwrap();
    let spec = format!("aio:{}", img.display());
    let (r1, r2) = (dir.path().join("run1"), dir.path().join("run2"));
    let _cleanup = Cleanup(vec![&r1, &r2]);
    run_ok(tap_ctl(&r1).args(["create", "-a", &spec]));
    let holder = pid_of(&r1);

    // Another tapdisk: refused read-write and read-only, naming the holder.
    for extra in [&[][..], &["-R"][..]] {
        let mut args = vec!["-a", spec.as_str()];
        args.extend_from_slice(extra);
        let out = create(&r2, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("--force-share"), "{err}");
        assert_holder_named(&err, &img, holder);
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // The same tapdisk, another minor: refused too.
    let out = tap_ctl(&r1)
        .args(["open", "-p", &holder.to_string(), "-a", &spec])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_holder_named(&err, &img, holder);

    // The override: served (unlocked), and the holder is logged.
    run_ok(tap_ctl(&r2).args(["create", "-a", &spec, "--force-share"]));
    run_ok(tap_ctl(&r2).args(["destroy", "-m", "0"]));

    // The holder's VBD swaps to the same image on unpause and keeps its lock.
    run_ok(tap_ctl(&r1).args(["pause", "-m", "0"]));
    run_ok(tap_ctl(&r1).args(["unpause", "-m", "0", "-a", &spec]));
    assert!(!create(&r2, &["-a", &spec]).status.success());

    // Once it is gone, the image is free.
    run_ok(tap_ctl(&r1).args(["destroy", "-m", "0"]));
    run_ok(tap_ctl(&r2).args(["create", "-a", &spec]));
    run_ok(tap_ctl(&r2).args(["destroy", "-m", "0"]));

    // Readers share an image; a writer is refused while they read.
    run_ok(tap_ctl(&r1).args(["create", "-a", &spec, "-R"]));
    run_ok(tap_ctl(&r2).args(["create", "-a", &spec, "-R"]));
    let td = Tapdisk::start().unwrap();
    let e = td.open(&spec, VbdSettings::default()).unwrap_err();
    assert!(e.to_string().contains("is in use by"), "{e}");
}

/// Swapping a VBD to an image another VBD writes is refused, and the VBD stays on its own.
#[test]
fn unpause_to_an_image_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, img_a) = image(16 << 20).unwrap();
    let (_b, img_b) = image(16 << 20).unwrap();
    let (ra, rb) = (dir.path().join("ra"), dir.path().join("rb"));
    let _cleanup = Cleanup(vec![&ra, &rb]);
    run_ok(tap_ctl(&ra).args(["create", "-a", &format!("aio:{}", img_a.display())]));
    run_ok(tap_ctl(&rb).args(["create", "-a", &format!("aio:{}", img_b.display())]));
    run_ok(tap_ctl(&rb).args(["pause", "-m", "0"]));
    let out = tap_ctl(&rb)
        .args([
            "unpause",
            "-m",
            "0",
            "-a",
            &format!("aio:{}", img_a.display()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_holder_named(&err, &img_a, pid_of(&ra));
    let list = String::from_utf8(run_ok(tap_ctl(&rb).args(["list"])).stdout).unwrap();
    // blktap3's flag word: PAUSED is 0x20.
    let paused = list
        .split_whitespace()
        .find_map(|w| w.strip_prefix("state=0x"))
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .is_some_and(|f| f & 0x20 != 0);
    assert!(
        list.contains(&format!("args=aio:{}", img_b.display())) && paused,
        "{list}"
    );
    run_ok(tap_ctl(&rb).args(["unpause", "-m", "0"]));
}
