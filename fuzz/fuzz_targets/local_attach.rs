//! The local transport's attach handshake fed arbitrary bytes (and no descriptors): it must be
//! refused with an error, never a panic or a hang.
#![no_main]
use blkif::local::{accept, AttachLimits};
use blkif::request::DiskInfo;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::unix::net::UnixStream;

fuzz_target!(|data: &[u8]| {
    let Ok((mut a, b)) = UnixStream::pair() else {
        return;
    };
    let info = DiskInfo::writable(8);
    let mut line = data[..data.len().min(8192)].to_vec();
    line.push(b'\n');
    let _ = a.write_all(&line);
    drop(a);
    assert!(accept(b, &AttachLimits::default(), &info).is_err());
});
