//! The Xen side of tapdisk's control protocol, on a machine without Xen: a real tapdisk
//! process refuses `xen_connect` with a one-line reason (no gntdev, bad rings) and keeps
//! serving, `xen_disconnect` of a frontend it does not serve is an error, and `tapback` and
//! `xen-frontend` fail cleanly without xenstore. The rig (`tests/xen-rig`) covers the real thing.

use std::process::Command;

use blkif::xen::backend::GrantMode;
use blkif::xen::frontend_keys::{FrontendRings, QueueKeys};
use blkif::Abi;
use tapdisk_control::proto::{Command as Ctl, Reply, XenConnectSpec};
use tapdisk_control::VbdSettings;
use tapdisk_e2e::{bin, image, Tapdisk};

fn spec(queues: usize, order: u8) -> XenConnectSpec {
    XenConnectSpec {
        domid: 7,
        devid: 51712,
        vdev: "xvda".into(),
        rings: FrontendRings {
            abi: Abi::X86_64,
            ring_order: order,
            queues: (0..queues)
                .map(|q| QueueKeys {
                    ring_refs: (0..1u32 << order).map(|i| 8 + i + q as u32 * 16).collect(),
                    evtchn: 20 + q as u32,
                })
                .collect(),
            persistent: false,
        },
        grant_mode: GrantMode::Map,
        read_only: false,
        max_persistent_grants: None,
    }
}

#[test]
fn xen_connect_is_refused_cleanly_without_xen() {
    if std::path::Path::new("/dev/xen/gntdev").exists() {
        return; // a real dom0: the rig tests this
    }
    let (_d, img) = image(8 << 20).unwrap();
    let td = Tapdisk::start().unwrap();
    let vbd = td
        .open(&format!("aio:{}", img.display()), VbdSettings::default())
        .unwrap();
    let mut c = td.client().unwrap();
    let e = c
        .call(Ctl::XenConnect {
            minor: vbd.minor,
            spec: spec(2, 4),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("gntdev"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    // Limits are checked before any device is touched.
    let e = c
        .call(Ctl::XenConnect {
            minor: vbd.minor,
            spec: spec(17, 0),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("queues"), "{e}");
    let e = c
        .call(Ctl::XenConnect {
            minor: vbd.minor,
            spec: spec(1, 5),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("2^5 pages") && e.contains("--ring-order"), "{e}");
    let e = c
        .call(Ctl::XenDisconnect {
            minor: vbd.minor,
            domid: 7,
            devid: 51712,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("serves no Xen frontend"), "{e}");
    // Still serving, with no Xen attachment listed.
    match c.call(Ctl::List).unwrap() {
        Reply::List { vbds } => {
            assert_eq!(vbds.len(), 1);
            assert!(vbds[0].xen.is_empty());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn tapback_and_xen_frontend_fail_cleanly_without_xenstore() {
    if std::path::Path::new("/dev/xen/xenbus").exists() {
        return;
    }
    let out = Command::new(bin("tapback"))
        .env("XENSTORED_PATH", "/nonexistent/xenstored.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("tapback: cannot reach xenstore"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = Command::new(bin("tapback"))
        .args(["--max-queues", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-queues 0"));
    let out = Command::new(bin("tapback"))
        .args(["--grant-mode", "mmap"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Persistent grants are negotiated, not a mode to force on every frontend.
    let out = Command::new(bin("tapback"))
        .args(["--grant-mode", "persistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--feature-persistent"));
    let out = Command::new(bin("tapback"))
        .args(["--feature-persistent", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("xen-frontend"))
        .env("XENSTORED_PATH", "/nonexistent/xenstored.sock")
        .args(["--image", "aio:/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("XENFRONT: FAIL"));
}
