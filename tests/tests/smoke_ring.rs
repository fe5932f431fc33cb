//! Quick ring round trip through a real tapdisk process.
use blkif::local::{FrontRequest, FrontendConfig, LocalFrontend};
use blkif::protocol::op;
use blkif::Segment;
use std::time::Duration;
use tapdisk_e2e::*;

#[test]
fn write_then_read_through_the_ring() {
    let td = Tapdisk::start().unwrap();
    let (_d, img) = image(1 << 20).unwrap();
    let vbd = td.open(&format!("aio:{}", img.display()), Default::default()).unwrap();
    let mut fe = LocalFrontend::connect(vbd.device.as_ref(), FrontendConfig { mem_pages: 16, ..Default::default() }).unwrap();
    fe.write_mem(0, &[0xabu8; 4096]);
    let seg = [Segment { gref: 0, first_sect: 0, last_sect: 7, pad: 0 }];
    assert!(fe.queue(&FrontRequest::Rw { op: op::WRITE, id: 1, sector: 8, segments: &seg }));
    fe.push().unwrap();
    assert!(fe.wait(Some(Duration::from_secs(10))).unwrap());
    let mut r = vec![];
    fe.poll(|x| r.push(x));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 0);
    let seg = [Segment { gref: 1, first_sect: 0, last_sect: 7, pad: 0 }];
    assert!(fe.queue(&FrontRequest::Rw { op: op::READ, id: 2, sector: 8, segments: &seg }));
    fe.push().unwrap();
    assert!(fe.wait(Some(Duration::from_secs(10))).unwrap());
    fe.poll(|x| r.push(x));
    assert_eq!(r[1].status, 0);
    let mut buf = [0u8; 4096];
    fe.read_mem(4096, &mut buf);
    assert_eq!(buf, [0xab; 4096]);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[4096..8192], &[0xab; 4096][..]);
    println!("{}", td.stats(vbd.minor).unwrap());
}
