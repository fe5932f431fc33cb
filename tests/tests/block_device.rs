//! `aio:` on a real block device (a loop device over a file): size from BLKGETSIZE64, IO with
//! O_DIRECT, discard through BLKDISCARD.

use std::process::Command;
use std::time::Duration;

use blkif::local::{FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::{op, status};
use blkif::Segment;
use tapdisk_e2e::*;

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn aio_on_a_loop_device() {
    let (_d, img) = image(8 << 20).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&img)
        .output()
        .expect("losetup (util-linux) must be installed");
    assert!(
        out.status.success(),
        "losetup failed (needs root and loop devices): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let td = Tapdisk::start().unwrap();
    let vbd = td
        .open(&format!("aio:{}", dev.0), Default::default())
        .unwrap();
    assert_eq!(vbd.size, 8 << 20);
    let mut f = LocalFrontend::connect(
        vbd.device.as_ref(),
        FrontendConfig {
            mem_pages: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let t = Some(Duration::from_secs(10));
    let done = |f: &mut LocalFrontend| {
        f.push().unwrap();
        assert!(f.wait(t).unwrap());
        let mut st = vec![];
        f.poll(|r| st.push(r.status));
        st
    };
    f.write_mem(0, &[0x3c; 4096]);
    let seg = |g| {
        [Segment {
            gref: g,
            first_sect: 0,
            last_sect: 7,
            pad: 0,
        }]
    };
    assert!(f.queue(&FrontRequest::Rw {
        op: op::WRITE,
        id: 1,
        sector: 1024,
        segments: &seg(0)
    }));
    assert_eq!(done(&mut f), vec![status::OKAY]);
    assert!(f.queue(&FrontRequest::Rw {
        op: op::FLUSH_DISKCACHE,
        id: 2,
        sector: 0,
        segments: &[]
    }));
    assert_eq!(done(&mut f), vec![status::OKAY]);
    // The bytes reached the file behind the loop device.
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[1024 * 512..1024 * 512 + 4096], &[0x3c; 4096][..]);
    assert!(f.queue(&FrontRequest::Discard {
        id: 3,
        sector: 1024,
        nr_sectors: 8,
        secure: false
    }));
    assert_eq!(done(&mut f), vec![status::OKAY]);
    assert!(f.queue(&FrontRequest::Rw {
        op: op::READ,
        id: 4,
        sector: 1024,
        segments: &seg(1)
    }));
    assert_eq!(done(&mut f), vec![status::OKAY]);
    let mut b = [9u8; 4096];
    f.read_mem(4096, &mut b);
    assert_eq!(
        b, [0; 4096],
        "a discarded loop-device range reads back as zeroes"
    );
    let s = td.stats(vbd.minor).unwrap();
    assert_eq!(s["ring"]["discard"]["requests"], 1);
}
